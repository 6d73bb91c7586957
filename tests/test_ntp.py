"""The next-token baseline: cached decoding, the sampler, sizes, and the entry points."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nbp import ntp, sampling
from tests.conftest import config_flags_for, run_module, tiny_ntp_config


def _model(**kw):
  fields = dict(vocab_size=11, max_len=24, num_layers=2, width=32, num_heads=4, num_kv_heads=2)
  fields.update(kw)
  return ntp.NextTokenTransformer(**fields)


@pytest.mark.parametrize("position", ["rope", "learned"])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_decoding_equals_full_forward(position, scan_layers):
  model = _model(position=position, scan_layers=scan_layers, max_len=12)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 10)
  positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
  params = model.init(jax.random.key(1), tokens, positions=positions)["params"]
  full = model.apply({"params": params}, tokens, positions=positions)
  cache = model.init(jax.random.key(1), tokens[:, :1], positions=positions[:, :1], decode=True)["cache"]
  step = jax.jit(lambda c, t, p: model.apply({"params": params, "cache": c}, t, positions=p, decode=True,
                                             mutable=["cache"]))
  steps = []
  for i in range(12):
    logits, mutated = step(cache, tokens[:, i:i + 1], positions[:, i:i + 1])
    cache = mutated["cache"]
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5)


def test_greedy_sampler_matches_recomputed_argmax():
  """The jitted, cached sampler at temperature 0 equals argmax decoding without a cache."""
  model = _model(max_len=12)
  params = model.init(jax.random.key(0), jnp.zeros((1, 12), jnp.int32))["params"]
  drawn = jax.jit(lambda p: ntp.sample(model, p, jax.random.key(0), batch_size=2, temperature=0.0))(params)
  bos = model.vocab_size - 1
  tokens = np.zeros((2, 12), np.int32)
  for i in range(12):
    logits = model.apply({"params": params}, ntp.next_token_inputs(jnp.asarray(tokens), bos))
    tokens[:, i] = np.argmax(np.asarray(logits[:, i, :bos]), axis=-1)
  np.testing.assert_array_equal(drawn, tokens)
  assert drawn.max() < bos  # the begin token is never drawn


def test_sampler_keeps_the_prompt():
  model = _model(max_len=12)
  params = model.init(jax.random.key(0), jnp.zeros((1, 12), jnp.int32))["params"]
  prompt = jnp.array([[1, 2, 3], [4, 5, 6]], jnp.int32)
  drawn = ntp.sample(model, params, jax.random.key(3), batch_size=2, prompt=prompt, top_k=3)
  np.testing.assert_array_equal(drawn[:, :3], prompt)


def test_top_k_and_top_p_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
  kept = sampling.filter_logits(logits[:, None, :], top_k=2)[:, 0] > -1e29  # vectorised over a block axis
  np.testing.assert_array_equal(kept, [[1, 1, 0, 0], [0, 0, 1, 1]])
  kept = sampling.filter_logits(logits, top_p=0.75) > -1e29  # 0.5 + 0.3 covers 0.75
  np.testing.assert_array_equal(kept, [[1, 1, 0, 0], [0, 0, 1, 1]])
  kept = sampling.filter_logits(logits, top_p=0.5) > -1e29  # the first token alone reaches 0.5
  np.testing.assert_array_equal(kept, [[1, 0, 0, 0], [0, 0, 0, 1]])
  draws = jax.vmap(lambda k: sampling.sample_tokens(k, logits, top_k=1))(jax.random.split(jax.random.key(0), 20))
  assert (draws == jnp.array([0, 3])).all()


def _nucleus_float64(logits, top_p):
  """Bool [..., V]: the top-p nucleus computed in float64 (ties kept together)."""
  x = np.asarray(logits, np.float64)
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  greater = (x[..., None, :] > x[..., :, None])  # [..., V (token), V (others)]
  mass_above = (greater * p[..., None, :]).sum(-1)
  return (mass_above < top_p) | (x == x.max(-1, keepdims=True))


def test_top_p_by_binary_search_equals_the_sorted_nucleus():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 3, 50)).astype(np.float32) * np.array([0.1, 1.0, 5.0])[:, None, None].repeat(2, 0)
  logits[0, 0, 10:20] = logits[0, 0, 5]  # ties straddling the nucleus' edge
  logits[1, 1, :] = 0.0  # all equal
  logits[2, 2, ::2] = -1e30  # masked by top-k before top-p
  logits[3, 0, 7] = -0.0
  logits = jnp.asarray(logits)
  for top_p in (0.0, 1e-6, 0.1, 0.5, 0.9, 0.99, 0.999):  # float32 masses cannot resolve a top_p nearer 1
    got = np.asarray(jax.jit(sampling.top_p_filter, static_argnums=1)(logits, top_p) > -1e29)
    np.testing.assert_array_equal(got, _nucleus_float64(logits, top_p), err_msg=f"top_p={top_p}")
    if top_p > 0:  # the sort-based reference (it drops every token at top_p 0)
      np.testing.assert_array_equal(got, sampling.top_p_filter_sorted(logits, top_p) > -1e29)
  np.testing.assert_array_equal(sampling.top_p_filter(logits, 0.9), sampling.filter_logits(logits, top_p=0.9))


def test_phase_bounds():
  assert sampling.phase_bounds(1, 48, 4) == [(1, 12), (12, 24), (24, 36), (36, 48)]
  assert sampling.phase_bounds(5, 8, 10) == [(5, 6), (6, 7), (7, 8)]  # never an empty phase
  assert sampling.phase_bounds(3, 3, 4) == [] and sampling.phase_bounds(0, 5, 1) == [(0, 5)]
  with pytest.raises(ValueError, match="cache_phases"):
    sampling.phase_bounds(0, 5, 0)


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_sampler_draws_the_same_tokens_in_any_number_of_phases(position):
  model = _model(max_len=12, position=position)
  params = model.init(jax.random.key(0), jnp.zeros((1, 12), jnp.int32),
                      positions=jnp.arange(12)[None])["params"]
  params = jax.tree.map(lambda x: x * 4.0, params)  # peaked logits: top-p keeps few tokens
  prompt = jnp.array([[1, 2, 3], [4, 5, 6]], jnp.int32)
  draw = jax.jit(lambda p, x, phases: ntp.sample(model, p, jax.random.key(3), batch_size=2, prompt=x, top_k=5,
                                                 top_p=0.8, cache_phases=phases), static_argnums=2)
  one = draw(params, prompt, 1)
  np.testing.assert_array_equal(draw(params, prompt, 9), one)  # 9 phases: one per generated token
  np.testing.assert_array_equal(one[:, :3], prompt)
  no_prompt = jax.jit(lambda p, phases: ntp.sample(model, p, jax.random.key(3), batch_size=2, top_p=0.8,
                                                   cache_phases=phases), static_argnums=1)
  np.testing.assert_array_equal(no_prompt(params, 1), no_prompt(params, 4))


def test_bfloat16_forward_is_finite():
  model = _model(dtype=jnp.bfloat16)
  tokens = jnp.zeros((2, 24), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # parameters stay float32
  logits = model.apply({"params": params}, tokens)
  assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("size,low,high", [("S", 2e6, 5e6), ("700M", 6.0e8, 8.0e8), ("3B", 3.0e9, 4.0e9)])
def test_sizes_table_parameter_counts(size, low, high):
  """The large sizes build abstractly (no memory) with the parameter count their name says."""
  config = tiny_ntp_config("unused")
  config.model.size = size
  config.data.name, config.data.seq_len = "text", 1024
  model = ntp.build_model(config.model, config.data)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert low < count < high, count


def test_sample_and_evaluate_entry_points(tmp_path, data_dir):
  config = tiny_ntp_config(data_dir, num_steps=2)
  base = ["--config", "experiments/configs/ntp_digits.py:tiny,local", "--workdir", str(tmp_path),
          *config_flags_for(config)]
  result = run_module(["-m", "experiments.sample", *base])
  assert result.returncode != 0 and "No checkpoint in workdir" in result.stderr
  assert run_module(["-m", "experiments.train", *base]).returncode == 0
  result = run_module(["-m", "experiments.sample", *base, "--seed=5"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.strip().splitlines()[-1])["step"] == 2
  assert os.path.exists(tmp_path / "samples" / "seed_5" / "step_0000002.gif")
  result = run_module(["-m", "experiments.evaluate", *base])
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads(result.stdout.strip().splitlines()[-1])
  assert metrics["step"] == 2 and np.isfinite(metrics["eval/loss"])


def test_text_config_trains_one_step(tmp_path):
  from experiments.configs import ntp_text  # pylint: disable=g-import-not-at-top
  from nbp.training import loop as train  # pylint: disable=g-import-not-at-top
  config = ntp_text.get_config("tiny,local")
  config.data.seq_len, config.batch_size, config.num_steps, config.eval_steps = 64, 4, 1, 1
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 1 and abs(result["loss"] - np.log(257)) < 1.0  # near uniform over bytes + begin
  with open(tmp_path / "samples" / "step_0000001.txt") as f:
    assert f.read().count("---") == config.model.num_samples
