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
from nbp.data import splits
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
  assert os.path.isdir(hawkes.cache_dir(cfg)) and meta["num_marks"] == 2 and set(first) == set(splits.SPLITS)
  with open(os.path.join(hawkes.cache_dir(cfg), "metadata.json")) as f:
    saved = hawkes.parameters_from_metadata(json.load(f))
  np.testing.assert_allclose(saved.alpha, hawkes.default_parameters(2).alpha)
  np.testing.assert_allclose(first["test"]["true_log_likelihood"],
                             hawkes.log_likelihood(saved, first["test"]["times"], first["test"]["marks"]))
  # Validation: 10% of the 16 simulated train sequences, carved by nbp.data.splits; train: the other 14.
  carved = splits.carve(16, cfg.validation_fraction, cfg.validation_seed)
  assert first["train"]["times"].shape == (14, 12) and first["validation"]["times"].shape == (2, 12)
  assert first["test"]["marks"].shape == (6, 12) and meta["validation_indices"] == carved["validation"].tolist()
  with np.load(os.path.join(hawkes.cache_dir(cfg), "data.npz")) as f:
    np.testing.assert_array_equal(first["validation"]["times"], f["train_times"][carved["validation"]])
    np.testing.assert_array_equal(first["train"]["marks"], f["train_marks"][carved["train"]])

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


def test_score_equals_a_hand_computation():
  rng = np.random.default_rng(4)
  b, e, k, m = 3, 5, 2, 2
  y = rng.normal(size=(b, e, 3 * m + k)).astype(np.float32)
  tau = rng.uniform(0.05, 3.0, (b, e)).astype(np.float32)
  tau[2, 3:] = 0.0  # a padded tail: not events
  marks = rng.integers(0, k, (b, e)).astype(np.int32)
  true_ll = rng.normal(size=b).astype(np.float32)
  scale = events.TimeScale(log_mean=0.2, log_std=0.8)
  out = events.score(StandIn(y), scale, m, None, {"tau": tau, "marks": marks, "true_log_likelihood": true_ll})
  valid = tau > 0
  np.testing.assert_array_equal(out["mark_accuracy"][1], [5, 5, 3])
  correct = (y[..., 3 * m:].argmax(-1) == marks) & valid
  np.testing.assert_array_equal(out["mark_accuracy"][0], correct.sum(-1))
  w = np.exp(y[..., :m]) / np.exp(y[..., :m]).sum(-1, keepdims=True)
  mu = scale.log_mean + scale.log_std * y[..., m:2 * m]
  sigma = scale.log_std * np.exp(np.clip(y[..., 2 * m:3 * m], *events.LOG_SCALE_RANGE))
  mean_tau = np.sum(w * np.exp(mu + sigma ** 2 / 2), -1)
  np.testing.assert_allclose(out["time_mse"][0], np.sum(np.where(valid, (mean_tau - tau) ** 2, 0), -1), rtol=1e-5)
  np.testing.assert_allclose(out["true_log_likelihood"][0], true_ll)
  np.testing.assert_allclose(out["log_likelihood"][0], out["time_log_likelihood"][0] + out["mark_log_likelihood"][0],
                             rtol=1e-6)


# ---------------------------------------------------------------------------
# Training.


@pytest.mark.parametrize("attention", ["softmax", "aaren"])
def test_one_training_step_and_the_score(tmp_path, attention):
  config = tiny_config(tmp_path, attention)
  task = tasks.make_task(config)
  assert (task.model.input_dim, task.model.output_dim) == (3, 3 * 3 + 2)
  batch = {k: jnp.asarray(v[:4]) for k, v in task.predict_fns["split_arrays"]("test").items()}
  # The time normalisation is the train split's (14 sequences), not the validation or test split's.
  train_tau = task.predict_fns["split_arrays"]("train")["tau"]
  assert train_tau.shape == (14, 12)
  log_tau = np.log(train_tau.astype(np.float64))
  assert task.loss.args[1] == events.TimeScale(float(log_tau.mean()), float(log_tau.std()))

  @jax.jit  # one program (init, a step, the score): one compile per attention
  def run(key):
    params = task.model.init(key, **task.init_inputs())["params"]
    (before, _), grads = jax.value_and_grad(task.loss, has_aux=True)(params, batch, None)
    after, _ = task.loss(jax.tree.map(lambda p, g: p - 0.05 * g, params, grads), batch, None)  # one SGD step
    features = events.event_features(batch["tau"], batch["marks"], time_scale, 2)
    return before, after, task.predict_fns["score"](params, batch), task.model.apply({"params": params}, features)

  time_scale = events.TimeScale.from_tau(task.predict_fns["split_arrays"]("train")["tau"])
  before, after, scores, y = run(jax.random.key(0))
  assert np.isfinite(float(before)) and float(after) < float(before)

  assert set(scores) == {"log_likelihood", "time_log_likelihood", "mark_log_likelihood", "true_log_likelihood",
                         "time_mse", "mark_accuracy"}
  value, count = scores["log_likelihood"]
  np.testing.assert_array_equal(np.asarray(count), 12.0)
  np.testing.assert_allclose(float(np.sum(value) / np.sum(count)), -float(before), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(scores["true_log_likelihood"][0]), batch["true_log_likelihood"])
  predicted = np.asarray(y)[..., 3 * 3:].argmax(-1)  # the mark logits follow 3 M mixture outputs
  np.testing.assert_array_equal(scores["mark_accuracy"][0], (predicted == np.asarray(batch["marks"])).sum(-1))


def poisson_log_likelihood(train, test, num_marks):
  """Per event, on the test sequences: a homogeneous Poisson process per mark with the train split's rates."""
  rates = np.bincount(train["marks"].ravel(), minlength=num_marks) / train["times"][:, -1].sum()
  ll = np.log(rates[test["marks"]]).sum(-1) - test["times"][:, -1] * rates.sum()
  return ll.sum() / test["marks"].size


@pytest.mark.slow
def test_a_trained_model_beats_a_poisson_process_and_the_true_ceiling_is_the_datas(tmp_path):
  """200 sequences of 32 events, 150 steps: the model's test log-likelihood per event lies well above a
  constant-rate Poisson process fitted to the train split and below the true process's, which the run logs
  as computed from the simulation's parameters."""
  config = tiny_config(tmp_path / "data", **{"data.seq_len": 32, "model.max_len": 32, "data.num_train": 200,
                                             "data.num_test": 50, "num_steps": 150, "checkpoint_every": 150,
                                             "log_every": 50, "batch_size": 16, "optimizer.lr": 3e-3,
                                             "optimizer.warmup_steps": 10})
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["status"] == "done"
  final = {}
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    for line in f:
      final.update(json.loads(line))
  assert final["metrics/num_examples"] == 20 and final["test/metrics/num_examples"] == 50
  data, meta = hawkes.load(config.data)
  true_ll = hawkes.log_likelihood(hawkes.parameters_from_metadata(meta), data["test"]["times"], data["test"]["marks"])
  assert final["test/metrics/true_log_likelihood"] == pytest.approx(true_ll.sum() / (50 * 32), rel=1e-5)
  poisson = poisson_log_likelihood(data["train"], data["test"], 2)
  model = final["test/metrics/log_likelihood"]
  assert poisson + 0.1 < model < final["test/metrics/true_log_likelihood"] + 0.05, (poisson, model)
