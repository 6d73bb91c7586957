"""Marked event sequences of a multivariate Hawkes process, simulated once and cached.

Dimension letters: N sequences, E events per sequence (`config.data.seq_len`),
K marks (`config.data.num_marks`).

The process. Mark k fires with the conditional intensity

  lambda_k(t) = mu_k + sum_{t_i < t} alpha[k, m_i] * beta * exp(-beta (t - t_i)),

an exponential kernel that integrates to alpha[k, m]: alpha is the branching
matrix (mean number of mark-k children of one mark-m event), and the process is
stationary when its spectral radius is below 1, with the rate vector
(I - alpha)^-1 mu (`HawkesParameters.stationary_rate`).

Parameters. `default_parameters(K)` draws them once from a Generator seeded by
(PARAMETER_SEED, K): mu ~ U(0.1, 0.5); alpha with diagonal U(0.5, 1) and
off-diagonal U(0, 0.15), rescaled to spectral radius SPECTRAL_RADIUS; beta ~
U(1, 3). Each mark mostly excites itself, so the recent marks tell the next
one (with alpha uniform over all pairs the next mark is barely predictable
from the history). Every run with the same K sees the same process; the values
are written to the cache's metadata.json.

Simulation. Ogata's thinning, vectorised over the N sequences (each draws its
own candidates; a loop runs until every sequence holds E events). Between
events the intensity only decays, so the total intensity just after the last
event (or candidate) bounds it until the next one. Every sequence starts at
t = 0 with no history: its first inter-event time is t_1 - 0, and the exact
log-likelihood below is that of the events on [0, t_E] from an empty history.

Log-likelihood. sum_i log lambda_{m_i}(t_i) - integral_0^{t_E} sum_k lambda_k.
The excitation at t_i splits by source mark m, sum_{j < i, m_j = m}
exp(-beta (t_i - t_j)) = exp(L_m(i) - beta t_i) with L_m(i) the exclusive
running logsumexp of beta t_j over the events of mark m (`np.logaddexp.accumulate`
along the events: the kernel's recursion, vectorised and overflow-free); the
compensator is closed form, T sum(mu) + sum_j sum_k alpha[k, m_j] (1 - exp(-beta (T - t_j))).

Cache. `load(config.data)` builds config.data.dir/hawkes_k{K}_e{E}_train{N}_test{N'}/
once: data.npz (times float64 [N, E], marks int32 [N, E] and the true
log-likelihood float64 [N] per simulated split, train and test) and
metadata.json (the parameters, their spectral radius and stationary rate, the
seeds); later calls read it.

Splits. train and test are simulated (independent draws); the validation split
is carved from the simulated train sequences by `nbp.data.splits.carve` with
`config.data.validation_fraction` and `validation_seed` (a fixed permutation),
so "train" is the num_train sequences less those. The sequences are i.i.d.,
so a carved validation sequence is as fresh as a simulated one.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from nbp.data import splits as splits_lib

PARAMETER_SEED = 20240611  # with num_marks: the Generator the process parameters are drawn from
SIMULATION_SEED = 7  # with num_marks, seq_len and the split: the Generator the sequences are drawn from
SPECTRAL_RADIUS = 0.7  # of alpha: the share of events that are children of earlier ones
SIMULATED = ("train", "test")  # the splits simulated into the cache; validation is carved from train
SPLITS = splits_lib.SPLITS
VERSION = 2  # bumped when the simulation or the file layout changes (an older cache is rejected)


@dataclasses.dataclass(frozen=True)
class HawkesParameters:
  """A K-mark Hawkes process with exponential kernels alpha[k, m] * beta * exp(-beta t)."""

  mu: np.ndarray  # float64 [K]: background rates
  alpha: np.ndarray  # float64 [K, K]: alpha[k, m], mean mark-k children of one mark-m event
  beta: float  # decay rate of the kernel (1 / its time scale)

  @property
  def num_marks(self) -> int:
    return len(self.mu)

  @property
  def spectral_radius(self) -> float:
    return float(np.max(np.abs(np.linalg.eigvals(self.alpha))))

  @property
  def stationary_rate(self) -> np.ndarray:
    """float64 [K]: events per unit time of each mark in the stationary regime, (I - alpha)^-1 mu."""
    return np.linalg.solve(np.eye(self.num_marks) - self.alpha, self.mu)

  def to_json(self) -> dict:
    return {"mu": self.mu.tolist(), "alpha": self.alpha.tolist(), "beta": self.beta}


def default_parameters(num_marks: int) -> HawkesParameters:
  """The process of `num_marks` marks every run uses (see the module docstring); stable by construction."""
  if num_marks < 1:
    raise ValueError(f"config.data.num_marks={num_marks} must be >= 1")
  rng = np.random.default_rng((PARAMETER_SEED, num_marks))
  mu = rng.uniform(0.1, 0.5, num_marks)
  alpha = rng.uniform(0.0, 0.15, (num_marks, num_marks)) + np.diag(rng.uniform(0.5, 1.0, num_marks))
  alpha *= SPECTRAL_RADIUS / np.max(np.abs(np.linalg.eigvals(alpha)))
  beta = float(rng.uniform(1.0, 3.0))
  return HawkesParameters(mu=mu, alpha=alpha, beta=beta)


def simulate(params: HawkesParameters, num_sequences: int, num_events: int,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Ogata's thinning from t = 0 with no history: (times float64 [N, E] increasing, marks int32 [N, E])."""
  if params.spectral_radius >= 1:
    raise ValueError(f"Hawkes alpha has spectral radius {params.spectral_radius:.3f} >= 1: not stationary.")
  n, k = num_sequences, params.num_marks
  times = np.zeros((n, num_events))
  marks = np.zeros((n, num_events), np.int32)
  t = np.zeros(n)  # the current time of each sequence (last event or rejected candidate)
  excitation = np.zeros((n, k))  # lambda - mu at time t, per mark
  count = np.zeros(n, np.int64)  # events accepted so far
  rows = np.arange(n)
  while True:
    active = count < num_events
    if not active.any():
      return times, marks
    bound = params.mu.sum() + excitation.sum(-1)  # [N] total intensity at t: an upper bound until the next event
    wait = rng.exponential(1.0 / bound)
    excitation = np.where(active[:, None], excitation * np.exp(-params.beta * wait)[:, None], excitation)
    t = np.where(active, t + wait, t)
    rate = params.mu + excitation  # [N, K] at the candidate time
    total = rate.sum(-1)
    accept = active & (rng.uniform(size=n) * bound <= total)
    # The mark of an accepted event: drawn in proportion to the marks' intensities.
    cumulative = np.cumsum(rate, -1) / total[:, None]
    mark = np.minimum((rng.uniform(size=n)[:, None] > cumulative).sum(-1), k - 1)
    idx = rows[accept]
    times[idx, count[idx]] = t[idx]
    marks[idx, count[idx]] = mark[idx]
    excitation[idx] += params.beta * params.alpha[:, mark[idx]].T
    count[idx] += 1


def log_likelihood(params: HawkesParameters, times: np.ndarray, marks: np.ndarray) -> np.ndarray:
  """Exact log-likelihood of sequences observed on [0, t_E] from an empty history: float64 [N].

  times float [N, E] (increasing, from 0), marks int [N, E]; see the module docstring.
  """
  times = np.asarray(times, np.float64)
  marks = np.asarray(marks)
  mu, alpha, beta = params.mu, params.alpha, params.beta
  onehot = marks[..., None] == np.arange(params.num_marks)  # [N, E, K]
  with np.errstate(divide="ignore"):
    scaled = np.where(onehot, beta * times[..., None], -np.inf)  # beta t_j where m_j = m, else -inf
  running = np.logaddexp.accumulate(scaled, axis=1)  # [N, E, K] logsumexp over j <= i
  exclusive = np.concatenate([np.full_like(running[:, :1], -np.inf), running[:, :-1]], axis=1)  # j < i
  decayed = np.exp(exclusive - beta * times[..., None])  # [N, E, K]: sum_{j<i, m_j=m} exp(-beta (t_i - t_j))
  rows = alpha[marks]  # [N, E, K]: alpha[m_i, m]
  intensity = mu[marks] + beta * np.sum(rows * decayed, -1)  # lambda_{m_i}(t_i)  [N, E]
  end = times[:, -1:]  # T = t_E
  compensator = end[:, 0] * mu.sum() + np.sum(
      alpha.sum(0)[marks] * (1.0 - np.exp(-beta * (end - times))), -1)
  return np.sum(np.log(intensity), -1) - compensator


def cache_dir(data_cfg) -> str:
  """config.data.dir/hawkes_k{K}_e{E}_train{N}_test{N'}: where `load` keeps the simulated sequences."""
  d = data_cfg
  return os.path.join(d.dir, f"hawkes_k{d.num_marks}_e{d.seq_len}_train{d.num_train}_test{d.num_test}")


def _check(data_cfg) -> None:
  for key in ("num_marks", "seq_len", "num_train", "num_test"):
    if int(data_cfg[key]) < 1:
      raise ValueError(f"config.data.{key}={data_cfg[key]} must be >= 1")
  if data_cfg.seq_len < 2:
    raise ValueError(f"config.data.seq_len={data_cfg.seq_len} must be >= 2 events")


def _metadata(data_cfg, params: HawkesParameters) -> dict:
  return {"version": VERSION, "num_marks": int(data_cfg.num_marks), "seq_len": int(data_cfg.seq_len),
          "num_train": int(data_cfg.num_train), "num_test": int(data_cfg.num_test),
          "parameters": params.to_json(), "spectral_radius": params.spectral_radius,
          "stationary_rate": params.stationary_rate.tolist(),
          "parameter_seed": [PARAMETER_SEED, int(data_cfg.num_marks)],
          "simulation_seed": [SIMULATION_SEED, int(data_cfg.num_marks), int(data_cfg.seq_len), "split index"]}


def build(data_cfg) -> str:
  """Simulates the train and test sequences of `config.data` into `cache_dir` (metadata.json written last)."""
  _check(data_cfg)
  params = default_parameters(data_cfg.num_marks)
  out = cache_dir(data_cfg)
  os.makedirs(out, exist_ok=True)
  arrays = {}
  for s, (split, count) in enumerate(zip(SIMULATED, (data_cfg.num_train, data_cfg.num_test))):
    rng = np.random.default_rng((SIMULATION_SEED, data_cfg.num_marks, data_cfg.seq_len, s))
    times, marks = simulate(params, count, data_cfg.seq_len, rng)
    arrays[f"{split}_times"] = times
    arrays[f"{split}_marks"] = marks
    arrays[f"{split}_true_log_likelihood"] = log_likelihood(params, times, marks)
  # Temporary names per process: runs that build the same cache at once each replace it whole (same content).
  tmp = os.path.join(out, f"data.{os.getpid()}.tmp.npz")
  np.savez(tmp, **arrays)
  os.replace(tmp, os.path.join(out, "data.npz"))
  tmp = os.path.join(out, f"metadata.{os.getpid()}.tmp.json")
  with open(tmp, "w") as f:
    json.dump(_metadata(data_cfg, params), f, indent=1)
  os.replace(tmp, os.path.join(out, "metadata.json"))
  return out


def load(data_cfg) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
  """({split: {"times", "marks", "true_log_likelihood"}} of SPLITS, metadata) of `config.data`, built on first use.

  The validation split is carved from the simulated train sequences (see the module docstring).

  Raises ValueError naming the cache folder when it was written by another
  version of this module (delete the folder to rebuild it).
  """
  _check(data_cfg)
  out = cache_dir(data_cfg)
  meta_path = os.path.join(out, "metadata.json")
  if not os.path.exists(meta_path):
    build(data_cfg)
  with open(meta_path) as f:
    meta = json.load(f)
  expected = _metadata(data_cfg, default_parameters(data_cfg.num_marks))
  if meta.get("version") != VERSION or not np.allclose(
      np.asarray(meta["parameters"]["alpha"]), np.asarray(expected["parameters"]["alpha"])):
    raise ValueError(f"The Hawkes cache {out} was written by another version of nbp.data.hawkes "
                     f"(version {meta.get('version')}, this is {VERSION}); delete the folder to rebuild it.")
  with np.load(os.path.join(out, "data.npz")) as f:
    simulated = {split: {key: f[f"{split}_{key}"] for key in ("times", "marks", "true_log_likelihood")}
                 for split in SIMULATED}
  carved = splits_lib.carve(int(data_cfg.num_train),
                            float(data_cfg.get("validation_fraction", splits_lib.VALIDATION_FRACTION)),
                            int(data_cfg.get("validation_seed", splits_lib.VALIDATION_SEED)))
  out_splits = {split: {k: v[carved[split]] for k, v in simulated["train"].items()} for split in carved}
  out_splits["test"] = simulated["test"]
  return out_splits, dict(meta, validation_indices=carved["validation"].tolist())


def parameters_from_metadata(meta: dict) -> HawkesParameters:
  """The process a cache was simulated from, as its metadata.json records it."""
  p = meta["parameters"]
  return HawkesParameters(mu=np.asarray(p["mu"]), alpha=np.asarray(p["alpha"]), beta=float(p["beta"]))
