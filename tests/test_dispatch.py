"""Tests of kernels/masks.py, kernels/reference.py, kernels/blocksparse.py and kernels/dispatch.py (CPU).

The masks and their visible-key formula are checked against a brute-force
loop, the dense reference (`kernels.reference.xla_attention`) against numpy;
the block-sparse XLA path against the reference (`block_causal_attention`) in
values and in dq, dk, dv; the dispatcher for its choices and its errors; and a
model config switches the implementation without touching model code.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import blocksparse
from kernels import dispatch
from kernels import masks
from kernels import reference
from kernels import scan_attention
from kernels.masks import MaskSpec
from layers import attention
from nbp.models import block_transformer


def randn(seed, shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def values_and_grads(fn, q, k, v, cotangent):
  """fn(q, k, v) and the gradients of <fn(q, k, v), cotangent> in q, k, v."""
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(cotangent.astype(out.dtype)))


def qkv(t, heads=4, kv_heads=2, d=8, batch=2, dtype=jnp.float32):
  return (randn(0, (batch, t, heads, d), dtype), randn(1, (batch, t, kv_heads, d), dtype),
          randn(2, (batch, t, kv_heads, d), dtype))


# ----------------------------------------------------------------------------
# Masks against brute force.


def brute_force_mask(q_len, kv_len, block_len, prefix_len, q_offset):
  mask = np.zeros((q_len, kv_len), dtype=bool)
  for t in range(q_len):
    i = q_offset + t
    for j in range(kv_len):
      if j < prefix_len:
        mask[t, j] = True
      elif i >= prefix_len:
        mask[t, j] = (i - prefix_len) // block_len >= (j - prefix_len) // block_len
  return mask


MASK_GRID = list(itertools.product((1, 4, 7), (1, 2, 3, 4, 16), (0, 1, 3), (0, 2, 5)))  # T, L, P, offset


def test_block_causal_mask_matches_brute_force():
  for q_len, block_len, prefix_len, q_offset in MASK_GRID:
    kv_len = q_offset + q_len + 2  # keys beyond the queries, as in a cache
    got = masks.block_causal_mask(q_len, kv_len, block_len=block_len, prefix_len=prefix_len, q_offset=q_offset)
    want = brute_force_mask(q_len, kv_len, block_len, prefix_len, q_offset)
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=str((q_len, block_len, prefix_len, q_offset)))


def test_visible_key_formula_in_numpy_matches_brute_force():
  """The numpy evaluation (the kernels' static bounds) of visible_key_end and its inverse."""
  for _, block_len, prefix_len, _ in MASK_GRID:
    t = 40
    want = brute_force_mask(t, t, block_len, prefix_len, 0)
    q_pos, k_pos = np.arange(t)[:, None], np.arange(t)[None, :]
    kw = dict(block_len=block_len, prefix_len=prefix_len)
    np.testing.assert_array_equal(k_pos < masks.visible_key_end(q_pos, **kw), want, err_msg=str(kw))
    np.testing.assert_array_equal(q_pos >= masks.first_seeing_query(k_pos, **kw), want, err_msg=str(kw))


def test_block_causal_special_cases():
  t = 9
  # block_len 1 is causal.
  np.testing.assert_array_equal(masks.block_causal_mask(t, block_len=1), np.tril(np.ones((t, t), bool)))
  np.testing.assert_array_equal(masks.causal_mask(t), np.tril(np.ones((t, t), bool)))
  np.testing.assert_array_equal(masks.causal_mask(3, 8, q_offset=4), np.tril(np.ones((3, 8), bool), k=4))
  # block_len >= T is full attention after the prefix; the prefix sees only itself.
  p = 3
  m = np.asarray(masks.block_causal_mask(t, block_len=t, prefix_len=p))
  assert m[p:].all()
  assert m[:p, :p].all() and not m[:p, p:].any()
  np.testing.assert_array_equal(masks.full_mask(4, 6), np.ones((4, 6), bool))


def test_mask_spec_and_traced_offset():
  spec = MaskSpec("block_causal", block_len=4, prefix_len=3)
  want = brute_force_mask(4, 20, 4, 3, 7)
  np.testing.assert_array_equal(spec.make(4, 20, q_offset=7), want)
  traced = jax.jit(lambda off: spec.make(4, 20, q_offset=off))(jnp.int32(7))
  np.testing.assert_array_equal(traced, want)
  np.testing.assert_array_equal(MaskSpec("causal").make(5), np.tril(np.ones((5, 5), bool)))
  np.testing.assert_array_equal(MaskSpec("causal", prefix_len=2).make(5), brute_force_mask(5, 5, 1, 2, 0))
  assert MaskSpec("full").make(3, 4).all()
  # The kernels' numbers of each kind give the same mask.
  for mask in (spec, MaskSpec("causal", prefix_len=2), MaskSpec("full")):
    block_len, prefix_len = mask.block_causal_numbers(20)
    np.testing.assert_array_equal(mask.make(6, 20, q_offset=3), brute_force_mask(6, 20, block_len, prefix_len, 3))
  with pytest.raises(ValueError):
    MaskSpec("diagonal")
  hash(spec)  # a config value: hashable


def test_padding_and_dense_masks():
  m = masks.padding_mask(jnp.array([2, 5]), 5)
  assert m.shape == (2, 1, 1, 5)
  np.testing.assert_array_equal(m[:, 0, 0], [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
  spec = MaskSpec("block_causal", block_len=2, prefix_len=1)
  dense = masks.dense_mask(spec, 3, 5, kv_valid_len=jnp.array([2, 5]), q_offset=1)
  assert dense.shape == (2, 1, 3, 5)
  np.testing.assert_array_equal(dense[:, 0], brute_force_mask(3, 5, 2, 1, 1)[None] & np.asarray(m[:, 0]))
  assert masks.dense_mask(spec, 3, 5).shape == (1, 1, 3, 5)


# ----------------------------------------------------------------------------
# The dense reference against numpy.


def naive_attention(q, k, v, mask):
  """numpy softmax attention with kv heads repeated to the query heads."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(np.broadcast_to(mask, logits.shape), logits, -1e30)
  logits -= logits.max(-1, keepdims=True)
  probs = np.exp(logits)
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", probs, v)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_xla_attention_matches_naive(heads, kv_heads):
  b, t, s, d = 2, 5, 7, 8
  q, k, v = randn(0, (b, t, heads, d)), randn(1, (b, s, kv_heads, d)), randn(2, (b, s, kv_heads, d))
  mask = masks.causal_mask(t, s, q_offset=2)[None, None] & masks.padding_mask(jnp.array([6, 3]), s)
  attend = jax.jit(reference.xla_attention)
  got = attend(q, k, v, mask)
  np.testing.assert_allclose(got, naive_attention(q, k, v, np.asarray(mask)), atol=1e-5)
  # A per-head mask [B, H, T, S] also works.
  head_mask = np.random.default_rng(3).random((b, heads, t, s)) < 0.7
  head_mask[..., 0] = True
  got = attend(q, k, v, head_mask)
  np.testing.assert_allclose(got, naive_attention(q, k, v, np.asarray(head_mask)), atol=1e-5)
  # No mask.
  got = attend(q, k, v)
  np.testing.assert_allclose(got, naive_attention(q, k, v, np.ones((1, 1, t, s), bool)), atol=1e-5)


def test_fully_masked_rows_are_finite():
  q = jnp.ones((1, 3, 2, 4))
  k = v = jnp.ones((1, 5, 2, 4))
  mask = jnp.zeros((1, 1, 3, 5), bool).at[0, 0, 1, :2].set(True)  # rows 0 and 2 see nothing
  out = reference.xla_attention(q, k, v, mask)
  assert np.isfinite(np.asarray(out)).all()
  grads = jax.grad(lambda q: reference.xla_attention(q, k, v, mask).sum())(q)
  assert np.isfinite(np.asarray(grads)).all()


def test_xla_impl_second_order_gradients():
  # EBT differentiates through its own gradient steps: the "xla" path must allow it.
  q, k, v = randn(0, (1, 4, 2, 4)), randn(1, (1, 4, 1, 4)), randn(2, (1, 4, 1, 4))
  attend = lambda q, k: dispatch.attention(q, k, v, mask=MaskSpec("causal"), impl="xla")

  def inner(q, k):
    return jnp.sum(jax.grad(lambda q: jnp.sum(attend(q, k) ** 2))(q) ** 2)

  g = jax.jit(jax.grad(inner, argnums=1))(q, k)
  assert g.shape == k.shape and np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0


# ----------------------------------------------------------------------------
# Block-sparse XLA attention against the dense reference.


@pytest.mark.parametrize("block_len", [1, 2, 16, 37])
@pytest.mark.parametrize("prefix_len", [0, 5])
def test_blocksparse_matches_dense_values_and_grads(block_len, prefix_len):
  t = 37  # not a multiple of the chunk (8), nor of most block lengths
  q, k, v = qkv(t)  # grouped-query: 4 heads over 2 kv heads
  lengths = jnp.array([t, 23])  # key padding in the second example
  kwargs = dict(block_len=block_len, prefix_len=prefix_len, kv_valid_len=lengths)
  cot = randn(3, q.shape)
  want = values_and_grads(functools.partial(reference.block_causal_attention, **kwargs), q, k, v, cot)
  got = values_and_grads(jax.jit(functools.partial(blocksparse.block_attention_blocksparse, chunk=8, **kwargs)),
                         q, k, v, cot)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5, err_msg=name)


@pytest.mark.parametrize("remat", [False, True])
def test_blocksparse_default_chunks_and_remat(remat):
  # T = 300 with the default chunk (256 rows, whole blocks of 16): a short last chunk.
  t, block_len, prefix_len = 300, 16, 12
  q, k, v = qkv(t, heads=2, kv_heads=1, batch=1)
  cot = randn(3, q.shape)
  kwargs = dict(block_len=block_len, prefix_len=prefix_len)
  want = values_and_grads(functools.partial(reference.block_causal_attention, **kwargs), q, k, v, cot)
  fn = functools.partial(blocksparse.block_attention_blocksparse, remat=remat, **kwargs)
  got = values_and_grads(jax.jit(fn), q, k, v, cot)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5, err_msg=name)


def test_blocksparse_bfloat16():
  t = 40
  q, k, v = qkv(t, dtype=jnp.bfloat16)
  cot = randn(3, q.shape, jnp.bfloat16)
  kwargs = dict(block_len=4, prefix_len=3, kv_valid_len=jnp.array([40, 31]))
  # The float32 reference on the same (bf16-rounded) inputs.
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  want = values_and_grads(functools.partial(reference.block_causal_attention, **kwargs), *f32,
                          cot.astype(jnp.float32))
  got = values_and_grads(jax.jit(functools.partial(blocksparse.block_attention_blocksparse, chunk=16, **kwargs)),
                         q, k, v, cot)
  assert all(g.dtype == jnp.bfloat16 for g in got)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=6e-2, rtol=5e-2, err_msg=name)


def test_blocksparse_chunks_cover_rows_and_visible_keys():
  for t, block_len, prefix_len, chunk in [(37, 2, 5, 8), (300, 16, 12, 256), (64, 64, 0, 16), (10, 1, 20, 4)]:
    bounds = blocksparse.chunk_bounds(t, block_len, prefix_len, chunk)
    rows = np.concatenate([np.arange(r0, r1) for r0, r1, _ in bounds])
    np.testing.assert_array_equal(rows, np.arange(t))
    mask = np.asarray(masks.block_causal_mask(t, t, block_len=block_len, prefix_len=prefix_len))
    for r0, r1, end in bounds:
      assert not mask[r0:r1, end:].any()  # nothing visible is skipped
      assert mask[r0:r1, end - 1].any()  # and the key range is tight
  # Default chunk: whole blocks, at most MAX_CHUNKS chunks.
  assert blocksparse.default_chunk(4096, 16) == 256
  assert blocksparse.default_chunk(4096, 100) == 200
  assert len(blocksparse.chunk_bounds(65536, 1, 0, blocksparse.default_chunk(65536, 1))) <= blocksparse.MAX_CHUNKS


def test_blocksparse_is_finite_without_visible_keys_and_twice_differentiable():
  q, k, v = qkv(12)
  out = blocksparse.block_attention_blocksparse(q, k, v, block_len=3, kv_valid_len=jnp.array([0, 5]), chunk=4)
  assert np.isfinite(np.asarray(out)).all()

  def inner(q, k):
    f = lambda q: jnp.sum(blocksparse.block_attention_blocksparse(q, k, v, block_len=3, chunk=4) ** 2)
    return jnp.sum(jax.grad(f)(q) ** 2)

  def inner_ref(q, k):
    f = lambda q: jnp.sum(reference.block_causal_attention(q, k, v, block_len=3) ** 2)
    return jnp.sum(jax.grad(f)(q) ** 2)

  np.testing.assert_allclose(jax.jit(jax.grad(inner, argnums=1))(q, k), jax.jit(jax.grad(inner_ref, argnums=1))(q, k),
                             atol=1e-4, rtol=1e-4)


def test_blocksparse_rejects_cross_attention():
  q = jnp.ones((1, 4, 2, 8))
  k = v = jnp.ones((1, 6, 2, 8))
  with pytest.raises(ValueError, match="self-attention"):
    blocksparse.block_attention_blocksparse(q, k, v, block_len=1)


# ----------------------------------------------------------------------------
# The dispatcher.


def test_resolve_impl_auto():
  n = dispatch.AUTO_BLOCKSPARSE_MIN_LEN
  assert dispatch.resolve_impl("auto", "cpu", n, n, 0) == "xla_blocksparse"
  assert dispatch.resolve_impl("auto", "cpu", 4 * n, 4 * n, 0) == "xla_blocksparse"
  assert dispatch.resolve_impl("auto", "cpu", n - 1, n - 1, 0) == "xla"  # short: dense
  assert dispatch.resolve_impl("auto", "cpu", 1, 4 * n, 7) == "xla"  # decoding
  assert dispatch.resolve_impl("auto", "cpu", n, n, 3) == "xla"  # queries not at 0
  assert dispatch.resolve_impl("auto", "cpu", n, 2 * n, 0) == "xla"  # cross-length
  for backend in ("gpu", "cuda", "tpu"):
    assert dispatch.resolve_impl("auto", backend, 64, 64, 0) == "pallas"
    assert dispatch.resolve_impl("auto", backend, 1, 64, 5) == "xla"
  traced = []
  jax.jit(lambda i: traced.append(dispatch.resolve_impl("auto", "cpu", n, n, i)) or i)(0)
  assert traced == ["xla"]  # a traced offset is a decode step
  for impl in ("xla", "xla_blocksparse", "pallas"):
    assert dispatch.resolve_impl(impl, "cpu", 8, 8, 0) == impl
  assert dispatch.resolve_impl("cudnn", "gpu", 8, 8, 0) == "cudnn"


def test_dispatcher_errors():
  q = k = v = jnp.ones((1, 4, 2, 8))
  causal = MaskSpec("causal")
  with pytest.raises(ValueError, match=r"'flash' is unknown; choose one of .*xla_blocksparse"):
    dispatch.attention(q, k, v, mask=causal, impl="flash")
  with pytest.raises(NotImplementedError, match="xla_blocksparse.*self-attention only.*decode"):
    dispatch.attention(q, jnp.ones((1, 8, 2, 8)), jnp.ones((1, 8, 2, 8)), mask=causal, q_offset=4,
                       impl="xla_blocksparse")
  with pytest.raises(NotImplementedError, match="'pallas' needs queries starting at position 0"):
    dispatch.attention(q, k, v, mask=causal, q_offset=2, impl="pallas")
  with pytest.raises(NotImplementedError, match="'cudnn' needs an NVIDIA GPU; the backend is 'cpu'"):
    dispatch.attention(q, k, v, mask=causal, impl="cudnn")
  with pytest.raises(TypeError, match="MaskSpec"):
    dispatch.attention(q, k, v, mask=masks.causal_mask(4))
  # The same message inside jit, with the cache index traced.
  with pytest.raises(NotImplementedError, match="xla_blocksparse"):
    jax.jit(lambda i: dispatch.attention(q, k, v, mask=causal, q_offset=i, impl="xla_blocksparse"))(0)


MASKS = [MaskSpec("full"), MaskSpec("causal"), MaskSpec("causal", prefix_len=3),
         MaskSpec("block_causal", block_len=4, prefix_len=2)]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: f"{m.kind}{m.block_len}p{m.prefix_len}")
def test_dispatch_impls_agree(mask):
  t = 19
  q, k, v = qkv(t)
  lengths = jnp.array([19, 11])
  want = reference.xla_attention(q, k, v, mask.make(t)[None, None] & masks.padding_mask(lengths, t))
  for impl in ("auto", "xla", "xla_blocksparse", "pallas"):
    got = dispatch.attention(q, k, v, mask=mask, kv_valid_len=lengths, impl=impl)
    np.testing.assert_allclose(got, want, atol=2e-5, err_msg=impl)


def test_dispatch_decode_rows_match_full():
  # Queries 8..11 over a cache of 16 keys with 12 written equal rows 8..11 of the full pass.
  t = 12
  q, k, v = qkv(t)
  mask = MaskSpec("block_causal", block_len=4, prefix_len=1)
  full = dispatch.attention(q, k, v, mask=mask, impl="xla")
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 4), (0, 0), (0, 0)))
  step = jax.jit(lambda q, k, v, i: dispatch.attention(q, k, v, mask=mask, kv_valid_len=i + 4, q_offset=i))
  got = step(q[:, 8:], pad(k), pad(v), jnp.int32(8))
  np.testing.assert_allclose(got, full[:, 8:], atol=2e-5)


def test_scan_forwards_to_scan_attention():
  s, v = randn(0, (2, 24, 3)), randn(1, (2, 24, 3, 8))
  valid = jnp.arange(24)[None] < jnp.array([[24], [17]])
  got = jax.jit(dispatch.scan)(s, v, valid)
  np.testing.assert_allclose(got, jax.jit(scan_attention.scan_attention_reference)(s, v, valid), atol=1e-5)
  with pytest.raises(ValueError, match="unknown impl"):
    dispatch.scan(s, v, impl="nope")


# ----------------------------------------------------------------------------
# Layers and models switch the implementation by configuration.


def test_multihead_attention_blocksparse_decodes_with_cache():
  mha = attention.MultiHeadAttention(num_heads=4, head_dim=8, num_kv_heads=2, rope="1d",
                                     mask=MaskSpec("block_causal", block_len=3, prefix_len=2),
                                     impl="xla_blocksparse", max_decode_len=11)
  x = randn(0, (2, 11, 16))
  variables = jax.jit(functools.partial(mha.init, decode=True))(jax.random.key(0), x)
  full = jax.jit(mha.apply)({"params": variables["params"]}, x)
  ref = jax.jit(mha.clone(impl="xla").apply)({"params": variables["params"]}, x)
  np.testing.assert_allclose(full, ref, atol=2e-5)
  step = jax.jit(functools.partial(mha.apply, decode=True, mutable=["cache"]))
  cache, outs, start = variables["cache"], [], 0
  for size in (2, 3, 3, 3):  # the prefix, then block by block (decode steps run "xla")
    out, mutated = step({"params": variables["params"], "cache": cache}, x[:, start:start + size])
    cache, start = mutated["cache"], start + size
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("block", [(1, 1, 1), (1, 1, 4)])
def test_model_config_switches_attention_impl(block):
  impls = ["xla", "xla_blocksparse", "auto", "pallas"]  # pallas: interpret mode on CPU
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, (2, 24)), jnp.int32)
  make = lambda impl: block_transformer.NextBlockTransformer(
      codebook_size=16, grid=(2, 3, 4), block=block, num_layers=2, width=32, num_heads=4, num_kv_heads=2,
      attention_impl=impl)
  params = make("xla").init(jax.random.key(0), tokens)["params"]
  want = make("xla").apply({"params": params}, tokens)
  for impl in impls:
    got = jax.jit(make(impl).apply)({"params": params}, tokens)
    np.testing.assert_allclose(got, want, atol=1e-4, err_msg=impl)


@pytest.mark.slow
def test_model_pallas_gradients_match_xla():
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 16, (1, 16)), jnp.int32)
  make = lambda impl: block_transformer.NextBlockTransformer(
      codebook_size=16, grid=(1, 4, 4), block=(1, 1, 4), position="rope", num_layers=1, width=32, num_heads=2,
      num_kv_heads=1, attention_impl=impl)
  params = make("xla").init(jax.random.key(0), tokens)["params"]
  loss = lambda impl: jax.jit(jax.grad(lambda p: jnp.sum(make(impl).apply({"params": p}, tokens) ** 2)))(params)
  for g, w in zip(jax.tree.leaves(loss("pallas")), jax.tree.leaves(loss("xla"))):
    np.testing.assert_allclose(g, w, atol=1e-3, rtol=1e-3)
