r"""The paradigms compared on one task at one training budget: one table, one plot.

  python -m experiments.compare --config experiments/configs/compare_digits.py:local \
      [--workdir runs/compare_digits_local]

In order, each step skipped where the workdir already holds it, so a rerun
resumes where the last one stopped:
  1. the judge: a video classifier of the contenders' videos
     (compare_digits.judge_config: video_classifier_digits.py:local,4x12
     locally), trained at config.classifier_workdir if absent;
  2. calibration: each contender's parameter count and the FLOPs of its
     compiled train step (XLA's count, per device: the step's share of
     each device on the data-parallel mesh); every contender trains for the
     training FLOPs of the reference's budget_steps steps;
  3. choices on validation: of each group in config.choices (NBP's block
     shapes other than the row), every candidate is trained at the first
     seed and measured as in 4 on the validation split; the one of lowest
     FVD takes part in the comparison, the others do not;
  4. training, per contender and seed, under workdir/runs/<name>_s<seed>
     (a run stopped mid-way resumes from its checkpoint; a run of another
     config there is refused);
  5. quality, per contender, sampler row and seed, on the test split: videos
     generated for the classes of real test videos N..2N-1, their in-domain
     FVD against real videos 0..N-1 (beside the distance between the two
     real sets, the floor), the share the judge finds the class asked for
     in, and next-frame prediction: the first `given_frames` frames of the
     videos N..2N-1 continued under their class, centre-of-mass error and
     pixel MSE of the predicted frames against the true ones (beside
     repeating the last given frame);
  6. cost, per contender and sampler row (training seed 0): training FLOPs
     and seconds, sequential model calls per video, frames/s of the whole
     jitted sampler at each speed batch beside its floor, and XLA's peak
     memory for it.
Results go to workdir/results.json after every row; at the end
workdir/table.md (means and standard deviations over seeds) and
workdir/pareto.png (quality against sampling cost).

The floor of a sampler: its sequential calls must each read the weights
(bytes / the bandwidth measured in the run), and together do at least the
arithmetic of the uncached forward passes over whole videos they amount to
(one for next-token and next-block prediction, a solver step's worth per
entity for xAR; XLA's FLOPs / the matmul rate measured in the run); the floor
is the larger.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, logging

from experiments import common
from experiments.configs import compare_digits
from nbp import contenders as contenders_lib
from nbp import roofline
from nbp import visualization
from nbp.evaluators import frame_prediction, frechet, fvd_digits, generation
from nbp.training import loop as train
from nbp.training import workdir as workdir_lib

QUALITY = ("fvd", "fvd_floor", "class_match", "com_error_px", "com_error_px_repeat_last", "mse", "mse_repeat_last")
GENERATION_BATCH = 64  # videos per sampler call when measuring quality


class Results:
  """workdir/results.json: the calibration and every measured row, written after each (atomically)."""

  def __init__(self, path: str):
    self.path = path
    self.data = {"calibration": None, "quality": {}, "cost": {}}
    if os.path.exists(path):
      with open(path) as f:
        self.data.update(json.load(f))

  def save(self) -> None:
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.data, f, indent=1, sort_keys=True)
    os.replace(tmp, self.path)


def judge_workdir(c) -> str:
  """The judge's workdir: trained there (compare_digits.judge_config) if it holds no finished run."""
  workdir = c.classifier_workdir
  if not os.path.exists(os.path.join(workdir, workdir_lib.CONFIG_FILE)):
    train.train_and_evaluate(compare_digits.judge_config(c), workdir)
  return workdir


def calibrate(c) -> dict:
  """Per contender: parameters, step FLOPs and the steps that spend the reference's training FLOPs."""
  out = {}
  for name in c.contenders:
    config = compare_digits.contender_config(c, name, seed=0)
    out[name] = {"params": contenders_lib.num_params(config), "step_flops": contenders_lib.train_step_flops(config)}
  budget = out[c.reference]["step_flops"] * c.budget_steps
  for row in out.values():
    row["steps"] = max(1, int(round(budget / row["step_flops"])))
    row["train_flops"] = row["steps"] * row["step_flops"]
  return out


def trained(c, name: str, seed: int, steps: int, workdir: str) -> str:
  """The run of contender `name` and `seed` under workdir/runs, trained (or resumed) to `steps` steps."""
  config = compare_digits.contender_config(c, name, seed, num_steps=steps)
  run_dir = os.path.join(workdir, "runs", f"{name}_s{seed}")
  changed = workdir_lib.changed_keys(run_dir, config)
  if changed:
    raise ValueError(f"{run_dir} holds a run of another config (changed: {', '.join(changed[:6])}); give another "
                     "--workdir or remove that run.")
  result = train.train_and_evaluate(config, run_dir)
  if result.get("status") != "done":
    raise RuntimeError(f"{run_dir}: training stopped at step {result.get('step')}; run again to resume it.")
  return run_dir


def _batched(fn, n: int, *arrays):
  """fn over rows of `arrays` in batches of GENERATION_BATCH (the last one padded), concatenated to n rows."""
  out = []
  for i in range(0, n, GENERATION_BATCH):
    rows = [frechet.pad_rows(a[i:i + GENERATION_BATCH], min(GENERATION_BATCH, n)) for a in arrays]
    out.append(fn(i, *rows))
  return np.concatenate(out)[:n]


def quality(c, contender: contenders_lib.Contender, judge: fvd_digits.Judge, seed: int, split: str) -> dict:
  """FVD (and its floor), class match and next-frame figures of one contender, sampler row and seed, measured
  against real videos of `split`."""
  data = contender.config.data
  n = c.num_videos
  reference = generation.real_videos(data, 0, n, split)
  stand_in = generation.real_videos(data, n, n, split)
  if reference["video"].shape[1:] != contender.video_shape:
    raise ValueError(f"the contender's videos are {contender.video_shape}, the real ones "
                     f"{reference['video'].shape[1:]}")
  rng = jax.random.key(seed)
  videos = _batched(lambda i, labels: contender.generate(jax.random.fold_in(rng, i), labels), n, stand_in["class"])
  given = c.given_frames
  continued = _batched(lambda i, labels, video: contender.continue_frames(
      jax.random.fold_in(rng, 10_000 + i), labels, video[:, :given]), n, stand_in["class"], stand_in["video"])
  real_features = judge.features(reference["video"])
  out = {"fvd": frechet.frechet_distance_of_features(real_features, judge.features(videos)),
         "fvd_floor": frechet.frechet_distance_of_features(real_features, judge.features(stand_in["video"])),
         "class_match": fvd_digits.class_match(judge.logits(videos), stand_in["label"])}
  frames = generation.frame_prediction_metrics(stand_in["video"], continued, given)
  out.update({k: frames[k] for k in ("com_error_px", "com_error_px_repeat_last", "mse", "mse_repeat_last")})
  out.update(frame_prediction.motion_floor_metrics(data, given))
  return out


def choose(c, cal: dict, judge: fvd_digits.Judge, workdir: str, results: Results) -> dict[str, str]:
  """Per group of c.choices, the candidate whose best sampler row has the lowest FVD on c.choice_split (each
  trained at the first seed, the run the comparison then reuses); the figures go to results["choice"]."""
  seed = c.seeds[0]
  figures = results.data.setdefault("choice", {})
  chosen = results.data.setdefault("chosen", {})
  for group, names in c.choices.items():
    for name in names:
      run_dir = trained(c, name, seed, cal[name]["steps"], workdir)
      for row, sampler in c.contenders[name].samplers.items():
        if f"{name}/{row}" not in figures:
          contender = contenders_lib.load(run_dir, sampler.to_dict())
          figures[f"{name}/{row}"] = quality(c, contender, judge, seed, c.choice_split)
          results.save()
    best = min(names, key=lambda n: min(figures[f"{n}/{r}"]["fvd"] for r in c.contenders[n].samplers))
    if chosen.get(group) != best:
      chosen[group] = best
      logging.info("%s: %s chosen on %s", group, best, c.choice_split)
      results.save()
  return chosen


def compared(c, chosen: dict[str, str]) -> list[str]:
  """The contenders of the comparison: every one outside c.choices, and each group's chosen candidate."""
  candidates = {name for names in c.choices.values() for name in names}
  return [name for name in c.contenders if name not in candidates or name in chosen.values()]


def cost(c, contender: contenders_lib.Contender, machine: roofline.Machine) -> dict:
  """Sampling speed against its floor at each speed batch, sequential calls and XLA's peak memory."""
  frames = contender.video_shape[0]
  calls = contender.sequential_calls()
  out = {"calls_generation": calls, "calls_continuation": contender.sequential_calls(c.given_frames)}
  weight_bytes = roofline.tree_bytes(contender.params)
  for batch in c.speed_batches:
    compiled, args = contender.compiled_sampler(batch)
    jax.block_until_ready(compiled(*args))
    seconds = roofline.median_seconds(lambda: compiled(*args), c.speed_repeats)
    floor = roofline.floor(calls * weight_bytes, contender.sampler_flops(batch), machine)
    memory = compiled.memory_analysis()
    out[f"b{batch}"] = {
        "frames_per_s": batch * frames / seconds, "floor_frames_per_s": batch * frames / floor.seconds,
        "of_floor": seconds / floor.seconds, "floor_bound": floor.bound,
        "peak_bytes": int(memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                          - memory.alias_size_in_bytes)}
  return out


def _mean_sd(values: list[float]) -> str:
  values = [v for v in values if v is not None and np.isfinite(v)]
  if not values:
    return ""
  return f"{np.mean(values):.3f}" + (f" ({np.std(values):.3f})" if len(values) > 1 else "")


def table(c, results: dict) -> str:
  """The markdown table: one line per compared contender and sampler row; then the choices on validation."""
  cal = results["calibration"]
  batches = list(c.speed_batches)
  head = ["contender", "sampler", "params", "train GFLOPs per device", "train s", "FVD", "class match",
          "CoM error (px)", "MSE", "calls/video", *[f"frames/s b{b} (floor)" for b in batches],
          f"peak MiB b{batches[-1]}"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name in compared(c, results.get("chosen", {})):
    for row in c.contenders[name].samplers:
      seeds = [results["quality"].get(f"{name}/{row}/s{seed}") for seed in c.seeds]
      seeds = [s for s in seeds if s]
      price = results["cost"].get(f"{name}/{row}", {})
      if not seeds:
        continue
      speeds = [f"{price[f'b{b}']['frames_per_s']:.1f} ({price[f'b{b}']['floor_frames_per_s']:.1f})"
                if f"b{b}" in price else "" for b in batches]
      memory = price.get(f"b{batches[-1]}", {}).get("peak_bytes")
      lines.append("| " + " | ".join([
          name, row, f"{cal[name]['params']:,}", f"{cal[name]['train_flops'] / 1e9:.1f}",
          _mean_sd([results["train_seconds"].get(f"{name}/s{seed}") for seed in c.seeds]),
          *[_mean_sd([s[k] for s in seeds]) for k in ("fvd", "class_match", "com_error_px", "mse")],
          str(price.get("calls_generation", "")), *speeds,
          f"{memory / 2**20:.1f}" if memory else ""]) + " |")
  # The real sets do not depend on the contender or the seed: one floor, one repeat-last figure.
  real = next(iter(results["quality"].values()), None)
  if real:
    lines.append(f"\nReal against real test videos (the FVD floor): {real['fvd_floor']:.3f}. Repeating the last "
                 f"given frame: CoM error {real['com_error_px_repeat_last']:.3f} px, MSE "
                 f"{real['mse_repeat_last']:.4f}.")
  for group, names in c.choices.items():
    floor = results["choice"][f"{names[0]}/{next(iter(c.contenders[names[0]].samplers))}"]["fvd_floor"]
    lines.append(f"\n{group}: {results['chosen'][group]} chosen on the {c.choice_split} split (seed {c.seeds[0]}, "
                 f"lowest FVD; real against real {floor:.3f}):\n\n"
                 "| candidate | sampler | FVD | class match | CoM error (px) | MSE |\n|---|---|---|---|---|---|")
    for name in names:
      for row in c.contenders[name].samplers:
        f = results["choice"][f"{name}/{row}"]
        lines.append(f"| {name} | {row} | {f['fvd']:.3f} | {f['class_match']:.3f} | {f['com_error_px']:.3f} | "
                     f"{f['mse']:.4f} |")
  return "\n".join(lines) + "\n"


def pareto_plot(c, results: dict, path: str) -> None:
  """FVD against sequential calls per video, one point per contender and sampler row (mean and sd over seeds)."""
  points = []
  for name in compared(c, results.get("chosen", {})):
    for row in c.contenders[name].samplers:
      seeds = [results["quality"][k] for k in results["quality"] if k.startswith(f"{name}/{row}/")]
      calls = results["cost"].get(f"{name}/{row}", {}).get("calls_generation")
      if seeds and calls:
        fvds = [s["fvd"] for s in seeds]
        points.append((calls, float(np.mean(fvds)), float(np.std(fvds)), f"{name} ({row})"))
  floors = [s["fvd_floor"] for s in results["quality"].values()]
  visualization.save_pareto(path, points, xlabel="sequential model calls per video",
                            ylabel="in-domain FVD (lower is better)", floor=float(np.mean(floors)) if floors else None)


def run(c, workdir: str) -> dict:
  """Every step of the module docstring; returns results.json's dict."""
  os.makedirs(workdir, exist_ok=True)
  results = Results(os.path.join(workdir, "results.json"))
  judge = fvd_digits.load_judge(judge_workdir(c), GENERATION_BATCH)
  if results.data["calibration"] is None:
    results.data["calibration"] = calibrate(c)
    results.save()
  cal = results.data["calibration"]
  results.data.setdefault("train_seconds", {})
  chosen = choose(c, cal, judge, workdir, results)
  machine = None
  for seed in c.seeds:
    for name in compared(c, chosen):
      spec = c.contenders[name]
      run_dir = trained(c, name, seed, cal[name]["steps"], workdir)
      results.data["train_seconds"][f"{name}/s{seed}"] = contenders_lib.training_seconds(run_dir)
      for row, sampler in spec.samplers.items():
        contender = contenders_lib.load(run_dir, sampler.to_dict())
        key = f"{name}/{row}/s{seed}"
        if key not in results.data["quality"]:
          start = time.perf_counter()
          results.data["quality"][key] = quality(c, contender, judge, seed, c.split)
          logging.info("%s measured in %.1f s", key, time.perf_counter() - start)
          results.save()
        if seed == c.seeds[0] and f"{name}/{row}" not in results.data["cost"]:
          machine = machine or roofline.Machine(roofline.measure_bandwidth(), roofline.peak_matmul_rate())
          results.data["cost"][f"{name}/{row}"] = cost(c, contender, machine)
          results.save()
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(table(c, results.data))
  pareto_plot(c, results.data, os.path.join(workdir, "pareto.png"))
  return results.data


def main(argv):
  del argv
  common.initialize()
  c = common.CONFIG.value or compare_digits.get_config("local")
  workdir = common.WORKDIR.value or c.workdir
  run(c, workdir)
  with open(os.path.join(workdir, "table.md")) as f:
    print(f.read())


if __name__ == "__main__":
  app.run(main)
