r"""Runs a config's evaluators (`config.evals`) on the latest checkpoint of a workdir.

  python -m experiments.evaluate --config experiments/configs/ntp_digits.py:XS,local \
      --workdir runs/ntp_digits_local [--split test] [--step 2000] [--raw_params] \
      [--config.evals.eval.steps=16]

Every evaluator runs, whatever its `every`, on the parameters evaluation uses
in training (the EMA when the run keeps one; the output's "params" says which),
or with `--raw_params` on the raw parameters of a run that keeps an EMA: what
the average bought. `--step` reads that checkpoint instead of the newest.
`--split` makes every evaluator read that split (default: each its own, the
validation split unless its config says otherwise): choices are made on
validation, and `--split test` is the one report on test.
Prints the metrics as JSON and writes them to workdir/eval_<step>[_<split>][_raw].json.
"""

import json
import os

from absl import app, flags

from experiments import common
from nbp.data import splits
from nbp.training import loop as train

SPLIT = flags.DEFINE_enum("split", None, list(splits.SPLITS), "The split every evaluator reads (default: its own).")
STEP = flags.DEFINE_integer("step", None, "The checkpoint step to evaluate (default: the newest readable one).")
RAW_PARAMS = flags.DEFINE_bool("raw_params", False, "Evaluate the raw parameters of a run that keeps an EMA.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  common.initialize()
  s, params, params_name, step = train.load_params(common.CONFIG.value, common.WORKDIR.value, STEP.value,
                                                   raw=RAW_PARAMS.value)
  metrics = train.run_evaluators(s, params, params_name, step, common.WORKDIR.value, final=True, only_due=False,
                                 split=SPLIT.value)
  metrics.update(step=step, params=params_name)
  suffix = (f"_{SPLIT.value}" if SPLIT.value else "") + ("_raw" if RAW_PARAMS.value else "")
  with open(os.path.join(common.WORKDIR.value, f"eval_{step}{suffix}.json"), "w") as f:
    json.dump(metrics, f, indent=1)
  print(json.dumps(metrics, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
