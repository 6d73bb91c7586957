"""Event forecasting: the Hawkes simulation and its exact likelihood, the log-normal mixture, the loss, training."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate
from scipy import stats

from experiments.configs import aaren_events
from nbp import tasks
from nbp.data import hawkes
from nbp.tasks import events
from nbp.training import loop as train
from tests.conftest import apply_overrides


def tiny_config(data_dir, attention="aaren", **overrides):
  c = aaren_events.get_config(f"{attention},local")
  c.data.dir = str(data_dir)
  c.data.num_marks = 2
  c.data.seq_len = 12
  c.data.num_train = 16
  c.data.num_test = 6
  with c.unlocked():
    c.model.variant = None
    c.model.num_layers, c.model.width, c.model.num_heads = 1, 16, 2
  c.model.max_len = 16
  c.loss.num_components = 3
  c.batch_size, c.num_steps, c.log_every, c.checkpoint_every = 4, 2, 1, 2
  c.optimizer.warmup_steps = 1
  return apply_overrides(c, overrides)


def _intensity(p, s, times, marks):
  """lambda [K] at time s, straight from the definition (every earlier event's kernel)."""
  past = times < s
  return p.mu + np.sum(p.alpha[:, marks[past]] * p.beta * np.exp(-p.beta * (s - times[past])), -1)


# ---------------------------------------------------------------------------
# The Hawkes process.


def test_simulated_rates_match_the_stationary_rate():
  p = hawkes.default_parameters(2)
  assert p.spectral_radius == pytest.approx(hawkes.SPECTRAL_RADIUS)
  times, marks = hawkes.simulate(p, 20, 1000, np.random.default_rng(0))
  assert times.shape == marks.shape == (20, 1000) and np.all(np.diff(times, axis=1) > 0) and times.min() > 0
  rates = np.bincount(marks.ravel(), minlength=2) / times[:, -1].sum()
  # Counts of a Hawkes process over 20k events vary by about 1 / ((1 - rho) sqrt(n)) = 2.4%.
  np.testing.assert_allclose(rates, p.stationary_rate, rtol=0.1)
  assert abs(rates.sum() / p.mu.sum() - 1) > 1  # far from the background rate: the excitation is simulated


def test_log_likelihood_matches_a_brute_force_sum_and_quadrature():
  p = hawkes.default_parameters(3)
  times, marks = hawkes.simulate(p, 3, 8, np.random.default_rng(1))
  got = hawkes.log_likelihood(p, times, marks)
  for t, m, value in zip(times, marks, got):
    log_intensity = sum(math.log(_intensity(p, ti, t, m)[mi]) for ti, mi in zip(t, m))
    compensator, _ = integrate.quad(lambda s: _intensity(p, s, t, m).sum(), 0.0, t[-1], points=t[:-1], limit=200)
    assert value == pytest.approx(log_intensity - compensator, rel=1e-7, abs=1e-7)


def test_the_cache_is_built_once_and_reused(tmp_path, monkeypatch):
  cfg = tiny_config(tmp_path).data
  first, meta = hawkes.load(cfg)
  assert os.path.isdir(hawkes.cache_dir(cfg)) and meta["num_marks"] == 2
  with open(os.path.join(hawkes.cache_dir(cfg), "metadata.json")) as f:
    saved = hawkes.parameters_from_metadata(json.load(f))
  np.testing.assert_allclose(saved.alpha, hawkes.default_parameters(2).alpha)
  np.testing.assert_allclose(first["test"]["true_log_likelihood"],
                             hawkes.log_likelihood(saved, first["test"]["times"], first["test"]["marks"]))
  assert first["train"]["times"].shape == (16, 12) and first["test"]["marks"].shape == (6, 12)

  def fail(*args, **kwargs):
    raise AssertionError("simulated again")
  monkeypatch.setattr(hawkes, "simulate", fail)
  again, _ = hawkes.load(cfg)
  np.testing.assert_array_equal(again["train"]["times"], first["train"]["times"])


# ---------------------------------------------------------------------------
# The log-normal mixture and the loss.


def test_lognormal_mixture_is_a_density_with_the_closed_form_mean():
  log_weights, means, log_scales = np.array([0.3, -0.5, 0.0]), np.array([-1.0, 0.5, 1.2]), np.array([-0.2, 0.1, -1.0])
  args = [jnp.asarray(v, jnp.float32) for v in (log_weights, means, log_scales)]
  log_prob = jax.jit(lambda tau: events.lognormal_mixture_log_prob(tau, *args))
  density = lambda tau: float(np.exp(log_prob(jnp.float32(tau))))
  # Over u = log tau (smooth, and negligible outside [-12, 12]): the integral of p(tau) dtau = p(e^u) e^u du.
  total, _ = integrate.quad(lambda u: density(math.exp(u)) * math.exp(u), -12, 12, limit=200)
  assert total == pytest.approx(1.0, abs=1e-5)
  mean = float(events.lognormal_mixture_mean(*args))
  weights = np.exp(log_weights) / np.exp(log_weights).sum()
  rng = np.random.default_rng(0)
  c = rng.choice(3, size=400_000, p=weights)
  draws = np.exp(means[c] + np.exp(log_scales[c]) * rng.normal(size=c.shape))
  assert mean == pytest.approx(draws.mean(), rel=0.01)
  assert mean == pytest.approx(integrate.quad(lambda u: density(math.exp(u)) * math.exp(2 * u), -12, 12,
                                              limit=200)[0], rel=1e-5)


class StandIn:
  """A model whose outputs are fixed: records its inputs and returns `y`."""

  def __init__(self, y):
    self.y, self.output_dim = y, y.shape[-1]

  def apply(self, variables, x):
    self.inputs = np.asarray(x)
    return jnp.asarray(self.y)


def test_loss_equals_a_hand_computation_in_the_original_time_units():
  rng = np.random.default_rng(2)
  b, e, k, m = 2, 4, 3, 2
  y = rng.normal(size=(b, e, 3 * m + k)).astype(np.float32)
  tau = rng.uniform(0.05, 3.0, (b, e)).astype(np.float32)
  marks = rng.integers(0, k, (b, e)).astype(np.int32)
  scale = events.TimeScale(log_mean=-0.4, log_std=1.7)
  model = StandIn(y)
  value, metrics = events.loss(model, scale, None, {"tau": tau, "marks": marks}, None, num_components=m)

  # By hand: mixture of log tau with means a + s y_mu and scales s exp(y_ls); density of tau via scipy.
  w = np.exp(y[..., :m]) / np.exp(y[..., :m]).sum(-1, keepdims=True)
  mu = scale.log_mean + scale.log_std * y[..., m:2 * m]
  sigma = scale.log_std * np.exp(np.clip(y[..., 2 * m:3 * m], *events.LOG_SCALE_RANGE))
  pdf = np.sum(w * stats.lognorm.pdf(tau[..., None], s=sigma, scale=np.exp(mu)), -1)
  logits = y[..., 3 * m:]
  mark_ll = np.take_along_axis(logits - np.log(np.exp(logits).sum(-1, keepdims=True)), marks[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(metrics["time_nll"]), -np.log(pdf).mean(), rtol=1e-5)
  np.testing.assert_allclose(float(value), -(np.log(pdf) + mark_ll).mean(), rtol=1e-5)
  # Inputs: a zero begin step, then event i-1's normalised log time and one-hot mark.
  assert np.all(model.inputs[:, 0] == 0)
  np.testing.assert_allclose(model.inputs[:, 1:, 0], (np.log(tau[:, :-1]) + 0.4) / 1.7, rtol=1e-5)
  np.testing.assert_array_equal(model.inputs[:, 1:, 1:], np.eye(k)[marks[:, :-1]])


# ---------------------------------------------------------------------------
# Training.


@pytest.mark.parametrize("attention", ["softmax", "aaren"])
def test_one_training_step_and_the_score(tmp_path, attention):
  config = tiny_config(tmp_path, attention)
  task = tasks.make_task(config)
  assert (task.model.input_dim, task.model.output_dim) == (3, 3 * 3 + 2)
  batch = {k: jnp.asarray(v[:4]) for k, v in task.examples("test").items()}

  @jax.jit  # one program (init, a step, the score): one compile per attention
  def run(key):
    params = task.model.init(key, **task.init_inputs())["params"]
    (before, _), grads = jax.value_and_grad(task.loss, has_aux=True)(params, batch, None)
    after, _ = task.loss(jax.tree.map(lambda p, g: p - 0.05 * g, params, grads), batch, None)  # one SGD step
    return before, after, task.score(params, batch)

  before, after, scores = run(jax.random.key(0))
  assert np.isfinite(float(before)) and float(after) < float(before)

  assert set(scores) == {"log_likelihood", "time_log_likelihood", "mark_log_likelihood", "true_log_likelihood",
                         "time_mse", "mark_accuracy"}
  value, count = scores["log_likelihood"]
  np.testing.assert_array_equal(np.asarray(count), 12.0)
  np.testing.assert_allclose(float(np.sum(value) / np.sum(count)), -float(before), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(scores["true_log_likelihood"][0]), batch["true_log_likelihood"])
  assert 0 <= float(np.sum(scores["mark_accuracy"][0])) <= 48


@pytest.mark.slow
def test_end_to_end_training_reports_the_split_metrics(tmp_path):
  config = tiny_config(tmp_path / "data")
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["status"] == "done"
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    final = [json.loads(line) for line in f][-1]
  assert final["test/num_examples"] == 6
  assert final["test/log_likelihood"] < final["test/true_log_likelihood"] + 0.5
  assert np.isfinite(final["test/time_mse"]) and 0 <= final["test/mark_accuracy"] <= 1
