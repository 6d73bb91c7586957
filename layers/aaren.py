"""Aaren's attention: a learned query attending over every prefix, computed as an RNN by a prefix scan.

Dimension letters: B batch, T time, H heads, D head dim, E width.

Per head, the query q is a parameter [D] (not a function of the input); keys
and values come from the input. The output at step t is softmax attention of
q over the keys and values of steps 0..t:

  s_i = q . k_i / sqrt(D),   o_t = sum_{i <= t} exp(s_i) v_i / sum_{i <= t} exp(s_i).

Because q is the same for every step, o_t is a many-to-one RNN over the
prefix, with the state (m, u, w) = (running max of s, sum exp(s - m),
sum exp(s - m) v) of kernels/scan_attention.py. One set of weights runs two
ways:

- parallel over a whole sequence (training): `kernels.dispatch.scan`, the
  chunked XLA scan on CPU and the Pallas kernel on GPU/TPU (`scan_impl`);
- streaming (decode=True): the state lives in the "cache" collection, one
  (m, u, w) per head, and each call folds its T new steps into it one by one
  (`scan_attention_step`): constant memory in the length of the stream.

The layer has MultiHeadAttention's call signature, so a TransformerBlock swaps
one for the other (`attention="aaren"`). It is causal by construction: masks
other than the causal one are refused by the block. Positions are not used
(the query has none; a model adds position embeddings to its input);
`kv_valid_len` marks steps at or after it invalid: they add nothing to the
state and their output repeats the last valid prefix's (zeros before any), so
right padding never gives NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from kernels import dispatch
from kernels import scan_attention
from layers import linear


class AarenAttention(nn.Module):
  """Learned-query prefix-scan attention x [B, T, E] -> [B, T, E] (causal), with a constant-size streaming state."""

  num_heads: int  # H
  head_dim: int  # D
  scan_impl: str = "auto"  # kernels.scan_attention.IMPLS: "auto" = Pallas on GPU/TPU, chunked XLA on CPU
  dtype: jnp.dtype = jnp.float32  # computation dtype (the scan itself runs in float32)
  param_dtype: jnp.dtype = jnp.float32  # parameter storage dtype
  use_bias: bool = False  # biases on the key/value/out projections
  kernel_init: Callable | None = None  # projections' initializer; None: fan-in truncated normal
  query_init: Callable = nn.initializers.normal(1.0)  # the learned queries [H, D]: scores start at O(1)

  def _dense(self, features, axis, kernel_names, name):
    return linear.DenseGeneral(
        features=features, axis=axis, kernel_axes=kernel_names, use_bias=self.use_bias,
        dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init, name=name)

  def scores_and_values(self, x):
    """x [B, T, E] -> scores float32 [B, T, H] and values [B, T, H, D]."""
    h, d = self.num_heads, self.head_dim
    x = x.astype(self.dtype)
    query = self.param("query", nn.with_logical_partitioning(self.query_init, ("heads", "head_dim")),
                       (h, d), self.param_dtype)
    k = self._dense((h, d), -1, ("embed", "heads", "head_dim"), "key")(x)  # [B, T, H, D]
    v = self._dense((h, d), -1, ("embed", "heads", "head_dim"), "value")(x)  # [B, T, H, D]
    s = jnp.einsum("bthd,hd->bth", k.astype(jnp.float32), query.astype(jnp.float32)) / math.sqrt(d)
    return s, v

  @nn.compact
  def __call__(self, x, *, positions=None, kv_valid_len=None, decode=False):
    del positions  # the query has no position; see the module docstring
    if self.scan_impl not in scan_attention.IMPLS:
      raise ValueError(f"scan_impl={self.scan_impl!r}: expected one of {scan_attention.IMPLS}")
    b, t, e = x.shape
    h, d = self.num_heads, self.head_dim
    s, v = self.scores_and_values(x)

    if decode:
      ready = self.has_variable("cache", "m")
      init = scan_attention.initial_state(b, h, d)
      m = self.variable("cache", "m", lambda: init.m)  # [B, H]
      u = self.variable("cache", "u", lambda: init.u)  # [B, H]
      w = self.variable("cache", "w", lambda: init.w)  # [B, H, D]
      index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))  # steps seen
    if decode and ready:
      steps = index.value + jnp.arange(t, dtype=jnp.int32)  # absolute step of each new token
      valid = jnp.ones((b, t), bool)
      if kv_valid_len is not None:
        valid = steps[None, :] < jnp.broadcast_to(jnp.asarray(kv_valid_len, jnp.int32), (b,))[:, None]

      def fold(state, step_inputs):
        return scan_attention.scan_attention_step(state, *step_inputs)

      state = scan_attention.ScanState(m.value, u.value, w.value)
      state, o = jax.lax.scan(fold, state, (jnp.swapaxes(s, 0, 1), jnp.swapaxes(v, 0, 1),
                                            jnp.swapaxes(valid, 0, 1)))  # time-major
      m.value, u.value, w.value = state
      index.value = index.value + t
      o = jnp.swapaxes(o, 0, 1)  # [B, T, H, D]
    else:
      valid = None
      if kv_valid_len is not None:
        lengths = jnp.broadcast_to(jnp.asarray(kv_valid_len, jnp.int32), (b,))
        valid = jnp.arange(t)[None, :] < lengths[:, None]  # [B, T]
      o = dispatch.scan(s, v, valid, impl=self.scan_impl)  # [B, T, H, D]
    return self._dense(e, (-2, -1), ("heads", "head_dim", "embed"), "out")(o.astype(self.dtype))
