"""Scan attention: Aaren's attention-as-an-RNN, computed by a prefix scan.

Dimension letters: B batch, T time, H heads, D head dim, C chunk length,
N = B * H independent sequences (the kernel's grid), Tp / Dp padded T / D.

For every position t the output is the softmax(s[:t+1])-weighted mean of
v[:t+1] (per batch and head). The many-to-one RNN keeps the state
(m, u, w) = (running max of s, sum exp(s - m), sum exp(s - m) v), outputs w / u,
and two states combine associatively:
  m = max(mA, mB), u = uA e^(mA - m) + uB e^(mB - m), w likewise.

`valid` (bool [B, T], optional) marks real positions; an invalid position
contributes nothing and its output is the output of the last valid prefix
(zeros when there is none). Invalid scores are replaced by the finite NEG_INF
(never -inf), every exp takes a masked argument and every divide a guarded
denominator, so no NaN appears in values or gradients, even for +-1e4 scores.
Scores below NEG_INF / 2 count as invalid.

Implementations (all equal up to rounding; `scan_attention_auto` picks one):
- `scan_attention_reference`: `lax.associative_scan` with the (m, u, w)
  operator, the parallel many-to-many form. Autodiff; its backward keeps the
  residuals of every scan level.
- `scan_attention_sequential`: `lax.scan` over time carrying (m, u, w), the
  constant-memory streaming form; `scan_attention_step` and `initial_state`
  expose one step for token-by-token decoding. Autodiff saves the carry of
  every step: O(T * D) backward memory.
- `scan_attention_chunked`: pure XLA. Inside a chunk a lower-triangular
  [C, C] matrix of exp-weights times v; across chunks the (m, u, w) carry in a
  `lax.scan`. The chunk body is wrapped in `jax.checkpoint`, so the backward
  saves only the per-chunk carries and recomputes the [C, C] tile chunk by
  chunk: O(T * D + C^2) memory. The fast CPU path; twice differentiable.
- `scan_attention`: the Pallas kernel, forward and backward under
  `jax.custom_vjp`. Grid over the N = B * H sequences, a `fori_loop` over
  chunks inside the kernel carrying (m, u, w). Residuals are the output o and
  the running logsumexp L_t = m_t + log u_t (as m and log u): O(T * D). The backward is a
  reverse-time `fori_loop` over chunks (see `_backward_kernel`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

# Score of a masked position: finite and far below any real score, so that
# differences with it stay finite in float32 (|NEG_INF - x| < 3e30 << 3.4e38).
NEG_INF = -1e30
# Above any real logsumexp: the reverse reference before any live row is seen.
POS_INF = 1e30
_HALF_NEG = 0.5 * NEG_INF

IMPLS = ("auto", "associative", "sequential", "xla_chunked", "pallas")


def _masked_scores(s, valid):
  """float32 scores with invalid positions at NEG_INF, and the bool mask."""
  s = s.astype(jnp.float32)
  if valid is None:
    valid = jnp.ones(s.shape[:2], bool)
  valid = jnp.broadcast_to(valid[:, :, None], s.shape)  # [B, T, H]
  return jnp.where(valid, s, NEG_INF), valid


def _safe_divide(w, u):
  """w / u with rows of u == 0 giving 0 (and a finite gradient)."""
  live = u > 0
  return jnp.where(live[..., None], w / jnp.where(live, u, 1.0)[..., None], 0.0)


# ----------------------------------------------------------------------------
# Reference: the parallel prefix scan.


def combine(a, b):
  """The associative (m, u, w) operator; a holds the earlier positions."""
  m_a, u_a, w_a = a
  m_b, u_b, w_b = b
  m = jnp.maximum(m_a, m_b)
  scale_a = jnp.exp(m_a - m)  # both <= 1; NEG_INF - NEG_INF = 0 is harmless as u = 0 there
  scale_b = jnp.exp(m_b - m)
  u = u_a * scale_a + u_b * scale_b
  w = w_a * scale_a[..., None] + w_b * scale_b[..., None]
  return m, u, w


def scan_attention_reference(s, v, valid=None):
  """s [B, T, H], v [B, T, H, D], valid bool [B, T] -> o [B, T, H, D] by associative_scan."""
  s, valid_bth = _masked_scores(s, valid)
  u = valid_bth.astype(jnp.float32)  # each position alone: u = 1 (0 if invalid)
  w = u[..., None] * v.astype(jnp.float32)
  m, u, w = lax.associative_scan(combine, (s, u, w), axis=1)
  return _safe_divide(w, u).astype(v.dtype)


# ----------------------------------------------------------------------------
# Streaming: one token at a time in constant memory.


class ScanState(NamedTuple):
  """The RNN state of scan attention, float32."""
  m: jax.Array  # [B, H] running max of the valid scores (NEG_INF before any)
  u: jax.Array  # [B, H] sum of exp(s - m)
  w: jax.Array  # [B, H, D] sum of exp(s - m) v


def initial_state(batch, heads, dim, dtype=jnp.float32) -> ScanState:
  """The empty prefix: outputs zeros until a valid position arrives."""
  return ScanState(m=jnp.full((batch, heads), NEG_INF, dtype),
                   u=jnp.zeros((batch, heads), dtype),
                   w=jnp.zeros((batch, heads, dim), dtype))


def scan_attention_step(state: ScanState, s_t, v_t, valid_t=None):
  """Adds one position: s_t [B, H], v_t [B, H, D], valid_t bool [B] -> (state, o_t [B, H, D])."""
  s_t = s_t.astype(jnp.float32)
  valid = jnp.ones(s_t.shape, bool) if valid_t is None else jnp.broadcast_to(valid_t[:, None], s_t.shape)
  m = jnp.where(valid, jnp.maximum(state.m, s_t), state.m)
  scale = jnp.exp(state.m - m)  # <= 1
  e = jnp.exp(jnp.where(valid, s_t - m, NEG_INF))  # 0 when invalid (no overflow, no NaN gradient)
  u = state.u * scale + e
  w = state.w * scale[..., None] + e[..., None] * v_t.astype(jnp.float32)
  return ScanState(m, u, w), _safe_divide(w, u).astype(v_t.dtype)


def scan_attention_sequential(s, v, valid=None):
  """s [B, T, H], v [B, T, H, D], valid bool [B, T] -> o [B, T, H, D] by lax.scan over time."""
  b, t, h = s.shape
  if valid is None:
    valid = jnp.ones((b, t), bool)
  xs = (jnp.swapaxes(s, 0, 1), jnp.swapaxes(v, 0, 1), jnp.swapaxes(valid, 0, 1))  # time-major

  def step(state, x):
    return scan_attention_step(state, *x)

  _, o = lax.scan(step, initial_state(b, h, v.shape[-1]), xs)
  return jnp.swapaxes(o, 0, 1)


# ----------------------------------------------------------------------------
# XLA chunked form.


def _pad_time(x, padded_len, value):
  pad = padded_len - x.shape[1]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _chunk_xla(carry, chunk):
  """One chunk: carry (m [N], u [N], w [N, D]); chunk s [N, C] (NEG_INF = invalid), v [N, C, D]."""
  m_c, u_c, w_c = carry
  s, v = chunk
  c = s.shape[-1]
  valid = s > _HALF_NEG
  causal = jnp.tril(jnp.ones((c, c), bool))  # [t, j]: j <= t
  mask = causal & valid[:, None, :]  # [N, C, C]
  # Per-row running max (a per-chunk max would underflow early rows).
  m_t = jnp.maximum(m_c[:, None], jnp.max(jnp.where(mask, s[:, None, :], NEG_INF), axis=-1))  # [N, C]
  p = jnp.exp(jnp.where(mask, s[:, None, :] - m_t[..., None], NEG_INF))  # [N, C, C]
  scale = jnp.exp(m_c[:, None] - m_t)  # [N, C]
  u_t = u_c[:, None] * scale + p.sum(-1)
  w_t = w_c[:, None, :] * scale[..., None] + jnp.einsum("ntj,njd->ntd", p, v)
  o = _safe_divide(w_t, u_t)
  return (jnp.max(m_t, axis=-1), u_t[:, -1], w_t[:, -1]), o


def scan_attention_chunked(s, v, valid=None, *, chunk=64):
  """s [B, T, H], v [B, T, H, D], valid bool [B, T] -> o [B, T, H, D]; XLA, chunk by chunk.

  Backward: `jax.checkpoint` on the chunk body (only the per-chunk carries are
  saved; each chunk's [C, C] tile is recomputed), O(T * D + C^2) memory.
  """
  b, t, h = s.shape
  d = v.shape[-1]
  chunk = min(chunk, t)
  n_chunks = -(-t // chunk)
  tp = n_chunks * chunk
  s, _ = _masked_scores(s, valid)
  s = _pad_time(s, tp, NEG_INF)
  vf = _pad_time(v.astype(jnp.float32), tp, 0.0)
  # [B, Tp, H] -> [n, B*H, C] and [B, Tp, H, D] -> [n, B*H, C, D]: chunk-major for the scan.
  s = s.reshape(b, n_chunks, chunk, h).transpose(1, 0, 3, 2).reshape(n_chunks, b * h, chunk)
  vf = vf.reshape(b, n_chunks, chunk, h, d).transpose(1, 0, 3, 2, 4).reshape(n_chunks, b * h, chunk, d)
  init = initial_state(b * h, 1, d)
  init = (init.m[:, 0], init.u[:, 0], init.w[:, 0])
  _, o = lax.scan(jax.checkpoint(_chunk_xla), init, (s, vf))  # o [n, B*H, C, D]
  o = o.reshape(n_chunks, b, h, chunk, d).transpose(1, 0, 3, 2, 4).reshape(b, tp, h, d)
  return o[:, :t].astype(v.dtype)


# ----------------------------------------------------------------------------
# Pallas kernels. Each program owns one sequence n: s as a row [1, Tp] and a
# column [Tp, 1] (the same bytes), v [Tp, Dp]. Only 2-D values, so that the
# same code lowers with Triton and with Mosaic (no in-kernel transposes of
# vectors). Carries are [1, 1] / [1, Dp] values of a fori_loop over chunks.


def _forward_kernel(s_row_ref, s_col_ref, v_ref, o_ref, m_ref, log_u_ref, *, chunk, n_chunks):
  """Writes o [Tp, Dp], and m, log u [Tp, 1]: the running logsumexp L = m + log u in two parts.

  m is NEG_INF (and log u = 0) before the first valid position. Keeping the two
  parts apart keeps p = exp((s - m) - log u) accurate in the backward even for
  scores of 1e4, where a float32 L has an ulp of 1e-3.
  """
  d = v_ref.shape[-1]
  row = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)  # t
  col = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)  # j
  causal = col <= row

  def body(c, carry):
    m_c, u_c, w_c = carry  # [1, 1], [1, 1], [1, Dp]
    start = pl.multiple_of(c * chunk, chunk)
    s_row = s_row_ref[:, pl.ds(start, chunk)]  # [1, C]
    s_col = s_col_ref[pl.ds(start, chunk), :]  # [C, 1]
    v = v_ref[pl.ds(start, chunk), :].astype(jnp.float32)  # [C, Dp]
    mask = causal & (s_row > _HALF_NEG)  # [C, C]
    m_t = jnp.maximum(m_c, jnp.max(jnp.where(mask, s_row, NEG_INF), axis=1, keepdims=True))  # [C, 1]
    p = jnp.exp(jnp.where(mask, s_row - m_t, NEG_INF))  # [C, C]
    scale = jnp.exp(m_c - m_t)  # [C, 1]
    u_t = u_c * scale + jnp.sum(p, axis=1, keepdims=True)
    w_t = w_c * scale + jnp.dot(p, v, preferred_element_type=jnp.float32)  # [C, Dp]
    live = u_t > 0  # u >= 1 once a valid position was seen
    u_safe = jnp.where(live, u_t, 1.0)
    o_ref[pl.ds(start, chunk), :] = jnp.where(live, w_t / u_safe, 0.0).astype(o_ref.dtype)
    m_ref[pl.ds(start, chunk), :] = m_t
    log_u_ref[pl.ds(start, chunk), :] = jnp.log(u_safe)
    # The carry after the whole chunk, from the column form of s.
    valid_col = s_col > _HALF_NEG
    m_n = jnp.maximum(m_c, jnp.max(jnp.where(valid_col, s_col, NEG_INF), axis=0, keepdims=True))
    e = jnp.exp(jnp.where(valid_col, s_col - m_n, NEG_INF))  # [C, 1]
    a = jnp.exp(m_c - m_n)
    return m_n, u_c * a + jnp.sum(e, axis=0, keepdims=True), w_c * a + jnp.sum(e * v, axis=0, keepdims=True)

  init = (jnp.full((1, 1), NEG_INF, jnp.float32), jnp.zeros((1, 1), jnp.float32),
          jnp.zeros((1, d), jnp.float32))
  lax.fori_loop(0, n_chunks, body, init)


def _backward_kernel(s_col_ref, v_ref, m_row_ref, m_col_ref, lu_row_ref, lu_col_ref, delta_row_ref,
                     delta_col_ref, do_ref, ds_ref, dv_ref, *, chunk, n_chunks):
  """Reverse-time pass over chunks.

  With p[t, i] = exp(s_i - L_t) for valid i <= t (L_t = m_t + log u_t, the
  running logsumexp) and delta_t = o_t . dO_t:
    dv_i = sum_{t >= i} p[t, i] dO_t,   ds_i = v_i . dv_i - sum_{t >= i} p[t, i] delta_t.
  Inside a chunk this is a masked [C, C] tile. The later chunks enter through a
  carry relative to a reference R = (R_m, R_l) (R = R_m + R_l, kept in two parts
  like L): A = sum_t exp(R - L_t) dO_t and B = sum_t exp(R - L_t) delta_t over the
  later live rows, so that p = exp(s_i - R) exp(R - L_t). L_t never decreases in
  t and L_t >= s_i for i <= t, so R = L of the first live row after the chunk
  keeps both exponents <= 0: nothing overflows.
  """
  d = v_ref.shape[-1]
  key = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)  # i
  query = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)  # t
  row = lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)

  def body(k, carry):
    ref_m, ref_l, a_c, b_c = carry  # R_m [1, 1], R_l [1, 1], A [1, Dp], B [1, 1]
    start = pl.multiple_of((n_chunks - 1 - k) * chunk, chunk)
    rows = pl.ds(start, chunk)
    s_col = s_col_ref[rows, :]  # [C, 1]
    v = v_ref[rows, :].astype(jnp.float32)  # [C, Dp]
    m_row, m_col = m_row_ref[:, rows], m_col_ref[rows, :]  # [1, C], [C, 1]
    lu_row, lu_col = lu_row_ref[:, rows], lu_col_ref[rows, :]
    delta_row, delta_col = delta_row_ref[:, rows], delta_col_ref[rows, :]
    do = do_ref[rows, :].astype(jnp.float32)  # [C, Dp]
    valid_col = s_col > _HALF_NEG
    live_col = m_col > _HALF_NEG  # u_t > 0
    mask = (query >= key) & valid_col & (m_row > _HALF_NEG)  # [i, t]
    pt = jnp.exp(jnp.where(mask, (s_col - m_row) - lu_row, NEG_INF))  # [C, C], p transposed
    g = jnp.exp(jnp.where(valid_col, (s_col - ref_m) - ref_l, NEG_INF))  # [C, 1], <= 1
    dv = jnp.dot(pt, do, preferred_element_type=jnp.float32) + g * a_c  # [C, Dp]
    pd = jnp.sum(pt * delta_row, axis=1, keepdims=True) + g * b_c  # [C, 1]
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    ds_ref[rows, :] = (jnp.sum(v * dv, axis=1, keepdims=True) - pd).astype(ds_ref.dtype)
    # Fold this chunk's rows into the carry; the new reference is its first live row.
    first = jnp.min(jnp.where(live_col, row, chunk), axis=0, keepdims=True)  # [1, 1]
    pick = row == first
    any_live = first < chunk
    new_m = jnp.where(any_live, jnp.sum(jnp.where(pick, m_col, 0.0), axis=0, keepdims=True), ref_m)
    new_l = jnp.where(any_live, jnp.sum(jnp.where(pick, lu_col, 0.0), axis=0, keepdims=True), ref_l)
    h = jnp.exp(jnp.where(live_col, (new_m - m_col) + (new_l - lu_col), NEG_INF))  # [C, 1], <= 1
    a = jnp.exp((new_m - ref_m) + (new_l - ref_l))  # <= 1
    return (new_m, new_l, a_c * a + jnp.sum(h * do, axis=0, keepdims=True),
            b_c * a + jnp.sum(h * delta_col, axis=0, keepdims=True))

  init = (jnp.full((1, 1), POS_INF, jnp.float32), jnp.zeros((1, 1), jnp.float32),
          jnp.zeros((1, d), jnp.float32), jnp.zeros((1, 1), jnp.float32))
  lax.fori_loop(0, n_chunks, body, init)


def _compiler_params(backend, dim):
  if backend == "gpu":
    return plgpu.CompilerParams(num_warps=4 if dim <= 64 else 8, num_stages=1)
  if backend == "tpu":
    return pltpu.CompilerParams(dimension_semantics=("parallel",))
  return None


def _seq_spec(*block):
  """BlockSpec of one whole sequence n of an [N, *block] array."""
  return pl.BlockSpec((None, *block), lambda n: (n,) + (0,) * len(block))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _scan_attention_padded(s, v, chunk, interpret, backend):
  """s [N, Tp] float32 (NEG_INF = invalid), v [N, Tp, Dp] -> o [N, Tp, Dp] float32."""
  return _forward(s, v, chunk, interpret, backend)[0]


def _forward(s, v, chunk, interpret, backend):
  n, tp, dp = v.shape
  kernel = functools.partial(_forward_kernel, chunk=chunk, n_chunks=tp // chunk)
  column = jax.ShapeDtypeStruct((n, tp, 1), jnp.float32)
  o, m, log_u = pl.pallas_call(
      kernel,
      grid=(n,),
      in_specs=[_seq_spec(1, tp), _seq_spec(tp, 1), _seq_spec(tp, dp)],
      out_specs=[_seq_spec(tp, dp), _seq_spec(tp, 1), _seq_spec(tp, 1)],
      out_shape=[jax.ShapeDtypeStruct((n, tp, dp), jnp.float32), column, column],
      compiler_params=_compiler_params(backend, dp),
      interpret=interpret,
      name="scan_attention_forward",
  )(s[:, None, :], s[:, :, None], v)
  return o, m[..., 0], log_u[..., 0]


def _scan_attention_fwd(s, v, chunk, interpret, backend):
  o, m, log_u = _forward(s, v, chunk, interpret, backend)
  return o, (s, v, o, m, log_u)  # O(T * D) residuals


def _scan_attention_bwd(chunk, interpret, backend, residuals, do):
  s, v, o, m, log_u = residuals
  n, tp, dp = v.shape
  delta = jnp.sum(o * do, axis=-1)  # [N, Tp]
  kernel = functools.partial(_backward_kernel, chunk=chunk, n_chunks=tp // chunk)
  ds, dv = pl.pallas_call(
      kernel,
      grid=(n,),
      in_specs=[_seq_spec(tp, 1), _seq_spec(tp, dp)] + [_seq_spec(1, tp), _seq_spec(tp, 1)] * 3
      + [_seq_spec(tp, dp)],
      out_specs=[_seq_spec(tp, 1), _seq_spec(tp, dp)],
      out_shape=[jax.ShapeDtypeStruct((n, tp, 1), jnp.float32), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compiler_params(backend, dp),
      interpret=interpret,
      name="scan_attention_backward",
  )(s[:, :, None], v, m[:, None, :], m[:, :, None], log_u[:, None, :], log_u[:, :, None], delta[:, None, :],
    delta[:, :, None], do)
  return ds[..., 0], dv


_scan_attention_padded.defvjp(_scan_attention_fwd, _scan_attention_bwd)


def _round_up(x, m):
  return -(-x // m) * m


def scan_attention(s, v, valid=None, *, chunk=None, interpret=False, backend=None):
  """s [B, T, H], v [B, T, H, D], valid bool [B, T] -> o [B, T, H, D]; the Pallas kernel.

  backend: "gpu" (Triton lowering: C and Dp powers of two >= 16), "tpu"
  (Mosaic: Dp a multiple of 128, C a multiple of 8) or "cpu" (interpret=True
  only); None = jax.default_backend(). chunk: None = 64 (128 on TPU).
  """
  backend = backend or jax.default_backend()
  if backend not in ("cpu", "gpu", "tpu"):
    raise ValueError(f"scan_attention: unknown backend {backend!r}; expected 'cpu', 'gpu' or 'tpu'")
  if backend == "cpu" and not interpret:
    raise ValueError("scan_attention (Pallas) runs on CPU only with interpret=True; on CPU use "
                     "scan_attention_auto(..., impl=...) with impl in 'xla_chunked' (fast), 'sequential' "
                     "or 'associative'")
  b, t, h = s.shape
  d = v.shape[-1]
  if chunk is None:
    chunk = 128 if backend == "tpu" else 64
  if backend == "gpu":
    chunk = max(16, 1 << (chunk - 1).bit_length())
    dp = max(16, 1 << (d - 1).bit_length())
  elif backend == "tpu":
    chunk = _round_up(chunk, 8)
    dp = _round_up(d, 128)
  else:
    dp = d
  tp = _round_up(t, chunk)
  s, _ = _masked_scores(s, valid)
  s = _pad_time(s, tp, NEG_INF).transpose(0, 2, 1).reshape(b * h, tp)  # [N, Tp]
  v_p = _pad_time(v, tp, 0).transpose(0, 2, 1, 3)  # [B, H, Tp, D]
  v_p = jnp.pad(v_p, [(0, 0)] * 3 + [(0, dp - d)]).reshape(b * h, tp, dp)
  o = _scan_attention_padded(s, v_p, chunk, interpret, backend)  # [N, Tp, Dp]
  o = o.reshape(b, h, tp, dp)[:, :, :t, :d].transpose(0, 2, 1, 3)
  return o.astype(v.dtype)


# ----------------------------------------------------------------------------
# Dispatcher.


def scan_attention_auto(s, v, valid=None, *, impl="auto"):
  """Picks an implementation: "auto" = "pallas" on GPU/TPU, "xla_chunked" on CPU.

  "pallas" asked for on CPU runs the kernel in interpret mode (slow; for tests), as the block attention
  dispatcher does.
  """
  if impl not in IMPLS:
    raise ValueError(f"scan_attention_auto: unknown impl {impl!r}; choose one of {IMPLS}")
  if impl == "auto":
    impl = "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla_chunked"
  if impl == "associative":
    return scan_attention_reference(s, v, valid)
  if impl == "sequential":
    return scan_attention_sequential(s, v, valid)
  if impl == "xla_chunked":
    # chunk 16: the fastest on CPU, forward and backward, of 8..128 measured at
    # [B, T, H, D] = [4, 2048, 4, 64] and [16, 512, 8, 32] (1.3-1.6x faster than "sequential").
    return scan_attention_chunked(s, v, valid, chunk=16)
  return scan_attention(s, v, valid, interpret=jax.default_backend() == "cpu")
