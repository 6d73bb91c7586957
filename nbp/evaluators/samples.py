"""Samples written to look at: the task's sampler jitted whole, its output as GIF/PNG (or text)."""

from __future__ import annotations

import dataclasses
import functools
import os

import jax

from nbp.training import sharding


@functools.cache
def compile_sampler(s):
  """The family's sampler jitted whole; samples come back replicated on every host."""
  return jax.jit(s.task.sample, out_shardings=sharding.replicated(s.mesh))


def draw(s, params, rng):
  """The task's samples as numpy (one sampler call)."""
  with s.context():
    return jax.device_get(compile_sampler(s)(params, rng))


@dataclasses.dataclass
class Evaluator:
  subdir: str = "samples"  # under the workdir

  def run(self, context) -> dict[str, float]:
    s = context.setup
    if s.task.sample is None:
      return {}
    rng = jax.random.fold_in(jax.random.key(s.config.seed + 3), context.step)
    samples = draw(s, context.params, rng)
    if s.task.write_samples is None or jax.process_index() != 0:
      return {}
    out_dir = os.path.join(context.workdir, self.subdir)
    os.makedirs(out_dir, exist_ok=True)
    return dict(s.task.write_samples(samples, out_dir, context.step))
