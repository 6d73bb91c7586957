"""Multi-head attention with a KV cache, over the kernels of kernels/.

Dimension letters: B batch, T query length, S key length, H query heads,
K kv heads, G = H / K query heads per kv head, D head dim, E width.

The masks (MaskSpec, block_causal_mask, ...), the reference attention and the
kernels live in kernels/ (kernels/masks.py, kernels/reference.py, and
kernels/dispatch.py, which picks an implementation); this module imports them,
never the other way round. MaskSpec is also importable from here, as model
code writes `layers.attention.MaskSpec`.

The KV cache of a decoding MultiHeadAttention keeps keys transposed and the
batch and kv-head axes merged: cached_key [B*K, D, S], cached_value [B*K, S, D]
(see `decode_attention`). Its length S is whatever the caller gives: a sampler
may start with a cache that just fits the prefill and grow it with
`resize_cache` between phases of its loop, so that each step attends only over
the slots written by the end of its phase.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from kernels import dispatch
from kernels import masks
from kernels.masks import MaskSpec  # re-exported: model configs write layers.attention.MaskSpec
from layers import linear
from layers import position


# ----------------------------------------------------------------------------
# Attention over a KV cache.
#
# Layout, measured on the 2-core CPU (XLA with YNNPACK dots; 8 heads of 64):
# with a cache [B, S, K, D] every decode step transposed
# the whole cache twice per layer (q.k wants [B, K, D, S], p.v [B, K, S, D]);
# with [B, K, ...] the product needs a reshape of the freshly written cache to
# one batch axis, and XLA duplicated the in-place write into a full copy for
# it. Keys [B*K, D, S] and values [B*K, S, D] feed both products as they are,
# and the write stays in place. Attention of 8 layers over 1000 slots, per
# step, [B, S, K, D] -> this layout: T=1 2.8 -> 0.8 ms (B=1), 39 -> 10 ms (B=8);
# T=16 6.8 -> 5.3 ms (B=1), 73 -> 43 ms (B=8); the q.k product was 2.4x
# faster with keys [D, S] than with [S, D]. (Attending to the old cache before
# writing, instead of after, made XLA copy the loop-carried cache.)

CACHE_KEYS = ("cached_key", "cached_value")  # the cache variables whose slot axis resize_cache changes


def cache_layout(k, v):
  """New keys and values [B, T, K, D] -> ([B*K, D, T], [B*K, T, D]), the cache layout."""
  b, t, kv, d = k.shape
  return k.transpose(0, 2, 3, 1).reshape(b * kv, d, t), v.transpose(0, 2, 1, 3).reshape(b * kv, t, d)


def decode_attention(q, keys, values, mask=None):
  """Softmax attention of q [B, T, H, D] over a cache: keys [B*K, D, S], values [B*K, S, D].

  mask: bool broadcastable to [B, 1, T, S] (True = visible), the same for every
  head. Scale 1/sqrt(D), float32 logits and softmax, output [B, T, H, D] in
  q.dtype: `kernels.reference.xla_attention` with the cache's layout.
  """
  b, t, h, d = q.shape
  bk, _, s = keys.shape
  kv = bk // b
  g = h // kv
  q = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(bk, g * t, d)  # [B*K, G*T, D]
  logits = jax.lax.dot_general(q, keys, (((2,), (1,)), ((0,), (0,))),
                               preferred_element_type=jnp.float32)  # [B*K, G*T, S]
  logits = logits * (1.0 / math.sqrt(d))
  if mask is not None:
    mask = jnp.asarray(mask, dtype=bool)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)[:, :1]  # [B|1, 1, T|1, S|1]
    mask = jnp.broadcast_to(mask[:, :, None], (b, kv, g, t, s)).reshape(bk, g * t, s)
    logits = jnp.where(mask, logits, masks.MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
  out = jax.lax.dot_general(probs, values, (((2,), (1,)), ((0,), (0,))))  # [B*K, G*T, D]
  return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


def resize_cache(cache, length: int):
  """A decoding cache (any pytree holding MultiHeadAttention caches) with `length` slots.

  Growing pads with zeros after the written slots; shrinking drops the last
  slots (only ever do that to unwritten ones). cache_index is unchanged.
  Works for unstacked and scanned (stacked [N, ...]) layers alike: the slot
  axis is the last of cached_key and the one before last of cached_value.
  """
  def resize(path, x):
    name = getattr(path[-1], "key", None)
    if name not in CACHE_KEYS:
      return x
    axis = x.ndim - 1 if name == "cached_key" else x.ndim - 2
    now = x.shape[axis]
    if length <= now:
      return jax.lax.slice_in_dim(x, 0, length, axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - now)
    return jnp.pad(x, pad)
  return jax.tree_util.tree_map_with_path(resize, cache)


def set_cache_index(cache, index):
  """A decoding cache whose every cache_index is `index`: the next call writes its slots from there.

  A sampler that evaluates the same tokens several times (xAR's solver steps
  on one entity) rewinds the index before each call, so each call overwrites
  the same slots and the last call's keys and values stay.
  """
  def rewind(path, x):
    if getattr(path[-1], "key", None) != "cache_index":
      return x
    return jnp.full(x.shape, index, x.dtype)
  return jax.tree_util.tree_map_with_path(rewind, cache)


# ----------------------------------------------------------------------------
# Multi-head attention.

ROPE_AXES = {None: 0, "1d": 1, "2d": 2, "3d": 3}


class MultiHeadAttention(nn.Module):
  """Multi-head (grouped-query) attention over x [B, T, E] with RoPE and a KV cache.

  Decoding (decode=True): `init` creates a cache of zeros (keys [B*K, D, S],
  values [B*K, S, D], see `decode_attention`) with S = max_decode_len (or T of
  the init input) and cache_index 0, and returns the ordinary forward pass.
  Each later `apply(..., mutable=["cache"])` writes its T new keys and values
  in place at cache_index, lets the queries at positions
  cache_index..cache_index+T-1 attend over the written part of the cache under
  `mask`, and advances cache_index by T. The cache may have any length S >= the
  slots written (`resize_cache`); a step costs attention over all S slots.

  `positions` ([B, T] or [B, T, A]) rotate queries and keys alike; a pair
  (query positions, key positions) rotates each by its own.

  `impl` picks the attention implementation through `kernels.dispatch.attention`
  ("auto" chooses per backend and sequence length); cached decode steps run
  `decode_attention` (plain XLA in the cache's layout), except a prefill of at
  least AUTO_BLOCKSPARSE_MIN_LEN tokens into an empty cache, which attends over
  its own keys through the dispatcher as training does. An impl outside
  kernels.dispatch.IMPLS is an AttentionImplError naming it and the choices.
  """

  num_heads: int  # H
  head_dim: int  # D
  num_kv_heads: int | None = None  # K; None: K = H (no grouping)
  mask: MaskSpec = MaskSpec("causal")  # which keys each query sees
  rope: str | None = None  # None, "1d", "2d" or "3d": axes of the rotary positions
  rope_base: float = 10000.0  # RoPE frequency base
  impl: str = "xla"  # one of kernels.dispatch.IMPLS ("auto", "xla", "xla_blocksparse", "pallas", "cudnn")
  dtype: jnp.dtype = jnp.float32  # computation dtype
  param_dtype: jnp.dtype = jnp.float32  # parameter storage dtype
  use_bias: bool = False  # biases on the q/k/v/out projections
  max_decode_len: int | None = None  # S of the KV cache; None: T of the init input
  kernel_init: Callable | None = None  # projections' initializer; None: fan-in truncated normal

  def _dense(self, features, axis, kernel_names, name):
    """A projection whose kernel (and bias) carry logical axis names."""
    return linear.DenseGeneral(
        features=features, axis=axis, kernel_axes=kernel_names, use_bias=self.use_bias,
        dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init, name=name)

  def _rope(self, x, positions):
    if self.rope is None:
      return x
    return position.rope(x, positions, base=self.rope_base)

  def _rope_qk(self, q, k, positions):
    """q and k rotated by one positions array, or by (query positions, key positions)."""
    q_positions, k_positions = positions if isinstance(positions, tuple) else (positions, positions)
    return self._rope(q, q_positions), self._rope(k, k_positions)

  def _default_positions(self, batch, length, offset):
    if self.rope is None:
      return None
    if self.rope != "1d":
      raise ValueError(f"rope={self.rope!r} needs explicit positions [B, T, {ROPE_AXES[self.rope]}]")
    return jnp.broadcast_to(offset + jnp.arange(length, dtype=jnp.int32), (batch, length))

  def _attend_cache(self, q, keys, values, *, kv_valid_len, q_offset):
    """q [B, T, H, D] at q_offset.. over the cache (keys [B*K, D, S], values [B*K, S, D])."""
    t, s = q.shape[1], values.shape[-2]
    mask = masks.dense_mask(self.mask, t, s, kv_valid_len=kv_valid_len, q_offset=q_offset)
    return decode_attention(q, keys, values, mask)

  @nn.compact
  def __call__(self, x, *, positions=None, kv_valid_len=None, decode=False):
    if self.rope not in ROPE_AXES:
      raise ValueError(f"rope={self.rope!r}: expected one of {list(ROPE_AXES)}")
    dispatch.check_impl(self.impl)  # cached decode steps never reach the dispatcher
    b, t, e = x.shape
    h, d = self.num_heads, self.head_dim
    kv = self.num_kv_heads or h
    x = x.astype(self.dtype)
    q = self._dense((h, d), -1, ("embed", "heads", "head_dim"), "query")(x)  # [B, T, H, D]
    k = self._dense((kv, d), -1, ("embed", "kv_heads", "head_dim"), "key")(x)  # [B, T, K, D]
    v = self._dense((kv, d), -1, ("embed", "kv_heads", "head_dim"), "value")(x)  # [B, T, K, D]

    cache_ready = decode and self.has_variable("cache", "cached_key")
    if decode:
      cache_len = self.max_decode_len or t
      if t > cache_len:
        raise ValueError(f"{t} tokens do not fit a KV cache of {cache_len}")
      cached_key = self.variable("cache", "cached_key", jnp.zeros, (b * kv, d, cache_len), self.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, (b * kv, cache_len, d), self.dtype)
      cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))

    if cache_ready:
      offset = cache_index.value
      cache_len = cached_value.value.shape[-2]  # the cache given, maybe resized
      if t > cache_len:
        raise ValueError(f"{t} tokens do not fit a KV cache of {cache_len}")
      if positions is None:
        positions = self._default_positions(b, t, offset)
      q, k = self._rope_qk(q, k, positions)
      # One in-place write per tensor at offset: keys [B*K, D, S] <- [B*K, D, T], values [B*K, S, D] <- [B*K, T, D].
      new_keys, new_values = cache_layout(k.astype(self.dtype), v.astype(self.dtype))
      keys = jax.lax.dynamic_update_slice(cached_key.value, new_keys, (0, 0, offset))
      values = jax.lax.dynamic_update_slice(cached_value.value, new_values, (0, offset, 0))
      cached_key.value, cached_value.value = keys, values
      cache_index.value = offset + t
      # The queries sit at offset..offset+T-1 and see the written part of the cache.
      written = jnp.broadcast_to(offset + t, (b,)).astype(jnp.int32)  # [B]
      if kv_valid_len is not None:
        written = jnp.minimum(written, jnp.asarray(kv_valid_len, jnp.int32))
      if t >= dispatch.AUTO_BLOCKSPARSE_MIN_LEN:
        # A prefill long enough for the training kernels: into an empty cache, the queries see only the keys
        # they bring, so attention runs as in training (skipping invisible tiles) rather than as per-head
        # products over the cache. Which branch runs is decided at run time by the cache index.
        out = jax.lax.cond(
            offset == 0,
            lambda: dispatch.attention(q, k, v, mask=self.mask, kv_valid_len=written, impl=self.impl),
            lambda: self._attend_cache(q, keys, values, kv_valid_len=written, q_offset=offset))
      else:
        out = self._attend_cache(q, keys, values, kv_valid_len=written, q_offset=offset)
    else:
      if positions is None:
        positions = self._default_positions(b, t, 0)
      q, k = self._rope_qk(q, k, positions)
      # The MaskSpec itself goes to the kernels: they may skip invisible tiles.
      out = dispatch.attention(q, k, v, mask=self.mask, kv_valid_len=kv_valid_len, impl=self.impl)
    # out: [B, T, H, D]
    return self._dense(e, (-2, -1), ("heads", "head_dim", "embed"), "out")(out)  # [B, T, E]
