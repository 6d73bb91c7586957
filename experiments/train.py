r"""Trains a config in a workdir, resuming from its latest checkpoint.

  python -m experiments.train --config experiments/configs/ntp_digits.py:S,local \
      --workdir runs/ntp_digits_local [--config.num_steps=1000 ...]

Evaluators read the validation split. `--config.eval_test_at_end=True` adds one
pass of every evaluator over the test split after the last step (logged as
test/<name>/<key>); `python -m experiments.evaluate --split test` does the same
on a finished run.

Multi-process on one machine (the local stand-in for a pod), one command per process:
  python -m experiments.train ... --coordinator_address=127.0.0.1:12345 \
      --num_processes=2 --process_id=0
On a TPU pod, run the same command on every host with --multihost.
"""

import json

from absl import app, flags

from experiments import common
from nbp.training import loop as train

flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  common.initialize()
  result = train.train_and_evaluate(common.CONFIG.value, common.WORKDIR.value)
  print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
