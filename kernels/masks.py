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

Blocks of different sizes (xAR's scales: 1, 4, 16, ... tokens) are a
block-causal mask with `block_sizes`: query i in block e sees the keys before
the end of block e. The visible keys are still a prefix, but not by the
uniform formula, so only the dense paths serve it (see kernels/dispatch.py).
"teacher_forcing" is the layout of a model trained on clean context (xAR's
ablation): the sequence is the S tokens clean, then the same S tokens noisy;
clean block e sees clean blocks <= e, noisy block e sees clean blocks < e
and its own noisy copy. A decoder of it caches the clean copy: queries in the
first S positions see exactly a block-causal mask.

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

MASK_KINDS = ("full", "causal", "block_causal", "teacher_forcing")


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


def block_ids(pos, block_sizes):
  """The block (0, 1, ...) of each position for consecutive blocks of `block_sizes`; past the end: the count."""
  ends = np.cumsum(block_sizes)
  return jnp.searchsorted(jnp.asarray(ends), pos, side="right")


def variable_block_causal_mask(q_len, kv_len=None, *, block_sizes, q_offset=0):
  """Bool [T, S]: query q_offset + t sees key s iff s is before the end of the query's block."""
  kv_len = q_len if kv_len is None else kv_len
  ends = jnp.asarray(np.concatenate([np.cumsum(block_sizes), [np.iinfo(np.int32).max]]))
  q_pos = q_offset + jnp.arange(q_len)[:, None]  # [T, 1]
  return jnp.arange(kv_len)[None, :] < ends[block_ids(q_pos, block_sizes)]


def teacher_forcing_mask(q_len, kv_len=None, *, block_sizes, q_offset=0):
  """Bool [T, S] over [clean copy (S0 tokens), noisy copy (S0)], S0 = sum(block_sizes) (module docstring)."""
  kv_len = q_len if kv_len is None else kv_len
  copy_len = int(np.sum(block_sizes))
  q_pos = q_offset + jnp.arange(q_len)[:, None]  # [T, 1]
  k_pos = jnp.arange(kv_len)[None, :]  # [1, S]
  q_noisy, k_noisy = q_pos >= copy_len, k_pos >= copy_len
  q_block = block_ids(jnp.where(q_noisy, q_pos - copy_len, q_pos), block_sizes)
  k_block = block_ids(jnp.where(k_noisy, k_pos - copy_len, k_pos), block_sizes)
  clean_query = ~q_noisy & ~k_noisy & (k_block <= q_block)
  noisy_query = q_noisy & jnp.where(k_noisy, k_block == q_block, k_block < q_block)
  return clean_query | noisy_query


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """A mask as data, so a model config can carry it (and a kernel skip tiles by it).

  kind "causal" uses block_len 1 (with the prefix, if any); "full" ignores both
  numbers. `block_sizes` (block_causal, teacher_forcing) gives blocks of
  different sizes in place of block_len, without a prefix.
  """

  kind: str = "causal"  # one of MASK_KINDS
  block_len: int = 1  # L, tokens per block (block_causal only)
  prefix_len: int = 0  # P, tokens visible to every query (causal, block_causal)
  block_sizes: tuple[int, ...] = ()  # consecutive blocks of these sizes (block_causal, teacher_forcing)

  def __post_init__(self):
    if self.kind not in MASK_KINDS:
      raise ValueError(f"MaskSpec.kind={self.kind!r}: expected one of {MASK_KINDS}")
    if self.block_len < 1 or self.prefix_len < 0 or any(n < 1 for n in self.block_sizes):
      raise ValueError(f"bad MaskSpec numbers: {self}")
    if self.block_sizes and (self.kind not in ("block_causal", "teacher_forcing") or self.prefix_len):
      raise ValueError(f"MaskSpec.block_sizes serves kinds block_causal and teacher_forcing without a prefix: {self}")
    if self.kind == "teacher_forcing" and not self.block_sizes:
      raise ValueError("MaskSpec kind 'teacher_forcing' needs block_sizes (the blocks of one copy)")

  @property
  def tiled(self) -> bool:
    """True iff the mask is block-causal with one block length (what the block kernels take)."""
    return not self.block_sizes

  def block_causal_numbers(self, kv_len) -> tuple[int, int]:
    """(block_len, prefix_len) of this mask as a block-causal mask over kv_len keys (tiled masks only)."""
    if not self.tiled:
      raise ValueError(f"{self} has blocks of several sizes: no single block length")
    if self.kind == "full":
      return max(kv_len, 1), 0  # one block holding every key
    if self.kind == "causal":
      return 1, self.prefix_len
    return self.block_len, self.prefix_len

  def make(self, q_len, kv_len=None, q_offset=0):
    """Bool [T, S] for queries at q_offset..q_offset+T-1 and keys 0..S-1."""
    if self.kind == "full":
      return full_mask(q_len, kv_len, q_offset)
    if self.kind == "teacher_forcing":
      return teacher_forcing_mask(q_len, kv_len, block_sizes=self.block_sizes, q_offset=q_offset)
    if self.block_sizes:
      return variable_block_causal_mask(q_len, kv_len, block_sizes=self.block_sizes, q_offset=q_offset)
    block_len, prefix_len = self.block_causal_numbers(kv_len)
    return block_causal_mask(q_len, kv_len, block_len=block_len, prefix_len=prefix_len,
                             q_offset=q_offset)


def dense_mask(mask: MaskSpec, q_len, kv_len, *, kv_valid_len=None, q_offset=0):
  """Bool [1|B, 1, T, S]: the MaskSpec's mask and-ed with the key padding (kv_valid_len [B])."""
  dense = mask.make(q_len, kv_len, q_offset=q_offset)[None, None]  # [1, 1, T, S]
  if kv_valid_len is not None:
    dense = dense & padding_mask(kv_valid_len, kv_len)  # [B, 1, T, S]
  return dense
