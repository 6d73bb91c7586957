"""Fréchet Video Distance: the Kinetics-400 I3D network, its preprocessing, the distance.

FVD (Unterthiner et al. 2018) is the Fréchet distance between two Gaussians fitted
to I3D features of real and of generated videos. The standard recipe, which the
NBP paper follows: 16 frames per video, frames resized to 224x224 (bilinear),
pixel values scaled to [-1, 1], the 400-d logits of the Kinetics-400 I3D (the
TF-Hub "i3d-kinetics-400" model, Carreira & Zisserman 2017) as the features.

Dimension letters: N videos, F frames, H height, W width, C channels, D feature
width (400 for I3D), T, Y, X the time and space axes inside the network.

Weights are never downloaded here. `load_i3d(path)` reads a file the user
converted once, in this format (`save_i3d` writes it):

  * `.npz` (numpy.savez) or `.msgpack` (`flax.serialization.msgpack_serialize`
    of a flat dict): one array per key, the key the "/"-joined path of the
    variable inside `InceptionI3D`, without the collection name, e.g.
      Conv3d_1a_7x7/conv/kernel          [7, 7, 7, 3, 64]   (T, Y, X, in, out)
      Conv3d_1a_7x7/bn/bias              [64]               (beta; params)
      Conv3d_1a_7x7/bn/mean              [64]               (moving mean; batch_stats)
      Conv3d_1a_7x7/bn/var               [64]               (moving variance; batch_stats)
      Mixed_3b/Branch_1/Conv3d_0b_3x3/conv/kernel [3, 3, 3, 96, 128]
      Logits/conv/kernel [1, 1, 1, 1024, 400], Logits/conv/bias [400]
    Keys ending in `bn/mean` and `bn/var` go to the `batch_stats` collection,
    all others to `params`.
  * From the TF-Hub / deepmind kinetics-i3d checkpoint the conversion is a
    rename of `RGB/inception_i3d/<block>/...`: `conv_3d/w` -> `conv/kernel`,
    `conv_3d/b` -> `conv/bias`, `batch_norm/beta` -> `bn/bias`,
    `batch_norm/moving_mean` -> `bn/mean`, `batch_norm/moving_variance` ->
    `bn/var` (drop any leading singleton dims of the batch-norm arrays); kernels
    keep TF's [T, Y, X, in, out] layout. The batch norm has no scale (gamma),
    as in Sonnet's default, and epsilon 1e-3.

One deliberate difference from the TF graph: the final average pool is a mean
over all remaining positions (time and space) instead of a fixed 2x7x7 VALID
window followed by a mean over time. For the standard 16x224x224 input the
last feature map is exactly 2x7x7, so the two agree; the mean also accepts other
sizes (the tests run at 112x112).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NUM_FRAMES = 16  # frames per video in the standard FVD
RESOLUTION = 224  # frame side the I3D sees
NUM_CLASSES = 400  # Kinetics-400: the logits are the FVD features

# Mixed block name -> (branch 0 1x1, (branch 1 1x1, 3x3), (branch 2 1x1, 3x3), branch 3 pool-1x1),
# the channel counts of the paper's Inception-v1 (Table 1 of Szegedy et al. 2015).
MIXED_CHANNELS = {
    "Mixed_3b": (64, (96, 128), (16, 32), 32),
    "Mixed_3c": (128, (128, 192), (32, 96), 64),
    "Mixed_4b": (192, (96, 208), (16, 48), 64),
    "Mixed_4c": (160, (112, 224), (24, 64), 64),
    "Mixed_4d": (128, (128, 256), (24, 64), 64),
    "Mixed_4e": (112, (144, 288), (32, 64), 64),
    "Mixed_4f": (256, (160, 320), (32, 128), 128),
    "Mixed_5b": (256, (160, 320), (32, 128), 128),
    "Mixed_5c": (384, (192, 384), (48, 128), 128),
}


def _max_pool(x, window: Sequence[int], strides: Sequence[int]):
  """TF's max_pool3d with SAME padding (the padding never wins the max)."""
  return nn.max_pool(x, tuple(window), strides=tuple(strides), padding="SAME")


class Unit3D(nn.Module):
  """Conv3d (no bias) -> batch norm (inference statistics, no scale) -> ReLU."""

  features: int
  kernel: Sequence[int] = (1, 1, 1)  # (T, Y, X)
  strides: Sequence[int] = (1, 1, 1)

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, tuple(self.kernel), strides=tuple(self.strides), padding="SAME",
                use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, use_scale=False, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


class Branch(nn.Module):
  """One branch of a Mixed block: optional 3x3x3 max pool, then units in order."""

  units: Sequence[tuple[str, int, Sequence[int]]]  # (name, channels, kernel) per unit
  pool_first: bool = False  # branch 3: max pool 3x3x3 stride 1 before its 1x1x1 conv

  @nn.compact
  def __call__(self, x):
    if self.pool_first:
      x = _max_pool(x, (3, 3, 3), (1, 1, 1))
    for name, channels, kernel in self.units:
      x = Unit3D(channels, kernel, name=name)(x)
    return x


class MixedBlock(nn.Module):
  """The inflated Inception module: four branches concatenated on channels."""

  channels: tuple  # see MIXED_CHANNELS

  @nn.compact
  def __call__(self, x):
    c0, (c1a, c1b), (c2a, c2b), c3 = self.channels
    one, three = (1, 1, 1), (3, 3, 3)
    branches = [
        Branch((("Conv3d_0a_1x1", c0, one),), name="Branch_0"),
        Branch((("Conv3d_0a_1x1", c1a, one), ("Conv3d_0b_3x3", c1b, three)), name="Branch_1"),
        Branch((("Conv3d_0a_1x1", c2a, one), ("Conv3d_0b_3x3", c2b, three)), name="Branch_2"),
        Branch((("Conv3d_0b_1x1", c3, one),), pool_first=True, name="Branch_3"),
    ]
    return jnp.concatenate([b(x) for b in branches], axis=-1)


class InceptionI3D(nn.Module):
  """Kinetics-400 RGB I3D: videos [N, F, H, W, 3] in [-1, 1] -> logits [N, num_classes].

  Shapes for the standard input [N, 16, 224, 224, 3] in comments.
  """

  num_classes: int = NUM_CLASSES
  dropout_rate: float = 0.0  # before the logits; the FVD runs with deterministic=True

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    x = Unit3D(64, (7, 7, 7), (2, 2, 2), name="Conv3d_1a_7x7")(x)  # [N, 8, 112, 112, 64]
    x = _max_pool(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_2a_3x3: [N, 8, 56, 56, 64]
    x = Unit3D(64, (1, 1, 1), name="Conv3d_2b_1x1")(x)
    x = Unit3D(192, (3, 3, 3), name="Conv3d_2c_3x3")(x)  # [N, 8, 56, 56, 192]
    x = _max_pool(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_3a_3x3: [N, 8, 28, 28, 192]
    for name in ("Mixed_3b", "Mixed_3c"):
      x = MixedBlock(MIXED_CHANNELS[name], name=name)(x)  # [N, 8, 28, 28, 480]
    x = _max_pool(x, (3, 3, 3), (2, 2, 2))  # MaxPool3d_4a_3x3: [N, 4, 14, 14, 480]
    for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
      x = MixedBlock(MIXED_CHANNELS[name], name=name)(x)  # [N, 4, 14, 14, 832]
    x = _max_pool(x, (2, 2, 2), (2, 2, 2))  # MaxPool3d_5a_2x2: [N, 2, 7, 7, 832]
    for name in ("Mixed_5b", "Mixed_5c"):
      x = MixedBlock(MIXED_CHANNELS[name], name=name)(x)  # [N, 2, 7, 7, 1024]
    # TF: avg_pool 2x7x7 VALID, then the logits, then the mean over time. At the
    # standard size that is one window, so a mean over (T, Y, X) is the same.
    x = jnp.mean(x, axis=(1, 2, 3), keepdims=True)  # [N, 1, 1, 1, 1024]
    x = nn.Dropout(self.dropout_rate, deterministic=deterministic)(x)
    x = _LogitsConv(self.num_classes, name="Logits")(x)  # [N, 1, 1, 1, 400]
    return x.reshape(x.shape[0], self.num_classes)  # [N, 400]


class _LogitsConv(nn.Module):
  """The 1x1x1 logits conv with bias, no batch norm or ReLU (path Logits/conv/...)."""

  num_classes: int

  @nn.compact
  def __call__(self, x):
    return nn.Conv(self.num_classes, (1, 1, 1), use_bias=True, name="conv")(x)


# ---------------------------------------------------------------------------
# Weights: a flat file keyed by variable path.

_STATS = ("mean", "var")  # batch-norm leaf names stored in `batch_stats`


def i3d_variable_shapes(num_classes: int = NUM_CLASSES) -> dict[str, tuple[int, ...]]:
  """Every key of the weight file and its shape (computed abstractly, no FLOPs)."""
  model = InceptionI3D(num_classes=num_classes)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 32, 32, 3), jnp.float32))
  return {k: tuple(v.shape) for k, v in flatten_variables(abstract).items()}


def flatten_variables(variables) -> dict[str, Any]:
  """{"params": ..., "batch_stats": ...} -> {"Conv3d_1a_7x7/conv/kernel": array, ...}."""
  flat = {}
  for collection in ("params", "batch_stats"):
    for path, value in flax.traverse_util.flatten_dict(dict(variables.get(collection, {}))).items():
      key = "/".join(path)
      if (path[-1] in _STATS) != (collection == "batch_stats"):
        raise ValueError(f"variable {collection}/{key} is in the wrong collection for the I3D file format")
      flat[key] = value
  return flat


def unflatten_variables(flat: dict[str, Any]) -> dict[str, Any]:
  """The inverse of `flatten_variables`."""
  params, stats = {}, {}
  for key, value in flat.items():
    path = tuple(key.split("/"))
    (stats if path[-1] in _STATS else params)[path] = value
  return {"params": flax.traverse_util.unflatten_dict(params),
          "batch_stats": flax.traverse_util.unflatten_dict(stats)}


def save_i3d(path: str, variables) -> None:
  """Writes I3D variables as `.npz` or `.msgpack` (by extension; see the module docstring)."""
  flat = {k: np.asarray(v, np.float32) for k, v in flatten_variables(variables).items()}
  if path.endswith(".npz"):
    with open(path, "wb") as f:  # a file object: numpy would otherwise append ".npz"
      np.savez(f, **flat)
  elif path.endswith(".msgpack"):
    with open(path, "wb") as f:
      f.write(flax.serialization.msgpack_serialize(flat))
  else:
    raise ValueError(f"I3D weight file {path!r}: expected a name ending in .npz or .msgpack")


def load_i3d(path: str, num_classes: int = NUM_CLASSES) -> dict[str, Any]:
  """Reads a weight file (see the module docstring) into `InceptionI3D` variables.

  Every expected key must be present with the expected shape, and no other key
  may be: otherwise a ValueError names the first offending key and the file.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"I3D weight file {path!r} does not exist (nothing is downloaded; "
                            "convert the TF-Hub i3d-kinetics-400 checkpoint once, see nbp/fvd.py).")
  if path.endswith(".npz"):
    with np.load(path) as data:
      flat = {k: np.asarray(data[k]) for k in data.files}
  elif path.endswith(".msgpack"):
    with open(path, "rb") as f:
      flat = {k: np.asarray(v) for k, v in flax.serialization.msgpack_restore(f.read()).items()}
  else:
    raise ValueError(f"I3D weight file {path!r}: expected a name ending in .npz or .msgpack")
  expected = i3d_variable_shapes(num_classes)
  for key, shape in expected.items():
    if key not in flat:
      raise ValueError(f"I3D weight file {path!r} lacks the key {key!r} (shape {shape}); "
                       f"it has {len(flat)} keys, {len(expected)} expected.")
    if tuple(flat[key].shape) != shape:
      raise ValueError(f"I3D weight file {path!r}: key {key!r} has shape {tuple(flat[key].shape)}, "
                       f"expected {shape}.")
  extra = sorted(set(flat) - set(expected))
  if extra:
    raise ValueError(f"I3D weight file {path!r} has an unexpected key {extra[0]!r} "
                     f"({len(extra)} unexpected in all).")
  return unflatten_variables({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})


# ---------------------------------------------------------------------------
# Preprocessing: the standard FVD one.

def resize_bilinear(frames: jax.Array, size: int, *, half_pixel_centers: bool = False) -> jax.Array:
  """[M, H, W, C] -> [M, size, size, C], bilinear without antialiasing.

  `half_pixel_centers=False` is TF1's `tf.image.resize_bilinear` (align_corners
  False), which the reference FVD code calls: output pixel i samples input
  position i * H / size. True is the half-pixel convention of `jax.image.resize`.
  """
  m, h, w, c = frames.shape
  frames = frames.astype(jnp.float32)
  if half_pixel_centers:
    return jax.image.resize(frames, (m, size, size, c), method="bilinear", antialias=False)
  rows, cols = _tf1_bilinear_matrix(h, size), _tf1_bilinear_matrix(w, size)
  return jnp.einsum("yh,mhwc,xw->myxc", rows, frames, cols, precision=jax.lax.Precision.HIGHEST)


def _tf1_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of TF1 bilinear resizing along one axis (the last input row repeats)."""
  position = np.arange(n_out) * (n_in / n_out)  # input coordinate of each output pixel
  low = np.floor(position).astype(np.int64)
  high = np.minimum(low + 1, n_in - 1)
  frac = (position - low).astype(np.float32)
  matrix = np.zeros((n_out, n_in), np.float32)
  np.add.at(matrix, (np.arange(n_out), low), 1.0 - frac)
  np.add.at(matrix, (np.arange(n_out), high), frac)
  return matrix


def preprocess(videos, *, resolution: int = RESOLUTION, num_frames: int | None = NUM_FRAMES,
               half_pixel_centers: bool = False) -> jax.Array:
  """Videos [N, F, H, W, C] (uint8, or floats in [0, 255]) -> float32 [N, F, R, R, 3] in [-1, 1].

  C = 1 (grey) is repeated to 3 channels. `num_frames` is checked (16 in the
  standard FVD); None accepts any length.
  """
  if videos.ndim != 5 or videos.shape[-1] not in (1, 3):
    raise ValueError(f"videos must be [N, F, H, W, 1|3], got shape {tuple(videos.shape)}")
  n, f, h, w, c = videos.shape
  if num_frames is not None and f != num_frames:
    raise ValueError(f"FVD expects {num_frames} frames per video, got {f} (shape {tuple(videos.shape)}); "
                     "pass num_frames=None to accept other lengths (the result is then not the standard FVD).")
  frames = jnp.asarray(videos).reshape(n * f, h, w, c)
  frames = resize_bilinear(frames, resolution, half_pixel_centers=half_pixel_centers)
  frames = jnp.clip(2.0 * frames / 255.0 - 1.0, -1.0, 1.0)  # clip: float rounding of the resize
  if c == 1:
    frames = jnp.repeat(frames, 3, axis=-1)
  return frames.reshape(n, f, resolution, resolution, 3)


# ---------------------------------------------------------------------------
# The distance.

def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix (negative eigenvalues clipped)."""
  values, vectors = np.linalg.eigh(sigma)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

  d = |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^(1/2)). The last trace is
  computed without a general matrix square root: with A = s1^(1/2) and
  B = s2^(1/2) (symmetric, by eigendecomposition), s1 s2 = A (A B B A) A^-1 has
  the eigenvalues of (A B)(A B)^T, so tr((s1 s2)^(1/2)) is the sum of the
  singular values of A B. This stays stable for rank-deficient covariances.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise ValueError(f"shapes do not match: mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}")
  s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
  cross = np.sum(np.linalg.svd(_psd_sqrt(s1) @ _psd_sqrt(s2), compute_uv=False))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * cross)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Features [N, D] -> mean [D] and unbiased covariance [D, D] (float64)."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"features must be [N >= 2, D], got shape {features.shape}")
  mu = features.mean(axis=0)
  centred = features - mu
  return mu, centred.T @ centred / (features.shape[0] - 1)


def frechet_distance_of_features(real_features, fake_features) -> float:
  return frechet_distance(*feature_statistics(real_features), *feature_statistics(fake_features))


@dataclasses.dataclass(eq=False)
class FeatureExtractor:
  """Videos -> features [N, D], in batches of a fixed size through one jitted function.

  `apply(variables, videos) -> features` receives raw videos (any preprocessing
  belongs inside it); the last batch is padded, so only one shape is compiled.
  """

  apply: Callable[[Any, jax.Array], jax.Array]
  variables: Any
  batch_size: int = 8

  def __post_init__(self):
    self._jitted = jax.jit(self.apply)

  def __call__(self, videos) -> np.ndarray:
    videos = np.asarray(videos)
    n = videos.shape[0]
    if n == 0:
      raise ValueError("no videos to extract features from")
    out = []
    for start in range(0, n, self.batch_size):
      chunk = videos[start:start + self.batch_size]
      pad = self.batch_size - chunk.shape[0]
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
      out.append(np.asarray(self._jitted(self.variables, chunk))[:self.batch_size - pad])
    return np.concatenate(out).astype(np.float64)


def i3d_apply(model: InceptionI3D, variables, videos, *, resolution: int = RESOLUTION,
              num_frames: int | None = NUM_FRAMES):
  """Raw videos -> I3D logits [N, 400]: the FVD features."""
  x = preprocess(videos, resolution=resolution, num_frames=num_frames)
  return model.apply(variables, x)


def i3d_extractor(variables, *, batch_size: int = 8, resolution: int = RESOLUTION,
                  num_frames: int | None = NUM_FRAMES) -> FeatureExtractor:
  """The standard FVD feature extractor, from variables (e.g. `load_i3d(path)`)."""
  num_classes = variables["params"]["Logits"]["conv"]["bias"].shape[0]
  apply = functools.partial(i3d_apply, InceptionI3D(num_classes=num_classes),
                            resolution=resolution, num_frames=num_frames)
  return FeatureExtractor(apply, variables, batch_size)


def fvd(real_videos, fake_videos, *, extractor: FeatureExtractor) -> float:
  """Fréchet Video Distance between two sets of videos [N, F, H, W, C].

  With `i3d_extractor(load_i3d(path))` this is the standard FVD (16 frames);
  published figures use 2048 to 50k videos per set, and few videos bias it up.
  """
  return frechet_distance_of_features(extractor(real_videos), extractor(fake_videos))
