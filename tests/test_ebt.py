"""EBT: the two-stream attention, the energy's locality, thinking, the two recipes, replay, caching."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import apply_overrides, set_tiny_budget
from experiments.configs import ebt_text
from layers import position
from layers import two_stream
from nbp.models.ebt import EBT
from nbp.samplers import ebt as thinking
from nbp.tasks import ebt as ebt_task
from nbp.training import checkpoint as checkpoint_lib
from nbp.training import loop as train

V = 16  # a small vocabulary for the model-level tests


def _tiny(**kw):
  return EBT(**{**dict(vocab_size=V, num_layers=2, width=32, num_heads=4, num_step_embeddings=2, max_len=32), **kw})


def _params(model, length=7, seed=0):
  obs = jnp.zeros((1, length), jnp.int32)
  cand = jnp.zeros((1, length, V))
  return nn.meta.unbox(model.init(jax.random.key(seed), obs, cand, 0))["params"]


def _inputs(batch=2, length=7, seed=1):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return (jax.random.randint(k1, (batch, length), 0, V),
          jax.nn.softmax(2.0 * jax.random.normal(k2, (batch, length, V))))


# ---------------------------------------------------------------------------
# Two-stream attention.


@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_two_stream_attention_equals_the_naive_masked_attention(num_kv_heads):
  b, o, c, h, d, e = 2, 6, 5, 4, 8, 32
  layer = two_stream.TwoStreamAttention(num_heads=h, head_dim=d, num_observed=o, num_kv_heads=num_kv_heads)
  x = jax.random.normal(jax.random.key(0), (b, o + c, e))
  p = nn.meta.unbox(layer.init(jax.random.key(1), x))["params"]
  got = layer.apply({"params": p}, x)

  proj = lambda name: jnp.einsum("bte,ehd->bthd", x, p[name]["kernel"])
  positions = jnp.broadcast_to(jnp.concatenate([jnp.arange(o), o - c + 1 + jnp.arange(c)]), (b, o + c))
  q, k = position.rope(proj("query"), positions), position.rope(proj("key"), positions)
  want = two_stream.naive_two_stream_attention(q, k, proj("value"), o)
  want = jnp.einsum("bthd,hde->bte", want, p["out"]["kernel"])
  np.testing.assert_allclose(got, want, atol=2e-6)
  # The naive mask really is the definition: candidate j sees observed 0..o-c+j and itself.
  mask = np.zeros((o + c, o + c), bool)
  mask[:o, :o] = np.tril(np.ones((o, o), bool))
  for j in range(c):
    mask[o + j, :o - c + j + 1] = True
    mask[o + j, o + j] = True
  from kernels import reference
  np.testing.assert_allclose(reference.xla_attention(q, k, proj("value"), mask),
                             two_stream.naive_two_stream_attention(q, k, proj("value"), o), atol=1e-6)


def test_two_stream_decoding_reads_the_cache_as_the_full_pass_does():
  b, o, h, d, e = 2, 6, 4, 8, 32
  x = jax.random.normal(jax.random.key(0), (b, o + o - 1, e))
  full = two_stream.TwoStreamAttention(num_heads=h, head_dim=d, num_observed=o)
  p = nn.meta.unbox(full.init(jax.random.key(1), x))["params"]
  want = full.apply({"params": p}, x)
  writer = two_stream.TwoStreamAttention(num_heads=h, head_dim=d, num_observed=2, max_decode_len=10)
  cache = nn.meta.unbox(writer.init(jax.random.key(1), x[:, :2], decode=True))["cache"]
  for start in range(0, o, 2):  # the observed stream written two tokens at a time
    out, upd = writer.apply({"params": p, "cache": cache}, x[:, start:start + 2], decode=True, mutable=["cache"])
    cache = upd["cache"]
    np.testing.assert_allclose(out, want[:, start:start + 2], atol=2e-6)
  reader = two_stream.TwoStreamAttention(num_heads=h, head_dim=d, num_observed=0, max_decode_len=10)
  out, _ = reader.apply({"params": p, "cache": cache}, x[:, -1:], decode=True, mutable=["cache"])
  np.testing.assert_allclose(out[:, 0], want[:, -1], atol=2e-6)


# ---------------------------------------------------------------------------
# The energy.


def test_a_candidate_changes_only_its_own_energy():
  model = _tiny()
  params = _params(model)
  obs, cand = _inputs()
  jac = jax.jit(jax.jacrev(lambda c: model.apply({"params": params}, obs, c, 1)))(cand)  # [B, L, B, L, V]
  size = jnp.abs(jac).sum(-1)[0, :, 0, :]  # [L, L]: energy i against candidate j
  off_diagonal = size * (1 - jnp.eye(size.shape[0]))
  assert float(off_diagonal.max()) == 0.0
  assert float(jnp.diag(size).min()) > 1e-3  # and its own candidate does change it
  # The observed token it predicts is invisible too: changing x_{i+1} leaves energy i alone.
  other = obs.at[:, 4].set((obs[:, 4] + 1) % V)
  energies = jax.jit(lambda o: model.apply({"params": params}, o, cand, 0))
  e, e2 = energies(obs), energies(other)
  np.testing.assert_array_equal(e[:, :3], e2[:, :3])
  assert float(jnp.abs(e[:, 4:] - e2[:, 4:]).min()) > 0


def test_training_path_refuses_a_kernel_by_its_key(tmp_path):
  config = _config("s2", tmp_path)
  config.model.attention_impl = "pallas"
  with pytest.raises(ValueError, match="config.model.attention_impl"):
    ebt_task.make_task(config)
  mismatched = _config("s1", tmp_path)  # a learned alpha without its parameter group
  del mismatched.param_groups["alpha"]
  with pytest.raises(ValueError, match="config.model.learn_alpha=True but config.param_groups lacks"):
    ebt_task.make_task(mismatched)


def test_second_order_gradient_matches_finite_differences():
  """The loss differentiates through dE/dp: d(loss)/d(params) along a random direction, against central differences.

  float32 throughout (the layers compute norms and logits in float32); a small step size keeps the loss smooth
  enough for eps = 1e-4 (measured: agreement to 1e-4 - 4e-4 relative).
  """
  model = _tiny(num_layers=1, width=16, num_heads=2)
  params = _params(model, length=4)
  obs, _ = _inputs(batch=1, length=4)
  targets = (obs + 1) % V
  y0 = jax.random.normal(jax.random.key(3), (1, 4, V))

  @functools.partial(jax.jit, static_argnums=(1, 2))
  def objective(p, steps, truncate=False):
    energy = thinking.model_energy(model, p, obs)
    ys = thinking.think(model, energy, y0, num_steps=steps, alpha=0.3, truncate=truncate).ys
    return ebt_task.cross_entropy(ys[-1], targets, jnp.ones((1,)))

  gradient = jax.jit(jax.grad(objective), static_argnums=(1, 2))

  direction = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape), params)
  along = lambda grad: sum(float(jnp.vdot(g, u)) for g, u in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
  eps = 1e-4
  shifted = lambda s: jax.tree.map(lambda x, u: x + s * eps * u, params, direction)
  # Two steps: the loss reaches the parameters through both steps' dE/dp (the first through the second's input).
  analytic = along(gradient(params, 2, False))
  numeric = float(objective(shifted(1), 2) - objective(shifted(-1), 2)) / (2 * eps)
  assert abs(analytic) > 1.0
  np.testing.assert_allclose(analytic, numeric, rtol=2e-3)
  # Truncation drops the first step's second-order term: no longer the loss's derivative.
  truncated = along(gradient(params, 2, True))
  assert abs(truncated - numeric) > 0.1 * abs(numeric)


def test_best_of_n_keeps_the_lowest_energy_per_position():
  model = _tiny()
  params = _params(model)
  obs, _ = _inputs()
  energy = thinking.model_energy(model, params, obs)
  kwargs = dict(num_steps=2, alpha=1.0)
  rng = jax.random.key(7)
  y, e = jax.jit(lambda r: thinking.think_best_of(model, energy, r, (2, 7, V), best_of=4, **kwargs))(rng)

  @jax.jit
  def single(key):  # one run of best-of-N, alone
    y_n = thinking.think(model, energy, jax.random.normal(jax.random.fold_in(key, 0), (2, 7, V)),
                         rng=jax.random.fold_in(key, 1), **kwargs).ys[-1]
    return y_n, thinking.final_energy(model, energy, y_n, 2)

  singles = [single(jax.random.fold_in(rng, n)) for n in range(4)]
  energies = jnp.stack([s[1] for s in singles])  # [N, B, L]
  best = jnp.argmin(energies, axis=0)
  np.testing.assert_allclose(e, energies.min(axis=0), rtol=1e-5)
  want = jnp.take_along_axis(jnp.stack([s[0] for s in singles]), best[None, ..., None], axis=0)[0]
  np.testing.assert_allclose(y, want, atol=2e-5)  # scanned vs eager: rounding
  assert len(set(np.asarray(best).ravel().tolist())) > 1  # different runs won at different positions


def test_accept_lower_never_raises_a_positions_energy():
  model = _tiny(num_step_embeddings=1)  # one energy landscape for every step
  params = _params(model)
  obs, _ = _inputs()
  energy = thinking.model_energy(model, params, obs)
  y0 = jax.random.normal(jax.random.key(4), (2, 7, V))
  final = jax.jit(lambda y: thinking.final_energy(model, energy, y, 1))
  run = jax.jit(lambda accept: thinking.think(model, energy, y0, num_steps=3, alpha=50.0, accept_lower=accept).ys,
                static_argnums=0)
  before = final(y0)
  for y in run(True):
    after = final(y)
    assert bool(jnp.all(after <= before + 1e-5))
    before = after
  # Without the rule, steps this large do raise some positions' energies.
  free = run(False)
  assert any(bool(jnp.any(final(b) > final(a))) for a, b in zip([y0] + free[:-1], free))


def test_cached_generation_equals_uncached():
  model = _tiny()
  params = _params(model)
  obs, _ = _inputs()
  kwargs = dict(num_steps=2, langevin_sigma=0.5, best_of=2)
  # Two new tokens: the second is thought over a cache the first one grew (the uncached side unrolls one
  # program per length, so each token more costs a compile).
  cached = jax.jit(lambda r: thinking.generate(model, params, r, obs[:, :3], 2, **kwargs))(jax.random.key(5))
  uncached = jax.jit(lambda r: thinking.generate_uncached(model, params, r, obs[:, :3], 2, **kwargs))(
      jax.random.key(5))
  np.testing.assert_array_equal(cached, uncached)
  assert cached.shape == (2, 5)


# ---------------------------------------------------------------------------
# The replay buffer.


def test_replay_buffer_is_a_fifo_and_weighs_unfilled_draws_zero():
  buffer = ebt_task.init_replay(4, seq_len=2, candidate_dim=3)
  windows, cands, weights = ebt_task.draw_replay(buffer, jax.random.key(0), 2)
  assert weights.tolist() == [0.0, 0.0]  # nothing stored yet
  for i in range(3):  # 6 rows into 4 slots: rows 2..5 stay
    rows = jnp.full((2, 3), 2 * i, jnp.int32) + jnp.arange(2)[:, None]
    buffer = ebt_task.push_replay(buffer, rows, jnp.zeros((2, 2, 3)) + rows[:, :1, None])
  assert int(buffer["count"]) == 4 and int(buffer["next"]) == 2
  assert sorted(buffer["windows"][:, 0].tolist()) == [2, 3, 4, 5]
  windows, cands, weights = ebt_task.draw_replay(buffer, jax.random.key(1), 3)
  assert weights.tolist() == [1.0, 1.0, 1.0]
  assert len(set(windows[:, 0].tolist())) == 3  # without replacement
  np.testing.assert_array_equal(cands[:, 0, 0], windows[:, 0])  # each window with its own candidate


# ---------------------------------------------------------------------------
# Training: both recipes through the shared loop.


def _config(recipe, tmp_path, **overrides):
  c = ebt_text.get_config(f"{recipe},local")
  c.unlock()
  c.data.seq_len = 16
  c.model.variant = None
  c.model.num_layers, c.model.width, c.model.num_heads = 1, 32, 2
  c.sampler.update(num_samples=2, prompt_len=4, num_new=4)
  if recipe == "s2":
    c.loss.replay_size = 8
    # A fixed step count: the per-batch draw compiles one branch per count, and tracing their second-order
    # linearisation dominates these tests. The draw itself: test_one_training_step_of_each_recipe.
    c.loss.num_steps_max = 0
  set_tiny_budget(c, num_steps=4, checkpoint_every=2)
  c.batch_size = 4
  return apply_overrides(c, overrides)


@pytest.mark.parametrize("recipe", ["s1", "s2"])
def test_one_training_step_of_each_recipe(tmp_path, recipe):
  config = _config(recipe, tmp_path, num_steps=1)
  if recipe == "s2":
    config.loss.num_steps_max = 3  # the recipe's own draw of 2-3 steps per batch
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["status"] == "done" and np.isfinite(result["loss"])
  state = checkpoint_lib.restore_state(str(tmp_path / "checkpoints"), train.setup(config).abstract_state)[1]
  if recipe == "s1":  # alpha trains in its own group, at 1500x the learning rate
    assert float(state.params["alpha"]) != 500.0
    assert state.loss_state is None
  else:
    assert "alpha" not in state.params
    assert int(state.loss_state["count"]) == 4  # the batch went into the buffer
  samples = list((tmp_path / "samples").glob("*.txt"))
  assert samples and samples[0].read_text().count("---") == 2


def test_replay_buffer_survives_a_resume_bit_identically(tmp_path, monkeypatch):
  config = _config("s2", tmp_path)
  config.evals = type(config.evals)()  # training only
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train.train_and_evaluate(config, str(straight))
  # The same run preempted after its second step (as SIGTERM would), then resumed. The same config, so the
  # same compiled step: a half run with a shorter num_steps would compile another LR schedule, and XLA may
  # round that program differently.
  calls = iter(range(100))
  monkeypatch.setattr(train._Preemption, "agreed", lambda self: next(calls) == 1)  # pylint: disable=protected-access
  assert train.train_and_evaluate(config, str(resumed))["status"] == "preempted"
  monkeypatch.undo()
  assert train.train_and_evaluate(config, str(resumed))["status"] == "done"
  abstract = train.setup(config).abstract_state
  a = checkpoint_lib.restore_state(str(straight / "checkpoints"), abstract)[1]
  b = checkpoint_lib.restore_state(str(resumed / "checkpoints"), abstract)[1]
  assert int(a.loss_state["count"]) == 8 and int(a.step) == 4
  jax.tree.map(np.testing.assert_array_equal, a.loss_state, b.loss_state)
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)


def test_thinking_lowers_the_energy_of_a_briefly_trained_model(tmp_path):
  config = _config("s2", tmp_path, num_steps=40, checkpoint_every=40)
  config.evals = type(config.evals)()
  train.train_and_evaluate(config, str(tmp_path))
  s, params, _, _ = train.load_params(config, str(tmp_path))
  model = s.task.model
  batch = next(s.task.data("validation", seed=0, process_index=0, process_count=1, batch_size=4))
  obs = jnp.asarray(batch["tokens"][:, :-1])
  energy = thinking.model_energy(model, params, obs)
  y0 = jax.random.normal(jax.random.key(0), (*obs.shape, 256))
  @jax.jit
  def energies(y0):
    ys = thinking.think(model, energy, y0, num_steps=2, alpha=thinking.step_size(model, params)).ys
    return [thinking.final_energy(model, energy, y, 1) for y in [y0] + ys]  # one step embedding: one landscape

  start, *after = energies(y0)
  assert float(jnp.mean(after[0])) < float(jnp.mean(start))
  assert float(jnp.mean(after[1])) < float(jnp.mean(start))


# ---------------------------------------------------------------------------
# Video: continuous frame candidates, and the regression baseline.


def _video_config(recipe, data_dir, **overrides):
  from experiments.configs import ebt_video  # pylint: disable=g-import-not-at-top
  c = ebt_video.get_config(f"{recipe},local")
  c.unlock()
  c.data.dir = data_dir
  c.data.update(num_frames=4, frame_size=8, num_train=16, num_validation=8, num_test=8)
  c.model.num_layers, c.model.width, c.model.num_heads = 1, 32, 2
  c.sampler.num_samples = 2
  if recipe != "regression":
    c.loss.replay_size = 8 if recipe == "s2" else 0
    c.loss.num_steps_max = 0  # a fixed step count (the draw: test_one_training_step_of_each_recipe)
  set_tiny_budget(c, num_steps=2, checkpoint_every=2)
  c.batch_size = 4
  if recipe == "s1":  # its evaluators are the same code as s2's: training only
    c.evals = type(c.evals)()
  return apply_overrides(c, overrides)


@pytest.mark.parametrize("recipe", ["s1", "s2", "regression"])
def test_next_frame_training_of_each_recipe_and_the_baseline(tmp_path, data_dir, recipe):
  config = _video_config(recipe, data_dir)
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["status"] == "done" and np.isfinite(result["loss"])
  if recipe != "s1":
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(metrics[-1]["eval/mse"])  # the held-out next frames, under the sampler's thinking for EBT
    assert list((tmp_path / "samples").glob("step_*.png"))  # the predicted frames written as a grid
  if recipe != "regression":
    s, params, _, _ = train.load_params(config, str(tmp_path))
    assert s.task.model.input_dim == 64 and s.task.model.continuous  # filled from the 8x8 frames


def test_a_frame_model_with_the_wrong_frame_size_is_refused(data_dir):
  config = _video_config("s2", data_dir, **{"model.input_dim": 100})
  with pytest.raises(ValueError, match="config.model.input_dim=100"):
    ebt_task.make_task(config)


# ---------------------------------------------------------------------------
# Class-conditioned video: a class token, frames generated one by one.


def test_the_class_token_conditions_every_candidate_and_generation_continues_a_prompt():
  """The class reaches every candidate's energy (the first's from the class alone, it sees no frame); a candidate
  still never sees its own target. Generated frame t depends on the frames before it and its key only, so the
  first G frames given as a prompt reproduce the rest of an unprompted draw."""
  model = EBT(input_dim=16, num_classes=10, num_layers=1, width=32, num_heads=2)
  observed = jax.random.normal(jax.random.key(0), (2, 3, 16))
  candidates = jax.random.normal(jax.random.key(1), (2, 4, 16))
  params = nn.meta.unbox(model.init(jax.random.key(2), observed, candidates, 0, labels=jnp.array([1, 2])))["params"]
  energy = lambda obs, labels: model.apply({"params": params}, obs, candidates, 0, labels=labels)
  base = energy(observed, jnp.array([1, 2]))
  assert base.shape == (2, 4)
  assert np.all(np.abs(np.asarray(energy(observed, jnp.array([3, 4])) - base)) > 1e-6)  # every candidate
  np.testing.assert_allclose(energy(observed, None), energy(observed, jnp.array([10, 10])), rtol=1e-6)  # null
  later = observed.at[:, 2].add(1.0)  # the last observed frame: the target of the last candidate
  np.testing.assert_allclose(energy(later, jnp.array([1, 2]))[:, :3], base[:, :3], rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(energy(later, jnp.array([1, 2]))[:, 3] - base[:, 3])).max() > 1e-6

  labels = jnp.array([1, 2])
  draw = jax.jit(lambda rng, prompt: thinking.generate_frames(model, params, rng, labels, 4, prompt=prompt,
                                                              num_steps=2))
  whole = draw(jax.random.key(3), None)
  assert whole.shape == (2, 4, 16) and np.abs(np.asarray(whole)).max() <= 1.0
  np.testing.assert_allclose(draw(jax.random.key(3), whole[:, :2]), whole, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(draw(jax.random.key(3), -whole[:, :2])[:, 2:] - whole[:, 2:])).max() > 1e-4
  with pytest.raises(ValueError, match="class-conditioned"):
    thinking.generate_frames(model.clone(num_classes=0), params, jax.random.key(3), labels, 4, num_steps=1)


def test_class_conditioned_frames_train_and_refuse_a_replay_buffer(tmp_path, data_dir):
  config = _video_config("s1", data_dir, **{"model.num_classes": 10, "loss.class_dropout": 0.1})
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["status"] == "done" and np.isfinite(result["loss"])
  with pytest.raises(ValueError, match="replay_size"):
    train.setup(_video_config("s2", data_dir, **{"model.num_classes": 10}))
  with pytest.raises(ValueError, match="num_classes=100, but the videos .* have 10 classes"):
    train.setup(_video_config("s1", data_dir, **{"model.num_classes": 100}))
