"""xAR's entities: the units an image is generated in, one autoregressive step each.

An image is a grid of h x w tokens (VAE latents, or pixel patches), each of C
channels. An `Entities` layout turns the grid into a sequence of S tokens cut
into K consecutive entities, and back:

  token      K = h*w entities of one token, raster order (next-token prediction);
  cell       k x k neighbouring tokens: K = (h/k)(w/k) cells in raster order,
             raster order inside each (the paper's best: 8x8 cells of a 16x16 grid);
  subsample  a strided, non-local grouping: entity (a, b), for a, b < s, holds
             the tokens at rows a, a+s, a+2s, ... and columns b, b+s, ...: K = s*s
             entities of (h/s)(w/s) tokens each, every one spread over the image;
  scale      coarse to fine: entity j is the grid average-pooled by factor f_j
             (f_0 > f_1 > ... > f_{K-1} = 1, each dividing the one before), so
             the entities have (h/f_j)(w/f_j) tokens and S > h*w;
  image      the whole grid as one entity (K = 1).

Token, cell, subsample and image are permutations of the grid: `decompose` is a
gather by `order` and `reconstruct` the inverse gather, exact for any values.
Scale is a pyramid, not a permutation. It is exact in this sense: average
pooling nests (pooling by f_j equals pooling the scale f_{j+1} by f_j/f_{j+1}),
so every coarse scale is a function of the finest one, and the reconstruction
rule is "the image is the finest scale": reconstruct(decompose(x)) == x
exactly, and the coarser scales a sampler draws are context for the finer ones.

Positions. Every token has 2D coordinates in units of the finest grid (a
pooled token at the centre of the tokens it averages: i*f + (f - 1)/2), for
2D RoPE; the learned position table is indexed by the sequence slot.

Dimensions: B batch, h/w token grid, C channels, S sequence length, K entities.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

KINDS = ("token", "cell", "subsample", "scale", "image")


def default_scales(h: int, w: int) -> tuple[int, ...]:
  """Pooling factors 2^m, ..., 4, 2, 1 down to a 1-token-wide side (the largest power of two dividing h and w)."""
  g = math.gcd(h, w)
  factors = [1]
  while g % (factors[-1] * 2) == 0:
    factors.append(factors[-1] * 2)
  return tuple(reversed(factors))


@dataclasses.dataclass(frozen=True)
class Entities:
  """How a [h, w] token grid is cut into entities (module docstring); hashable, a trace-time constant."""

  kind: str  # one of KINDS
  grid: tuple[int, int]  # (h, w) tokens
  cell: int = 1  # k: side of a cell (kind "cell")
  stride: int = 2  # s: subsampling stride (kind "subsample"), s*s entities
  scales: tuple[int, ...] = ()  # pooling factors coarse to fine, ending in 1 (kind "scale"); (): default_scales

  def __post_init__(self):
    h, w = self.grid
    if self.kind not in KINDS:
      raise ValueError(f"config.model.entity={self.kind!r}: choose one of {KINDS}")
    if self.kind == "cell" and (self.cell < 1 or h % self.cell or w % self.cell):
      raise ValueError(f"config.model.cell={self.cell} must divide the token grid {tuple(self.grid)}")
    if self.kind == "subsample" and (self.stride < 1 or h % self.stride or w % self.stride):
      raise ValueError(f"config.model.stride={self.stride} must divide the token grid {tuple(self.grid)}")
    if self.kind == "scale":
      factors = self.factors
      if factors[-1] != 1 or any(a <= b or a % b for a, b in zip(factors, factors[1:])):
        raise ValueError(f"config.model.scales={factors}: pooling factors must fall to 1, each dividing the "
                         "one before (e.g. (8, 4, 2, 1))")
      if any(h % f or w % f for f in factors):
        raise ValueError(f"config.model.scales={factors} must divide the token grid {tuple(self.grid)}")

  @property
  def factors(self) -> tuple[int, ...]:
    """The scale kind's pooling factors, coarse to fine."""
    return tuple(self.scales) or default_scales(*self.grid)

  @property
  def sizes(self) -> tuple[int, ...]:
    """Tokens per entity, in generation order."""
    h, w = self.grid
    if self.kind == "token":
      return (1,) * (h * w)
    if self.kind == "cell":
      return (self.cell ** 2,) * (h * w // self.cell ** 2)
    if self.kind == "subsample":
      return ((h // self.stride) * (w // self.stride),) * self.stride ** 2
    if self.kind == "scale":
      return tuple((h // f) * (w // f) for f in self.factors)
    return (h * w,)

  @property
  def num_entities(self) -> int:
    return len(self.sizes)

  @property
  def seq_len(self) -> int:
    """S: tokens of the sequence (h*w, or more for the scale pyramid)."""
    return sum(self.sizes)

  @property
  def uniform(self) -> bool:
    """True iff every entity has the same size (one block length for the attention kernels)."""
    return len(set(self.sizes)) == 1

  @property
  def starts(self) -> np.ndarray:
    """int [K]: the first slot of every entity."""
    return np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int32)

  def entity_of_slot(self) -> np.ndarray:
    """int [S]: the entity each sequence slot belongs to."""
    return np.repeat(np.arange(self.num_entities), self.sizes).astype(np.int32)

  @property
  def order(self) -> np.ndarray:
    """int [h*w]: slot i holds grid token order[i] (row-major index); permutation kinds only."""
    return _order(self.kind, self.grid, self.cell, self.stride)

  def positions(self) -> np.ndarray:
    """float32 [S, 2]: (row, column) of every slot in units of the finest grid."""
    h, w = self.grid
    if self.kind != "scale":
      coords = np.indices((h, w)).reshape(2, -1).T[self.order]
      return coords.astype(np.float32)
    out = []
    for f in self.factors:
      coords = np.indices((h // f, w // f)).reshape(2, -1).T
      out.append(coords * f + (f - 1) / 2)
    return np.concatenate(out).astype(np.float32)

  def decompose(self, x):
    """Grid x [B, h, w, C] -> sequence [B, S, C] (entities in generation order)."""
    b, h, w, c = x.shape
    if (h, w) != tuple(self.grid):
      raise ValueError(f"a grid of {(h, w)} tokens given to entities over {tuple(self.grid)}")
    if self.kind != "scale":
      return x.reshape(b, h * w, c)[:, self.order]
    return jnp.concatenate([pool(x, f).reshape(b, -1, c) for f in self.factors], axis=1)

  def reconstruct(self, seq):
    """Sequence [B, S, C] -> grid [B, h, w, C]: the inverse permutation, or the finest scale."""
    b, s, c = seq.shape
    h, w = self.grid
    if s != self.seq_len:
      raise ValueError(f"a sequence of {s} tokens given to entities of {self.seq_len}")
    if self.kind != "scale":
      return seq[:, np.argsort(self.order)].reshape(b, h, w, c)
    return seq[:, -h * w:].reshape(b, h, w, c)


def pool(x, factor: int):
  """Average pooling of [B, h, w, C] by `factor` in both directions -> [B, h/f, w/f, C]."""
  b, h, w, c = x.shape
  if factor == 1:
    return x
  return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


@functools.cache
def _order(kind: str, grid: tuple[int, int], cell: int, stride: int) -> np.ndarray:
  h, w = grid
  index = np.arange(h * w).reshape(h, w)
  if kind == "cell":  # [cell rows, cell cols, in-cell rows, in-cell cols]
    return index.reshape(h // cell, cell, w // cell, cell).transpose(0, 2, 1, 3).reshape(-1)
  if kind == "subsample":  # [row offset a, col offset b, rows, cols]: x[a::s, b::s]
    return index.reshape(h // stride, stride, w // stride, stride).transpose(1, 3, 0, 2).reshape(-1)
  if kind == "scale":
    raise ValueError("the scale pyramid is not a permutation: it has no order")
  return index.reshape(-1)  # token and image: raster order
