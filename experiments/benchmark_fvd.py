r"""In-domain FVD of trained moving-digits generators, side by side: fvd_digits_classifier and frames/s.

  python -m experiments.benchmark_fvd --classifier runs/fvd/classifier \
      --run runs/fvd/nbp_row \
      --run experiments/configs/nbp_digits.py:XS,local,token=runs/fvd/nbp_token \
      [--run runs/fvd/ntp] [--num_videos 256] [--sample_batch_size 64] [--seeds 0,1] \
      [--fvd_split validation] [--out_dir runs/fvd/benchmark] \
      [--steps 300,1000,3000] [--sampler top_p=0.9 --sampler guidance_scale=3]

A thin caller of the `fvd_digits` evaluator (nbp/evaluators/fvd_digits.py),
once per run and seed. Each `--run` is a trained `next_block` run (NBP, or
next-token prediction as its 1x1x1 blocks; pixels or tokenizer tokens): its
WORKDIR alone (the config is its config.json), or CONFIG_FILE:ARG=WORKDIR to
sample it with another config (e.g. other sampler settings). `--classifier`
is the workdir of the judge, a video_classifier run trained on the generators'
videos (video_classifier_digits.py:local,4x12 for the local pixel runs); the
evaluator stops with an error naming both when a run's decoded videos differ
from the classifier's in shape, digits, speed or grey levels. `--steps`
evaluates each run at those checkpoint steps instead of its newest (a training
curve: keep them with `--config.keep_checkpoint_steps` when training) and,
with --out_dir, plots fvd_vs_steps.png; `--sampler KEY=VALUE` sets a sampler
key of every run (top_p, temperature, guidance_scale, ...) for a sweep.

Per sampling seed s (N = --num_videos), as nbp/evaluators/generation.py says:
the reference is real videos 0..N-1 of one split of the classifier's data
(--fvd_split: validation while choosing settings, test once for the report), the
stand-in videos (s+1)N..(s+2)N-1 of the same split; the floor is their
distance; each run draws N videos conditioned like the stand-in (its digit
classes, or its first frames for frame prediction) with the key
jax.random.key(s), through the run's "sample_conditioned" and its guidance.
Token runs' samples are decoded by their tokenizer. Beside the distance, "class match": the share of videos whose k
top-scoring classes are the k digits asked for ("-" for runs without a class
condition; for the floor row, the classifier's accuracy on the stand-in).
Frame-prediction runs (continuing the stand-in's first frames) also get a
second table: the distance in pixels between the centres of mass of each
predicted frame and its true frame, and the pixel MSE, each beside repeating
the last given frame (and, for the MSE, black frames).
frames/s: generated frames over the seconds of the sampler calls (compiled
ahead, block_until_ready per batch, in the process that computes the FVD).

Prints one JSON line per (run, seed), then a Markdown table: per run, the
distance per seed, its mean and sd over the seeds, frames/s (the range over
the seeds) and the class match; with --out_dir also results.json and a PNG
frame grid of each run's first generated videos.

The measured tables, with their commands: docs/nbp.md.

Dimensions: N videos, B sampler batch, F frames, H = W frame side.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os

import jax
import numpy as np
from absl import app, flags

from nbp import evaluators
from nbp.evaluators import fvd_digits
from nbp.training import loop as train
from nbp.training import workdir as workdir_lib

FVD_KEY = fvd_digits.FVD_KEY  # "fvd_digits_classifier": never plain "fvd"
FLOOR_KEY = FVD_KEY + "_floor"

RUNS = flags.DEFINE_multi_string("run", [], "A trained generator: WORKDIR or CONFIG_FILE:ARG=WORKDIR (repeatable).")
CLASSIFIER = flags.DEFINE_string(
    "classifier", "runs/fvd/classifier",
    "The judge: WORKDIR of a trained video_classifier run (a CONFIG_FILE:ARG= prefix is ignored: the "
    "workdir's config.json is what it was trained with).")
NUM_VIDEOS = flags.DEFINE_integer("num_videos", 256, "N: generated videos per run and seed, and real videos per set.")
BATCH_SIZE = flags.DEFINE_integer("sample_batch_size", 64, "Videos per sampler call (and per classifier call).")
SEEDS = flags.DEFINE_list("seeds", ["0"], "Sampling seeds; seed s also picks the real stand-in set.")
SPLIT = flags.DEFINE_enum("fvd_split", "validation", ["validation", "test"],
                          "The real videos' split: validation while choosing, test once for the report.")
OUT_DIR = flags.DEFINE_string("out_dir", "", "If set: results.json and samples_<run>.png here (and, with "
                               "several --steps, fvd_vs_steps.png).")
STEPS = flags.DEFINE_list("steps", [], "Checkpoint steps to evaluate each run at (kept in training with "
                          "config.keep_checkpoint_steps); default: each run's newest.")
SAMPLER = flags.DEFINE_multi_string("sampler", [], "KEY=VALUE of config.sampler applied to every run, e.g. "
                                    "--sampler top_p=0.9 --sampler guidance_scale=3 (repeatable).")


def parse_run(spec: str) -> tuple[str, str, str]:
  """"path.py:ARG=WORKDIR" -> (path, ARG, WORKDIR) (ARG may hold commas); a bare "WORKDIR" -> ("", "", WORKDIR)."""
  config_part, sep, workdir = spec.rpartition("=")
  if not sep:
    return "", "", spec
  if not config_part or not workdir:
    raise ValueError(f"expected WORKDIR or CONFIG_FILE:ARG=WORKDIR, got {spec!r}")
  path, _, arg = config_part.partition(":")
  return path, arg, workdir


def load_config(path: str, arg: str):
  """`get_config(arg)` of a config file, as `--config path:arg` would give it."""
  spec = importlib.util.spec_from_file_location(f"_benchmark_fvd_config_{abs(hash(path))}", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"no config file {path!r}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def run_config(spec: str):
  """(config, workdir) of a --run: the config file's, or the one the workdir was trained with."""
  path, arg, workdir = parse_run(spec)
  return (load_config(path, arg) if path else workdir_lib.read_config(workdir)), workdir


def override_sampler(config, overrides):
  """The config with `overrides` ["KEY=VALUE", ...] set in config.sampler.

  A value is typed like the key it replaces; a key the run's config lacks (a
  sampler option newer than the run) is read as a Python literal, and the task
  names it if its sampler does not take it.
  """
  if not overrides:
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for item in overrides:
      key, sep, value = item.partition("=")
      if not sep or not key:
        raise ValueError(f"--sampler {item!r}: expected KEY=VALUE, KEY a sampler option such as "
                         f"{sorted(config.sampler)}")
      config.sampler[key] = type(config.sampler[key])(value) if key in config.sampler else ast.literal_eval(value)
  return config


def describe(config) -> tuple[str, str]:
  """(block, condition) of a run for the table."""
  return "x".join(map(str, config.model.block)), config.model.get("condition", "none")


def benchmark(specs, classifier: str, *, num_videos: int, batch_size: int, seeds, out_dir: str = "",
              split: str = "validation", steps=(None,), sampler=()) -> list[dict]:
  """One row per (run, step, seed) with the evaluator's numbers on `split`; a floor row per seed (first run).

  steps: checkpoint steps to evaluate (None: the newest); sampler: "KEY=VALUE" overrides of every run's sampler.
  """
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
  rows = []
  for index, (spec, wanted_step) in enumerate((spec, step) for spec in specs for step in steps):
    config, workdir = run_config(spec)
    config = override_sampler(config, sampler)
    s, params, params_name, step = train.load_params(config, workdir, wanted_step)
    name = os.path.basename(os.path.normpath(workdir))
    block, condition = describe(config)
    for seed in seeds:
      # The floor and the real class match are the same for every run of a seed: measured with the first.
      evaluator = fvd_digits.Evaluator(classifier_workdir=classifier, num_videos=num_videos, batch_size=batch_size,
                                       seed=seed, floor=index == 0, split=split)
      context = evaluators.Context(setup=s, params=params, params_name=params_name, step=step, workdir=workdir,
                                   rng=jax.random.key(seed))
      metrics, _, generated = evaluator.measure(context)
      if index == 0:
        rows.append({"run": f"real {split} videos {(seed + 1) * num_videos}..{(seed + 2) * num_videos - 1}",
                     "block": "-", "condition": "-", "seed": seed, FVD_KEY: metrics.pop(FLOOR_KEY),
                     "class_match": metrics.pop("class_match_real"), "frames_per_s": None, "floor": True})
        print(json.dumps(rows[-1]), flush=True)
      rows.append({"run": name, "spec": spec, "block": block, "condition": condition, "seed": seed, "step": step,
                   "params": params_name, "split": split, "class_match": metrics.pop("class_match", None),
                   **metrics})
      print(json.dumps(rows[-1]), flush=True)
      if out_dir and seed == seeds[0]:
        from nbp import visualization  # pylint: disable=g-import-not-at-top
        suffix = f"_step{step}" if wanted_step is not None else ""
        visualization.save_frame_grid(os.path.join(out_dir, f"samples_{name}{suffix}.png"), generated.videos,
                                      max_videos=8, title=f"{name} ({block}, {condition}), step {step}, seed {seed}")
  return rows


def _spread(values, digits: int = 1) -> str:
  """"mean (sd)" over seeds (sd with one degree of freedom; "-" for one seed)."""
  values = np.asarray(values, np.float64)
  sd = f"{np.std(values, ddof=1):.{digits}f}" if len(values) > 1 else "-"
  return f"{np.mean(values):.{digits}f} ({sd})"


def table(rows: list[dict]) -> str:
  """The Markdown table: one line per run (the floor first), its seeds side by side."""
  lines = [f"| run | block | condition | {FVD_KEY} per seed | mean (sd) | frames/s | class match |",
           "|---|---|---|---|---|---|---|"]
  groups: dict[str, list[dict]] = {}
  several_steps = len({(r["spec"], r.get("step")) for r in rows if not r.get("floor")}) > len(
      {r["spec"] for r in rows if not r.get("floor")})
  for r in rows:
    label = "real videos (floor)" if r.get("floor") else r["spec"] + (f" @ {r.get('step')}" if several_steps else "")
    groups.setdefault(label, []).append(r)
  for label, group in groups.items():
    fps = [r["frames_per_s"] for r in group if r["frames_per_s"] is not None]
    fps_text = f"{min(fps):.0f}-{max(fps):.0f}" if fps else "-"
    matches = [r["class_match"] for r in group if r["class_match"] is not None]
    match_text = f"{np.mean(matches):.3f}" if matches else "-"
    per_seed = " / ".join(f"{r[FVD_KEY]:.1f}" for r in group)
    lines.append(f"| {label} | {group[0]['block']} | {group[0]['condition']} | {per_seed} | "
                 f"{_spread([r[FVD_KEY] for r in group])} | {fps_text} | {match_text} |")
  predicting = {label: group for label, group in groups.items() if "com_error_px" in group[0]}
  if predicting:
    lines += ["", "Frame prediction (the predicted frames against the true ones; mean (sd) over seeds):", "",
              "| run | centre-of-mass error (px) | repeat last given frame | pixel MSE | repeat last | black "
              "frames | empty predicted frames |", "|---|---|---|---|---|---|---|"]
    for label, group in predicting.items():
      cells = [_spread([r[k] for r in group], digits) for k, digits in (
          ("com_error_px", 2), ("com_error_px_repeat_last", 2), ("mse", 4), ("mse_repeat_last", 4),
          ("mse_black", 4), ("empty_frames", 3))]
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def save_curves(path: str, rows: list[dict]) -> None:
  """FVD against checkpoint step, one line per run (mean and sd over the seeds), the floor dashed."""
  from nbp import visualization  # pylint: disable=g-import-not-at-top
  curves = {}
  for spec in dict.fromkeys(r["spec"] for r in rows if not r.get("floor")):
    by_step: dict[int, list[float]] = {}
    for r in rows:
      if r.get("spec") == spec and not r.get("floor"):
        by_step.setdefault(r["step"], []).append(r[FVD_KEY])
    x = sorted(by_step)
    curves[spec] = (x, [float(np.mean(by_step[k])) for k in x],
                    [float(np.std(by_step[k], ddof=1)) if len(by_step[k]) > 1 else 0.0 for k in x])
  floors = [r[FVD_KEY] for r in rows if r.get("floor")]
  visualization.save_curves(path, curves, xlabel="training step", ylabel=FVD_KEY + " (mean, sd over seeds)",
                            floor=float(np.mean(floors)) if floors else None)


def main(argv):
  del argv
  if not RUNS.value:
    raise app.UsageError("give at least one --run WORKDIR (or CONFIG_FILE:ARG=WORKDIR)")
  seeds = [int(x) for x in SEEDS.value]
  classifier = parse_run(CLASSIFIER.value)[2]
  steps = [int(x) for x in STEPS.value] or [None]
  rows = benchmark(RUNS.value, classifier, num_videos=NUM_VIDEOS.value, batch_size=BATCH_SIZE.value,
                   seeds=seeds, out_dir=OUT_DIR.value, split=SPLIT.value, steps=steps, sampler=SAMPLER.value)
  print(f"\n{FVD_KEY}: N = {NUM_VIDEOS.value} videos per set against real {SPLIT.value} videos "
        f"0..{NUM_VIDEOS.value - 1}; "
        f"classifier {classifier}; batch {BATCH_SIZE.value}; {jax.default_backend()}, "
        f"{jax.device_count()} device(s)\n")
  print(table(rows))
  if OUT_DIR.value:
    with open(os.path.join(OUT_DIR.value, "results.json"), "w") as f:
      json.dump({"num_videos": NUM_VIDEOS.value, "batch_size": BATCH_SIZE.value, "classifier": classifier,
                 "split": SPLIT.value, "sampler": SAMPLER.value, "rows": rows}, f, indent=1)
    if len(steps) > 1:
      save_curves(os.path.join(OUT_DIR.value, "fvd_vs_steps.png"), rows)


if __name__ == "__main__":
  app.run(main)
