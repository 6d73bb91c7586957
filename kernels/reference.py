"""Dense softmax attention in plain jnp: the reference every kernel is checked against.

Dimension letters: B batch, T query length, S key length, H query heads,
K kv heads, G = H / K query heads per kv head, D head dim, L tokens per block,
P prefix length.

`xla_attention` takes any bool mask broadcastable to [B, H, T, S] (True =
visible); it is also the "xla" implementation of `kernels.dispatch.attention`
(any mask, any query offset, differentiable to any order). `block_causal_attention`
is it under the block-causal mask and key padding: the contract of the
block-causal kernels (kernels/block_attention.py, kernels/blocksparse.py).
`xla_attention_lse` also returns each query's logsumexp, and `merge_attention`
combines two attentions of the same queries over disjoint key sets (the
candidates of layers/two_stream.py: their prefix, then themselves).

Scale 1/sqrt(D), logits and softmax in float32, masked logits MASK_VALUE (a row
without any visible key averages every value instead of giving NaN), output in
q.dtype. Grouped-query k and v are never repeated: q is viewed as [B, T, K, G, D].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kernels import masks
from kernels import scan_attention


def _as_bkgts_mask(mask, num_kv_heads):
  """Mask broadcastable to [B, H, T, S] -> broadcastable to [B, K, G, T, S]."""
  mask = jnp.asarray(mask, dtype=bool)
  mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # [B|1, H|1, T|1, S|1]
  b, h, t, s = mask.shape
  if h == 1:
    return mask[:, :, None]  # [B|1, 1, 1, T|1, S|1]
  return mask.reshape(b, num_kv_heads, h // num_kv_heads, t, s)  # [B|1, K, G, T|1, S|1]


def _masked_logits(q, k, mask):
  """Scaled float32 logits [B, K, G, T, S] of q [B, T, H, D] against k [B, S, K, D], masked to MASK_VALUE."""
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  if h % kv_heads:
    raise ValueError(f"{h} query heads are not a multiple of {kv_heads} kv heads")
  q = q.reshape(b, t, kv_heads, h // kv_heads, d)  # [B, T, K, G, D]
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  logits = logits * (1.0 / math.sqrt(d))  # [B, K, G, T, S]
  if mask is not None:
    logits = jnp.where(_as_bkgts_mask(mask, kv_heads), logits, masks.MASK_VALUE)
  return logits


def _weighted_values(probs, v, q):
  """probs [B, K, G, T, S] times v [B, S, K, D] -> [B, T, H, D] in q.dtype."""
  b, t, h, d = q.shape
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)  # [B, T, K, G, D]
  return out.reshape(b, t, h, d).astype(q.dtype)


def xla_attention(q, k, v, mask=None):
  """Softmax attention q [B, T, H, D], k and v [B, S, K, D] -> [B, T, H, D] (H % K == 0).

  mask: None (all visible) or bool broadcastable to [B, H, T, S].
  """
  return _weighted_values(jax.nn.softmax(_masked_logits(q, k, mask), axis=-1), v, q)


def xla_attention_lse(q, k, v, mask=None):
  """`xla_attention` that also returns the logsumexp of each query's scaled logits.

  q [B, T, H, D], k and v [B, S, K, D] -> (out [B, T, H, D], lse float32 [B, T, H]).
  Two attentions of the same query over disjoint key sets merge exactly by
  `merge_attention`. A row without any visible key has lse about MASK_VALUE.
  """
  b, t, h, _ = q.shape
  logits = _masked_logits(q, k, mask)
  lse = jax.nn.logsumexp(logits, axis=-1)  # [B, K, G, T]
  out = _weighted_values(jnp.exp(logits - lse[..., None]), v, q)
  return out, lse.transpose(0, 3, 1, 2).reshape(b, t, h)


def merge_attention(out_a, lse_a, out_b, lse_b):
  """The attention over the union of two disjoint key sets, from each set's (out [..., D], lse [...]).

  The softmax combine of scan attention (kernels.scan_attention.combine) on
  the states (lse, 1, out): weights exp(lse_a - m) and exp(lse_b - m) with m
  the larger lse. Output in out_a.dtype.
  """
  m, u, w = scan_attention.combine(
      (lse_a.astype(jnp.float32), jnp.ones_like(lse_a, jnp.float32), out_a.astype(jnp.float32)),
      (lse_b.astype(jnp.float32), jnp.ones_like(lse_b, jnp.float32), out_b.astype(jnp.float32)))
  del m
  return (w / u[..., None]).astype(out_a.dtype)


def block_causal_attention(q, k, v, *, block_len, prefix_len=0, kv_valid_len=None):
  """`xla_attention` under block_causal_mask(T, S, block_len=L, prefix_len=P) and key padding.

  q [B, T, H, D], k and v [B, S, K, D]; kv_valid_len None or int [B] (keys at
  s >= kv_valid_len[b] are hidden).
  """
  t, s = q.shape[1], k.shape[1]
  mask = masks.MaskSpec("block_causal", block_len=block_len, prefix_len=prefix_len)
  return xla_attention(q, k, v, masks.dense_mask(mask, t, s, kv_valid_len=kv_valid_len))
