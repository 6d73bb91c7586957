"""Attention masks: the block-causal mask, its visible-key formula, MaskSpec.

Dimension letters: B batch, T query length, S key length, L tokens per block,
P prefix length.

The block-causal mask is the one mask of the next-block (NBP) and next-entity
(xAR) models: keys 0..P-1 form a prefix that every query sees; after it, token
i belongs to block (i - P) // L and sees every token of its own and earlier
blocks. L = 1 is ordinary causal attention, L >= T full attention.

The keys a query at position i sees are always the contiguous range
[0, visible_key_end(i)), and visible_key_end grows with i. That one formula
defines the mask: `block_causal_mask` is `key < visible_key_end(query)`, the
Pallas kernels (kernels/block_attention.py) take their tile masks and loop
bounds from it, and the block-sparse XLA path (kernels/blocksparse.py) the key
extent of each row chunk. `first_seeing_query` is its inverse (query i sees
key j iff i >= first_seeing_query(j), for j below the sequence end), the
bound of the key-tile loops of the backward kernels. Both evaluate in numpy
(static bounds, tests), in jnp and on traced scalars inside a Pallas kernel.

Masks are bool arrays, True = the query may see the key. Masked logits get
MASK_VALUE, large and finite, so that a fully masked row gives a uniform
(finite) average instead of NaN.
"""

from __future__ import annotations

import dataclasses

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# Logits of masked pairs (never -inf: see the module docstring).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

MASK_KINDS = ("full", "causal", "block_causal")


# ----------------------------------------------------------------------------
# The visible-key formula, for numpy, jnp and traced kernel scalars.


def array_module(x):
  """jnp for a jax array (concrete or traced), numpy for anything else."""
  return jnp if isinstance(x, jax.Array) else np


def index_div(a, b):
  """a // b for integers a >= 0 and b > 0.

  lax.div on jax arrays: inside a Pallas kernel it is one integer division
  (floor division would add sign corrections), and for a >= 0 truncation and
  floor agree.
  """
  if isinstance(a, jax.Array):
    return lax.div(a, jnp.asarray(b, a.dtype))
  return a // b


def visible_key_end(q_pos, *, block_len, prefix_len):
  """One past the last key that the query at position q_pos sees: it sees [0, end).

  A prefix query sees the prefix; a later one its own and the earlier blocks
  (with the prefix). The end may exceed the number of keys; clip it yourself.
  """
  xp = array_module(q_pos)
  after = prefix_len + (index_div(xp.maximum(q_pos - prefix_len, 0), block_len) + 1) * block_len
  return xp.where(q_pos < prefix_len, prefix_len, after)


def first_seeing_query(k_pos, *, block_len, prefix_len):
  """The first query position that sees key k_pos (every later query does too)."""
  xp = array_module(k_pos)
  start = prefix_len + index_div(xp.maximum(k_pos - prefix_len, 0), block_len) * block_len
  return xp.where(k_pos < prefix_len, 0, start)


# ----------------------------------------------------------------------------
# Dense masks.


def block_causal_mask(q_len, kv_len=None, *, block_len, prefix_len=0, q_offset=0):
  """Bool [T, S]: query q_offset + t sees key s (see the module docstring).

  `q_offset` may be a traced integer (the cache index while decoding);
  `block_len` and `prefix_len` are static.
  """
  kv_len = q_len if kv_len is None else kv_len
  if block_len < 1:
    raise ValueError(f"block_len must be >= 1, got {block_len}")
  q_pos = q_offset + jnp.arange(q_len)[:, None]  # [T, 1] absolute query positions
  k_pos = jnp.arange(kv_len)[None, :]  # [1, S] key positions
  return k_pos < visible_key_end(q_pos, block_len=block_len, prefix_len=prefix_len)


def causal_mask(q_len, kv_len=None, q_offset=0):
  """Bool [T, S]: query q_offset + t sees keys 0..q_offset + t."""
  return block_causal_mask(q_len, kv_len, block_len=1, q_offset=q_offset)


def full_mask(q_len, kv_len=None, q_offset=0):
  """Bool [T, S], all True (bidirectional attention)."""
  del q_offset  # every query sees every key wherever it is
  kv_len = q_len if kv_len is None else kv_len
  return jnp.ones((q_len, kv_len), dtype=bool)


def padding_mask(kv_valid_len, kv_len):
  """Bool [B, 1, 1, S]: key s is visible iff s < kv_valid_len[b]."""
  valid = jnp.arange(kv_len)[None, :] < jnp.asarray(kv_valid_len)[:, None]  # [B, S]
  return valid[:, None, None, :]


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """A mask as data, so a model config can carry it (and a kernel skip tiles by it).

  kind "causal" uses block_len 1 (with the prefix, if any); "full" ignores both
  numbers.
  """

  kind: str = "causal"  # one of MASK_KINDS
  block_len: int = 1  # L, tokens per block (block_causal only)
  prefix_len: int = 0  # P, tokens visible to every query (causal, block_causal)

  def __post_init__(self):
    if self.kind not in MASK_KINDS:
      raise ValueError(f"MaskSpec.kind={self.kind!r}: expected one of {MASK_KINDS}")
    if self.block_len < 1 or self.prefix_len < 0:
      raise ValueError(f"bad MaskSpec numbers: {self}")

  def block_causal_numbers(self, kv_len) -> tuple[int, int]:
    """(block_len, prefix_len) of this mask as a block-causal mask over kv_len keys."""
    if self.kind == "full":
      return max(kv_len, 1), 0  # one block holding every key
    if self.kind == "causal":
      return 1, self.prefix_len
    return self.block_len, self.prefix_len

  def make(self, q_len, kv_len=None, q_offset=0):
    """Bool [T, S] for queries at q_offset..q_offset+T-1 and keys 0..S-1."""
    if self.kind == "full":
      return full_mask(q_len, kv_len, q_offset)
    block_len, prefix_len = self.block_causal_numbers(kv_len)
    return block_causal_mask(q_len, kv_len, block_len=block_len, prefix_len=prefix_len,
                             q_offset=q_offset)


def dense_mask(mask: MaskSpec, q_len, kv_len, *, kv_valid_len=None, q_offset=0):
  """Bool [1|B, 1, T, S]: the MaskSpec's mask and-ed with the key padding (kv_valid_len [B])."""
  dense = mask.make(q_len, kv_len, q_offset=q_offset)[None, None]  # [1, 1, T, S]
  if kv_valid_len is not None:
    dense = dense & padding_mask(kv_valid_len, kv_len)  # [B, 1, T, S]
  return dense
