"""A task's metrics over every example of a split once: accuracy, MSE/MAE at horizons, log-likelihood per event.

The task gives the whole split as arrays (its "split_arrays" predict
function, small datasets) and a per-example score (its "score": (params,
batch) -> {metric: (value [B], count [B])}). The split is cut into batches of
`batch_size` (default config.batch_size); the last one is padded by repeating
its first row with count 0, so every example counts exactly once. Each metric
is reported as sum(value) / sum(count) over the split, with `num_examples`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from nbp.training import sharding


@functools.cache
def compile_score(s, pred: str = "score"):
  """The task's score jitted on the run's shardings; the padded rows' counts are zeroed by `weight`."""
  score_fn = s.task.predict_fn(pred, who="the split_metrics evaluator")

  def score(params, batch, weight):
    out = score_fn(params, batch)
    return {k: (jnp.sum(value * weight), jnp.sum(count * weight)) for k, (value, count) in out.items()}
  return jax.jit(score, in_shardings=(s.state_sharding.params, s.batch_sharding, s.batch_sharding),
                 out_shardings=sharding.replicated(s.mesh))


def padded_batches(examples: dict[str, np.ndarray], batch_size: int):
  """Yields (batch, weight float32 [batch_size]) over all N examples; padding rows have weight 0."""
  n = len(next(iter(examples.values())))
  if n == 0:
    raise ValueError("the split holds no examples")
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size)
    weight = (rows < n).astype(np.float32)
    rows = np.where(rows < n, rows, start)  # padding repeats the batch's first example
    yield {k: v[rows] for k, v in examples.items()}, weight


@dataclasses.dataclass
class Evaluator:
  split: str = "validation"  # the split to score
  batch_size: int = 0  # examples per batch (0: config.batch_size)
  pred: str = "score"  # the task's per-example score
  arrays: str = "split_arrays"  # the task's whole split as arrays

  def run(self, context) -> dict[str, float]:
    s = context.setup
    examples = s.task.predict_fn(self.arrays, who="the split_metrics evaluator")(context.split_of(self))
    batch_size = self.batch_size or s.config.batch_size
    score = compile_score(s, self.pred)
    sums, counts = {}, {}
    count_procs, index = jax.process_count(), jax.process_index()
    local = batch_size // count_procs
    with s.context():
      for batch, weight in padded_batches(examples, batch_size):
        part = slice(index * local, (index + 1) * local)  # this host's rows of the global batch
        batch = sharding.global_batch({k: v[part] for k, v in batch.items()}, s.batch_sharding)
        weight = sharding.global_batch(weight[part], s.batch_sharding)
        for k, (value, count) in jax.device_get(score(context.params, batch, weight)).items():
          sums[k] = sums.get(k, 0.0) + float(value)
          counts[k] = counts.get(k, 0.0) + float(count)
    out = {k: sums[k] / counts[k] if counts[k] else float("nan") for k in sums}
    out["num_examples"] = float(len(next(iter(examples.values()))))
    out["uses_ema"] = float(context.params_name == "ema_params")
    return out
