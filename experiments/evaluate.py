r"""Evaluates the latest checkpoint of a workdir on the test split.

  python -m experiments.evaluate --config experiments/configs/ntp_digits.py:S,local \
      --workdir runs/ntp_digits_local

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
  config = common.CONFIG.value
  s, state = train.load_state(config, common.WORKDIR.value)
  with s.context():
    metrics = train.evaluate(s, state, int(state.step))
  metrics["step"] = int(state.step)
  with open(os.path.join(common.WORKDIR.value, f"eval_{metrics['step']}.json"), "w") as f:
    json.dump(metrics, f, indent=1)
  print(json.dumps(metrics, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
