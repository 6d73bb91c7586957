"""Block-causal attention in plain XLA that only computes the visible keys.

The fast CPU path of `kernels.dispatch.attention` for long self-attention.
Same contract as `kernels.reference.block_causal_attention` (the dense mask
`block_causal_mask(T, T, block_len=L, prefix_len=P)` and key padding), but the
queries are cut into row chunks of C tokens and chunk r only multiplies against
keys [0, end_r), end_r = `visible_key_end` of its last row (kernels/masks.py). The
work and the saved activations therefore follow the visible (lower block-
triangular) area, about half of T^2 for causal attention, instead of T^2.

XLA needs static shapes, so the chunks are a static Python loop: each chunk has
its own key length, known when tracing. The block-causal part of each chunk's
mask is a numpy constant; only key padding is a traced mask. Chunks whose rows
all see the same keys skip the mask altogether.

Softmax is in float32 and normalised after the value product (a [C, D] divide
instead of [C, S]); masked logits are a large finite negative (never -inf), so a
row without any visible key (only possible with kv_valid_len 0) stays finite.
Gradients come from ordinary autodiff; `remat=True` recomputes each chunk's
scores in the backward pass instead of keeping them.

Dimension letters: B batch, T sequence, H query heads, K kv heads, G = H / K,
D head dim, L tokens per block, P prefix tokens, C rows per chunk.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kernels import masks

# Rows per chunk before rounding to whole blocks. Forward + backward at T=4096,
# L=16, H=4, D=64 on the 2-core CPU: 0.46 s (C=128), 0.43 (256), 0.49 (512),
# 0.51 (1024); dense 1.7 s. Smaller chunks cost compile time (more ops).
DEFAULT_CHUNK = 256
# Longer sequences get proportionally larger chunks so that the traced program
# stays at most this many chunks long (compile time grows with the chunk count).
MAX_CHUNKS = 48


def default_chunk(seq_len: int, block_len: int) -> int:
  """Rows per chunk: DEFAULT_CHUNK (or enough for MAX_CHUNKS), whole blocks when L is smaller."""
  chunk = max(DEFAULT_CHUNK, -(-seq_len // MAX_CHUNKS))
  if block_len < chunk:
    chunk = max(block_len, chunk // block_len * block_len)
  return chunk


def chunk_bounds(seq_len: int, block_len: int, prefix_len: int, chunk: int):
  """[(r0, r1, end)]: row chunks and their key extents.

  The prefix rows and the rows after it are chunked separately, so that with C a
  multiple of L every chunk ends exactly on a block boundary.
  """
  bounds = []
  split = min(prefix_len, seq_len)
  for lo, hi in ((0, split), (split, seq_len)):
    for r0 in range(lo, hi, chunk):
      r1 = min(r0 + chunk, hi)
      end = masks.visible_key_end(r1 - 1, block_len=block_len, prefix_len=prefix_len)
      bounds.append((r0, r1, int(min(end, seq_len))))
  return bounds


def _chunk_mask(r0, r1, end, block_len, prefix_len):
  """numpy bool [r1 - r0, end]: the block-causal mask of rows r0..r1-1 (None if all True)."""
  q_pos = np.arange(r0, r1)[:, None]
  k_pos = np.arange(end)[None, :]
  mask = k_pos < masks.visible_key_end(q_pos, block_len=block_len, prefix_len=prefix_len)
  return None if mask.all() else mask


def _attend_chunk(q_chunk, k, v, *, mask, valid):
  """q_chunk [B,K,G,C,D] (pre-scaled), k/v [B,K,E,D], mask [C,E] | None, valid [B,E] | None."""
  logits = jnp.einsum("bkgcd,bked->bkgce", q_chunk, k, preferred_element_type=jnp.float32)
  visible = None
  if mask is not None:
    visible = jnp.asarray(mask)[None, None, None]  # [1, 1, 1, C, E]
  if valid is not None:
    pad = valid[:, None, None, None, :]  # [B, 1, 1, 1, E]
    visible = pad if visible is None else visible & pad
  if visible is not None:
    logits = jnp.where(visible, logits, masks.MASK_VALUE)
  # The softmax is invariant to the shift, so no gradient needs to flow through it.
  shift = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  p = jnp.exp(logits - shift)  # [B, K, G, C, E]
  denom = jnp.sum(p, axis=-1, keepdims=True)  # [B, K, G, C, 1]
  out = jnp.einsum("bkgce,bked->bkgcd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out / denom  # [B, K, G, C, D] float32


def block_attention_blocksparse(q, k, v, *, block_len, prefix_len=0, kv_valid_len=None, chunk=None,
                                remat=False):
  """Block-causal self-attention over the visible keys only.

  q [B, T, H, D], k and v [B, T, K, D] with H % K == 0 (grouped-query; k and v are
  not repeated). block_len L >= 1 and prefix_len P >= 0 are static; L = 1 is
  causal attention, L >= T full attention. kv_valid_len: None or int [B], keys
  at s >= kv_valid_len[b] are hidden. chunk: rows per chunk (None: default_chunk).
  remat: recompute each chunk in the backward pass (less memory, more time).
  Returns [B, T, H, D] in q.dtype, equal to `reference.block_causal_attention`.
  """
  b, t, h, d = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  if s != t or v.shape[1] != t:
    raise ValueError(f"xla_blocksparse is self-attention: {t} queries but {s} keys")
  if h % kv_heads:
    raise ValueError(f"{h} query heads are not a multiple of {kv_heads} kv heads")
  if block_len < 1 or prefix_len < 0:
    raise ValueError(f"block_len must be >= 1 and prefix_len >= 0, got {block_len}, {prefix_len}")
  chunk = default_chunk(t, block_len) if chunk is None else int(chunk)
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1, got {chunk}")
  g = h // kv_heads
  scale = 1.0 / math.sqrt(d)
  qt = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,D]
  kt = k.transpose(0, 2, 1, 3)  # [B, K, T, D]
  vt = v.transpose(0, 2, 1, 3)  # [B, K, T, D]
  valid = None
  if kv_valid_len is not None:
    lengths = jnp.broadcast_to(jnp.asarray(kv_valid_len, jnp.int32), (b,))
    valid = jnp.arange(t)[None, :] < lengths[:, None]  # [B, T]

  outs = []
  for r0, r1, end in chunk_bounds(t, block_len, prefix_len, chunk):
    mask = _chunk_mask(r0, r1, end, block_len, prefix_len)  # a constant of this chunk
    attend = functools.partial(_attend_chunk, mask=mask)
    if remat:
      attend = jax.checkpoint(attend)
    outs.append(attend(qt[:, :, :, r0:r1], kt[:, :, :end], vt[:, :, :end],
                       valid=None if valid is None else valid[:, :end]).astype(q.dtype))
  out = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]  # [B, K, G, T, D]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)

