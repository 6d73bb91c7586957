r"""`make demo`: NBP end to end on moving digits: tokenizer, tokens, next-block transformer, videos.

  python -m experiments.demo --workdir runs/demo

Three stages, each resumed or skipped when the workdir already holds it:
  1. trains the video tokenizer (3D causal CNN + FSQ) -> workdir/tokenizer
     (--tokenizer_config, default experiments/configs/video_tokenizer_digits.py:local);
  2. encodes the train, validation and test videos once into tokens -> workdir/tokens;
  3. trains NBP on the tokens, one latent row per block, class-conditional,
     and samples videos through the tokenizer's decoder -> workdir/nbp
     (experiments/configs/nbp_digits.py:XS,local,tokens,row).
To override keys, name the configs, e.g.
  python -m experiments.demo --workdir runs/demo2000 \
      --config experiments/configs/nbp_digits.py:XS,local,tokens,row --config.num_steps=2000 \
      --tokenizer_config experiments/configs/video_tokenizer_digits.py:local --tokenizer_config.num_steps=1200
Then it writes workdir/samples.gif and samples.png (NBP's videos, one class
per row), reconstructions.gif (validation videos above their tokenizer
reconstructions), loss.png (one panel per trained stage) and metrics.json
(each stage's figures and its seconds in this invocation). Its eval figures
are on the validation split, as in training. On CPU it runs on two devices
(--num_cpu_devices, default 2), each batch split between them.

The demo trains no judge of its samples. Given one, a video classifier trained
on the demo's videos (`--judge WORKDIR` of a
video_classifier_digits.py:5x16 run), it also samples 128 videos at the
config's sampler settings, conditioned on the classes of validation videos,
and writes metrics.json's "samples_judged": the share in which the classifier
finds the digit asked for ("class_match") and fvd_digits_classifier against
real validation videos, beside the distance between two real sets ("floor").
On a finished workdir only that step runs.
"""

import glob
import json
import os
import shutil
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import common
from experiments.configs import nbp_digits, video_tokenizer_digits
from nbp import evaluators
from nbp import visualization
from nbp.data import splits
from nbp.data import tokens as tokens_lib
from nbp.evaluators import fvd_digits
from nbp.tasks import video_tokenizer
from nbp.training import loop as train
from nbp.training import metrics as metrics_lib
from nbp.training import workdir as workdir_lib

DEFAULT_ARG = "XS,local,tokens,row"  # of experiments/configs/nbp_digits.py
DEFAULT_TOKENIZER_ARG = "local"  # of experiments/configs/video_tokenizer_digits.py
TOKENIZER_CONFIG = config_flags.DEFINE_config_file(
    "tokenizer_config", None, "The video tokenizer's config (default video_tokenizer_digits.py:local).")
JUDGE = flags.DEFINE_string(
    "judge", "", "Optional: WORKDIR of a trained video_classifier_digits.py:5x16 run, the judge of the samples.")
DEFAULT_WORKDIR = "runs/demo"
# The demo splits each batch over two CPU devices, data parallel, one per core
# of a 2-core machine: its tokenizer's training step runs in about 0.85x the
# time of one device's threaded step there (docs/nbp.md). --num_cpu_devices
# sets another count (1: one device); it concerns the CPU backend only.
DEFAULT_CPU_DEVICES = 2
flags.FLAGS.set_default(common.NUM_CPU_DEVICES.name, DEFAULT_CPU_DEVICES)
JUDGED_VIDEOS = 128  # videos sampled for "samples_judged"


def _last(rows: list[dict], key: str):
  values = [r[key] for r in rows if key in r]
  return values[-1] if values else None


def _copy_latest_samples(run_dir: str, out_stem: str) -> None:
  latest = sorted(glob.glob(os.path.join(run_dir, "samples", "step_*.gif")))[-1:]
  for path in latest:
    shutil.copy(path, out_stem + ".gif")
    shutil.copy(path[:-4] + ".png", out_stem + ".png")


def encode_tokens(tokenizer_dir: str, tokens_dir: str, tokenizer_step: int) -> dict:
  """Encodes the tokenizer's dataset unless `tokens_dir` already holds this tokenizer step's tokens of every split."""
  if os.path.exists(os.path.join(tokens_dir, tokens_lib.METADATA)):
    metadata = tokens_lib.read_metadata(tokens_dir)
    if metadata.get("tokenizer_step") == tokenizer_step and set(splits.SPLITS) <= set(metadata.get("num_examples", {})):
      return metadata
  return video_tokenizer.encode_tokens(tokenizer_dir, tokens_dir, extra_metadata={"tokenizer_step": tokenizer_step})


def judge_samples(nbp_dir: str, classifier: str, num_videos: int = JUDGED_VIDEOS) -> dict:
  """The fvd_digits evaluator on the run's newest checkpoint: class match and distance to real validation videos."""
  s, params, params_name, step = train.load_params(workdir_lib.read_config(nbp_dir), nbp_dir)
  section = dict(type="fvd_digits", classifier_workdir=classifier, num_videos=num_videos)
  _, evaluator = evaluators.build({"fvd": section})["fvd"]
  context = evaluators.Context(setup=s, params=params, params_name=params_name, step=step, workdir=nbp_dir,
                               rng=jax.random.key(0))
  result = evaluator.run(context)
  keys = ("class_match", "class_match_real", fvd_digits.FVD_KEY, fvd_digits.FVD_KEY + "_floor", "num_videos")
  return {"classifier": classifier, "step": step, **{k: result[k] for k in keys if k in result}}


def run(config, tokenizer_config, workdir: str, classifier: str = "", judged_videos: int = JUDGED_VIDEOS) -> dict:
  """Runs the three stages (and, given a classifier's workdir, judges the samples); returns metrics.json's dict."""
  start = time.perf_counter()
  if config.data.name != "tokens":
    raise ValueError(f"The demo trains NBP on tokenizer tokens: config.data.name={config.data.name!r} must be "
                     "'tokens' (nbp_digits.py:...,tokens).")
  tokenizer_dir, tokens_dir, nbp_dir = (os.path.join(workdir, name) for name in ("tokenizer", "tokens", "nbp"))
  seconds = {}  # per stage, this invocation (a resumed stage counts only what it redid)
  tokenizer_result = train.train_and_evaluate(tokenizer_config, tokenizer_dir)
  seconds["tokenizer"] = time.perf_counter() - start
  metadata = encode_tokens(tokenizer_dir, tokens_dir, tokenizer_result["step"])
  seconds["tokens"] = time.perf_counter() - start - seconds["tokenizer"]

  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.token_dir = tokens_dir
  nbp_result = train.train_and_evaluate(config, nbp_dir)
  seconds["nbp"] = time.perf_counter() - start - seconds["tokenizer"] - seconds["tokens"]

  tokenizer_rows = metrics_lib.read_jsonl(os.path.join(tokenizer_dir, "metrics.jsonl"))
  nbp_rows = metrics_lib.read_jsonl(os.path.join(nbp_dir, "metrics.jsonl"))
  visualization.save_loss_panels(os.path.join(workdir, "loss.png"), {
      "video tokenizer": (tokenizer_rows, ("loss",), "training loss (its config's terms)"),
      "NBP": (nbp_rows, ("loss", "eval/loss"), "cross-entropy (nats/token)")})
  _copy_latest_samples(nbp_dir, os.path.join(workdir, "samples"))
  _copy_latest_samples(tokenizer_dir, os.path.join(workdir, "reconstructions"))
  summary = {
      "tokenizer": {
          "steps": tokenizer_result["step"],
          "eval_psnr_db": _last(tokenizer_rows, "eval/psnr"),
          "eval_codebook_usage": _last(tokenizer_rows, "eval/codebook_usage"),
          "token_grid": metadata["latent_shape"],
          "codebook_size": metadata["codebook_size"],
      },
      "nbp": {
          "block": list(config.model.block),
          "steps": nbp_result["step"],
          "status": nbp_result["status"],
          "train_loss_first": next((r["loss"] for r in nbp_rows if "loss" in r), None),
          "train_loss_last": _last(nbp_rows, "loss"),
          "eval_loss": _last(nbp_rows, "eval/loss"),
          "eval_bits_per_token": _last(nbp_rows, "eval/bits_per_token"),
          "eval_accuracy": _last(nbp_rows, "eval/accuracy"),
      },
      "stage_seconds_this_invocation": seconds,
      "samples_judged": judge_samples(nbp_dir, classifier, judged_videos) if classifier else None,
      "wall_seconds_this_invocation": time.perf_counter() - start,
  }
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax's per-save INFO lines drown the progress bar
  common.initialize()
  config = common.CONFIG.value
  if config is None:  # the flags are experiments.common's, shared with train/sample/evaluate
    config = nbp_digits.get_config(DEFAULT_ARG)
  tokenizer_config = TOKENIZER_CONFIG.value or video_tokenizer_digits.get_config(DEFAULT_TOKENIZER_ARG)
  workdir = common.WORKDIR.value or DEFAULT_WORKDIR
  summary = run(config, tokenizer_config, workdir, classifier=JUDGE.value)
  print(json.dumps(summary, indent=1))
  print(f"NBP samples: {workdir}/samples.gif and samples.png; tokenizer reconstructions: "
        f"{workdir}/reconstructions.gif; loss curve: {workdir}/loss.png")


if __name__ == "__main__":
  app.run(main)
