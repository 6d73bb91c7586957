"""Aaren: the learned-query scan attention against naive softmax attention, parallel = streaming, padding,
the attention switch in the shared stack (the text model included), and the split_metrics evaluator."""

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import ntp_text
from layers import aaren
from layers import transformer as transformer_lib
from nbp import tasks
from nbp.evaluators import split_metrics
from nbp.models import block_transformer as bt
from nbp.models import sequence
from nbp.tasks import next_block as nb

B, T, F, O = 2, 21, 3, 5  # T is not a multiple of the scan's chunk (16)


def _model(attention, **kw):
  fields = dict(input_dim=F, output_dim=O, attention=attention, num_layers=2, width=32, num_heads=4, max_len=32)
  fields.update(kw)
  return sequence.SequenceModel(**fields)


@functools.cache
def _params(model):
  x = jnp.zeros((1, T, F))
  return flax.core.meta.unbox(jax.jit(model.init)(jax.random.key(1), x)["params"])


def _inputs(seed=0):
  return jax.random.normal(jax.random.key(seed), (B, T, F))


def naive_learned_query_attention(params, x, valid):
  """numpy float64: softmax of the learned query over each valid prefix, through the layer's own projections."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), flax.core.meta.unbox(params))
  x = np.asarray(x, np.float64)
  q = p["query"]  # [H, D]
  k = np.einsum("bte,ehd->bthd", x, p["key"]["kernel"])
  v = np.einsum("bte,ehd->bthd", x, p["value"]["kernel"])
  s = np.einsum("bthd,hd->bth", k, q) / math.sqrt(q.shape[-1])
  o = np.zeros(v.shape)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      keep = [i for i in range(t + 1) if valid[b, i]]
      if not keep:
        continue
      logits = s[b, keep]  # [K, H]
      w = np.exp(logits - logits.max(0))
      w /= w.sum(0)
      o[b, t] = np.einsum("kh,khd->hd", w, v[b, keep])
  return np.einsum("bthd,hde->bte", o, p["out"]["kernel"])


@pytest.mark.parametrize("scan_impl", ["auto", "associative", "pallas"])
def test_layer_equals_naive_masked_softmax_with_the_learned_query(scan_impl):
  layer = aaren.AarenAttention(num_heads=2, head_dim=8, scan_impl=scan_impl)
  x = jax.random.normal(jax.random.key(0), (B, T, 16))
  lengths = jnp.array([T, 9])
  params = layer.init(jax.random.key(1), x)["params"]  # "pallas": the kernel in interpret mode on CPU
  out = jax.jit(lambda p, x: layer.apply({"params": p}, x, kv_valid_len=lengths))(params, x)
  valid = np.arange(T)[None] < np.asarray(lengths)[:, None]
  want = naive_learned_query_attention(params, x, valid)
  np.testing.assert_allclose(out[0], want[0], atol=2e-5)
  np.testing.assert_allclose(out[1, :9], want[1, :9], atol=2e-5)
  # After the last valid step the output repeats the last valid prefix's.
  np.testing.assert_allclose(out[1, 9:], np.broadcast_to(want[1, 8], out[1, 9:].shape), atol=2e-5)


def test_query_is_a_parameter_per_head_and_layer():
  model = _model("aaren")
  params = _params(model)
  for i in range(2):
    attention = params["decoder"][f"layer_{i}"]["attention"]
    assert attention["query"].shape == (4, 8)  # H x D: no query projection
    assert set(attention) == {"query", "key", "value", "out"}
  softmax = _params(_model("softmax"))
  count = lambda p: sum(x.size for x in jax.tree.leaves(p))
  # The same model but for the query: E*H*D projection weights become H*D learned queries per layer.
  assert count(softmax) - count(params) == 2 * (32 * 32 - 32)


@pytest.mark.parametrize("attention", ["aaren", "softmax"])
def test_parallel_equals_streaming(attention):
  model = _model(attention)
  params = _params(model)
  x = _inputs()
  parallel = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
  step = jax.jit(functools.partial(sequence.step, model))
  state = sequence.init_state(model, params, B)
  outs = []
  for t in range(T):
    state, y = step(params, state, x[:, t])
    outs.append(y)
  np.testing.assert_allclose(jnp.stack(outs, axis=1), parallel, atol=2e-5)
  np.testing.assert_allclose(jax.jit(functools.partial(sequence.stream, model))(params, x), parallel, atol=2e-5)


def test_aaren_state_is_constant_in_the_context_and_the_kv_cache_is_not():
  def state_size(attention, max_len):
    model = _model(attention, max_len=max_len)
    state = jax.eval_shape(lambda p: sequence.init_state(model, p, B), _params(_model(attention)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))
  assert state_size("aaren", 16) == state_size("aaren", 4096)
  assert state_size("softmax", 4096) > 100 * state_size("softmax", 16)  # the KV cache grows with its slots


@pytest.mark.parametrize("attention", ["aaren", "softmax"])
def test_padding_gives_finite_values_and_gradients_and_leaves_real_steps_alone(attention):
  model = _model(attention)
  params = _params(model)
  x = _inputs()
  valid = jnp.arange(T)[None] < jnp.array([[T], [7]])
  garbage = x.at[1, 7:].set(jnp.nan).at[1, 8].set(1e30)  # what padding may hold
  apply = jax.jit(lambda p, x, valid: model.apply({"params": p}, x, valid=valid))
  full = apply(params, x, None)
  out = apply(params, garbage, valid)
  assert bool(jnp.isfinite(out).all())
  np.testing.assert_allclose(out[1, :7], full[1, :7], atol=2e-5)
  np.testing.assert_allclose(out[0], full[0], atol=2e-5)

  def loss(p, x):
    y = model.apply({"params": p}, x, valid=valid)
    return jnp.sum(jnp.where(valid[..., None], y, 0.0) ** 2)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, garbage)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads[1][1, 7:]).max()) == 0.0  # padding gets no gradient


def test_aaren_scores_far_apart_stay_finite():
  layer = aaren.AarenAttention(num_heads=1, head_dim=4, query_init=lambda *_: jnp.full((1, 4), 1e4))
  x = jax.random.normal(jax.random.key(0), (1, 20, 8)) * 10
  params = layer.init(jax.random.key(1), x)["params"]
  grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x, kv_valid_len=jnp.array([15])))))(params)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_aaren_refuses_non_causal_masks_by_name():
  block = transformer_lib.TransformerBlock(
      num_heads=2, head_dim=8, mlp_dim=32, attention="aaren",
      mask=transformer_lib.MaskSpec("block_causal", block_len=4))
  with pytest.raises(ValueError, match="attention='aaren'"):
    block.init(jax.random.key(0), jnp.zeros((1, 8, 16)))
  assert transformer_lib.is_causal(transformer_lib.MaskSpec("block_causal", block_len=1, prefix_len=1))
  assert not transformer_lib.is_causal(transformer_lib.MaskSpec("full"))
  with pytest.raises(ValueError, match="config.model.attention"):
    _model("linear").init(jax.random.key(0), jnp.zeros((1, 4, F)))
  with pytest.raises(ValueError, match="config.model.attention='aaren'"):
    bt.NextBlockTransformer(codebook_size=8, grid=(1, 2, 2), block=(1, 2, 2), attention="aaren",
                            variant="tiny").init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def test_the_text_model_runs_on_aaren_cached_decoding_equals_the_forward_pass():
  config = ntp_text.get_config("tiny,local,aaren")
  assert config.model.attention == "aaren" and config.model.position == "learned"
  config.model.grid = (1, 1, 12)
  model = tasks.build_model(bt.NextBlockTransformer, config.model)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)
  inputs, _ = nb.next_block_targets(model, tokens)
  params = jax.jit(model.init)(jax.random.key(1), inputs)["params"]
  full = jax.jit(lambda p, i: model.apply({"params": p}, i))(params, inputs)
  _, cache = model.apply({"params": params}, inputs[:, :1], decode=True, mutable=["cache"])
  step = jax.jit(lambda c, t, s: model.apply({"params": params, "cache": c}, t, slots=s, decode=True,
                                             mutable=["cache"]))
  logits, cache = step(cache["cache"], inputs[:, :5], jnp.broadcast_to(jnp.arange(5), (2, 5)))  # a prefill
  outs = [logits]
  for i in range(5, 12):
    logits, cache = step(cache["cache"], inputs[:, i:i + 1], jnp.full((2, 1), i))
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=3e-5)
  samples = jax.jit(lambda p, r: nb.sample(model, p, r, num_samples=2, temperature=1.0))(params, jax.random.key(2))
  assert samples.shape == (2, 1, 1, 12)


def test_split_metrics_counts_every_example_once():
  examples = {"x": np.arange(10, dtype=np.float32)[:, None]}
  seen, total = [], 0.0
  for batch, weight in split_metrics.padded_batches(examples, 4):
    assert batch["x"].shape == (4, 1)
    seen += list(batch["x"][weight > 0, 0])
    total += float(weight.sum())
  assert sorted(seen) == list(range(10)) and total == 10
  with pytest.raises(ValueError, match="no examples"):
    next(split_metrics.padded_batches({"x": np.zeros((0, 1))}, 4))


def test_data_sizes_fill_zeros_and_a_disagreeing_config_value_is_named():
  model = sequence.SequenceModel()
  sized = sequence.with_data_sizes(model, input_dim=7, output_dim=3, data="the test data")
  assert (sized.input_dim, sized.output_dim) == (7, 3)
  assert sequence.with_data_sizes(sized, input_dim=7, output_dim=3, data="the test data") == sized
  with pytest.raises(ValueError, match=r"config.model.output_dim=3, but the test data needs 4"):
    sequence.with_data_sizes(sized, input_dim=7, output_dim=4, data="the test data")
