"""Tests of kernels/block_attention.py: the Pallas block-causal flash attention.

On CPU the kernels run in interpret mode with 16-row tiles, against the dense
reference `kernels.reference.block_causal_attention` (values and dq, dk, dv
through a random cotangent). The compiled
GPU / TPU tests are marked and skipped elsewhere.
"""

import functools
import itertools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import block_attention as ba
from kernels import masks
from kernels import reference

TILE = 16


def randn(seed, shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32).astype(dtype)


def qkv(seed, b, t, s, h, kv_heads, d, dtype=jnp.float32):
  return (randn(seed, (b, t, h, d), dtype), randn(seed + 1, (b, s, kv_heads, d), dtype),
          randn(seed + 2, (b, s, kv_heads, d), dtype))


@functools.partial(jax.jit, static_argnums=0)
def value_and_grads(fn, q, k, v, cotangent, kv_valid_len):
  """fn(q, k, v, kv_valid_len) and its vjp with `cotangent`, in one program."""
  out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, kv_valid_len), q, k, v)
  return out, vjp(cotangent)


def kernel_fn(block_len, prefix_len, block_q=TILE, block_k=TILE):
  return functools.partial(_kernel, block_len, prefix_len, block_q, block_k)


def _kernel(block_len, prefix_len, block_q, block_k, q, k, v, kv_valid_len):
  return ba.block_attention(q, k, v, block_len=block_len, prefix_len=prefix_len,
                            kv_valid_len=kv_valid_len, block_q=block_q, block_k=block_k,
                            interpret=True, backend="cpu")


def reference_fn(block_len, prefix_len):
  return functools.partial(_reference, block_len, prefix_len)


def _reference(block_len, prefix_len, q, k, v, kv_valid_len):
  return reference.block_causal_attention(q, k, v, block_len=block_len, prefix_len=prefix_len,
                                         kv_valid_len=kv_valid_len)


def assert_matches_reference(q, k, v, kv_valid_len, *, block_len, prefix_len, atol, rtol=0.0,
                             block_q=TILE, block_k=TILE):
  ct = randn(7, q.shape, q.dtype)
  out, grads = value_and_grads(kernel_fn(block_len, prefix_len, block_q, block_k), q, k, v, ct,
                               kv_valid_len)
  ref, ref_grads = value_and_grads(reference_fn(block_len, prefix_len), q, k, v, ct, kv_valid_len)
  assert out.dtype == q.dtype and out.shape == q.shape
  for name, x, y in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
    assert x.dtype == y.dtype, name
    assert bool(jnp.all(jnp.isfinite(x))), name
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=atol,
                               rtol=rtol, err_msg=name)


# ----------------------------------------------------------------------------
# Values and gradients against the reference (interpret mode).

# (T, S, H, K, L, P, kv_valid_len): each case covers several features at once;
# together every block length (1, 2, 16, a non-divisor of the tile, T), prefix
# 0 and > 0, ragged T, grouped heads K = 2 and K = 1, key padding and T != S.
F32_CASES = [
    (48, 48, 4, 4, 1, 0, None),  # causal, whole tiles, no grouping
    (40, 40, 4, 2, 1, 5, (40, 17)),  # causal + prefix, ragged, padding
    (37, 37, 4, 1, 2, 0, None),  # L = 2, ragged, one kv head
    (48, 48, 4, 2, 2, 3, (30, 48)),  # L = 2 + prefix, padding
    (64, 64, 2, 1, 16, 0, (64, 33)),  # L = tile
    (50, 50, 4, 2, 16, 7, None),  # L = tile, prefix not a multiple of anything
    (41, 41, 4, 2, 5, 2, (41, 9)),  # L not dividing the tile: blocks straddle tiles
    (40, 40, 4, 2, 40, 0, None),  # L = T: full attention
    (33, 33, 4, 4, 33, 4, (20, 33)),  # full attention + prefix + padding
    (24, 40, 4, 2, 4, 3, (40, 26)),  # T < S
    (40, 24, 4, 2, 4, 3, None),  # T > S
    (30, 30, 2, 1, 3, 45, None),  # prefix longer than the sequence: all visible
]


@pytest.mark.parametrize("t,s,h,kv_heads,block_len,prefix_len,valid", F32_CASES)
def test_matches_reference_float32(t, s, h, kv_heads, block_len, prefix_len, valid):
  q, k, v = qkv(0, 2, t, s, h, kv_heads, 16)
  valid = None if valid is None else jnp.asarray(valid, jnp.int32)
  assert_matches_reference(q, k, v, valid, block_len=block_len, prefix_len=prefix_len, atol=2e-5)


@pytest.mark.parametrize("block_q,block_k", [(16, 32), (32, 16)])
def test_unequal_tiles_and_wider_heads(block_q, block_k):
  q, k, v = qkv(1, 1, 70, 70, 2, 1, 32)
  valid = jnp.asarray([61], jnp.int32)
  assert_matches_reference(q, k, v, valid, block_len=3, prefix_len=5, atol=2e-5,
                           block_q=block_q, block_k=block_k)


BF16_CASES = [
    (40, 4, 2, 1, 0, None),
    (48, 4, 1, 16, 3, (48, 21)),
    (36, 2, 2, 36, 0, None),
]


@pytest.mark.parametrize("t,h,kv_heads,block_len,prefix_len,valid", BF16_CASES)
def test_matches_reference_bfloat16(t, h, kv_heads, block_len, prefix_len, valid):
  q, k, v = qkv(2, 2, t, t, h, kv_heads, 16, jnp.bfloat16)
  valid = None if valid is None else jnp.asarray(valid, jnp.int32)
  # Both sides round probabilities and products to bfloat16 (at different points).
  assert_matches_reference(q, k, v, valid, block_len=block_len, prefix_len=prefix_len,
                           atol=3e-2, rtol=3e-2)


def test_default_tiles_on_cpu():
  q, k, v = qkv(3, 1, 80, 80, 2, 2, 16)  # default tile 64: two query tiles, ragged
  ct = randn(4, q.shape)
  fn = lambda q, k, v, valid: ba.block_attention(q, k, v, block_len=4, prefix_len=6,
                                                 interpret=True, backend="cpu")
  out, grads = value_and_grads(fn, q, k, v, ct, None)
  ref, ref_grads = value_and_grads(reference_fn(4, 6), q, k, v, ct, None)
  for x, y in zip((out, *grads), (ref, *ref_grads)):
    np.testing.assert_allclose(x, y, atol=2e-5)


# ----------------------------------------------------------------------------
# Padding, fully masked rows and skipped tiles.


def test_no_nan_with_empty_rows_and_poisoned_padding():
  """kv_valid_len 0 gives zero rows and zero gradients; keys past the valid
  length (whole tiles of NaN here) never reach the output or the gradients."""
  t, valid = 48, jnp.asarray([0, 16], jnp.int32)
  q, k, v = qkv(5, 2, t, t, 4, 2, 16)
  poison = jnp.arange(t)[None, :, None, None] >= 16  # key tiles 1 and 2 of both examples
  k_bad, v_bad = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
  ct = randn(6, q.shape)
  out, (dq, dk, dv) = value_and_grads(kernel_fn(2, 3), q, k_bad, v_bad, ct, valid)
  for x in (out, dq, dk, dv):
    assert bool(jnp.all(jnp.isfinite(x)))
  np.testing.assert_array_equal(out[0], 0.0)
  for g in (dq[0], dk[0], dv[0], dk[:, 16:], dv[:, 16:]):
    np.testing.assert_array_equal(g, 0.0)
  # Example 1 agrees with the reference (on clean keys: padding is invisible).
  ref, ref_grads = value_and_grads(reference_fn(2, 3), q, k, v, ct, valid)
  for x, y in zip((out, dq, dk, dv), (ref, *ref_grads)):
    np.testing.assert_allclose(x[1], y[1], atol=2e-5)


def test_tiles_above_the_block_diagonal_are_not_read():
  """NaN in the last key tile reaches only the last query tile (L = tile, no
  prefix); NaN in the first query tile and its cotangent reaches only the
  first key tile's dk, dv."""
  t = 64
  q, k, v = qkv(8, 1, t, t, 2, 1, 16)
  last = jnp.arange(t)[None, :, None, None] >= t - TILE
  out = jax.jit(kernel_fn(TILE, 0))(q, jnp.where(last, jnp.nan, k), jnp.where(last, jnp.nan, v),
                                    None)
  assert bool(jnp.all(jnp.isfinite(out[:, :t - TILE])))
  assert not bool(jnp.any(jnp.isfinite(out[:, t - TILE:])))

  first = jnp.arange(t)[None, :, None, None] < TILE
  ct = jnp.where(first, jnp.nan, randn(9, q.shape))
  _, (dq, dk, dv) = value_and_grads(kernel_fn(TILE, 0), jnp.where(first, jnp.nan, q), k, v, ct,
                                    None)
  for g in (dq[:, TILE:], dk[:, TILE:], dv[:, TILE:]):
    assert bool(jnp.all(jnp.isfinite(g)))


def test_cpu_without_interpret_is_a_clear_error():
  q, k, v = qkv(0, 1, 16, 16, 2, 2, 16)
  with pytest.raises(ValueError, match="interpret mode"):
    ba.block_attention(q, k, v, block_len=1, backend="cpu")


def test_bad_arguments():
  q, k, v = qkv(0, 1, 16, 16, 3, 2, 16)
  with pytest.raises(ValueError, match="multiple"):
    ba.block_attention(q, k, v, block_len=1, interpret=True, backend="cpu")
  with pytest.raises(ValueError, match="block_len"):
    ba.block_attention(q, k[:, :, :1], v[:, :, :1], block_len=0, interpret=True, backend="cpu")


def test_triton_lowering_for_cuda():
  """All three kernels lower through Triton for CUDA (no GPU needed): catches
  unsupported primitives, block shapes and compiler params here; compiling to
  PTX and the numerics need a GPU (test_gpu_compiled)."""
  q, k, v = qkv(0, 2, 200, 200, 4, 2, 80, jnp.bfloat16)  # ragged T, head dim padded to 128

  def loss_grads(q, k, v, valid):
    fn = lambda q, k, v: ba.block_attention(q, k, v, block_len=16, prefix_len=5,
                                            kv_valid_len=valid, backend="gpu")
    return jax.grad(lambda *x: fn(*x).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

  text = jax.jit(loss_grads).trace(q, k, v, jnp.asarray([200, 90])).lower(
      lowering_platforms=("cuda",)).as_text()
  for name in ("block_attention_fwd", "block_attention_dq", "block_attention_dkv"):
    assert f'name = "{name}"' in text
  assert text.count("xla.gpu.triton") == 3
  assert "num_warps = 8" in text


def test_gpu_tiles_must_suit_triton():
  q, k, v = qkv(0, 1, 48, 48, 2, 2, 16)
  with pytest.raises(ValueError, match="power of two"):
    ba.block_attention(q, k, v, block_len=1, block_q=24, backend="gpu")


# ----------------------------------------------------------------------------
# Which tiles are visited.


def visible_pair_tiles(t, s, block_len, prefix_len, block_q, block_k, valid):
  """Bool [T/bq, S/bk]: tiles holding at least one visible (query, key) pair.

  The pairs come from the visible-key formula in numpy (no compilation per
  shape); tests/test_dispatch.py checks that formula against brute force.
  """
  qi, kj = np.arange(t)[:, None], np.arange(s)[None, :]
  mask = (kj < masks.visible_key_end(qi, block_len=block_len, prefix_len=prefix_len)) & (kj < valid)
  nq, nk = -(-t // block_q), -(-s // block_k)
  padded = np.zeros((nq * block_q, nk * block_k), dtype=bool)
  padded[:t, :s] = mask
  return padded.reshape(nq, block_q, nk, block_k).any(axis=(1, 3))


@hypothesis.settings(max_examples=50, deadline=None, derandomize=True)
@hypothesis.given(
    t=st.integers(1, 90), s=st.integers(1, 90), block_len=st.integers(1, 40),
    prefix_len=st.integers(0, 30), block_q=st.sampled_from([8, 16, 32]),
    block_k=st.sampled_from([8, 16, 32]), valid=st.integers(0, 90))
def test_visited_tiles_cover_every_visible_pair(t, s, block_len, prefix_len, block_q, block_k,
                                                valid):
  needed = visible_pair_tiles(t, s, block_len, prefix_len, block_q, block_k, valid)
  by_query = ba.visited_tiles(t, s, block_len, prefix_len, block_q, block_k, kv_valid_len=valid)
  by_key = ba.visited_tiles(t, s, block_len, prefix_len, block_q, block_k, by="key",
                            kv_valid_len=valid)
  # The forward / dq key loop and the dk, dv query loop visit the same tiles.
  np.testing.assert_array_equal(by_query, by_key)
  assert not np.any(needed & ~by_query), "a tile with a visible pair is skipped"
  if t % block_q == 0:  # no padded query rows: exactly the needed tiles
    np.testing.assert_array_equal(by_query, needed)


def test_visited_tiles_formulas_run_in_a_kernel_too():
  """The traced (jnp) evaluation of the loop bounds equals the numpy one."""
  kw = dict(block_q=16, block_k=32, block_len=5, prefix_len=7)
  for i, valid in itertools.product(range(6), (0, 40, 96)):
    n = ba._num_key_tiles(jnp.int32(i), jnp.int32(valid), **kw)  # pylint: disable=protected-access
    assert int(n) == ba._num_key_tiles(i, valid, **kw)  # pylint: disable=protected-access
    lo, hi = ba._query_tile_range(jnp.int32(i), jnp.int32(valid), 6, **kw)  # pylint: disable=protected-access
    assert (int(lo), int(hi)) == tuple(int(x) for x in ba._query_tile_range(i, valid, 6, **kw))  # pylint: disable=protected-access


def test_visible_tile_fraction():
  assert 0.5 <= ba.visible_tile_fraction(4096, 4096, 1, 0, 64, 64) <= 0.51  # causal: half
  assert ba.visible_tile_fraction(4096, 4096, 4096, 0, 64, 64) == 1.0  # full
  assert ba.visible_tile_fraction(256, 256, 1, 256, 64, 64) == 1.0  # all prefix
  # Block length of 2 tiles: a lower triangle of 4 x 4 blocks, each 2 x 2 tiles.
  assert ba.visible_tile_fraction(512, 512, 128, 0, 64, 64) == (4 * 5 / 2) * 4 / 64
  # A prefix adds its columns to every query tile.
  assert ba.visible_tile_fraction(1024, 1024, 1, 128, 64, 64) > ba.visible_tile_fraction(
      1024, 1024, 1, 0, 64, 64)


# ----------------------------------------------------------------------------
# TPU route (splash attention), in the TPU interpreter on CPU.


def test_splash_route_in_interpret_mode():
  """The splash route: the computable mask, head layout, segment-id padding, GQA."""
  q, k, v = qkv(10, 2, 100, 100, 2, 1, 32)  # padded to one 128 tile
  valid = jnp.asarray([100, 57], jnp.int32)
  ct = randn(11, q.shape)
  fn = lambda q, k, v, valid: ba.block_attention(q, k, v, block_len=8, prefix_len=5,
                                                 kv_valid_len=valid, interpret=True, backend="tpu")
  out, grads = value_and_grads(fn, q, k, v, ct, valid)
  ref, ref_grads = value_and_grads(reference_fn(8, 5), q, k, v, ct, valid)
  for name, x, y in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
    np.testing.assert_allclose(x, y, atol=2e-5, err_msg=name)


def test_splash_mask_equals_block_causal_mask():
  for t, block_len, prefix_len in ((37, 1, 0), (64, 5, 7), (50, 16, 3), (20, 20, 25)):
    mask = ba.BlockCausalMask((t, t), block_len, prefix_len)
    np.testing.assert_array_equal(
        mask[:, :], np.asarray(masks.block_causal_mask(t, block_len=block_len, prefix_len=prefix_len)))
    assert mask == ba.BlockCausalMask((t, t), block_len, prefix_len)
    assert hash(mask) == hash(ba.BlockCausalMask((t, t), block_len, prefix_len))


# ----------------------------------------------------------------------------
# Compiled kernels on accelerators (skipped on CPU).

ACCEL_CASES = [
    # (dtype, T, H, K, D, L, P, valid, atol)
    (jnp.float32, 1000, 8, 2, 64, 16, 8, (1000, 611), 2e-3),  # TF32-free IEEE dots on GPU
    (jnp.bfloat16, 1024, 8, 8, 128, 1, 0, None, 3e-2),
    (jnp.bfloat16, 777, 4, 1, 80, 64, 100, (700, 777), 3e-2),
]


def _compiled_matches_reference(backend, dtype, t, h, kv_heads, d, block_len, prefix_len, valid,
                                atol):
  q, k, v = qkv(12, 2, t, t, h, kv_heads, d, dtype)
  valid = None if valid is None else jnp.asarray(valid, jnp.int32)
  ct = randn(13, q.shape, dtype)
  fn = lambda q, k, v, valid: ba.block_attention(q, k, v, block_len=block_len,
                                                 prefix_len=prefix_len, kv_valid_len=valid,
                                                 backend=backend)
  out, grads = value_and_grads(fn, q, k, v, ct, valid)
  ref, ref_grads = value_and_grads(reference_fn(block_len, prefix_len), q, k, v, ct, valid)
  for name, x, y in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
    assert bool(jnp.all(jnp.isfinite(x))), name
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=atol,
                               rtol=atol, err_msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("dtype,t,h,kv_heads,d,block_len,prefix_len,valid,atol", ACCEL_CASES)
def test_gpu_compiled(dtype, t, h, kv_heads, d, block_len, prefix_len, valid, atol):
  _compiled_matches_reference("gpu", dtype, t, h, kv_heads, d, block_len, prefix_len, valid, atol)


@pytest.mark.tpu
@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
@pytest.mark.parametrize("dtype,t,h,kv_heads,d,block_len,prefix_len,valid,atol", ACCEL_CASES)
def test_tpu_compiled(dtype, t, h, kv_heads, d, block_len, prefix_len, valid, atol):
  _compiled_matches_reference("tpu", dtype, t, h, kv_heads, d, block_len, prefix_len, valid, atol)
