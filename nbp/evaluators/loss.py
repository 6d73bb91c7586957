"""The task's held-out loss: its "eval_loss" predict function (default: the loss) averaged over batches of a split."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from nbp.training import sharding


@functools.cache
def compile_eval_step(s, pred: str = "eval_loss"):
  """The task's predict function `pred` (a loss), jitted on the run's shardings: params, batch, rng -> metrics."""
  evaluate = s.task.predict_fn(pred, who="the loss evaluator")

  def step(params, batch, rng):
    value, metrics = evaluate(params, batch, rng)
    if isinstance(value, dict):  # one objective per parameter group: report each
      return dict(metrics, **{f"loss_{k}": v for k, v in value.items()}, loss=value["model"])
    return dict(metrics, loss=value)
  return jax.jit(step, in_shardings=(s.state_sharding.params, s.batch_sharding, sharding.replicated(s.mesh)),
                 out_shardings=sharding.replicated(s.mesh))


@dataclasses.dataclass
class Evaluator:
  steps: int = 4  # batches of config.batch_size
  split: str = "validation"  # the split the batches come from
  pred: str = "eval_loss"  # the task's predict function: (params, batch, rng) -> (loss, metrics)

  def run(self, context) -> dict[str, float]:
    s = context.setup
    local = s.config.batch_size // jax.process_count()
    it = s.task.data(context.split_of(self), seed=s.config.seed, process_index=jax.process_index(),
                     process_count=jax.process_count(), batch_size=local)
    eval_step = compile_eval_step(s, self.pred)
    rng = jax.random.key(s.config.seed + 2)  # the same batches and keys at every evaluation
    totals = []
    with s.context():
      for i in range(self.steps):
        batch = sharding.global_batch(next(it), s.batch_sharding)
        totals.append(jax.device_get(eval_step(context.params, batch, jax.random.fold_in(rng, i))))
    out = {k: float(np.mean([t[k] for t in totals])) for k in totals[0]}
    if "nll" in out:  # nats per token: the perplexity of the whole evaluation, not a mean of per-batch ones
      with np.errstate(over="ignore"):  # an untrained model's perplexity may be inf: reported as such
        out["perplexity"] = float(np.exp(out["nll"]))
    out["uses_ema"] = float(context.params_name == "ema_params")
    return out
