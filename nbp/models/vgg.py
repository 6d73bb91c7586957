"""LPIPS with VGG16 features: a perceptual distance whose weights load from a local file the user names.

LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as
a Perceptual Metric"): frames in [-1, 1] are shifted and scaled per channel,
run through VGG16's convolutions up to relu5_3, and at each of the five
layers relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 the features are
unit-normalised over channels, their squared difference weighted per channel
by a learned non-negative vector (the "linear heads" lin0..lin4) and averaged
over space; the five layers' values are summed. The official NBP code carries
this loss (nbp/modules/lpips.py, the heads in vgg.pth, torchvision's VGG16).

Nothing is ever downloaded: `load_weights(path)` reads an .npz or a .msgpack
(flax.serialization) of named float arrays, and fails naming the file and the
key when one is missing or misshapen. The expected keys (`EXPECTED_SHAPES`):

  conv{b}_{i}/kernel  [3, 3, Cin, Cout]  (HWIO)   conv1_1 .. conv5_3, 13 layers
  conv{b}_{i}/bias    [Cout]
  lin{k}              [C_k]                       k = 0..4, C = 64, 128, 256, 512, 512

(a .msgpack may nest them: {"conv1_1": {"kernel", "bias"}, ..., "lin0", ...}).
`python -m nbp.models.vgg --vgg16 vgg16.pth --lpips vgg.pth --out lpips_vgg16.npz`
converts torchvision's VGG16 state dict and the LPIPS heads (richzhang's
PerceptualSimilarity weights/v0.1/vgg.pth), both files the user already has,
with `from_torch_state_dicts` (needs torch to read .pth files).

Dimensions: N frames, H height, W width, C channels (1 or 3; 1 is repeated to 3).
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Mapping

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from nbp.models import weight_files

# VGG16's convolutions up to relu5_3 by block: (name, Cin, Cout); a 2x2 max pool starts blocks 2..5.
BLOCKS = (
    (("conv1_1", 3, 64), ("conv1_2", 64, 64)),
    (("conv2_1", 64, 128), ("conv2_2", 128, 128)),
    (("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256)),
    (("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512)),
    (("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512)),
)
LAYER_CHANNELS = (64, 128, 256, 512, 512)  # channels of relu1_2 .. relu5_3, the LPIPS layers
EXPECTED_SHAPES: dict[str, tuple[int, ...]] = {
    **{f"{name}/kernel": (3, 3, cin, cout) for block in BLOCKS for name, cin, cout in block},
    **{f"{name}/bias": (cout,) for block in BLOCKS for name, _, cout in block},
    **{f"lin{k}": (c,) for k, c in enumerate(LAYER_CHANNELS)},
}
# LPIPS's input scaling (its ScalingLayer): (x - shift) / scale on frames in [-1, 1].
SHIFT = np.asarray([-0.030, -0.088, -0.188], np.float32)
SCALE = np.asarray([0.458, 0.448, 0.450], np.float32)
MIN_SIZE = 16  # four 2x2 pools: relu5_3 needs frames of at least 16x16


def _flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(_flatten(value, name + "/"))
    else:
      out[name] = np.asarray(value)
  return out


def load_weights(path: str) -> dict[str, np.ndarray]:
  """key -> float32 array of `EXPECTED_SHAPES`, from an .npz or a .msgpack at `path` (a local file)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"LPIPS/VGG16 weight file {path!r} does not exist (config.loss.perceptual_weights_file); make one with "
        "`python -m nbp.models.vgg --vgg16 VGG16.pth --lpips LPIPS_HEADS.pth --out FILE.npz` (see nbp/models/vgg.py).")
  if path.endswith(".msgpack"):
    with open(path, "rb") as f:
      arrays = _flatten(flax.serialization.msgpack_restore(f.read()))
  else:
    with np.load(path) as data:
      arrays = {key: data[key] for key in data.files}
  # The keys and shapes: the module docstring. Keys beyond them (a converter's extras) are ignored.
  weight_files.check_arrays(arrays, EXPECTED_SHAPES, what="LPIPS/VGG16", path=path, allow_extra=True)
  return {key: np.asarray(arrays[key], np.float32) for key in EXPECTED_SHAPES}


def save_weights(path: str, weights: Mapping[str, np.ndarray]) -> None:
  """Writes `weights` (key -> array) to `path` as an .npz (or a nested .msgpack when the name says so)."""
  if path.endswith(".msgpack"):
    tree: dict = {}
    for key, value in weights.items():
      node = tree
      *parents, leaf = key.split("/")
      for parent in parents:
        node = node.setdefault(parent, {})
      node[leaf] = np.asarray(value, np.float32)
    with open(path, "wb") as f:
      f.write(flax.serialization.msgpack_serialize(tree))
  else:
    np.savez(path, **{key: np.asarray(value, np.float32) for key, value in weights.items()})


def from_torch_state_dicts(vgg16: Mapping[str, np.ndarray], lpips_heads: Mapping[str, np.ndarray]) -> dict:
  """torchvision VGG16 state dict (features.{i}.weight [Cout, Cin, 3, 3], .bias) and the LPIPS heads
  (lin{k}.model.{j}.weight [1, C, 1, 1]) as numpy arrays -> the keys of `EXPECTED_SHAPES`."""
  conv_indices = iter((0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28))  # torchvision's features.{i} convs
  out = {}
  for block in BLOCKS:
    for name, _, _ in block:
      i = next(conv_indices)
      out[f"{name}/kernel"] = np.asarray(vgg16[f"features.{i}.weight"], np.float32).transpose(2, 3, 1, 0)
      out[f"{name}/bias"] = np.asarray(vgg16[f"features.{i}.bias"], np.float32)
  for key, value in lpips_heads.items():
    match = re.fullmatch(r"lin(\d)\.model\.\d\.weight", key)
    if match:
      out[f"lin{match.group(1)}"] = np.asarray(value, np.float32).reshape(-1)
  missing = sorted(set(EXPECTED_SHAPES) - set(out))
  if missing:
    raise KeyError(f"the LPIPS heads state dict lacks {missing} (keys like 'lin0.model.1.weight' expected).")
  return out


def _conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """relu(3x3 "same" convolution + bias): [N, H, W, Cin] -> [N, H, W, Cout].

  On CPU, inputs of at most 4x4 pixels run as one matrix product of 3x3
  patches: XLA's CPU convolution of 512 channels at 2x2 pixels ran 10-100x
  slower than that here (relu4 and relu5 of small frames). Both compute the same.
  """
  kernel = kernel.astype(x.dtype)
  padding = ((1, 1), (1, 1))
  if jax.default_backend() == "cpu" and x.shape[1] * x.shape[2] <= 16:
    patches = jax.lax.conv_general_dilated_patches(x, (3, 3), (1, 1), padding,
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))  # [N, H, W, Cin*9]
    y = patches @ kernel.transpose(2, 0, 1, 3).reshape(-1, kernel.shape[-1])  # patches are (Cin, kh, kw)-major
  else:
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jax.nn.relu(y + bias.astype(x.dtype))


def features(weights: Mapping[str, jax.Array], frames: jax.Array) -> list[jax.Array]:
  """frames [N, H, W, C] in [-1, 1] -> [relu1_2 [N, H, W, 64], relu2_2 [N, H/2, W/2, 128], ..., relu5_3]."""
  n, h, w, c = frames.shape
  if min(h, w) < MIN_SIZE:
    raise ValueError(f"LPIPS/VGG16 needs frames of at least {MIN_SIZE}x{MIN_SIZE}, got {h}x{w}.")
  if c == 1:
    frames = jnp.repeat(frames, 3, axis=-1)  # grey frames as RGB
  elif c != 3:
    raise ValueError(f"LPIPS/VGG16 takes frames of 1 or 3 channels, got {c}.")
  x = (frames.astype(jnp.float32) - SHIFT) / SCALE
  outs = []
  for b, block in enumerate(BLOCKS):
    if b:
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")  # 2x2 max pool
    for name, _, _ in block:
      x = _conv(x, weights[f"{name}/kernel"], weights[f"{name}/bias"])
    outs.append(x)
  return outs


def lpips(weights: Mapping[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
  """LPIPS distance of frames x and y [N, H, W, C] in [-1, 1] -> [N] (0 for equal frames)."""
  unit = lambda a: a / (jnp.sqrt(jnp.sum(jnp.square(a), axis=-1, keepdims=True)) + 1e-10)
  total = 0.0
  for k, (fx, fy) in enumerate(zip(features(weights, x), features(weights, y))):
    diff = jnp.square(unit(fx) - unit(fy))  # [N, h, w, C_k]
    total = total + jnp.mean(jnp.sum(diff * weights[f"lin{k}"], axis=-1), axis=(1, 2))
  return total


def _load_torch(path: str) -> dict[str, np.ndarray]:
  """A .pth state dict as numpy arrays. torch is no dependency of this codebase: only the converter needs it."""
  import torch  # pylint: disable=g-import-not-at-top
  state = torch.load(path, map_location="cpu")
  return {key: value.numpy() for key, value in state.items()}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vgg16", required=True, help="torchvision's VGG16 state dict (.pth), a local file")
  parser.add_argument("--lpips", required=True, help="the LPIPS VGG heads (vgg.pth of PerceptualSimilarity)")
  parser.add_argument("--out", required=True, help="the weight file to write (.npz or .msgpack)")
  args = parser.parse_args(argv)
  weights = from_torch_state_dicts(_load_torch(args.vgg16), _load_torch(args.lpips))
  save_weights(args.out, weights)
  load_weights(args.out)  # checks every key and shape
  print(f"wrote {len(weights)} arrays to {args.out}")


if __name__ == "__main__":
  main()
