r"""xAR on digits: in-domain FID per entity kind at one training budget, and images/s of 4 entities vs 64.

  python -m experiments.benchmark_xar --image_classifier runs/image_classifier_digits \
      [--kinds cell,token,subsample,scale,image,cell:tf] [--train_seeds 0,1,2] [--variant S] \
      [--num_steps 500] [--num_images 360] [--runs_dir runs/xar_benchmark] [--speed_only]

Quality. For every kind (an entity of xar_digits.py; "KIND:tf" trains it with
teacher forcing, i.e. clean context) and training seed, one run of
xar_digits.py:KIND,VARIANT with `--num_steps` steps (the same budget for all;
a finished run in runs_dir is reused), then the `fid_digits` evaluator
(nbp/evaluators/fid_digits.py): N generated images against the N real test
images, judged by the digit image classifier of `--image_classifier`
(image_classifier_digits.py), with the real-vs-real floor (N train images
against the same test images) printed beside. Every run samples with the
same settings (the config's sampler: SDE, 20 steps per entity, no guidance).

Speed (`--speed_only` runs just this part). The same network (variant, width,
depth, the same parameters) sampling with 4 cell entities and with 64 token
entities (flow-matching next-token AR), both with the same solver steps per
entity, jitted whole, at each batch of `--speed_batches`; calls interleaved, `--speed_repeats`
of each, block_until_ready per call; images/s and their ratio. Run it on an
idle machine: the ratio is measured side by side, absolute times are noisy.

Prints one JSON line per run, then Markdown tables (mean and sd over seeds).

Dimensions: N images, B sampler batch.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.configs import xar_digits
from nbp import evaluators
from nbp.evaluators import fid_digits
from nbp.models.xar import XAR
from nbp.tasks import xar
from nbp.training import loop as train

CLASSIFIER = flags.DEFINE_string("image_classifier", "runs/image_classifier_digits", "Workdir of the digit image classifier.")
KINDS = flags.DEFINE_list("kinds", ["cell", "token", "subsample", "scale", "image", "cell:tf"],
                          "Entity kinds to train; KIND:tf with teacher forcing.")
SEEDS = flags.DEFINE_list("train_seeds", ["0", "1", "2"], "Training seeds (one run each).")
VARIANT = flags.DEFINE_string("variant", "S", "nbp.models.xar.SIZES key of every run.")
NUM_STEPS = flags.DEFINE_integer("num_steps", 500, "Training steps of every run (batch 32).")
NUM_IMAGES = flags.DEFINE_integer("num_images", 360, "N: generated and real images per set (the test split has 360).")
OUT_DIR = flags.DEFINE_string("runs_dir", "runs/xar_benchmark", "Run workdirs and results.json.")
DATA_DIR = flags.DEFINE_string("data_dir", "data", "tfds data dir of the digits.")
SPEED_ONLY = flags.DEFINE_bool("speed_only", False, "Only the images/s comparison.")
SPEED_BATCHES = flags.DEFINE_list("speed_batches", ["1", "16"], "Images per sampler call in the speed comparison.")
SPEED_STEPS = flags.DEFINE_integer("speed_solver_steps", 20, "Solver steps per entity in the speed comparison.")
REPEATS = flags.DEFINE_integer("speed_repeats", 5, "Timed calls per sampler in the speed comparison.")


def run_config(kind: str, seed: int):
  """xar_digits.py's config of a kind ("cell", "cell:tf") and seed at the benchmark's budget."""
  name, _, mode = kind.partition(":")
  config = xar_digits.get_config(",".join([name, VARIANT.value] + (["tf"] if mode == "tf" else [])))
  config.unlock()
  config.seed = seed
  config.num_steps = NUM_STEPS.value
  config.data.dir = DATA_DIR.value
  config.checkpoint_every = NUM_STEPS.value
  config.evals.eval.every = 0
  del config.evals["sample"]  # the FID below draws the samples
  return config


def quality(kinds, seeds) -> list[dict]:
  rows = []
  for kind in kinds:
    for seed in seeds:
      config = run_config(kind, seed)
      workdir = os.path.join(OUT_DIR.value, f"{kind.replace(':', '_')}_seed{seed}")
      start = time.perf_counter()
      result = train.train_and_evaluate(config, workdir)
      train_seconds = time.perf_counter() - start
      s, params, params_name, step = train.load_params(config, workdir)
      evaluator = fid_digits.Evaluator(classifier_workdir=CLASSIFIER.value, num_images=NUM_IMAGES.value, seed=0,
                                       floor=not rows)
      context = evaluators.Context(setup=s, params=params, params_name=params_name, step=step, workdir=workdir,
                                   rng=jax.random.key(0))
      metrics = evaluator.run(context)
      row = {"kind": kind, "seed": seed, "step": step, "params": params_name, "train_loss": result.get("loss"),
             "train_seconds": train_seconds, **metrics}
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def _spread(values, digits=2) -> str:
  values = np.asarray(values, np.float64)
  sd = f"{np.std(values, ddof=1):.{digits}f}" if len(values) > 1 else "-"
  return f"{np.mean(values):.{digits}f} ({sd})"


def quality_table(rows) -> str:
  key = fid_digits.FID_KEY
  lines = [f"| entities | context | {key} per seed | mean (sd) | class match |", "|---|---|---|---|---|"]
  floor = [r[key + "_floor"] for r in rows if key + "_floor" in r]
  if floor:
    lines.append(f"| real train images (floor) | - | {floor[0]:.2f} | - | - |")
  groups: dict[str, list[dict]] = {}
  for r in rows:
    groups.setdefault(r["kind"], []).append(r)
  for kind, group in groups.items():
    name, _, mode = kind.partition(":")
    per_seed = " / ".join(f"{r[key]:.2f}" for r in group)
    matches = [r["class_match"] for r in group if "class_match" in r]
    match = f"{np.mean(matches):.3f}" if matches else "-"
    lines.append(f"| {name} | {'clean (teacher forcing)' if mode == 'tf' else 'noisy'} | {per_seed} | "
                 f"{_spread([r[key] for r in group])} | {match} |")
  return "\n".join(lines)


def speed(batch: int) -> dict:
  """Images/s of the same network with 4 cells and with 64 tokens as entities (module docstring)."""
  base = dict(token_dim=4, grid=(8, 8), num_classes=10, variant=VARIANT.value)
  models = {"cell (4 entities)": XAR(entity="cell", cell=4, **base), "token (64 entities)": XAR(entity="token", **base)}
  first = next(iter(models.values()))
  params = first.init(jax.random.key(0), jnp.zeros((1, 64, 4)), jnp.zeros((1, 64)), jnp.zeros((1,), jnp.int32))
  samplers = {}
  for name, model in models.items():
    fn = jax.jit(lambda p, r, m=model: xar.sample(m, p, r, num_samples=batch, num_steps=SPEED_STEPS.value))
    jax.block_until_ready(fn(params["params"], jax.random.key(0)))  # compile, then one untimed call
    jax.block_until_ready(fn(params["params"], jax.random.key(1)))
    samplers[name] = fn
  seconds = {name: [] for name in samplers}
  for i in range(REPEATS.value):
    for name, fn in samplers.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(params["params"], jax.random.key(2 + i)))
      seconds[name].append(time.perf_counter() - start)
  rates = {name: batch / np.median(s) for name, s in seconds.items()}
  names = list(rates)
  return {"images_per_s": rates, "ratio": rates[names[0]] / rates[names[1]], "batch": batch,
          "solver_steps": SPEED_STEPS.value, "repeats": REPEATS.value, "variant": VARIANT.value}


def main(argv):
  del argv
  os.makedirs(OUT_DIR.value, exist_ok=True)
  results = {}
  if not SPEED_ONLY.value:
    rows = quality(KINDS.value, [int(s) for s in SEEDS.value])
    results["quality"] = rows
    print(f"\n{fid_digits.FID_KEY}: N = {NUM_IMAGES.value} generated vs real test images; xar_digits.py:KIND,"
          f"{VARIANT.value}, {NUM_STEPS.value} steps of batch 32 per run; classifier {CLASSIFIER.value}\n")
    print(quality_table(rows))
  results["speed"] = [speed(int(b)) for b in SPEED_BATCHES.value]
  r = results["speed"][0]
  print(f"\nSampling speed, xAR {r['variant']} (the same parameters), {r['solver_steps']} solver steps per entity, "
        f"median of {r['repeats']} interleaved calls, {jax.default_backend()}:\n")
  names = list(r["images_per_s"])
  print(f"| batch | {names[0]} images/s | {names[1]} images/s | ratio |\n|---|---|---|---|")
  for r in results["speed"]:
    rates = r["images_per_s"]
    print(f"| {r['batch']} | {rates[names[0]]:.1f} | {rates[names[1]]:.1f} | {r['ratio']:.1f}x |")
  with open(os.path.join(OUT_DIR.value, "results.json"), "w") as f:
    json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
  app.run(main)
