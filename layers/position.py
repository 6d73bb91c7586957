"""Position information: rotary embeddings (1d, 2d, 3d), token grids, learned tables.

Dimension letters: B batch, T tokens, N heads (query or kv), D head dim,
A position axes (1 for text, 2 for height/width, 3 for time/height/width),
E width.

Multi-axis RoPE (axial). The D/2 rotation pairs are split into A contiguous
sections; section a rotates by the coordinate on axis a. Section sizes are as
equal as possible, the first (D/2) % A sections taking one extra pair: D=64,
A=3 gives 32 pairs split 11, 11, 10. Each section has its own frequency ladder
base**(-i/n) for i < n (n its size), i.e. it is an ordinary 1d RoPE of
dimension 2n, so every axis sees fast and slow frequencies alike.

Pairs are formed half-split style: dimension i rotates with dimension i + D/2.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def rope_sections(half_dim: int, num_axes: int) -> tuple[int, ...]:
  """How many of the `half_dim` rotation pairs each of the `num_axes` axes gets."""
  if num_axes < 1 or half_dim < num_axes:
    raise ValueError(f"cannot split {half_dim} rotation pairs over {num_axes} axes")
  size, extra = divmod(half_dim, num_axes)
  return tuple(size + (1 if a < extra else 0) for a in range(num_axes))


def rope_angles(positions, half_dim: int, *, base: float = 10000.0):
  """Rotation angles float32 [B, T, D/2] for positions [B, T] or [B, T, A]."""
  positions = jnp.asarray(positions)
  if positions.ndim == 2:
    positions = positions[..., None]  # [B, T] -> [B, T, 1]
  angles = []
  for axis, n in enumerate(rope_sections(half_dim, positions.shape[-1])):
    inv_freq = base ** (-jnp.arange(n, dtype=jnp.float32) / n)  # [n]
    coord = positions[..., axis].astype(jnp.float32)  # [B, T]
    angles.append(coord[..., None] * inv_freq)  # [B, T, n]
  return jnp.concatenate(angles, axis=-1)  # [B, T, D/2]


def rope(x, positions, *, base: float = 10000.0):
  """Rotary position embedding of x [B, T, N, D] at positions [B, T] or [B, T, A]."""
  d = x.shape[-1]
  if d % 2:
    raise ValueError(f"RoPE needs an even head dim, got {d}")
  half = d // 2
  angles = rope_angles(positions, half, base=base)[:, :, None, :]  # [B, T, 1, D/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:]  # [B, T, N, D/2] each
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def grid_positions(shape: Sequence[int]):
  """Coordinates int32 [prod(shape), len(shape)] of a row-major flattened grid."""
  coords = np.indices(tuple(shape)).reshape(len(shape), -1).T  # [prod, A]
  return jnp.asarray(coords, dtype=jnp.int32)


class LearnedPositionEmbedding(nn.Module):
  """A learned table of `max_len` position vectors: positions [B, T] -> [B, T, E]."""

  max_len: int  # number of rows of the table (largest position + 1)
  features: int  # E, width of each vector
  dtype: jnp.dtype = jnp.float32  # output dtype
  param_dtype: jnp.dtype = jnp.float32  # the table is stored in this dtype

  @nn.compact
  def __call__(self, positions):
    table = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
        (self.max_len, self.features),
        self.param_dtype,
    )
    return jnp.take(table, positions, axis=0).astype(self.dtype)



def sinusoidal_positions(positions, features: int, *, base: float = 10000.0):
  """Fixed sine/cosine embeddings float32 [..., E] of integer positions [...] (E even): no table, any length."""
  if features % 2:
    raise ValueError(f"sinusoidal position embeddings need an even width, got {features}")
  half = features // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [E/2]
  angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq  # [..., E/2]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
