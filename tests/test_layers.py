"""Tests of layers/: attention over a KV cache, RoPE, KV-cache decoding, blocks and stacks (CPU).

The masks and the reference attention are tested with kernels/ (tests/test_dispatch.py).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import dispatch
from kernels import masks
from kernels import reference
from kernels.masks import MaskSpec
from layers import attention, position, transformer
from layers.attention import MultiHeadAttention
from layers.transformer import DecoderStack, Mlp, TransformerBlock


def randn(seed, shape):
  """Standard normal float32 test data (numpy: no per-shape compilation)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# ----------------------------------------------------------------------------
# Attention in the cache layout


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_decode_attention_in_the_cache_layout_matches_reference(heads, kv_heads):
  b, t, s, d = 2, 5, 7, 8
  q, k, v = randn(0, (b, t, heads, d)), randn(1, (b, s, kv_heads, d)), randn(2, (b, s, kv_heads, d))
  keys, values = attention.cache_layout(k, v)
  assert keys.shape == (b * kv_heads, d, s) and values.shape == (b * kv_heads, s, d)
  mask = masks.causal_mask(t, s, q_offset=2)[None, None] & masks.padding_mask(jnp.array([6, 3]), s)
  # The reference is checked against numpy in tests/test_dispatch.py.
  got = jax.jit(attention.decode_attention)(q, keys, values, mask)  # mask [B, 1, T, S]
  np.testing.assert_allclose(got, reference.xla_attention(q, k, v, mask), atol=1e-5)
  shared = masks.causal_mask(t, s, q_offset=2)  # [T, S], the same for every row
  got = jax.jit(attention.decode_attention)(q, keys, values, shared)
  np.testing.assert_allclose(got, reference.xla_attention(q, k, v, shared), atol=1e-5)


# ----------------------------------------------------------------------------
# RoPE and positions


def _dot(a, b):
  return jnp.sum(a * b, axis=-1)  # [B, T, N]


@pytest.mark.parametrize("axes", [1, 2, 3])
def test_rope_relative_positions_and_norm(axes):
  b, t, n, d = 2, 6, 3, 16
  rng = np.random.default_rng(axes)
  q, k = randn(axes, (b, t, n, d)), randn(axes + 10, (b, t, n, d))
  shape = (b, t) if axes == 1 else (b, t, axes)
  p = jnp.asarray(rng.integers(0, 50, shape))
  r = jnp.asarray(rng.integers(0, 50, shape))
  shift = jnp.asarray(rng.integers(-20, 20, (axes,)))  # one offset per axis
  shift = shift[0] if axes == 1 else shift
  base = _dot(position.rope(q, p), position.rope(k, r))
  shifted = _dot(position.rope(q, p + shift), position.rope(k, r + shift))
  np.testing.assert_allclose(shifted, base, rtol=1e-4, atol=1e-4)
  # The score does change with the relative position.
  other = _dot(position.rope(q, p + shift), position.rope(k, r))
  assert not np.allclose(other, base, atol=1e-3)
  np.testing.assert_allclose(jnp.linalg.norm(position.rope(q, p), axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-5)


def test_rope_sections_and_dtype():
  assert position.rope_sections(32, 3) == (11, 11, 10)
  assert position.rope_sections(8, 2) == (4, 4)
  # 1d positions [B, T] equal 1-axis positions [B, T, 1]; position 0 is the identity.
  x = randn(0, (1, 4, 2, 8))
  pos = jnp.arange(4)[None]
  np.testing.assert_allclose(position.rope(x, pos), position.rope(x, pos[..., None]))
  np.testing.assert_allclose(position.rope(x, jnp.zeros((1, 4, 3), jnp.int32)), x, atol=1e-6)
  assert position.rope(x.astype(jnp.bfloat16), pos).dtype == jnp.bfloat16


def test_grid_positions_and_learned_embedding():
  g = position.grid_positions((2, 3, 4))
  assert g.shape == (24, 3) and g.dtype == jnp.int32
  np.testing.assert_array_equal(g[:5], [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3], [0, 1, 0]])
  np.testing.assert_array_equal(g[-1], [1, 2, 3])
  emb = position.LearnedPositionEmbedding(max_len=10, features=6)
  variables = emb.init(jax.random.key(0), jnp.zeros((2, 3), jnp.int32))
  out = emb.apply(variables, jnp.array([[0, 1, 9], [2, 2, 2]]))
  assert out.shape == (2, 3, 6)
  assert isinstance(variables["params"]["embedding"], nn.LogicallyPartitioned)


# ----------------------------------------------------------------------------
# KV-cache decoding equals the full forward pass


def _stack(scan_layers, mask, rope, cache_len):
  block = dict(
      num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48, activation="swiglu", norm="rmsnorm",
      mask=mask, rope=rope, max_decode_len=cache_len)
  return DecoderStack(num_layers=2, block=block, scan_layers=scan_layers)


def _decode_in_chunks(model, variables, x, chunks, positions=None):
  step = jax.jit(lambda p, c, xs, pos: model.apply(
      {"params": p, "cache": c}, xs, positions=pos, decode=True, mutable=["cache"]))
  cache, outs, start = variables["cache"], [], 0
  for size in chunks:
    pos = None if positions is None else positions[:, start:start + size]
    out, mutated = step(variables["params"], cache, x[:, start:start + size], pos)
    cache, start = mutated["cache"], start + size
    outs.append(out)
  return jnp.concatenate(outs, axis=1), cache


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [False, True])
def test_decode_token_by_token_matches_forward_causal(scan_layers):
  t = 10
  model = _stack(scan_layers, MaskSpec("causal"), "1d", cache_len=t)
  x = randn(0, (2, t, 32))
  variables = jax.jit(functools.partial(model.init, decode=True))(jax.random.key(1), x)
  indices = jax.tree.leaves(jax.tree.map(np.asarray, variables["cache"]))
  assert all((a == 0).all() for a in indices)  # init leaves the cache empty and cache_index at 0
  full = jax.jit(model.apply)({"params": variables["params"]}, x)
  decoded, cache = _decode_in_chunks(model, variables, x, [1] * t)
  np.testing.assert_allclose(decoded, full, atol=1e-5)
  index = cache["layers"]["attention"]["cache_index"] if scan_layers else cache["layer_1"]["attention"]["cache_index"]
  np.testing.assert_array_equal(index, t)


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [False, True])
def test_decode_block_by_block_matches_forward_block_causal(scan_layers):
  prefix, block, num_blocks = 3, 4, 3
  t = prefix + block * num_blocks
  model = _stack(scan_layers, MaskSpec("block_causal", block_len=block, prefix_len=prefix), "1d", cache_len=t + 2)
  x = randn(2, (2, t, 32))
  variables = jax.jit(functools.partial(model.init, decode=True))(jax.random.key(3), jnp.zeros((2, t + 2, 32)))
  full = jax.jit(model.apply)({"params": variables["params"]}, x)
  decoded, _ = _decode_in_chunks(model, variables, x, [prefix] + [block] * num_blocks)
  np.testing.assert_allclose(decoded, full, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [False, True])
def test_decode_with_a_cache_grown_between_steps_matches_forward(scan_layers):
  """A cache just long enough for the prefill, grown by resize_cache before each chunk (a sampler's phases)."""
  prefix, block, num_blocks = 3, 4, 4
  t = prefix + block * num_blocks
  model = _stack(scan_layers, MaskSpec("block_causal", block_len=block, prefix_len=prefix), "1d", cache_len=t)
  x = randn(6, (2, t, 32))
  variables = jax.jit(functools.partial(model.init, decode=True))(jax.random.key(3), x)
  full = jax.jit(model.apply)({"params": variables["params"]}, x)
  step = jax.jit(lambda p, c, xs: model.apply({"params": p, "cache": c}, xs, decode=True, mutable=["cache"]))
  cache = attention.resize_cache(variables["cache"], prefix)  # shrunk to the prefill's slots
  outs, start = [], 0
  for size, length in [(prefix, prefix), (block, prefix + block), (block, t - block), (block, t - block),
                       (block, t)]:
    cache = attention.resize_cache(cache, length)  # grows (or keeps) the slots; written ones stay
    out, mutated = step(variables["params"], cache, x[:, start:start + size])
    cache, start = mutated["cache"], start + size
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)
  keys = cache["layers"]["attention"]["cached_key"] if scan_layers else cache["layer_0"]["attention"]["cached_key"]
  assert keys.shape[-1] == t  # keys [(N,) B*K, D, S]
  with pytest.raises(ValueError, match="do not fit"):  # a step longer than the whole cache
    step(variables["params"], attention.resize_cache(variables["cache"], 2), x[:, :3])


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_a_long_prefill_into_an_empty_cache_attends_as_training_does(impl, monkeypatch):
  """From AUTO_BLOCKSPARSE_MIN_LEN tokens a prefill at cache index 0 takes the dispatcher's path; later
  long chunks (cache index > 0) take the cache's; both match the full forward pass."""
  monkeypatch.setattr(dispatch, "AUTO_BLOCKSPARSE_MIN_LEN", 16)  # small shapes; both branches of the cond
  prefix, block = 16, 4
  t = prefix + 16 + 2 * block
  mask = MaskSpec("block_causal", block_len=block, prefix_len=prefix)
  model = _stack(False, mask, "1d", cache_len=t)
  model = DecoderStack(num_layers=2, block={**model.block, "impl": impl})
  x = randn(7, (2, t, 32))
  variables = jax.jit(functools.partial(model.init, decode=True))(jax.random.key(5), x)
  full = jax.jit(model.apply)({"params": variables["params"]}, x)
  calls = []
  real = dispatch.attention
  monkeypatch.setattr(dispatch, "attention", lambda *a, **k: calls.append(a[0].shape[1]) or real(*a, **k))
  decoded, _ = _decode_in_chunks(model, variables, x, [prefix, 16, block, block])
  np.testing.assert_allclose(decoded, full, atol=1e-5)
  assert 16 in calls  # the long chunks were traced through the dispatcher (a cond picks at run time)


def test_decode_3d_rope_block_causal():
  grid = (3, 2, 4)  # (time, height, width); a block is one row of 4 tokens
  prefix, block = 2, 4
  coords = position.grid_positions(grid) + jnp.array([1, 0, 0])  # the prefix takes time 0
  prefix_coords = jnp.zeros((prefix, 3), jnp.int32).at[:, 2].set(jnp.arange(prefix))
  pos = jnp.broadcast_to(jnp.concatenate([prefix_coords, coords])[None], (2, prefix + coords.shape[0], 3))
  t = pos.shape[1]
  model = _stack(False, MaskSpec("block_causal", block_len=block, prefix_len=prefix), "3d", cache_len=t)
  x = randn(4, (2, t, 32))
  variables = jax.jit(functools.partial(model.init, decode=True))(jax.random.key(5), x, positions=pos)
  full = jax.jit(model.apply)({"params": variables["params"]}, x, positions=pos)
  decoded, _ = _decode_in_chunks(model, variables, x, [prefix] + [block] * (coords.shape[0] // block), positions=pos)
  np.testing.assert_allclose(decoded, full, atol=1e-5)
  # Without explicit positions a multi-axis RoPE refuses to guess.
  with pytest.raises(ValueError, match="positions"):
    model.apply({"params": variables["params"]}, x)


def test_padding_in_multi_head_attention():
  mha = MultiHeadAttention(num_heads=2, head_dim=4, mask=MaskSpec("full"))
  x = randn(0, (2, 5, 8))
  variables = jax.jit(mha.init)(jax.random.key(1), x)
  valid = jnp.array([3, 5])
  apply = jax.jit(mha.apply)
  out = apply(variables, x, kv_valid_len=valid)
  # Changing padded tokens of row 0 leaves its valid outputs unchanged.
  out2 = apply(variables, x.at[0, 3:].set(7.0), kv_valid_len=valid)
  np.testing.assert_allclose(out[0, :3], out2[0, :3], atol=1e-6)


# ----------------------------------------------------------------------------
# Blocks, MLP, norms, remat, partitioning, dtypes


@pytest.mark.slow
def test_adaln_block_is_identity_at_init():
  blk = TransformerBlock(num_heads=2, head_dim=8, mlp_dim=32, adaln=True, mask=MaskSpec("block_causal", block_len=4))
  x = randn(0, (2, 8, 16))
  for cond in (randn(1, (2, 12)), randn(1, (2, 8, 12))):
    out, variables = jax.jit(blk.init_with_output)(jax.random.key(2), x, cond)
    np.testing.assert_allclose(out, x, atol=1e-6)
  with pytest.raises(ValueError):
    blk.apply(variables, x)  # adaln without cond
  mods = transformer.AdaLNModulation(16).init_with_output(jax.random.key(0), jnp.ones((2, 12)))[0]
  assert len(mods) == 6 and mods[0].shape == (2, 1, 16)
  np.testing.assert_allclose(transformer.modulate(jnp.ones(3), 1.0, 2.0), 4.0 * np.ones(3))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_mlp_shapes(activation):
  mlp = Mlp(hidden_dim=24, activation=activation)
  x = jnp.ones((2, 3, 8))
  out, variables = mlp.init_with_output(jax.random.key(0), x)
  assert out.shape == (2, 3, 8)
  names = {"gelu": {"wi", "wo"}, "swiglu": {"wi_gate", "wi_up", "wo"}}[activation]
  assert set(variables["params"]) == names


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norms_in_float32(kind):
  x = randn(0, (2, 3, 8)).astype(jnp.bfloat16) * 100
  norm = transformer.make_norm(kind)
  out, variables = norm.init_with_output(jax.random.key(0), x)
  assert out.dtype == jnp.bfloat16
  ms = jnp.mean(out.astype(jnp.float32) ** 2, axis=-1)
  np.testing.assert_allclose(ms, 1.0, rtol=3e-2)
  with pytest.raises(ValueError):
    transformer.make_norm("batchnorm")


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [False, True])
def test_remat_policies_same_gradients(scan_layers):
  block = dict(num_heads=2, head_dim=8, mlp_dim=32, rope="1d", mask=MaskSpec("block_causal", block_len=2))
  x = randn(0, (2, 6, 16))
  params = jax.jit(DecoderStack(2, block, scan_layers).init)(jax.random.key(1), x)["params"]

  def grads(policy):
    model = DecoderStack(2, block, scan_layers, remat_policy=policy)
    return jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)))(params)

  reference = grads("none")
  policies = ("full", "dots_with_no_batch_dims_saveable") if scan_layers else ("nothing_saveable",)
  for policy in policies:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), grads(policy), reference)
  with pytest.raises(ValueError, match="remat_policy"):
    grads("sometimes")


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_param_is_logically_partitioned(scan_layers):
  block = dict(num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=32, adaln=True, norm="layernorm")
  model = DecoderStack(2, block, scan_layers)
  x = jnp.ones((1, 4, 16))
  params = jax.jit(model.init)(jax.random.key(0), x, jnp.ones((1, 16)))["params"]
  leaves = jax.tree.leaves(params, is_leaf=lambda a: isinstance(a, nn.Partitioned))
  assert leaves and all(isinstance(a, nn.LogicallyPartitioned) for a in leaves)
  specs = jax.tree.leaves(nn.get_partition_spec(params), is_leaf=lambda a: a is None)
  assert all(s is not None for s in specs)
  if scan_layers:
    assert all(s[0] == "layers" for s in specs)
  # Every projection of the attention, biases included, carries its names.
  mha = MultiHeadAttention(num_heads=2, head_dim=4, use_bias=True)
  params = mha.init(jax.random.key(0), jnp.ones((1, 3, 8)))["params"]
  leaves = jax.tree.leaves(params, is_leaf=lambda a: isinstance(a, nn.Partitioned))
  assert len(leaves) == 8 and all(isinstance(a, nn.LogicallyPartitioned) for a in leaves)
  assert params["query"]["kernel"].names == ("embed", "heads", "head_dim")
  assert params["key"]["kernel"].names == ("embed", "kv_heads", "head_dim")
  assert params["out"]["kernel"].names == ("heads", "head_dim", "embed")


def test_bfloat16_forward():
  block = dict(num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=32, rope="2d", dtype=jnp.bfloat16,
               mask=MaskSpec("block_causal", block_len=4, prefix_len=1))
  model = DecoderStack(2, block, scan_layers=True)
  x = randn(0, (2, 9, 16)).astype(jnp.bfloat16)
  pos = jnp.broadcast_to(jnp.concatenate([jnp.zeros((1, 2), jnp.int32), position.grid_positions((2, 4))])[None], (2, 9, 2))
  out, variables = jax.jit(model.init_with_output)(jax.random.key(1), x, positions=pos)
  assert out.dtype == jnp.bfloat16 and np.isfinite(np.asarray(out, np.float32)).all()
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(nn.unbox(variables["params"])))


def test_unknown_rope_and_impl_in_module():
  x = jnp.ones((1, 3, 8))
  with pytest.raises(ValueError, match="rope"):
    MultiHeadAttention(num_heads=2, head_dim=4, rope="4d").init(jax.random.key(0), x)
  # impl is one of kernels.dispatch.IMPLS; the error names the impl and the choices.
  unknown = r"'no_such_impl' is unknown; choose one of .*'xla_blocksparse', 'pallas'"
  with pytest.raises(dispatch.AttentionImplError, match=unknown):
    MultiHeadAttention(num_heads=2, head_dim=4, impl="no_such_impl").init(jax.random.key(0), x)
  # Also on a cached decode step, which does not go through the dispatcher.
  mha = MultiHeadAttention(num_heads=2, head_dim=4, max_decode_len=4)
  variables = mha.init(jax.random.key(0), x, decode=True)
  with pytest.raises(dispatch.AttentionImplError, match=unknown):
    mha.clone(impl="no_such_impl").apply(variables, x[:, :1], decode=True, mutable=["cache"])


def test_stack_is_hashable_config():
  block = dict(num_heads=2, head_dim=4, mlp_dim=8, mask=MaskSpec("block_causal", block_len=2))
  a, b = DecoderStack(2, block), DecoderStack(2, dict(block))
  assert hash(a) == hash(b)
