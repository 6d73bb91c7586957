r"""`make demo`: trains the headline model on moving digits, samples, and writes
samples (GIF, PNG), metrics (JSON) and a loss plot under the workdir.

  python -m experiments.demo --workdir runs/demo

Until the NBP model lands, the headline model is the next-token baseline
(experiments/configs/ntp_digits.py:XS,local). Run again with the same workdir,
it resumes an interrupted run; a finished run is only summarised again.
"""

import glob
import json
import os
import shutil
import time

from absl import app, flags, logging
from ml_collections import config_flags

from nbp import metrics as metrics_lib
from nbp import train
from nbp import video

CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "ntp_digits.py") + ":XS,local",
    "The headline model's config.")
WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where everything is written.")


def run(config, workdir: str) -> dict:
  """Trains, then gathers the outputs; returns the metrics written to metrics.json."""
  start = time.perf_counter()
  result = train.train_and_evaluate(config, workdir)
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  video.save_loss_plot(os.path.join(workdir, "loss.png"), rows)
  latest = sorted(glob.glob(os.path.join(workdir, "samples", "step_*.gif")))
  for path in latest[-1:]:
    shutil.copy(path, os.path.join(workdir, "samples.gif"))
    shutil.copy(path[:-4] + ".png", os.path.join(workdir, "samples.png"))
  evals = [r for r in rows if "eval/loss" in r]
  trains = [r for r in rows if "loss" in r]
  summary = {
      "family": config.family,
      "steps": result["step"],
      "status": result["status"],
      "train_loss_first": trains[0]["loss"] if trains else None,
      "train_loss_last": trains[-1]["loss"] if trains else None,
      "eval_loss": evals[-1]["eval/loss"] if evals else None,
      "eval_bits_per_token": evals[-1].get("eval/bits_per_token") if evals else None,
      "tokens_per_sec": trains[-1].get("tokens_per_sec") if trains else None,
      "wall_seconds_this_invocation": time.perf_counter() - start,
  }
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax's per-save INFO lines drown the progress bar
  summary = run(CONFIG.value, WORKDIR.value)
  print(json.dumps(summary, indent=1))
  print(f"Samples: {WORKDIR.value}/samples.gif and samples.png; loss curve: {WORKDIR.value}/loss.png")


if __name__ == "__main__":
  app.run(main)
