"""Event forecasting: a marked temporal point process from a causal sequence model (Aaren or a Transformer).

Dimension letters: B batch, E events per sequence, F input features (1 + K),
K marks, M mixture components, O outputs (3M + K).

Data. `config.data.name` "hawkes" (nbp.data.hawkes): sequences of E events
(time t_i, mark m_i) from t = 0; a batch holds their inter-event times
tau_i = t_i - t_(i-1) (t_0 = 0) in the process's own time units, tau float32
[B, E], the marks int32 [B, E], and the true process's log-likelihood of each
sequence, true_log_likelihood float32 [B] (the ceiling a model can reach).

Inputs. Event i is the feature vector [z_i, one_hot(m_i)] with
z_i = (log tau_i - a) / s, a and s the mean and standard deviation of log tau
over the train split (`TimeScale`). The first event has no history: the input
sequence is a begin step of zeros (no mark is hot) followed by events
1..E-1, so the model's output at step i parameterises event i+1 and every one
of the E events is predicted, the first from the begin step alone. The true
log-likelihood covers the same E events on [0, t_E], so the two compare.

Outputs. Step i's O outputs: the inter-event time's distribution, a mixture of
M log-normals (log-weights, means and log-scales of log tau, each M), then K
mark logits. The network emits the mixture of z = (log tau - a) / s; since
log tau = a + s z is affine, it is the mixture of log tau with means a + s mu_z
and log-scales log s + log sigma_z, and the density of tau in its own units is
p(tau) = p_logtau(log tau) / tau (`lognormal_mixture_log_prob`). Every
likelihood here is in the original time units, so it compares with the true
process's. The mark is categorical given the history (not the time of the next
event), one reason a model stays below the ceiling.

Loss: the negative log-likelihood per event (time + mark), `config.loss.num_components` = M.
Score (the predict function "score", for the split_metrics evaluator), each per event over a split:
  log_likelihood       time + mark log-likelihood (nats per event);
  time_log_likelihood, mark_log_likelihood   its two parts;
  true_log_likelihood  the true process's on the same sequences;
  time_mse             squared error of the predicted mean inter-event time
                       (closed form, sum_c w_c exp(mu_c + sigma_c^2 / 2)); its root is the time RMSE;
  mark_accuracy        the most likely mark against the true one.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from nbp import tasks
from nbp.data import hawkes
from nbp.data import pipeline
from nbp.data import splits
from nbp.models import sequence
from nbp.models.sequence import SequenceModel as Model

DATASETS = ("hawkes",)
NUM_COMPONENTS = 8  # M: log-normal components of the inter-event time
LOG_SCALE_RANGE = (-5.0, 1.0)  # normalised log-scales log sigma_z are clipped here (sigma_z in [0.007, 2.7])


@dataclasses.dataclass(frozen=True)
class TimeScale:
  """The normalisation of log inter-event times: z = (log tau - log_mean) / log_std (train statistics)."""

  log_mean: float  # a: mean of log tau over the train split
  log_std: float  # s: its standard deviation

  @classmethod
  def from_tau(cls, tau: np.ndarray) -> "TimeScale":
    log_tau = np.log(np.asarray(tau, np.float64))
    return cls(float(log_tau.mean()), float(log_tau.std()))

  def normalise(self, tau):
    return (jnp.log(tau) - self.log_mean) / self.log_std


def inter_event_times(times: np.ndarray) -> np.ndarray:
  """times [N, E] from t = 0 -> tau float32 [N, E], tau_i = t_i - t_(i-1) with t_0 = 0."""
  return np.diff(times, axis=1, prepend=0.0).astype(np.float32)


def lognormal_mixture_log_prob(tau, log_weights, means, log_scales):
  """log p(tau) of a mixture of log-normals: tau [...] > 0, the others [..., M] (of log tau) -> [...].

  log_weights are normalised here (log-softmax); p(tau) = sum_c w_c N(log tau; mu_c, sigma_c) / tau.
  """
  x = jnp.log(tau)[..., None]
  z = (x - means) * jnp.exp(-log_scales)
  per_component = jax.nn.log_softmax(log_weights, -1) - 0.5 * z * z - log_scales - 0.5 * math.log(2 * math.pi)
  return jax.nn.logsumexp(per_component, -1) - x[..., 0]


def lognormal_mixture_mean(log_weights, means, log_scales):
  """E[tau] = sum_c w_c exp(mu_c + sigma_c^2 / 2): [..., M] -> [...]."""
  return jnp.exp(jax.nn.logsumexp(jax.nn.log_softmax(log_weights, -1) + means + 0.5 * jnp.exp(2 * log_scales), -1))


def event_features(tau, marks, time_scale: TimeScale, num_marks: int):
  """tau float [B, E], marks int [B, E] -> inputs float32 [B, E, 1 + K]: a zero begin step, then events 1..E-1."""
  features = jnp.concatenate([time_scale.normalise(tau)[..., None],
                              jax.nn.one_hot(marks, num_marks, dtype=jnp.float32)], -1)  # [B, E, F]
  return jnp.pad(features[:, :-1], ((0, 0), (1, 0), (0, 0)))


def split_outputs(y, time_scale: TimeScale, num_components: int):
  """y [..., 3M + K] -> ((log_weights, means, log_scales) [..., M] of log tau in time units, mark logits [..., K])."""
  m = num_components
  log_weights = y[..., :m]
  means = time_scale.log_mean + time_scale.log_std * y[..., m:2 * m]
  log_scales = math.log(time_scale.log_std) + jnp.clip(y[..., 2 * m:3 * m], *LOG_SCALE_RANGE)
  return (log_weights, means, log_scales), y[..., 3 * m:]


def predict(model: Model, time_scale: TimeScale, params, batch, num_components: int):
  """The model's distribution of every event: (mixture, mark logits [B, E, K], valid bool [B, E], tau [B, E]).

  Events with tau <= 0 (a row of zeros) are not valid: their tau is replaced by 1 so every value stays
  finite, and the loss and score leave them out.
  """
  num_marks = model.output_dim - 3 * num_components
  valid = batch["tau"] > 0
  tau = jnp.where(valid, batch["tau"], 1.0)
  y = model.apply({"params": params}, event_features(tau, batch["marks"], time_scale, num_marks))
  mixture, logits = split_outputs(y.astype(jnp.float32), time_scale, num_components)
  return mixture, logits, valid, tau


def event_log_likelihoods(model: Model, time_scale: TimeScale, params, batch, num_components: int):
  """Per event: (time log-likelihood [B, E] in time units, mark log-likelihood [B, E], logits, mixture, valid, tau)."""
  mixture, logits, valid, tau = predict(model, time_scale, params, batch, num_components)
  time_ll = lognormal_mixture_log_prob(tau, *mixture)
  mark_ll = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch["marks"][..., None], -1)[..., 0]
  return time_ll, mark_ll, logits, mixture, valid, tau


def loss(model: Model, time_scale: TimeScale, params, batch, rng, *, num_components: int = NUM_COMPONENTS):
  """Negative log-likelihood per event (inter-event time in its own units + mark), averaged over events."""
  del rng  # no dropout
  time_ll, mark_ll, _, _, valid, _ = event_log_likelihoods(model, time_scale, params, batch, num_components)
  count = jnp.maximum(jnp.sum(valid), 1)
  time_nll = -jnp.sum(jnp.where(valid, time_ll, 0.0)) / count
  mark_nll = -jnp.sum(jnp.where(valid, mark_ll, 0.0)) / count
  return time_nll + mark_nll, {"time_nll": time_nll, "mark_nll": mark_nll, "num_targets": jnp.sum(valid)}


def score(model: Model, time_scale: TimeScale, num_components: int, params, batch):
  """{metric: (sum over a sequence's events [B], its number of events [B])}: see the module docstring."""
  time_ll, mark_ll, logits, mixture, valid, tau = event_log_likelihoods(
      model, time_scale, params, batch, num_components)
  per_sequence = lambda v: jnp.sum(jnp.where(valid, v, 0.0), -1)
  count = jnp.sum(valid, -1).astype(jnp.float32)
  error = lognormal_mixture_mean(*mixture) - tau
  correct = (jnp.argmax(logits, -1) == batch["marks"]).astype(jnp.float32)
  return {"log_likelihood": (per_sequence(time_ll + mark_ll), count),
          "time_log_likelihood": (per_sequence(time_ll), count),
          "mark_log_likelihood": (per_sequence(mark_ll), count),
          "true_log_likelihood": (jnp.where(count > 0, batch["true_log_likelihood"], 0.0), count),
          "time_mse": (per_sequence(error * error), count),
          "mark_accuracy": (per_sequence(correct), count)}


# ------------------------------------------------------------------------- data


def split_arrays(data_cfg, split: str) -> dict[str, np.ndarray]:
  """The whole split: {"tau": float32 [N, E], "marks": int32 [N, E], "true_log_likelihood": float32 [N]}."""
  splits.check(split, "the hawkes dataset")
  data = hawkes.load(data_cfg)[0][split]
  return {"tau": inter_event_times(data["times"]), "marks": data["marks"].astype(np.int32),
          "true_log_likelihood": data["true_log_likelihood"].astype(np.float32)}


def make_data(data_cfg, split: str, *, seed: int, process_index: int, process_count: int, batch_size: int):
  """A checkpointable grain iterator of this host's batches of `split_arrays(split)` (shuffled, repeated)."""
  return pipeline.make_iterator(
      pipeline.ArraySource(split_arrays(data_cfg, split)), global_batch_size=batch_size * process_count, seed=seed,
      shuffle=True, process_index=process_index, process_count=process_count,
      worker_count=data_cfg.worker_count)


def make_task(config) -> tasks.Task:
  d = config.data
  num_components = config.get("loss", {}).get("num_components", NUM_COMPONENTS)
  if num_components < 1:
    raise ValueError(f"config.loss.num_components={num_components} must be >= 1")
  model = tasks.build_model(Model, config.model)
  features, outputs = 1 + d.num_marks, 3 * num_components + d.num_marks
  model = sequence.with_data_sizes(
      model, input_dim=features, output_dim=outputs,
      data=f"the hawkes data with num_marks={d.num_marks} and num_components={num_components}")
  if model.max_len < d.seq_len:
    raise ValueError(f"config.model.max_len={model.max_len} is below config.data.seq_len={d.seq_len}.")
  time_scale = TimeScale.from_tau(split_arrays(d, "train")["tau"])  # the train split's statistics only
  return tasks.Task(
      model=model,
      init_inputs=lambda: {"x": jnp.zeros((1, d.seq_len, features), jnp.float32)},
      loss=functools.partial(loss, model, time_scale, num_components=num_components),
      data=functools.partial(make_data, d),
      predict_fns={
          "split_arrays": functools.partial(split_arrays, d),
          "score": functools.partial(score, model, time_scale, num_components),
      },
  )
