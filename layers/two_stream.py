"""Two-stream attention: an observed causal stream, and candidates that each see its prefix and themselves.

Dimension letters: B batch, O observed tokens, C candidate tokens, H query
heads, K kv heads, D head dim, E width, S cache slots.

The autoregressive energy-based transformer (nbp/models/ebt.py) runs one
sequence [observed stream | candidates] through every layer. Observed token t
attends causally to observed tokens 0..t and never to a candidate. Candidate
c (the guess for the observed token that follows observed token
O - C + c) attends to observed tokens 0..O - C + c and to itself: never to
its own target, never to another candidate. Both streams share every weight.

Written as one masked attention over O + C tokens, the candidates' rows would
cost as much as the observed rows and again as much for the mostly empty
candidate-candidate square. Here the candidates' queries attend causally over
the observed keys (`xla_attention_lse`), and that result is merged with each
candidate's own key and value by the softmax combine of scan attention
(`kernels.reference.merge_attention`): about twice the attention of a plain
transformer over O tokens. Every path is plain XLA and differentiable to any
order; only the observed stream may go through a kernel (`impl`), for
inference that differentiates once.

Rotary positions: observed token t sits at position offset + t; candidate c
at the position of its target, offset + O - C + c + 1.

Decoding (decode=True) keeps a KV cache of the observed stream only, in the
layout of `layers.attention.MultiHeadAttention` (so nbp/decoding.py's
init_cache, resize_cache and set_cache_index serve it). A call with observed
tokens writes them at cache_index and advances it; a call with candidates
only (num_observed=0) reads the cache and writes nothing: candidate c then
sees the slots written up to cache_index - C + c.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from kernels import dispatch
from kernels import masks
from kernels import reference
from layers import attention as attention_lib
from layers import linear
from layers import position


def candidate_mask(num_candidates: int, num_keys: int, written=None):
  """Bool [C, S]: candidate c sees keys 0..W - C + c of S slots, W = `written` (traced or not; default S)."""
  written = num_keys if written is None else written
  c = jnp.arange(num_candidates)[:, None]
  return jnp.arange(num_keys)[None, :] <= written - num_candidates + c


def self_scores(q, k):
  """Each query's scaled score against its own key: q [B, C, H, D], k [B, C, K, D] -> float32 [B, C, H]."""
  b, c, h, d = q.shape
  kv = k.shape[2]
  q = q.reshape(b, c, kv, h // kv, d)
  s = jnp.einsum("bckgd,bckd->bckg", q, k, preferred_element_type=jnp.float32) * (1.0 / math.sqrt(d))
  return s.reshape(b, c, h)


def repeat_kv(v, num_heads: int):
  """v [B, C, K, D] -> [B, C, H, D], each kv head serving its H / K query heads."""
  return jnp.repeat(v, num_heads // v.shape[2], axis=2)


def candidate_attention(q, k_obs, v_obs, k_self, v_self, mask):
  """Candidates q [B, C, H, D] over observed keys/values [B, S, K, D] under mask [C, S], merged with themselves."""
  out, lse = reference.xla_attention_lse(q, k_obs, v_obs, mask)
  own = repeat_kv(v_self, q.shape[2])
  return reference.merge_attention(out, lse, own, self_scores(q, k_self))


def naive_two_stream_attention(q, k, v, num_observed: int):
  """The same attention as one masked attention over all O + C tokens: the definition the tests check against.

  q [B, O + C, H, D], k and v [B, O + C, K, D] (observed first) -> [B, O + C, H, D].
  """
  n = q.shape[1]
  c = n - num_observed
  rows = jnp.arange(n)[:, None]
  cols = jnp.arange(n)[None, :]
  observed_rows = (rows < num_observed) & (cols <= rows)
  # Candidate row O + j sees observed keys 0..O - C + j and itself.
  candidate_rows = (rows >= num_observed) & ((cols <= rows - c) | (cols == rows))
  return reference.xla_attention(q, k, v, observed_rows | candidate_rows)


class TwoStreamAttention(nn.Module):
  """x [B, O + C, E] (observed first, `num_observed` of them) -> [B, O + C, E]; see the module docstring."""

  num_heads: int  # H
  head_dim: int  # D
  num_observed: int  # O of this call; the rest of x are candidates
  num_kv_heads: int | None = None  # K; None: K = H
  rope_base: float = 10000.0  # RoPE frequency base
  impl: str = "xla"  # the observed stream's attention (kernels.dispatch.IMPLS); candidates are always XLA
  dtype: jnp.dtype = jnp.float32  # computation dtype
  param_dtype: jnp.dtype = jnp.float32  # parameter storage dtype
  max_decode_len: int | None = None  # S of the KV cache; None: O of the init input
  kernel_init: Callable | None = None  # projections' initializer; None: fan-in truncated normal

  def _dense(self, features, axis, kernel_names, name):
    return linear.DenseGeneral(
        features=features, axis=axis, kernel_axes=kernel_names, use_bias=False, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=self.kernel_init, name=name)

  @nn.compact
  def __call__(self, x, *, positions=None, kv_valid_len=None, decode=False):
    del positions  # the layer places both streams itself (module docstring)
    if kv_valid_len is not None:
      raise ValueError("two-stream attention takes no key padding (kv_valid_len)")
    dispatch.check_impl(self.impl)
    b, n, e = x.shape
    o = self.num_observed
    c = n - o
    h, d = self.num_heads, self.head_dim
    kv = self.num_kv_heads or h
    x = x.astype(self.dtype)
    q = self._dense((h, d), -1, ("embed", "heads", "head_dim"), "query")(x)  # [B, O + C, H, D]
    k = self._dense((kv, d), -1, ("embed", "kv_heads", "head_dim"), "key")(x)  # [B, O + C, K, D]
    v = self._dense((kv, d), -1, ("embed", "kv_heads", "head_dim"), "value")(x)  # [B, O + C, K, D]

    if decode:
      out = self._decode(q, k, v, o, c, b, kv, d)
    else:
      offsets = jnp.concatenate([jnp.arange(o), o - c + 1 + jnp.arange(c)]).astype(jnp.int32)
      pos = jnp.broadcast_to(offsets, (b, n))
      q, k = position.rope(q, pos, base=self.rope_base), position.rope(k, pos, base=self.rope_base)
      q_o, k_o, v_o = q[:, :o], k[:, :o], v[:, :o]
      parts = []
      if o:
        parts.append(dispatch.attention(q_o, k_o, v_o, mask=masks.MaskSpec("causal"), impl=self.impl))
      if c:
        if c > o:
          raise ValueError(f"{c} candidates need at least as many observed tokens, got {o}")
        mask = candidate_mask(c, o)
        parts.append(candidate_attention(q[:, o:], k_o, v_o, k[:, o:], v[:, o:], mask))
      out = jnp.concatenate(parts, axis=1)  # [B, O + C, H, D]
    return self._dense(e, (-2, -1), ("heads", "head_dim", "embed"), "out")(out)  # [B, O + C, E]

  def _decode(self, q, k, v, o, c, b, kv, d):
    """One decoding call: observed tokens written into the cache, candidates reading it."""
    cache_ready = self.has_variable("cache", "cached_key")
    cache_len = self.max_decode_len or o
    cached_key = self.variable("cache", "cached_key", jnp.zeros, (b * kv, d, cache_len), self.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, (b * kv, cache_len, d), self.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
    offset = cache_index.value if cache_ready else jnp.array(0, jnp.int32)
    pos = jnp.concatenate([offset + jnp.arange(o), offset + o - c + 1 + jnp.arange(c)]).astype(jnp.int32)
    pos = jnp.broadcast_to(pos, (b, o + c))
    q, k = position.rope(q, pos, base=self.rope_base), position.rope(k, pos, base=self.rope_base)
    keys, values = cached_key.value, cached_value.value
    if o:
      new_keys, new_values = attention_lib.cache_layout(k[:, :o].astype(self.dtype), v[:, :o].astype(self.dtype))
      keys = jax.lax.dynamic_update_slice(keys, new_keys, (0, 0, offset))
      values = jax.lax.dynamic_update_slice(values, new_values, (0, offset, 0))
      if cache_ready:  # `init` builds the cache; only a real decoding call fills it
        cached_key.value, cached_value.value = keys, values
        cache_index.value = offset + o
    written = offset + o
    slots = values.shape[-2]
    parts = []
    if o:
      mask = masks.causal_mask(o, slots, q_offset=offset)
      parts.append(attention_lib.decode_attention(q[:, :o], keys, values, mask))
    if c:
      # The cache's layout back to [B, S, K, D] for the candidates' merged attention.
      k_obs = keys.reshape(b, kv, d, slots).transpose(0, 3, 1, 2)
      v_obs = values.reshape(b, kv, slots, d).transpose(0, 2, 1, 3)
      mask = candidate_mask(c, slots, written)
      parts.append(candidate_attention(q[:, o:], k_obs, v_obs, k[:, o:], v[:, o:], mask))
    return jnp.concatenate(parts, axis=1)
