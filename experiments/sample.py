r"""Samples from the latest checkpoint of a workdir.

  python -m experiments.sample --config experiments/configs/ntp_digits.py:S,local \
      --workdir runs/ntp_digits_local [--seed 1]

Writes workdir/samples/seed_<seed>/step_<N>.{gif,png} (video) or .txt (text).
"""

import json
import os

import jax
from absl import app, flags

from experiments import common
from nbp.training import loop as train

SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  common.initialize()
  config = common.CONFIG.value
  s, state = train.load_state(config, common.WORKDIR.value)
  params = state.ema_params if state.ema_params is not None else state.params
  with s.context():
    samples = jax.device_get(train.compile_sampler(s)(params, jax.random.key(SEED.value)))
  out_dir = os.path.join(common.WORKDIR.value, "samples", f"seed_{SEED.value}")
  os.makedirs(out_dir, exist_ok=True)
  step = int(state.step)
  metrics = s.task.write_samples(samples, out_dir, step) if s.task.write_samples else {}
  print(json.dumps({"step": step, "out_dir": out_dir, **metrics}))


if __name__ == "__main__":
  app.run(main)
