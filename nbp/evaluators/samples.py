"""Samples written to look at: the task's sampler jitted whole, its output as GIF/PNG (or text)."""

from __future__ import annotations

import dataclasses
import functools
import os

import jax

from nbp.training import sharding


@functools.cache
def compile_sampler(s, pred: str = "sample"):
  """The family's sampler `pred` jitted whole; samples come back replicated on every host."""
  return jax.jit(s.task.predict_fn(pred, who="the samples evaluator"), out_shardings=sharding.replicated(s.mesh))


def draw(s, params, rng, pred: str = "sample"):
  """The task's samples as numpy (one sampler call)."""
  with s.context():
    return jax.device_get(compile_sampler(s, pred)(params, rng))


@dataclasses.dataclass
class Evaluator:
  OPTIONAL_PREDICT_FNS = True  # in every config by default: a family without a sampler writes nothing

  subdir: str = "samples"  # under the workdir
  pred: str = "sample"  # the task's sampler: (params, rng) -> samples; a family without it writes nothing
  write: str = "write_samples"  # the task's writer: (samples, out_dir, step) -> numbers

  def run(self, context) -> dict[str, float]:
    s = context.setup
    if not s.task.offers(self.pred):
      return {}
    rng = jax.random.fold_in(jax.random.key(s.config.seed + 3), context.step)
    samples = draw(s, context.params, rng, self.pred)
    if not s.task.offers(self.write) or jax.process_index() != 0:
      return {}
    out_dir = os.path.join(context.workdir, self.subdir)
    os.makedirs(out_dir, exist_ok=True)
    return dict(s.task.predict_fn(self.write)(samples, out_dir, context.step))
