"""Inception-v3 up to its pool3 features (2048-d), in the variant the FID is defined with.

The FID (nbp.evaluators.fid) compares Gaussians fitted to the 2048-d "pool3"
features of Inception-v3: the global average pool of the last mixed block, on
images resized to 299x299 and scaled to [-1, 1].

The variant. The standard FID implementations run the 2015-12-05 TF Inception
graph, whose blocks differ from the Inception-v3 of the paper and of most
libraries in two places, both kept here:
  * every average pool inside a block (branch_pool of Mixed_5b..5d, 6b..6e,
    7b) is 3x3, stride 1, SAME, and averages over the window's in-image
    positions only (the padding is not counted);
  * the pool branch of the last block, Mixed_7c, is a 3x3 stride-1 MAX pool,
    not an average pool.
As in every Inception-v3, the convolutions have no bias, each followed by a
batch norm with a scale and an offset (epsilon 1e-3, inference statistics)
and a ReLU; the stem and the two reductions (Mixed_6a, 7a) convolve and pool
VALID at stride 2, everything else is SAME. pool3 is the mean over the last
8x8 positions (at other input sides, over all of them).
No auxiliary classifier and no logits layer: the FID needs neither (the TF
graph's 1008-way logits are not part of the weight file either). With them
gone the network has 21,785,568 trainable weights (conv kernels, batch-norm
scales and offsets in 94 conv units) plus 2 x 17,216 batch-norm statistics.

Dimension letters: N images, H height, W width, C channels, R the side the
network sees (299 for the FID), D feature width (2048).

Weights are never downloaded here. `load_params(path)` reads a `.npz` the user
converted once (`save_params` writes the format): one array per variable, its
key the "/"-joined path of the variable in `InceptionV3`'s variables,
collection first, e.g.
    params/Conv2d_1a_3x3/conv/kernel             [3, 3, 3, 32]   (Y, X, in, out)
    params/Conv2d_1a_3x3/bn/scale                [32]            (gamma)
    params/Conv2d_1a_3x3/bn/bias                 [32]            (beta)
    batch_stats/Conv2d_1a_3x3/bn/mean            [32]            (moving mean)
    batch_stats/Conv2d_1a_3x3/bn/var             [32]            (moving variance)
    params/Mixed_5b/branch5x5_2/conv/kernel      [5, 5, 48, 64]
    params/Mixed_7c/branch3x3dbl_3b/conv/kernel  [3, 1, 384, 384]
Block and branch names are those of the PyTorch-layout (torchvision-named)
state dict of the FID Inception, so converting it is a rename: `<block>.<branch>.conv.weight`
[out, in, Y, X] -> `params/<block>/<branch>/conv/kernel` transposed to
[Y, X, in, out]; `.bn.weight` -> `params/.../bn/scale`, `.bn.bias` ->
`params/.../bn/bias`, `.bn.running_mean` -> `batch_stats/.../bn/mean`,
`.bn.running_var` -> `batch_stats/.../bn/var`; drop `num_batches_tracked`,
`fc.*` and `AuxLogits.*`. `from_torch_state_dict` does that on a dict of numpy
arrays (read the state dict with torch, pass `{k: v.numpy()}`), so
  save_params("inception_fid.npz", from_torch_state_dict(state))
converts it once.
"""

from __future__ import annotations

import functools
import os
import zipfile
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nbp.models import weight_files
from nbp.models.resize import resize_bilinear

RESOLUTION = 299  # image side the FID's Inception sees
FEATURE_DIM = 2048  # D: the pool3 features
MIN_RESOLUTION = 75  # the smallest side the stride-2 VALID convolutions and pools accept


# ---------------------------------------------------------------------------
# The network.


class BasicConv(nn.Module):
  """Conv (no bias) -> batch norm (inference statistics) -> ReLU; SAME padding unless `valid`."""

  features: int
  kernel: Sequence[int] = (1, 1)  # (Y, X)
  strides: int = 1
  valid: bool = False  # VALID padding: the stride-2 reductions and the stem

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, tuple(self.kernel), strides=self.strides, padding="VALID" if self.valid else "SAME",
                use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  """3x3 stride-1 average over the in-image positions of each window (the TF graph's block pools)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME", count_include_pad=False)


def _max_pool_3x3(x, stride: int = 1):
  """3x3 max pool: SAME at stride 1 (padding never wins), VALID at stride 2 (the reductions)."""
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding="SAME" if stride == 1 else "VALID")


class InceptionA(nn.Module):
  """Mixed_5b..5d at 35x35: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1 -> 224 + pool_features channels."""

  pool_features: int  # 32 in Mixed_5b, 64 in Mixed_5c and 5d

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, name="branch1x1")(x)
    b5 = BasicConv(48, name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), name="branch5x5_2")(b5)
    b3 = BasicConv(64, name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a, 35x35 -> 17x17: 3x3/2 | 1x1-3x3-3x3/2 | max pool/2 -> 384 + 96 + C channels."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), strides=2, valid=True, name="branch3x3")(x)
    bd = BasicConv(64, name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), strides=2, valid=True, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e at 17x17, factorised 7x7s: 1x1 | 1x7-7x1 | 7x1-1x7-7x1-1x7 | avg pool-1x1 -> 768 channels."""

  channels_7x7: int  # the width inside the 7x7 branches: 128, 160, 160, 192

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, name="branch1x1")(x)
    b7 = BasicConv(c7, name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), name="branch7x7_3")(b7)
    bd = BasicConv(c7, name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a, 17x17 -> 8x8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2 -> 320 + 192 + C channels."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), strides=2, valid=True, name="branch3x3_2")(b3)
    b7 = BasicConv(192, name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), strides=2, valid=True, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b, 7c at 8x8: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1 -> 2048 channels.

  The pool is the in-image average in Mixed_7b and a max in Mixed_7c (the TF graph's).
  """

  max_pool: bool  # True in Mixed_7c

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, name="branch1x1")(x)
    b3 = BasicConv(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), name="branch3x3_2a")(b3),
                          BasicConv(384, (3, 1), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv(448, name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), name="branch3x3dbl_3a")(bd),
                          BasicConv(384, (3, 1), name="branch3x3dbl_3b")(bd)], axis=-1)
    pooled = _max_pool_3x3(x) if self.max_pool else _avg_pool_3x3(x)
    bp = BasicConv(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """Images [N, R, R, 3] in [-1, 1] -> pool3 features [N, 2048] (R >= 75; 299 for the FID).

  Shapes for R = 299 in comments.
  """

  @nn.compact
  def __call__(self, x):
    x = BasicConv(32, (3, 3), strides=2, valid=True, name="Conv2d_1a_3x3")(x)  # [N, 149, 149, 32]
    x = BasicConv(32, (3, 3), valid=True, name="Conv2d_2a_3x3")(x)  # [N, 147, 147, 32]
    x = BasicConv(64, (3, 3), name="Conv2d_2b_3x3")(x)  # [N, 147, 147, 64]
    x = _max_pool_3x3(x, 2)  # [N, 73, 73, 64]
    x = BasicConv(80, name="Conv2d_3b_1x1")(x)  # [N, 73, 73, 80]
    x = BasicConv(192, (3, 3), valid=True, name="Conv2d_4a_3x3")(x)  # [N, 71, 71, 192]
    x = _max_pool_3x3(x, 2)  # [N, 35, 35, 192]
    x = InceptionA(32, name="Mixed_5b")(x)  # [N, 35, 35, 256]
    x = InceptionA(64, name="Mixed_5c")(x)  # [N, 35, 35, 288]
    x = InceptionA(64, name="Mixed_5d")(x)  # [N, 35, 35, 288]
    x = InceptionB(name="Mixed_6a")(x)  # [N, 17, 17, 768]
    for name, width in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(width, name=name)(x)  # [N, 17, 17, 768]
    x = InceptionD(name="Mixed_7a")(x)  # [N, 8, 8, 1280]
    x = InceptionE(max_pool=False, name="Mixed_7b")(x)  # [N, 8, 8, 2048]
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)  # [N, 8, 8, 2048]
    return jnp.mean(x, axis=(1, 2))  # pool3: [N, 2048]


# ---------------------------------------------------------------------------
# Preprocessing.


def preprocess(images, *, resolution: int = RESOLUTION, half_pixel_centers: bool = False) -> jax.Array:
  """Images [N, H, W, C] (uint8, or floats in [0, 255]) -> float32 [N, R, R, 3] in [-1, 1].

  Bilinear resize to R x R without antialiasing (TF1's convention by default,
  as the TF FID graph resizes; `half_pixel_centers=True` is jax.image's), then
  x / 127.5 - 1. C = 1 (grey) is repeated to 3 channels.
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [N, H, W, 1|3], got shape {tuple(images.shape)}")
  if resolution < MIN_RESOLUTION:
    raise ValueError(f"Inception-v3 needs images of at least {MIN_RESOLUTION}x{MIN_RESOLUTION}; "
                     f"resolution={resolution} was asked for (299 for the FID).")
  x = resize_bilinear(jnp.asarray(images), resolution, half_pixel_centers=half_pixel_centers)
  x = jnp.clip(x / 127.5 - 1.0, -1.0, 1.0)  # clip: float rounding of the resize
  return jnp.repeat(x, 3, axis=-1) if images.shape[-1] == 1 else x


def pool3_features(variables, images, *, resolution: int = RESOLUTION) -> jax.Array:
  """Raw images [N, H, W, C] -> pool3 features [N, 2048]: the FID features."""
  return InceptionV3().apply(variables, preprocess(images, resolution=resolution))


# ---------------------------------------------------------------------------
# Weights: a flat .npz keyed by variable path.


def flatten_variables(variables) -> dict[str, Any]:
  """{"params": {...}, "batch_stats": {...}} -> {"params/Conv2d_1a_3x3/conv/kernel": array, ...}."""
  return {"/".join(path): value for path, value in flax.traverse_util.flatten_dict(dict(variables)).items()}


def unflatten_variables(flat: dict[str, Any]) -> dict[str, Any]:
  """The inverse of `flatten_variables`."""
  return flax.traverse_util.unflatten_dict({tuple(key.split("/")): value for key, value in flat.items()})


@functools.cache  # tracing the network takes seconds; every load_params without a reference needs it
def abstract_variables():
  """ShapeDtypeStructs of `InceptionV3`'s variables (nothing computed)."""
  x = jax.ShapeDtypeStruct((1, RESOLUTION, RESOLUTION, 3), jnp.float32)
  return jax.eval_shape(InceptionV3().init, jax.random.key(0), x)


def variable_shapes(reference=None) -> dict[str, tuple[int, ...]]:
  """Every key of the weight file and its shape, in the order `load_params` checks them."""
  flat = flatten_variables(abstract_variables() if reference is None else reference)
  return {key: tuple(value.shape) for key, value in flat.items()}


_TORCH_LEAVES = {"conv.weight": ("params", "conv/kernel"), "bn.weight": ("params", "bn/scale"),
                 "bn.bias": ("params", "bn/bias"), "bn.running_mean": ("batch_stats", "bn/mean"),
                 "bn.running_var": ("batch_stats", "bn/var")}  # torch leaf -> (collection, our leaf)
_TORCH_DROPPED = ("fc.", "AuxLogits.")  # prefixes of the parts the pool3 features do not use


def from_torch_state_dict(state: dict[str, Any]) -> dict[str, Any]:
  """Variables of `InceptionV3` from a PyTorch-layout state dict {"Mixed_5b.branch1x1.conv.weight": array, ...}.

  The rename of the module docstring; conv kernels go from [out, in, Y, X] to
  [Y, X, in, out]. A key of another form raises a ValueError naming it; keys
  and shapes are checked by `load_params` once the result is saved.
  """
  flat = {}
  for key, value in state.items():
    if key.endswith("num_batches_tracked") or key.startswith(_TORCH_DROPPED):
      continue
    module, _, leaf = key.rpartition(".")
    module, _, kind = module.rpartition(".")
    if f"{kind}.{leaf}" not in _TORCH_LEAVES or not module:
      raise ValueError(f"state dict key {key!r} is not <block>[.<branch>].conv.weight or .bn.<weight|bias|"
                       "running_mean|running_var> of an Inception-v3.")
    collection, ours = _TORCH_LEAVES[f"{kind}.{leaf}"]
    value = np.asarray(value, np.float32)
    flat[f"{collection}/{module.replace('.', '/')}/{ours}"] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
  return unflatten_variables(flat)


def save_params(path: str, variables) -> None:
  """Writes variables (e.g. {"params", "batch_stats"} of `InceptionV3`) as a float32 .npz keyed by path."""
  flat = {k: np.asarray(v, np.float32) for k, v in flatten_variables(variables).items()}
  with open(path, "wb") as f:  # a file object: numpy would otherwise append ".npz"
    np.savez(f, **flat)


def load_params(path: str, reference=None) -> dict[str, Any]:
  """Reads a weight file (see the module docstring) into variables shaped like `reference`.

  `reference`: abstract (ShapeDtypeStructs) or concrete variables whose keys
  and shapes the file must have; None: `InceptionV3`'s. A key the reference
  has but the file lacks, or has at another shape, raises a ValueError naming
  the first such key (in the reference's order) and the file; so does a key
  the file has beyond the reference.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"Inception weight file {path!r} does not exist (nothing is downloaded; convert the "
                            "FID Inception-v3 weights once into this .npz format, see nbp/models/inception.py).")
  try:
    with np.load(path) as data:
      flat = {k: np.asarray(data[k]) for k in data.files}
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise ValueError(f"Inception weight file {path!r} is not a .npz archive (numpy.savez): {e}") from e
  expected = variable_shapes(reference)
  weight_files.check_arrays(flat, expected, what="Inception", path=path)
  return unflatten_variables({k: jnp.asarray(flat[k], jnp.float32) for k in expected})
