r"""xAR on digits: entity kinds, what the sampler caches as context, latents, the network switches, and speed.

  python -m experiments.benchmark_xar --xar_parts kinds,context,posterior,switches,speed \
      [--image_classifier runs/image_classifier_digits] [--kinds cell,token,subsample,scale,image,cell:tf] \
      [--train_seeds 0,1,2] [--variant S] [--num_steps 1500] [--guidance_scales 1,3] \
      [--xar_splits validation] [--runs_dir runs/xar_benchmark] [--speed_profile DIR] [--smoke]

Every quality figure is the `fid_digits` evaluator (nbp/evaluators/fid_digits.py):
N generated images against N real images of a split, judged by the digit
image classifier of `--image_classifier` (image_classifier_digits.py; trained
there first if absent), with the real-vs-real floor (N train images against
the same reference) and the class match (the share of samples the classifier
reads as the digit asked for; real images score about 0.99). N is the whole
split: 144 validation images, 360 test images. Choices are made on
validation (`--xar_splits validation`, the default); the test split is evaluated
once, for the settings chosen, with `--xar_splits test` (the same runs, reused).
Sampling is deterministic (fixed keys and classes), so a table re-measured
from the same checkpoints gives the same numbers. A finished run in
runs_dir is reused.

Parts (`--xar_parts`, any of):
  kinds      every kind of `--kinds` ("KIND:tf": teacher forcing) and training
             seed, xar_digits.py:KIND,VARIANT for `--num_steps` steps, sampled
             with the config's sampler at each guidance scale of
             `--guidance_scales` (1: no guidance).
  context    the cell runs of `kinds` (trained if absent), sampled with each
             context mode of nbp/samplers/xar.py ("clean", "t_end", and
             "fixed" at each level of `--context_levels`): the same
             checkpoints, only the sampler differs.
  posterior  kl_vae_digits.py's VAE (trained into runs_dir/kl_vae if absent),
             its latents encoded with both moments (runs_dir/latents), and
             xar_digits.py:cell,VARIANT,latents trained on the posterior mean
             and on a posterior draw per step.
  switches   the differences from the official network (nbp.models.xar.OFFICIAL),
             each switched alone on the cell config, against the default.
  speed      images/s of the same network sampling 4 cell entities and 64
             token entities (same parameters, same solver steps per entity,
             the context mode of xar_digits.py), jitted whole, calls
             interleaved, `--speed_repeats` of each at each batch of
             `--speed_batches`. Run it on an idle machine: the ratio is
             measured side by side, absolute times are noisy. Beside each,
             the milliseconds of one solver call (the sampler's time over
             its model calls) against that call's floor (nbp.roofline): the
             weights and the cache it attends over (the mean over the
             entities) at the bandwidth measured in the run, or the FLOPs
             XLA counts for one call compiled alone at that cache length at
             the matmul rate of the call's own rows (batch x entity
             tokens), whichever is larger.

`--smoke` runs every part asked for at a tiny size (variant tiny, 2 steps,
16 images, 2 solver steps, one seed, a 2-step classifier) under
runs_dir/smoke: it checks that the script works, not what it measures.

Prints one JSON line per measurement, then Markdown tables (mean and sd over
seeds); everything is also written to runs_dir/results.json.

Dimensions: N images, B sampler batch.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from experiments.configs import image_classifier_digits, kl_vae_digits, xar_digits
from nbp import decoding, evaluators, profiling, roofline
from nbp.evaluators import fid_digits
from nbp.models import xar as xar_model
from nbp.models.xar import XAR
from nbp.samplers import xar as sampler_lib
from nbp.tasks import kl_vae
from nbp.training import loop as train
from nbp.training import workdir as workdir_lib

PARTS = ("kinds", "context", "posterior", "switches", "speed")
SPLIT_IMAGES = {"validation": xar_digits.VALIDATION_IMAGES, "test": 360}  # N: the whole split

PARTS_FLAG = flags.DEFINE_list("xar_parts", ["kinds", "speed"], f"Which parts to run, of {PARTS}.")
CLASSIFIER = flags.DEFINE_string("image_classifier", "runs/image_classifier_digits",
                                 "Workdir of the digit image classifier (trained there first if absent).")
KINDS = flags.DEFINE_list("kinds", ["cell", "token", "subsample", "scale", "image", "cell:tf"],
                          "Entity kinds of the kinds part; KIND:tf with teacher forcing.")
SEEDS = flags.DEFINE_list("train_seeds", ["0", "1", "2"], "Training seeds (one run each).")
VARIANT = flags.DEFINE_string("variant", "S", "nbp.models.xar.SIZES key of every run.")
NUM_STEPS = flags.DEFINE_integer("num_steps", 1500, "Training steps of every run (batch 32): the config's own.")
GUIDANCE = flags.DEFINE_list("guidance_scales", ["1", "3"], "Guidance scales sampled (1: no guidance).")
CONTEXT_LEVELS = flags.DEFINE_list("context_levels", ["0.1", "0.3"], "context_t of the 'fixed' context mode.")
SPLITS = flags.DEFINE_list("xar_splits", ["validation"], "Reference splits: validation (choices), test (once).")
OUT_DIR = flags.DEFINE_string("runs_dir", "runs/xar_benchmark", "Run workdirs and results.json.")
DATA_DIR = flags.DEFINE_string("data_dir", "data", "tfds data dir of the digits.")
SMOKE = flags.DEFINE_bool("smoke", False, "Every part at a tiny size under runs_dir/smoke (checks the script).")
SPEED_BATCHES = flags.DEFINE_list("speed_batches", ["1", "16"], "Images per sampler call in the speed comparison.")
SPEED_STEPS = flags.DEFINE_integer("speed_solver_steps", 20, "Solver steps per entity in the speed comparison.")
PROFILE = flags.DEFINE_string("speed_profile", "", "If set, a directory where each solver call of the speed "
                              "comparison is traced; where its time goes is printed (nbp.profiling).")
REPEATS = flags.DEFINE_integer("speed_repeats", 5, "Timed calls per sampler in the speed comparison.")


def runs_dir() -> str:
  return os.path.join(OUT_DIR.value, "smoke") if SMOKE.value else OUT_DIR.value


def budget(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The benchmark's training budget, data dir and evaluators on a config (unlocked, returned)."""
  config.unlock()
  config.data.dir = DATA_DIR.value
  config.num_steps = 2 if SMOKE.value else NUM_STEPS.value
  config.checkpoint_every = config.num_steps
  config.evals = ml_collections.ConfigDict()  # the FID below draws the samples
  if SMOKE.value:
    config.batch_size, config.log_every, config.optimizer.warmup_steps = 4, 1, 1
  return config


def xar_config(arg: str, seed: int, **overrides) -> ml_collections.ConfigDict:
  """xar_digits.py:ARG,VARIANT at the benchmark's budget; overrides are dotted keys ("model.dropout": 0.1)."""
  config = budget(xar_digits.get_config(f"{arg},{'tiny' if SMOKE.value else VARIANT.value}"))
  config.seed = seed
  if SMOKE.value:
    config.sampler.num_steps = 2
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def trained(config, name: str) -> str:
  """The workdir runs_dir/NAME with `config` trained to its last step (a finished run resumes at its end)."""
  workdir = os.path.join(runs_dir(), name)
  start = time.perf_counter()
  result = train.train_and_evaluate(config, workdir)
  print(json.dumps({"trained": name, "step": result.get("step"), "seconds": time.perf_counter() - start}),
        flush=True)
  if result.get("status") != "done" or result.get("step") != config.num_steps:
    raise RuntimeError(f"{workdir}: training stopped at step {result.get('step')} of {config.num_steps} "
                       f"({result.get('status')}); run the benchmark again to resume it.")
  return workdir


def classifier() -> str:
  """The judge's workdir: --image_classifier, trained there with image_classifier_digits.py if absent."""
  workdir = os.path.join(runs_dir(), "image_classifier") if SMOKE.value else CLASSIFIER.value
  if not os.path.exists(os.path.join(workdir, workdir_lib.CONFIG_FILE)):
    config = image_classifier_digits.get_config("")
    config.unlock()
    config.data.dir = DATA_DIR.value
    if SMOKE.value:
      config.num_steps, config.checkpoint_every, config.batch_size = 2, 2, 8
      config.evals = ml_collections.ConfigDict()
    train.train_and_evaluate(config, workdir)
  return workdir


def measure(config, workdir: str, split: str, **sampler) -> dict:
  """fid_digits on `split` of the run in `workdir`, its sampler's keys replaced by `sampler`."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.sampler.update(sampler)
  s, params, params_name, step = train.load_params(config, workdir)
  num_images = 16 if SMOKE.value else SPLIT_IMAGES[split]
  evaluator = fid_digits.Evaluator(classifier_workdir=classifier(), num_images=num_images, seed=0, floor=True,
                                   split=split)
  context = evaluators.Context(setup=s, params=params, params_name=params_name, step=step, workdir=workdir,
                               rng=jax.random.key(0))
  metrics = evaluator.run(context)
  return {"step": step, "params": params_name, "split": split, "num_images": num_images, **sampler,
          **{k: metrics[k] for k in (fid_digits.FID_KEY, fid_digits.FID_KEY + "_floor", "class_match")}}


def guidance_settings() -> list[dict]:
  return [{"guidance_scale": float(g)} for g in GUIDANCE.value]


def seeds() -> list[int]:
  return [0] if SMOKE.value else [int(s) for s in SEEDS.value]


def emit(rows: list[dict], row: dict) -> None:
  rows.append(row)
  print(json.dumps(row, default=float), flush=True)


# ---------------------------------------------------------------------------
# The parts.


def kind_config(kind: str, seed: int):
  name, _, mode = kind.partition(":")
  return xar_config(name + (",tf" if mode == "tf" else ""), seed)


def run_name(what: str, seed: int) -> str:
  return f"{what.replace(':', '_')}_{'tiny' if SMOKE.value else VARIANT.value}_{NUM_STEPS.value}_seed{seed}"


def kinds_part() -> list[dict]:
  rows = []
  for kind in (["cell"] if SMOKE.value else KINDS.value):
    for seed in seeds():
      config = kind_config(kind, seed)
      workdir = trained(config, run_name(kind, seed))
      for split in SPLITS.value:
        for setting in guidance_settings():
          emit(rows, {"part": "kinds", "kind": kind, "seed": seed, **measure(config, workdir, split, **setting)})
  return rows


def context_part() -> list[dict]:
  rows = []
  modes = [{"context": "clean"}, {"context": "t_end"}]
  modes += [{"context": "fixed", "context_t": float(c)} for c in CONTEXT_LEVELS.value]
  for seed in seeds():
    config = kind_config("cell", seed)
    workdir = trained(config, run_name("cell", seed))
    for split in SPLITS.value:
      for mode in modes:
        for setting in guidance_settings():
          emit(rows, {"part": "context", "kind": "cell", "seed": seed,
                      **measure(config, workdir, split, **mode, **setting)})
  return rows


def latent_dir() -> str:
  """runs_dir/latents: kl_vae_digits.py's VAE (trained into runs_dir/kl_vae if absent), its moments encoded."""
  directory = os.path.join(runs_dir(), "latents")
  vae = os.path.join(runs_dir(), "kl_vae")
  config = budget(kl_vae_digits.get_config("local"))
  config.num_steps = 2 if SMOKE.value else kl_vae_digits.get_config("local").num_steps
  config.checkpoint_every = config.num_steps
  trained(config, "kl_vae")
  metadata_path = os.path.join(directory, "metadata.json")
  metadata = {}
  if os.path.exists(metadata_path):
    with open(metadata_path) as f:
      metadata = json.load(f)
  if not metadata.get("moments"):  # absent, or an old cache of means only
    kl_vae.encode_latents(vae, directory, batch_size=256)
  return directory


def posterior_part() -> list[dict]:
  rows, directory = [], latent_dir()
  for posterior in ("mean", "sample"):
    for seed in seeds():
      config = xar_config("cell,latents", seed, **{"data.latent_dir": directory, "loss.posterior": posterior})
      workdir = trained(config, run_name(f"cell_latents_{posterior}", seed))
      for split in SPLITS.value:
        for setting in guidance_settings():
          emit(rows, {"part": "posterior", "posterior": posterior, "seed": seed,
                      **measure(config, workdir, split, **setting)})
  return rows


def switches_part() -> list[dict]:
  rows = []
  switches = [("default", {})] + [(key, {f"model.{key}": value}) for key, value in xar_model.OFFICIAL.items()]
  for name, overrides in switches:
    for seed in seeds():
      config = xar_config("cell", seed, **overrides)
      workdir = trained(config, run_name("cell" if name == "default" else f"cell_{name}", seed))
      for split in SPLITS.value:
        for setting in guidance_settings():
          emit(rows, {"part": "switches", "switch": name, "value": str(next(iter(overrides.values()), "")),
                      "seed": seed, **measure(config, workdir, split, **setting)})
  return rows


def solver_call_floor(model, params, batch: int, context: str, bandwidth: float, repeats: int) -> dict:
  """One solver call of `model`'s sampler at `batch` against its floor: {"calls", "floor"} (module docstring)."""
  ents = model.entities
  length, c = ents.sizes[0], model.token_dim
  calls = ents.num_entities * (SPEED_STEPS.value if not SMOKE.value else 2) + (
      ents.num_entities if context != "t_end" else 0)  # one more call per entity writes its context
  example = (jnp.zeros((batch, 1, c)), jnp.zeros((batch, 1)), jnp.zeros((batch,), jnp.int32))
  slot_bytes = (roofline.tree_bytes(decoding.init_cache(model, 2, *example))
                - roofline.tree_bytes(decoding.init_cache(model, 1, *example)))
  attended = [(k + 1) * length for k in range(ents.num_entities)]  # entity k sees slots 0 .. (k + 1) L - 1
  mean_len = int(round(np.mean(attended)))

  def call(params, cache, x, t, labels):  # the sampler's velocity: one entity at the last slots of the cache
    slots = jnp.broadcast_to(mean_len - length + jnp.arange(length, dtype=jnp.int32), (batch, length))
    return decoding.apply_decoding(model, params, cache, x, t, labels, slots=slots)

  cache = decoding.init_cache(model, mean_len, *example)
  args = (params, cache, jnp.zeros((batch, length, c)), jnp.zeros((batch, length)), example[2])
  compiled = jax.jit(call).lower(*args).compile()
  if PROFILE.value:  # calls as the sampler makes them: in a loop carrying the cache and the entity
    def body(i, params, carry):
      cache, x = carry
      velocity, cache = call(params, cache, x, args[3] + 0.01 * i, args[4])  # t moves, as the solver's does
      return cache, x + 0.01 * velocity

    name = f"{ents.num_entities}_entities_batch{batch}"
    profiling.print_summary(f"solver call, {name}", profiling.profile_steps(
        body, params, (cache, args[2]), 8, repeats, os.path.join(PROFILE.value, name)))
  rate = roofline.measure_matmul_rate(batch * length, model.embed_dim, xar_model.mlp_dim(model.embed_dim),
                                      repeats=repeats)
  return {"calls": calls, "floor": roofline.floor(
      roofline.tree_bytes(params) + slot_bytes * float(np.mean(attended)), roofline.compiled_flops(compiled),
      roofline.Machine(bandwidth, rate))}


def speed(batch: int, bandwidth: float) -> dict:
  """Images/s of the same network with 4 cells and with 64 tokens as entities, and each call against its floor."""
  variant = "tiny" if SMOKE.value else VARIANT.value
  base = dict(token_dim=4, grid=(8, 8), num_classes=10, variant=variant)
  models = {"cell (4 entities)": XAR(entity="cell", cell=4, **base), "token (64 entities)": XAR(entity="token", **base)}
  first = next(iter(models.values()))
  params = first.init(jax.random.key(0), jnp.zeros((1, 64, 4)), jnp.zeros((1, 64)), jnp.zeros((1,), jnp.int32))
  steps = 2 if SMOKE.value else SPEED_STEPS.value
  context = xar_digits.get_config("cell").sampler.context  # the config's cache, with its extra call or not
  repeats = 1 if SMOKE.value else REPEATS.value
  samplers = {}
  for name, model in models.items():
    fn = jax.jit(lambda p, r, m=model: sampler_lib.sample(m, p, r, num_samples=batch, num_steps=steps,
                                                          context=context))
    jax.block_until_ready(fn(params["params"], jax.random.key(0)))  # compile, then one untimed call
    jax.block_until_ready(fn(params["params"], jax.random.key(1)))
    samplers[name] = fn
  seconds = {name: [] for name in samplers}
  for i in range(repeats):
    for name, fn in samplers.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(params["params"], jax.random.key(2 + i)))
      seconds[name].append(time.perf_counter() - start)
  rates = {name: batch / np.median(s) for name, s in seconds.items()}
  calls = {}
  for name, model in models.items():
    floor = solver_call_floor(model, params["params"], batch, context, bandwidth, repeats + 2)
    per_call = float(np.median(seconds[name])) / floor["calls"]
    calls[name] = {"calls": floor["calls"], "ms_per_call": 1e3 * per_call, **roofline.as_dict(per_call, floor["floor"])}
  names = list(rates)
  return {"part": "speed", "images_per_s": rates, "ratio": rates[names[0]] / rates[names[1]], "batch": batch,
          "solver_steps": steps, "repeats": repeats, "variant": variant, "calls": calls,
          "bandwidth_gb_per_s": bandwidth / 1e9}


# ---------------------------------------------------------------------------
# Tables.


def _spread(values, digits=1) -> str:
  values = np.asarray(values, np.float64)
  sd = f"{np.std(values, ddof=1):.{digits}f}" if len(values) > 1 else "-"
  return f"{np.mean(values):.{digits}f} ({sd})"


def table(rows: list[dict], label: str, key_of) -> str:
  """One line per (label value, split, guidance): FID per seed, its mean (sd), class match mean (sd), the floor."""
  fid = fid_digits.FID_KEY
  lines = [f"| {label} | split | guidance | {fid} per seed | mean (sd) | class match, mean (sd) | floor |",
           "|---|---|---|---|---|---|---|"]
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((key_of(r), r["split"], r["guidance_scale"]), []).append(r)
  for (name, split, guidance), group in groups.items():
    per_seed = " / ".join(f"{r[fid]:.1f}" for r in group)
    lines.append(f"| {name} | {split} | {guidance:g} | {per_seed} | {_spread([r[fid] for r in group])} | "
                 f"{_spread([r['class_match'] for r in group], 3)} | {group[0][fid + '_floor']:.1f} |")
  return "\n".join(lines)


def context_name(r: dict) -> str:
  return f"fixed, t = {r['context_t']:g}" if r["context"] == "fixed" else r["context"]


def print_tables(results: dict) -> None:
  steps = 2 if SMOKE.value else NUM_STEPS.value
  print(f"\nxar_digits.py, variant {'tiny' if SMOKE.value else VARIANT.value}, {steps} steps; N = the whole "
        f"reference split; classifier {classifier()}")
  if results.get("kinds"):
    print("\nEntity kinds:\n" + table(results["kinds"], "entities", lambda r: r["kind"]))
  if results.get("context"):
    print("\nWhat the cache keeps as context (cell, the same checkpoints):\n"
          + table(results["context"], "context", context_name))
  if results.get("posterior"):
    print("\nLatents (cell): the posterior mean or a draw per step:\n"
          + table(results["posterior"], "posterior", lambda r: r["posterior"]))
  if results.get("switches"):
    print("\nThe official network's values, one at a time (cell):\n"
          + table(results["switches"], "switch", lambda r: f"{r['switch']} {r['value']}".strip()))
  if results.get("speed"):
    r = results["speed"][0]
    names = list(r["images_per_s"])
    print(f"\nSampling speed, xAR {r['variant']} (the same parameters), {r['solver_steps']} solver steps per "
          f"entity, median of {r['repeats']} interleaved calls, {jax.default_backend()}:\n")
    print(f"| batch | {names[0]} images/s | {names[1]} images/s | ratio |\n|---|---|---|---|")
    for r in results["speed"]:
      rates = r["images_per_s"]
      print(f"| {r['batch']} | {rates[names[0]]:.1f} | {rates[names[1]]:.1f} | {r['ratio']:.1f}x |")
    print(f"\nOne solver call against its floor (memory bandwidth {r['bandwidth_gb_per_s']:.1f} GB/s):\n")
    print("| batch | entities | calls per image batch | ms per call | floor ms | bound | of floor |\n"
          "|---|---|---|---|---|---|---|")
    for r in results["speed"]:
      for name, c in r["calls"].items():
        print(f"| {r['batch']} | {name} | {c['calls']} | {c['ms_per_call']:.2f} | {c['floor_ms']:.2f} | "
              f"{c['floor_bound']} | {c['of_floor']:.2f}x |")


def main(argv):
  del argv
  unknown = sorted(set(PARTS_FLAG.value) - set(PARTS))
  if unknown:
    raise ValueError(f"--xar_parts: {unknown} unknown; choose from {PARTS}")
  bad_splits = sorted(set(SPLITS.value) - set(SPLIT_IMAGES))
  if bad_splits:
    raise ValueError(f"--xar_splits: {bad_splits} unknown; choose from {sorted(SPLIT_IMAGES)}")
  os.makedirs(runs_dir(), exist_ok=True)
  parts = {"kinds": kinds_part, "context": context_part, "posterior": posterior_part, "switches": switches_part,
           "speed": lambda: [speed(int(b), bandwidth) for b in SPEED_BATCHES.value]}
  bandwidth = roofline.measure_bandwidth() if "speed" in PARTS_FLAG.value else None
  results = {}
  for name in PARTS:
    if name in PARTS_FLAG.value:
      results[name] = parts[name]()
  print_tables(results)
  with open(os.path.join(runs_dir(), "results.json"), "w") as f:
    json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
  app.run(main)
