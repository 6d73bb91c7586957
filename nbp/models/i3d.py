"""The Kinetics-400 I3D network (Inception-v1 inflated to 3D), whose logits are the FVD features.

The standard FVD (nbp.evaluators.fvd) uses the 400-d logits of the Kinetics-400
I3D (the TF-Hub "i3d-kinetics-400" model, Carreira & Zisserman 2017) on 16
frames of 224x224 in [-1, 1].

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
sizes (the tests run at 8 frames of 32x32).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nbp.models import weight_files

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
  """Every key of the weight file and its shape (computed abstractly, no FLOPs), in the file format's order."""
  return dict(_variable_shapes(num_classes))


@functools.cache  # tracing the whole network takes seconds; every load_i3d needs the shapes
def _variable_shapes(num_classes: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
  model = InceptionI3D(num_classes=num_classes)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 32, 32, 3), jnp.float32))
  return tuple((k, tuple(v.shape)) for k, v in flatten_variables(abstract).items())


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
                            "convert the TF-Hub i3d-kinetics-400 checkpoint once, see nbp/models/i3d.py).")
  if path.endswith(".npz"):
    with np.load(path) as data:
      flat = {k: np.asarray(data[k]) for k in data.files}
  elif path.endswith(".msgpack"):
    with open(path, "rb") as f:
      flat = {k: np.asarray(v) for k, v in flax.serialization.msgpack_restore(f.read()).items()}
  else:
    raise ValueError(f"I3D weight file {path!r}: expected a name ending in .npz or .msgpack")
  weight_files.check_arrays(flat, i3d_variable_shapes(num_classes), what="I3D", path=path)
  return unflatten_variables({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})
