r"""Samples from the latest checkpoint of a workdir (its EMA parameters when kept, as in evaluation).

  python -m experiments.sample --config experiments/configs/ntp_digits.py:S,local \
      --workdir runs/ntp_digits_local [--seed 1]

Writes workdir/samples/seed_<seed>/step_<N>.{gif,png} (video) or .txt (text).
"""

import json
import os

import jax
from absl import app, flags

from experiments import common
from nbp.evaluators import samples as samples_lib
from nbp.training import loop as train

SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  common.initialize()
  config = common.CONFIG.value
  s, params, params_name, step = train.load_params(config, common.WORKDIR.value)
  samples = samples_lib.draw(s, params, jax.random.key(SEED.value))
  out_dir = os.path.join(common.WORKDIR.value, "samples", f"seed_{SEED.value}")
  os.makedirs(out_dir, exist_ok=True)
  metrics = s.task.predict_fn("write_samples")(samples, out_dir, step) if s.task.offers("write_samples") else {}
  print(json.dumps({"step": step, "params": params_name, "out_dir": out_dir, **metrics}))


if __name__ == "__main__":
  app.run(main)
