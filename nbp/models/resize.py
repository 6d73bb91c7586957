"""Bilinear resizing as the reference FVD and FID graphs do it (TF1), for the feature networks' preprocessing.

Dimension letters: M images (or frames), H/W their side, C channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


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
