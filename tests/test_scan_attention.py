"""Scan attention: every implementation against the associative-scan reference.

Dimension letters as in kernels/scan_attention.py: B batch, T time, H heads, D head dim.
Shapes are small and shared between tests so that each implementation compiles
once per dtype (XLA compiles dominate this file's run time).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import scan_attention as sa

B, T, H, D = 3, 37, 2, 8  # T is not a multiple of CHUNK
CHUNK = 16

IMPLS = {
    "sequential": sa.scan_attention_sequential,
    "xla_chunked": functools.partial(sa.scan_attention_chunked, chunk=CHUNK),
    "pallas": functools.partial(sa.scan_attention, chunk=CHUNK, interpret=True),
    # The accelerator layouts, run by the interpreter: D padded to 16 / 128.
    "pallas_gpu_layout": functools.partial(sa.scan_attention, chunk=CHUNK, interpret=True, backend="gpu"),
    "pallas_tpu_layout": functools.partial(sa.scan_attention, chunk=CHUNK, interpret=True, backend="tpu"),
}


def brute_force(s, v, valid=None):
  """numpy float64: explicit softmax over each valid prefix; zeros before the first valid position."""
  s = np.asarray(s, np.float64)
  v = np.asarray(v, np.float64)
  b, t, h = s.shape
  valid = np.ones((b, t), bool) if valid is None else np.asarray(valid)
  o = np.zeros(v.shape)
  for bi in range(b):
    for ti in range(t):
      keep = np.flatnonzero(valid[bi, :ti + 1])
      if keep.size == 0:
        continue
      logits = s[bi, keep]  # [K, H]
      p = np.exp(logits - logits.max(0))
      p /= p.sum(0)
      o[bi, ti] = np.einsum("kh,khd->hd", p, v[bi, keep])
  return o


def gated_form(s, v, valid):
  """numpy float64, the gated form of Aaren's recurrence: o_t = a_t o_(t-1) + (1 - a_t) v_t, a_t = exp(L_(t-1) - L_t)."""
  s = np.asarray(s, np.float64)
  v = np.asarray(v, np.float64)
  o = np.zeros(v.shape)
  lse = np.full(s.shape[::2], -np.inf)  # [B, H], L of the empty prefix
  prev = np.zeros(v[:, 0].shape)
  for t in range(s.shape[1]):
    new_lse = np.where(valid[:, t, None], np.logaddexp(lse, s[:, t]), lse)
    with np.errstate(invalid="ignore"):  # -inf - -inf before the first valid position, where a = 1
      a = np.where(np.isneginf(new_lse), 1.0, np.exp(lse - new_lse))  # exp(-inf) = 0 at the first valid one
    prev = a[..., None] * prev + (1 - a[..., None]) * v[:, t]
    o[:, t], lse = prev, new_lse
  return o


def make_case(name, dtype=jnp.float32, seed=0):
  """(s, v, valid, cotangent) for one named case."""
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(B, T, H)) * 3
  v = rng.normal(size=(B, T, H, D))
  valid = np.ones((B, T), bool)
  if name in ("masked", "extreme"):
    valid = rng.random((B, T)) > 0.25
    valid[0, :20] = False  # fully invalid prefix, longer than a chunk
    valid[1, -10:] = False  # trailing padding
    valid[1, 0] = True
    valid[2] = False  # a sequence with no valid position at all
  if name == "extreme":
    s = np.where(rng.random(s.shape) < 0.5, 1e4, -1e4) * rng.random(s.shape)
    s[:, 5:9] = 1e4
    s[:, 9:12] = -1e4
  ct = rng.normal(size=v.shape)
  return (jnp.asarray(s, dtype), jnp.asarray(v, dtype), jnp.asarray(valid), jnp.asarray(ct, dtype))


@functools.partial(jax.jit, static_argnums=0)
def value_and_grads(impl, s, v, valid, ct):
  """o and (ds, dv) = vjp(ct)."""
  fn = sa.scan_attention_reference if impl == "reference" else IMPLS[impl]
  o, vjp = jax.vjp(lambda s, v: fn(s, v, valid), s, v)
  return o, vjp(ct)


@functools.cache
def reference_results(case, dtype):
  return value_and_grads("reference", *make_case(case, dtype))


def assert_finite(*xs):
  for x in xs:
    assert bool(jnp.isfinite(x.astype(jnp.float32)).all())


def assert_close(x, y, tol):
  """Elementwise, relative to the largest entry of y."""
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.float32)
  scale = max(1.0, float(np.abs(y).max()))
  np.testing.assert_allclose(x, y, atol=tol * scale, rtol=tol)


# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 1, 4), (2, 7, 3, 5), (B, T, H, D)])
@pytest.mark.parametrize("masked", [False, True])
def test_reference_equals_brute_force(shape, masked):
  b, t, h, d = shape
  rng = np.random.default_rng(t)
  s = rng.normal(size=(b, t, h)) * 3
  v = rng.normal(size=(b, t, h, d))
  valid = rng.random((b, t)) > 0.3 if masked else None
  o = jax.jit(sa.scan_attention_reference)(jnp.asarray(s, jnp.float32), jnp.asarray(v, jnp.float32),
                                           None if valid is None else jnp.asarray(valid))
  np.testing.assert_allclose(np.asarray(o), brute_force(s, v, valid), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["random", "masked", "extreme"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_matches_reference_float32(impl, case):
  o, (ds, dv) = value_and_grads(impl, *make_case(case))
  o_ref, (ds_ref, dv_ref) = reference_results(case, jnp.float32)
  assert_finite(o, ds, dv, o_ref, ds_ref, dv_ref)
  assert_close(o, o_ref, 1e-5)
  assert_close(dv, dv_ref, 1e-5)
  assert_close(ds, ds_ref, 1e-4)
  _, _, valid, _ = make_case(case)
  assert not np.asarray(ds)[~np.asarray(valid)].any()  # masked positions get no gradient
  assert not np.asarray(dv)[~np.asarray(valid)].any()


@pytest.mark.parametrize("impl", ["sequential", "xla_chunked", "pallas"])
def test_matches_reference_bfloat16(impl):
  o, (ds, dv) = value_and_grads(impl, *make_case("masked", jnp.bfloat16))
  o_ref, (ds_ref, dv_ref) = reference_results("masked", jnp.bfloat16)
  assert o.dtype == ds.dtype == dv.dtype == jnp.bfloat16
  assert_finite(o, ds, dv)
  assert_close(o, o_ref, 2e-2)
  assert_close(dv, dv_ref, 2e-2)
  assert_close(ds, ds_ref, 3e-2)
  # And against float32 math on the same (bfloat16-rounded) inputs.
  s, v, valid, _ = make_case("masked", jnp.bfloat16)
  np.testing.assert_allclose(np.asarray(o, np.float32), brute_force(np.asarray(s, np.float32),
                                                                    np.asarray(v, np.float32), valid),
                             atol=2e-2, rtol=2e-2)


def test_fully_invalid_rows_give_zeros():
  s, v, valid, _ = make_case("masked")
  o, _ = reference_results("masked", jnp.float32)
  assert not np.asarray(o)[2].any()  # sequence 2 has no valid position
  assert not np.asarray(o)[0, :20].any()  # invalid prefix
  # Trailing padding repeats the output of the last valid prefix.
  last = int(np.flatnonzero(np.asarray(valid[1]))[-1])
  np.testing.assert_allclose(np.asarray(o)[1, last:], np.broadcast_to(np.asarray(o)[1, last], o[1, last:].shape),
                             atol=1e-6)


@pytest.mark.parametrize("case", ["masked", "extreme"])
def test_streaming_steps_equal_parallel(case):
  s, v, valid, _ = make_case(case)
  step = jax.jit(sa.scan_attention_step)
  state = sa.initial_state(B, H, D)
  outs = []
  for t in range(T):
    state, o_t = step(state, s[:, t], v[:, t], valid[:, t])
    outs.append(o_t)
  o_ref, _ = reference_results(case, jnp.float32)
  assert_close(jnp.stack(outs, 1), o_ref, 1e-5)
  assert state.w.shape == (B, H, D)  # constant memory: the state does not grow with T


@pytest.mark.parametrize("case", ["random", "masked"])
def test_gated_form_agrees(case):
  s, v, valid, ct = make_case(case)
  o, _ = value_and_grads("xla_chunked", s, v, valid, ct)
  np.testing.assert_allclose(np.asarray(o), gated_form(s, v, np.asarray(valid)), atol=1e-5, rtol=1e-5)


def test_dispatcher():
  s, v, valid, _ = make_case("masked")
  o_ref, _ = reference_results("masked", jnp.float32)
  assert_close(sa.scan_attention_auto(s, v, valid), o_ref, 1e-5)  # auto = xla_chunked on CPU
  assert_close(sa.scan_attention_auto(s, v, valid, impl="sequential"), o_ref, 1e-5)
  with pytest.raises(ValueError, match="xla_chunked"):
    sa.scan_attention_auto(s, v, impl="flash")
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="interpret=True"):
      sa.scan_attention(s, v)


@pytest.mark.parametrize("impl", ["xla_chunked", "pallas"])
def test_backward_memory_is_linear_in_time(impl):
  """Compile-only: the backward's temporaries grow ~linearly in T (a T^2 form grows 16x)."""

  def temp_bytes(fn, t, d=32):
    s = jax.ShapeDtypeStruct((1, t, 1), jnp.float32)
    v = jax.ShapeDtypeStruct((1, t, 1, d), jnp.float32)
    grad = jax.jit(jax.grad(lambda s, v: jnp.sum(fn(s, v) ** 2), argnums=(0, 1)))
    analysis = grad.lower(s, v).compile().memory_analysis()
    if analysis is None or not hasattr(analysis, "temp_size_in_bytes"):
      pytest.skip("memory_analysis() is not available on this backend")
    return analysis.temp_size_in_bytes

  fn = functools.partial(IMPLS[impl], chunk=64) if impl == "xla_chunked" else functools.partial(
      sa.scan_attention, chunk=64, interpret=True)
  small, large = temp_bytes(fn, 1024), temp_bytes(fn, 4096)
  assert large < 5 * small, (small, large)
  assert large < 64 * 4096 * 32 * 4  # a few [T, D] float32 arrays, not [T, T]

  # The check can see a quadratic backward: dense causal softmax attention.
  def dense(s, v):
    t = s.shape[1]
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s[:, None, :, 0], sa.NEG_INF)  # [B, T, T]
    return jnp.einsum("bti,bid->btd", jax.nn.softmax(logits, -1), v[:, :, 0])[:, :, None]

  assert temp_bytes(dense, 4096) > 10 * temp_bytes(dense, 1024)


# ----------------------------------------------------------------------------
# Compiled kernels on the accelerators (skipped elsewhere).


def _compiled_against_chunked(backend):
  rng = np.random.default_rng(1)
  b, t, h, d = 2, 1000, 4, 64
  valid = jnp.asarray(rng.random((b, t)) > 0.1).at[0, :100].set(False)
  for dtype, tol in ((jnp.float32, 2e-3), (jnp.bfloat16, 3e-2)):
    s = jnp.asarray(rng.normal(size=(b, t, h)) * 3, dtype)
    v = jnp.asarray(rng.normal(size=(b, t, h, d)), dtype)
    ct = jnp.asarray(rng.normal(size=v.shape), dtype)
    got = jax.jit(lambda s, v: jax.vjp(lambda s, v: sa.scan_attention(s, v, valid, backend=backend), s, v))
    want = jax.jit(lambda s, v: jax.vjp(lambda s, v: sa.scan_attention_chunked(s, v, valid), s, v))
    o, vjp = got(s, v)
    o_ref, vjp_ref = want(s, v)
    assert_close(o, o_ref, tol)
    for g, g_ref in zip(vjp(ct), vjp_ref(ct)):
      assert_finite(g)
      assert_close(g, g_ref, tol)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_compiled_gpu_kernel():
  _compiled_against_chunked("gpu")


@pytest.mark.tpu
@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
def test_compiled_tpu_kernel():
  _compiled_against_chunked("tpu")
