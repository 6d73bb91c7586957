r"""Runs a config's evaluators (`config.evals`) on the latest checkpoint of a workdir.

  python -m experiments.evaluate --config experiments/configs/ntp_digits.py:XS,local \
      --workdir runs/ntp_digits_local [--config.evals.eval.steps=16]

Every evaluator runs, whatever its `every`, on the parameters evaluation uses
in training (the EMA when the run keeps one; the output's "params" says which).
Prints the metrics as JSON and writes them to workdir/eval_<step>.json.
"""

import json
import os

from absl import app, flags

from experiments import common
from nbp.training import loop as train

flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  common.initialize()
  s, params, params_name, step = train.load_params(common.CONFIG.value, common.WORKDIR.value)
  metrics = train.run_evaluators(s, params, params_name, step, common.WORKDIR.value, final=True, only_due=False)
  metrics.update(step=step, params=params_name)
  with open(os.path.join(common.WORKDIR.value, f"eval_{step}.json"), "w") as f:
    json.dump(metrics, f, indent=1)
  print(json.dumps(metrics, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
