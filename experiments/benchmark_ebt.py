r"""EBT against Transformer++ on text: perplexity against thinking, in and out of distribution, and training cost;
against a regression transformer on next-frame prediction; and the bidirectional EBT against a flow
transformer on image denoising: PSNR against forward passes.

  python -m experiments.benchmark_ebt --ebt_parts thinking,cost [--ebt_seeds 0,1,2] \
      [--ebt_splits validation] [--ood_text PATH] [--ebt_steps 1,2,3,4,6] [--ebt_best_of 1,2,4] \
      [--ebt_runs_dir runs/ebt_benchmark] [--ebt_num_steps N] [--ebt_smoke]
  python -m experiments.benchmark_ebt --ebt_parts video [--ebt_seeds 0,1,2] [--ebt_splits validation,test]
  python -m experiments.benchmark_ebt --ebt_parts recipes [--ebt_seeds 0] [--ebt_recipes s1,s1:model.alpha=50.0,...]
  python -m experiments.benchmark_ebt --ebt_parts denoising [--ebt_seeds 0,1,2] [--ebt_splits validation,test] \
      [--ebt_denoising_ebt_steps 1,2,3,4,6,8] [--ebt_denoising_flow_steps 1,2,4,8,16,32] [--ebt_num_steps N]

thinking  for each seed, ebt_text.py:s2,local (System 2) and ntp_text.py's
          Transformer++ at the same width, depth, heads and window, trained
          through the shared loop for the same steps and batch (a finished run
          in ebt_runs_dir is reused). Each is scored teacher-forced on every
          whole window of each split of `--ebt_splits` (choices on validation;
          test once) and of the out-of-distribution text `--ood_text` (default:
          the Python licence, LICENSE.txt of the running interpreter's
          standard library: legal English against the documentation the models
          trained on). EBT's perplexity is exp of the final candidates' mean
          cross-entropy for every thinking setting: `--ebt_steps` optimisation
          steps (best-of-1), and best-of-N (`--ebt_best_of`) at the recipe's
          3 steps. Transformer++ has no such knob: one figure per text.
cost      one training step of each recipe (System 1: 2 steps; System 2 at 2
          and at 3 steps, its two branches) and of Transformer++, same
          model size, batch and window: XLA's FLOP count of the compiled step
          and its median time, steps interleaved, both as ratios to
          Transformer++. Run it on an idle machine.
video     for each seed, ebt_video.py:s2,local (System 2 on moving digits,
          each frame one token) and ebt_video.py:regression,local (a causal
          transformer of the same size regressing the next frame), trained
          for the same steps and batch (a finished run is reused). Each is
          scored teacher-forced on every video of each split of
          `--ebt_splits`: the smooth L1 (the training loss) and the MSE of
          every next frame; EBT for each of `--ebt_steps` (best-of-1) and
          best-of-N at the recipe's steps; beside them, repeating the last
          frame (no model).
denoising for each seed, ebt_denoising.py:ebt,local (the bidirectional EBT,
          System 2 denoising recipe) and ebt_denoising.py:flow,local (a flow
          transformer of the same backbone and size), trained through the
          shared loop for the same steps and batch (a finished run in
          ebt_runs_dir is reused). Each is scored by the same split_metrics
          evaluator the loop runs, over every image of each split of
          `--ebt_splits` (choices on validation; test once), the same noisy
          images for both: the PSNR of the noisy input, and of the output
          after each step count (EBT: thinking steps, each one forward and
          one backward pass; flow: Euler steps from t*, one forward pass
          each).
speed     at thinking's model size, untrained weights (speed does not depend
          on them): one thinking step (the energy's forward and backward
          pass over the candidates of a whole window, `think` with 1 step)
          at each batch of `--ebt_speed_batches`, against its floor
          (with `--ebt_profile DIR`, also where its time goes)
          (nbp.roofline: the weights at the bandwidth, or XLA's FLOPs of the
          compiled step at the matmul rate of its rows, batch x 2L through
          the width-to-MLP projection, both measured in the run); and
          text generation with the KV cache at batch 1 (the recipe's
          thinking steps per token, after a 32-byte prompt) against
          Transformer++ decoding token by token with its KV cache, in
          tokens/s, timed in turns. Run it on an idle machine.
recipes   the local text recipe values, chosen on validation: each candidate
          of `--ebt_recipes` (ebt_text.py:RECIPE,local at thinking's model
          size, with its overrides) trained for each seed, and its validation
          perplexity at the candidate's own evaluation steps.

Prints one JSON line per measurement, then Markdown tables (mean and sd over
seeds); also written to ebt_runs_dir/results.json. `--ebt_smoke`: every part
at a tiny size (2 training steps, a few windows): it checks the script, not
what it measures.

Dimensions: B batch, L window (observed bytes).
"""

from __future__ import annotations

import ast
import functools
import json
import os
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.configs import ebt_denoising, ebt_text, ebt_video, ntp_text
from nbp import profiling, roofline
from nbp.data import pipeline, video_sources
from nbp.models import block_transformer
from nbp.samplers import ebt as thinking
from nbp.tasks import ebt as ebt_task
from nbp.tasks import next_block
from nbp.training import loop as train
from nbp.training import sharding
from nbp.training import workdir as workdir_lib

PARTS = ("thinking", "cost", "video", "denoising", "recipes", "speed")
PARTS_FLAG = flags.DEFINE_list("ebt_parts", ["thinking", "cost"], f"Which parts to run, of {PARTS}.")
SEEDS = flags.DEFINE_list("ebt_seeds", ["0", "1", "2"], "Training seeds (one run of each model each).")
SPLITS = flags.DEFINE_list("ebt_splits", ["validation"], "In-distribution splits scored (test: once).")
OOD = flags.DEFINE_string("ood_text", os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt"),
                          "A UTF-8 text file scored as the out-of-distribution text.")
STEPS = flags.DEFINE_list("ebt_steps", ["1", "2", "3", "4", "6"], "Thinking steps scored (best-of-1).")
BEST_OF = flags.DEFINE_list("ebt_best_of", ["1", "2", "4"], "N of best-of-N scored (at the recipe's steps).")
RUNS_DIR = flags.DEFINE_string("ebt_runs_dir", "runs/ebt_benchmark", "Run workdirs and results.json.")
NUM_STEPS = flags.DEFINE_integer("ebt_num_steps", 0, "Training steps of every run (0: the local configs' own).")
RECIPES = flags.DEFINE_list(
    "ebt_recipes", ["s1", "s1:model.alpha=50.0", "s1:model.alpha=5.0", "s2", "s2:loss.langevin_sigma=0.0"],
    "Recipes part: the text candidates, each RECIPE[:KEY=VALUE[+KEY=VALUE...]] (dotted config keys).")
THINKING_OVERRIDES = flags.DEFINE_string(
    "ebt_thinking_overrides", "", "KEY=VALUE+... on the thinking part's System 2 config, e.g. loss.langevin_sigma=0.0 "
    "(give it its own --ebt_runs_dir).")
COST_REPEATS = flags.DEFINE_integer("ebt_cost_repeats", 7, "Timed training steps per model in the cost part.")
SPEED_BATCHES = flags.DEFINE_list("ebt_speed_batches", ["1", "16"], "Speed part: batches of the thinking step.")
PROFILE = flags.DEFINE_string("ebt_profile", "", "Speed part: if set, a directory where each thinking step is "
                              "traced; where its time goes is printed (nbp.profiling).")
SMOKE = flags.DEFINE_bool("ebt_smoke", False, "Every part at a tiny size (checks the script).")
DATA_DIR = flags.DEFINE_string("ebt_data_dir", "data", "config.data.dir of the runs.")
DENOISE_STEPS = {
    "ebt": flags.DEFINE_list("ebt_denoising_ebt_steps", [str(k) for k in ebt_denoising.STEPS["ebt"]],
                             "Denoising: the EBT's thinking step counts scored."),
    "flow": flags.DEFINE_list("ebt_denoising_flow_steps", [str(k) for k in ebt_denoising.STEPS["flow"]],
                              "Denoising: the flow's Euler step counts scored."),
}
DENOISE_NAMES = {"ebt": "bidirectional EBT", "flow": "flow transformer"}


def runs_dir() -> str:
  return os.path.join(RUNS_DIR.value, "smoke") if SMOKE.value else RUNS_DIR.value


def text_config(recipe: str, overrides: dict | None = None):
  """ebt_text.py:RECIPE,local, unlocked, its MLP as wide as Transformer++'s (the same parameters), overridden."""
  ebt = ebt_text.get_config(f"{recipe},local")
  ebt.unlock()
  ebt.model.mlp_dim = block_transformer.mlp_dim(ebt_task.Model.SIZES[ebt.model.variant][1], "swiglu")
  for key, value in (overrides or {}).items():
    *path, last = key.split(".")
    target = ebt
    for part in path:
      target = target[part]
    if last not in target:
      raise KeyError(f"--ebt_recipes: {key!r} is not a key of ebt_text.py:{recipe},local")
    target[last] = value
  return ebt


def parse_recipe(candidate: str) -> tuple[str, dict]:
  """'s1:model.alpha=50.0+loss.num_steps=3' -> ('s1', {'model.alpha': 50.0, 'loss.num_steps': 3})."""
  recipe, _, rest = candidate.partition(":")
  overrides = {}
  for item in filter(None, rest.split("+")):
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--ebt_recipes: {item!r} in {candidate!r} is not KEY=VALUE")
    overrides[key] = ast.literal_eval(value)
  return recipe, overrides


def configs(seed: int):
  """(EBT System 2, Transformer++) configs of the same size, window, batch and budget."""
  ebt = text_config("s2", parse_recipe("s2:" + THINKING_OVERRIDES.value)[1])
  depth, width, heads = ebt_task.Model.SIZES[ebt.model.variant]
  ntp = ntp_text.get_config("tiny,local")
  ntp.unlock()
  ntp.model.variant = None
  ntp.model.num_layers, ntp.model.width, ntp.model.num_heads, ntp.model.num_kv_heads = depth, width, heads, heads
  # The same windows of L + 1 bytes. Transformer++ predicts all L + 1 (the first from its begin token alone),
  # EBT the last L: one target in L + 1 more for the baseline, and the hardest.
  ntp.model.grid = (1, 1, ebt.data.seq_len + 1)
  for c in (ebt, ntp):
    c.seed = seed
    c.data.dir = DATA_DIR.value
    c.batch_size = ebt.batch_size
    c.num_steps = 2 if SMOKE.value else (NUM_STEPS.value or ebt.num_steps)
    c.optimizer.lr, c.optimizer.warmup_steps = ebt.optimizer.lr, ebt.optimizer.warmup_steps
    c.checkpoint_every = c.num_steps
    c.evals = type(c.evals)()
  if SMOKE.value:
    ebt.data.seq_len = 16
    ntp.model.grid = (1, 1, 17)
    ebt.loss.replay_size = 8
  return ebt, ntp


def trained(config, name: str) -> str:
  """The workdir of `config` trained under runs_dir()/name: resumed or reused if there, refused if another config's."""
  workdir = os.path.join(runs_dir(), name)
  changed = workdir_lib.changed_keys(workdir, config)
  if changed:
    raise ValueError(f"{workdir} holds a run of another config (changed: {', '.join(changed[:6])}); "
                     "give another --ebt_runs_dir or remove that run")
  start = time.perf_counter()
  result = train.train_and_evaluate(config, workdir)
  if result.get("status") != "done":
    raise RuntimeError(f"{workdir}: training stopped at step {result.get('step')} ({result.get('status')}); "
                       "run the benchmark again to resume it.")
  print(json.dumps({"trained": name, "step": result.get("step"), "seconds": time.perf_counter() - start}),
        flush=True)
  return workdir


def windows_of(text: str | bytes, seq_len: int, max_windows: int | None) -> np.ndarray:
  """Every whole window int32 [N, L + 1] of a text (a split's or a file's bytes)."""
  data = np.frombuffer(text if isinstance(text, bytes) else text.encode("utf-8"), np.uint8)
  source = pipeline.TextBytesSource(data, seq_len, ())
  n = len(source) if max_windows is None else min(len(source), max_windows)
  return np.stack([source[i]["tokens"] for i in range(n)])


def split_text(split: str, config) -> bytes:
  fraction, seed = pipeline.validation_keys(config.data)
  source = pipeline.text_bytes_source(split, config.data.seq_len, validation_fraction=fraction, validation_seed=seed)
  return source.data.tobytes()


def mean_nll(score, windows: np.ndarray, batch: int) -> float:
  """The mean over windows of score(batch of windows) (its nats per byte), the last partial batch dropped."""
  n = (len(windows) // batch) * batch
  values = [float(score(jnp.asarray(windows[i:i + batch]), i)) for i in range(0, n, batch)]
  return float(np.mean(values))


def _ebt_nll(model, params, batch, rng, *, setting):
  """EBT's teacher-forced mean cross-entropy of a batch under one thinking setting."""
  return ebt_task.eval_loss(model, params, batch, rng, **setting)[0]


def thinking_part() -> list[dict]:
  rows = []
  max_windows = 8 if SMOKE.value else None
  for seed in [0] if SMOKE.value else [int(s) for s in SEEDS.value]:
    ebt_cfg, ntp_cfg = configs(seed)
    ebt_dir, ntp_dir = trained(ebt_cfg, f"ebt_s2_seed{seed}"), trained(ntp_cfg, f"ntp_seed{seed}")
    s_ebt, p_ebt, _, _ = train.load_params(ebt_cfg, ebt_dir)
    s_ntp, p_ntp, _, _ = train.load_params(ntp_cfg, ntp_dir)
    texts = {split: split_text(split, ebt_cfg) for split in SPLITS.value}
    with open(OOD.value, "rb") as f:
      texts["ood"] = f.read()
    ntp_loss = jax.jit(s_ntp.task.predict_fn("eval_loss"))
    settings = [dict(num_steps=int(k), best_of=1) for k in STEPS.value]
    settings += [dict(num_steps=ebt_cfg.sampler.num_steps, best_of=int(n)) for n in BEST_OF.value if int(n) > 1]
    # One jitted scorer per thinking setting, compiled once and reused for every text.
    scorers = [(setting, jax.jit(functools.partial(_ebt_nll, s_ebt.task.model, setting=setting)))
               for setting in settings]
    for text_name, text in texts.items():
      windows = windows_of(text, ebt_cfg.data.seq_len, max_windows)
      batch = min(len(windows), ebt_cfg.batch_size)
      with s_ntp.context():
        nll = mean_nll(lambda w, i: ntp_loss(p_ntp, {"tokens": w}, jax.random.key(i))[0], windows, batch)
      emit(rows, {"part": "thinking", "model": "Transformer++", "seed": seed, "text": text_name,
                  "windows": len(windows), "nll": nll, "perplexity": float(np.exp(nll))})
      for setting, fn in scorers:
        with s_ebt.context():
          nll = mean_nll(lambda w, i: fn(p_ebt, {"tokens": w}, jax.random.key(i)), windows, batch)
        emit(rows, {"part": "thinking", "model": "EBT System 2", "seed": seed, "text": text_name,
                    "windows": len(windows), **setting, "nll": nll, "perplexity": float(np.exp(nll))})
  return rows


def cost_part() -> list[dict]:
  """Training-step FLOPs and time of each recipe against Transformer++ (module docstring)."""
  ebt_s2, ntp = configs(0)
  ebt_s1 = ebt_text.get_config("s1,local")
  ebt_s1.unlock()
  ebt_s1.model.mlp_dim, ebt_s1.data.seq_len = ebt_s2.model.mlp_dim, ebt_s2.data.seq_len
  ebt_s1.batch_size = ebt_s2.batch_size
  variants = {"Transformer++": ntp, "EBT System 1 (2 steps)": ebt_s1}
  for steps in (2, 3):
    c = ebt_s2.copy_and_resolve_references()
    c.loss.num_steps, c.loss.num_steps_max = steps, 0
    variants[f"EBT System 2 ({steps} steps)"] = c
  steps_fns, costs = {}, {}
  for name, config in variants.items():
    s = train.setup(config)
    state = train.init_state(s, 0)
    length = config.data.seq_len + 1 if config.family == "ebt" else config.model.grid[-1]
    tokens = np.random.default_rng(0).integers(0, 256, (config.batch_size, length), dtype=np.int32)
    batch = sharding.global_batch({"tokens": tokens}, s.batch_sharding)
    with s.context():
      compiled = train.compile_train_step(s).lower(state, batch, jax.random.key(0)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    costs[name] = {"flops": float(cost.get("flops", float("nan"))),
                   "params": int(sum(x.size for x in jax.tree.leaves(state.params)))}
    steps_fns[name] = _stepper(compiled, state, batch)
  repeats = 1 if SMOKE.value else COST_REPEATS.value
  seconds = {name: [] for name in steps_fns}
  for name, fn in steps_fns.items():
    jax.block_until_ready(fn())  # one untimed step each (the donated state is replaced by the output)
  for _ in range(repeats):
    for name, fn in steps_fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      seconds[name].append(time.perf_counter() - start)
  base = "Transformer++"
  rows = []
  for name in steps_fns:
    t = float(np.median(seconds[name]))
    emit(rows, {"part": "cost", "model": name, **costs[name], "seconds_per_step": t,
                "flops_ratio": costs[name]["flops"] / costs[base]["flops"],
                "time_ratio": t / float(np.median(seconds[base])), "repeats": repeats,
                "backend": jax.default_backend()})
  return rows


def recipes_part() -> list[dict]:
  """Validation perplexity of each text recipe candidate at its own evaluation steps (the local values' choice)."""
  rows = []
  for seed in [0] if SMOKE.value else [int(s) for s in SEEDS.value]:
    _, ntp_cfg = configs(seed)  # the budget, batch and learning rate that thinking's runs use
    for candidate in RECIPES.value:
      recipe, overrides = parse_recipe(candidate)
      c = text_config(recipe, overrides)
      c.seed, c.data.dir, c.num_steps, c.checkpoint_every = seed, DATA_DIR.value, ntp_cfg.num_steps, ntp_cfg.num_steps
      c.optimizer.warmup_steps = ntp_cfg.optimizer.warmup_steps
      c.evals = type(c.evals)()
      if SMOKE.value:
        c.data.seq_len, c.loss.replay_size = 16, 8
      slug = "".join(ch if ch.isalnum() or ch in "._=" else "_" for ch in candidate)
      name = f"recipe_{slug}_seed{seed}"
      s_ebt, params, _, _ = train.load_params(c, trained(c, name))
      windows = windows_of(split_text("validation", c), c.data.seq_len, 8 if SMOKE.value else None)
      fn = jax.jit(functools.partial(_ebt_nll, s_ebt.task.model, setting=dict(num_steps=c.sampler.num_steps)))
      with s_ebt.context():
        nll = mean_nll(lambda w, i: fn(params, {"tokens": w}, jax.random.key(i)), windows,
                       min(len(windows), c.batch_size))
      emit(rows, {"part": "recipes", "candidate": candidate, "seed": seed, "text": "validation",
                  "num_steps": c.sampler.num_steps, "alpha": float(params.get("alpha", c.model.alpha)),
                  "nll": nll, "perplexity": float(np.exp(nll))})
  return rows


def for_benchmark(c, seed: int):
  """A local config, unlocked, as a benchmark run: its seed, the data dir, the budget (one checkpoint at the end)."""
  c.unlock()
  c.seed = seed
  c.data.dir = DATA_DIR.value
  c.num_steps = 2 if SMOKE.value else (NUM_STEPS.value or c.num_steps)
  c.checkpoint_every = c.num_steps
  return c


def video_config(recipe: str, seed: int):
  """ebt_video.py:RECIPE,local for the benchmark: its budget, no in-training evaluators."""
  c = for_benchmark(ebt_video.get_config(f"{recipe},local"), seed)
  c.evals = type(c.evals)()
  if SMOKE.value:
    c.data.num_frames, c.data.frame_size, c.data.num_validation, c.data.num_test = 4, 8, 8, 8
    c.data.num_train = 32
    if recipe != "regression":
      c.loss.replay_size = 8
  return c


def video_part() -> list[dict]:
  """Next-frame smooth L1 and MSE of EBT against thinking, the regression transformer and the last frame."""
  rows = []
  for seed in [0] if SMOKE.value else [int(s) for s in SEEDS.value]:
    ebt_cfg, reg_cfg = video_config("s2", seed), video_config("regression", seed)
    s_ebt, p_ebt, _, _ = train.load_params(ebt_cfg, trained(ebt_cfg, f"video_ebt_s2_seed{seed}"))
    s_reg, p_reg, _, _ = train.load_params(reg_cfg, trained(reg_cfg, f"video_regression_seed{seed}"))
    settings = [dict(num_steps=int(k), best_of=1) for k in STEPS.value]
    settings += [dict(num_steps=ebt_cfg.sampler.num_steps, best_of=int(n)) for n in BEST_OF.value if int(n) > 1]
    reg_loss = jax.jit(s_reg.task.loss)
    for split in SPLITS.value:
      num = ebt_cfg.data.num_validation if split == "validation" else ebt_cfg.data.num_test
      videos = jnp.asarray(video_sources.first_videos(ebt_cfg.data.to_json(), num, split))
      frames = videos.reshape(*videos.shape[:2], -1)
      base = {"part": "video", "seed": seed, "split": split, "videos": int(videos.shape[0])}
      last, target = frames[:, :-1], frames[:, 1:]
      ones = jnp.ones((videos.shape[0],))
      emit(rows, {**base, "model": "repeat the last frame", "smooth_l1": float(ebt_task.smooth_l1(last, target, ones)),
                  "mse": float(jnp.mean((last - target) ** 2))})
      with s_reg.context():
        value, aux = reg_loss(p_reg, {"video": videos}, jax.random.key(0))
      emit(rows, {**base, "model": "regression transformer", "params": _size(p_reg), "smooth_l1": float(value),
                  "mse": float(aux["mse"])})
      for setting in settings:
        fn = jax.jit(functools.partial(s_ebt.task.predict_fn("eval_loss"), **setting))
        with s_ebt.context():
          value, aux = fn(p_ebt, {"video": videos}, jax.random.key(seed))
        emit(rows, {**base, "model": "EBT System 2", "params": _size(p_ebt), **setting, "smooth_l1": float(value),
                    "mse": float(aux["mse"])})
  return rows


def _size(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def denoising_config(kind: str, seed: int):
  """ebt_denoising.py:KIND,local for the benchmark: its budget, the PSNR evaluator alone (the validation split)."""
  c = for_benchmark(ebt_denoising.get_config(f"{kind},local"), seed)
  c.sampler.steps = tuple(int(k) for k in DENOISE_STEPS[kind].value)
  if SMOKE.value:
    c.data.image_size = 8
    c.model.variant = None
    c.model.num_layers, c.model.width, c.model.num_heads = 1, 32, 2
    c.sampler.steps = (1, 2)
  c.evals = type(c.evals)({"psnr": dict(type="split_metrics", every=0, split="validation")})
  return c


def denoising_part() -> list[dict]:
  """PSNR against forward passes of both denoisers over whole splits (module docstring)."""
  rows = []
  for seed in [0] if SMOKE.value else [int(s) for s in SEEDS.value]:
    for kind in ("ebt", "flow"):
      config = denoising_config(kind, seed)
      workdir = trained(config, f"denoising_{kind}_seed{seed}")
      s, params, params_name, step = train.load_params(config, workdir)
      size = _size(params)
      for split in SPLITS.value:
        out = train.run_evaluators(s, params, params_name, step, workdir, final=True, only_due=False, split=split)
        scores = {k.split("/")[-1]: v for k, v in out.items()}
        base = {"part": "denoising", "model": DENOISE_NAMES[kind], "params": size, "seed": seed, "split": split,
                "images": scores["num_examples"]}
        emit(rows, {**base, "steps": 0, "forward": 0, "backward": 0, "psnr": scores["psnr_noisy"], "noisy": True})
        for k in config.sampler.steps:
          emit(rows, {**base, "steps": k, "forward": scores[f"forward_{k}_steps"],
                      "backward": scores[f"backward_{k}_steps"], "psnr": scores[f"psnr_{k}_steps"]})
  return rows


def speed_part() -> list[dict]:
  """One thinking step against its floor, and cached text generation against Transformer++ (module docstring)."""
  ebt_config, ntp_config = configs(0)
  ebt_s, ntp_s = train.setup(ebt_config), train.setup(ntp_config)
  ebt_model, ntp_model = ebt_s.task.model, ntp_s.task.model
  ebt_params, ntp_params = train.init_state(ebt_s, 0).params, train.init_state(ntp_s, 0).params
  length = ebt_config.data.seq_len
  repeats = 1 if SMOKE.value else COST_REPEATS.value
  bandwidth = roofline.measure_bandwidth(repeats=repeats)
  rows = []
  alpha = thinking.step_size(ebt_model, ebt_params)
  for batch in [int(b) for b in SPEED_BATCHES.value]:
    observed = jnp.zeros((batch, length), jnp.int32)
    y0 = jax.random.normal(jax.random.key(0), (batch, length, ebt_model.candidate_dim))

    def one_step(params, observed, y0):
      energy = thinking.model_energy(ebt_model, params, observed)
      return thinking.think(ebt_model, energy, y0, num_steps=1, alpha=alpha).ys[-1]

    compiled = jax.jit(one_step).lower(ebt_params, observed, y0).compile()
    seconds = roofline.median_seconds(lambda: compiled(ebt_params, observed, y0), repeats)
    rate = roofline.measure_matmul_rate(batch * 2 * length, ebt_model.embed_dim, ebt_config.model.mlp_dim,
                                        repeats=repeats)
    floor = roofline.floor(roofline.tree_bytes(ebt_params), roofline.compiled_flops(compiled),
                           roofline.Machine(bandwidth, rate))
    emit(rows, {"part": "speed", "what": "thinking step", "batch": batch, "window": length,
                "ms": 1e3 * seconds, **roofline.as_dict(seconds, floor)})
    if PROFILE.value:
      ops = profiling.profile_ops(compiled.as_text(), lambda: compiled(ebt_params, observed, y0), repeats,
                                  os.path.join(PROFILE.value, f"thinking_step_batch{batch}"))
      profiling.print_summary(f"thinking step, batch {batch}", ops)

  # Text generation at batch 1: EBT after a prompt, Transformer++ over its whole window, both with a KV cache.
  prompt_len = min(ebt_config.sampler.prompt_len, length // 2)
  num_new = length - prompt_len
  steps = ebt_config.loss.num_steps
  ebt_generate = jax.jit(lambda p, r: thinking.generate(ebt_model, p, r, jnp.zeros((1, prompt_len), jnp.int32),
                                                        num_new, num_steps=steps))
  ntp_generate = jax.jit(lambda p, r: next_block.sample(ntp_model, p, r, num_samples=1, top_p=1.0))
  generators = {f"EBT System 2 ({steps} thinking steps per token)": (ebt_generate, ebt_params, num_new),
                "Transformer++": (ntp_generate, ntp_params, ntp_model.num_generated)}
  for fn, params, _ in generators.values():
    jax.block_until_ready(fn(params, jax.random.key(0)))  # compile and warm up
  seconds = {name: [] for name in generators}
  for i in range(repeats):
    for name, (fn, params, _) in generators.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(params, jax.random.key(i + 1)))
      seconds[name].append(time.perf_counter() - start)
  rates = {name: n / float(np.median(seconds[name])) for name, (_, _, n) in generators.items()}
  for name, tokens_per_s in rates.items():
    emit(rows, {"part": "speed", "what": "generation", "model": name, "batch": 1, "tokens": generators[name][2],
                "tokens_per_s": tokens_per_s, "vs_transformer_pp": tokens_per_s / rates["Transformer++"]})
  return rows


def _stepper(compiled, state, batch):
  """A function running one more training step of `compiled` (the state is donated, so it keeps the newest)."""
  holder = [state]

  def run():
    holder[0] = compiled(holder[0], batch, jax.random.key(0))[0]
    return holder[0]
  return run


def emit(rows: list[dict], row: dict) -> None:
  rows.append(row)
  print(json.dumps(row, default=float), flush=True)


def _mean_sd(values, digits: int = 2) -> str:
  values = np.asarray(values, np.float64)
  sd = f" ({np.std(values, ddof=1):.{digits}f})" if len(values) > 1 else ""
  return f"{np.mean(values):.{digits}f}{sd}"


def print_tables(results: dict) -> None:
  speed = results.get("speed", [])
  if speed:
    print(f"\nOne thinking step against its floor ({jax.default_backend()}):\n")
    print("| batch | window | ms | floor ms | bound | of floor |\n|---|---|---|---|---|---|")
    for r in (r for r in speed if r["what"] == "thinking step"):
      print(f"| {r['batch']} | {r['window']} | {r['ms']:.2f} | {r['floor_ms']:.2f} | {r['floor_bound']} | "
            f"{r['of_floor']:.2f}x |")
    print("\nText generation with the KV cache, batch 1:\n\n| model | tokens/s | against Transformer++ |\n|---|---|---|")
    for r in (r for r in speed if r["what"] == "generation"):
      print(f"| {r['model']} | {r['tokens_per_s']:.0f} | {r['vs_transformer_pp']:.2f}x |")
  rows = results.get("thinking", [])
  if rows:
    texts = list(dict.fromkeys(r["text"] for r in rows))
    keys = list(dict.fromkeys((r["model"], r.get("num_steps"), r.get("best_of")) for r in rows))
    print("\nPerplexity (bytes; mean (sd) over seeds), teacher-forced on whole windows:\n")
    print("| model | thinking | " + " | ".join(texts) + " |\n|---|---|" + "---|" * len(texts))
    for model, steps, best_of in keys:
      label = "-" if steps is None else f"{steps} steps" + (f", best of {best_of}" if best_of > 1 else "")
      cells = [_mean_sd([r["perplexity"] for r in rows if (r["model"], r.get("num_steps"), r.get("best_of"),
                                                            r["text"]) == (model, steps, best_of, t)])
               for t in texts]
      print(f"| {model} | {label} | " + " | ".join(cells) + " |")
  rows = results.get("recipes", [])
  if rows:
    print("\nText recipe candidates (validation perplexity at each candidate's evaluation steps; mean (sd) over seeds):\n")
    print("| candidate | thinking steps | final alpha | validation perplexity |\n|---|---|---|---|")
    for candidate in dict.fromkeys(r["candidate"] for r in rows):
      mine = [r for r in rows if r["candidate"] == candidate]
      print(f"| {candidate} | {mine[0]['num_steps']} | {_mean_sd([r['alpha'] for r in mine])} | "
            f"{_mean_sd([r['perplexity'] for r in mine])} |")
  rows = results.get("cost", [])
  if rows:
    print(f"\nTraining step against Transformer++ ({rows[0]['backend']}, median of {rows[0]['repeats']}):\n")
    print("| model | parameters | XLA FLOPs | FLOPs ratio | time ratio |\n|---|---|---|---|---|")
    for r in rows:
      print(f"| {r['model']} | {r['params']:,} | {r['flops'] / 1e9:.2f} G | {r['flops_ratio']:.2f}x | "
            f"{r['time_ratio']:.2f}x |")
  rows = results.get("video", [])
  if rows:
    splits = list(dict.fromkeys(r["split"] for r in rows))
    print("\nNext-frame smooth L1 / MSE (pixels in [-1, 1]; mean (sd) over seeds), teacher-forced on whole splits:\n")
    print("| model | thinking | " + " | ".join(f"{t} smooth L1 | {t} MSE" for t in splits) + " |\n|---|---|"
          + "---|---|" * len(splits))
    for model, steps, best_of in dict.fromkeys((r["model"], r.get("num_steps"), r.get("best_of")) for r in rows):
      label = "-" if steps is None else f"{steps} steps" + (f", best of {best_of}" if best_of > 1 else "")
      cells = []
      for t in splits:
        mine = [r for r in rows if (r["model"], r.get("num_steps"), r.get("best_of"), r["split"]) ==
                (model, steps, best_of, t)]
        cells += [_mean_sd([r["smooth_l1"] for r in mine], 4), _mean_sd([r["mse"] for r in mine], 4)]
      print(f"| {model} | {label} | " + " | ".join(cells) + " |")
  rows = results.get("denoising", [])
  if rows:
    splits = list(dict.fromkeys(r["split"] for r in rows))
    sizes = ", ".join(f"{m} {p:,}" for m, p in dict.fromkeys((r["model"], r["params"]) for r in rows))
    print(f"\nDenoising PSNR (dB; mean (sd) over seeds) against passes per image; parameters: {sizes}:\n")
    print("| model | steps | forward | backward | " + " | ".join(splits) + " |\n|---|---|---|---|"
          + "---|" * len(splits))
    first = rows[0]["model"]  # both models score the same noisy images
    noisy = [_mean_sd([r["psnr"] for r in rows if r.get("noisy") and (r["split"], r["model"]) == (t, first)])
             for t in splits]
    print("| noisy input | 0 | 0 | 0 | " + " | ".join(noisy) + " |")
    for model, steps, forward, backward in dict.fromkeys(
        (r["model"], r["steps"], r["forward"], r["backward"]) for r in rows if not r.get("noisy")):
      cells = [_mean_sd([r["psnr"] for r in rows if not r.get("noisy") and (r["model"], r["steps"], r["split"]) ==
                         (model, steps, t)]) for t in splits]
      print(f"| {model} | {steps} | {forward:g} | {backward:g} | " + " | ".join(cells) + " |")


def main(argv):
  del argv
  unknown = sorted(set(PARTS_FLAG.value) - set(PARTS))
  if unknown:
    raise ValueError(f"--ebt_parts: {unknown} unknown; choose from {PARTS}")
  if not os.path.exists(OOD.value):
    raise FileNotFoundError(f"--ood_text={OOD.value!r}: no such file")
  os.makedirs(runs_dir(), exist_ok=True)
  results = {}
  for name, fn in (("thinking", thinking_part), ("cost", cost_part), ("video", video_part),
                   ("denoising", denoising_part), ("recipes", recipes_part), ("speed", speed_part)):
    if name in PARTS_FLAG.value:
      results[name] = fn()
  print_tables(results)
  with open(os.path.join(runs_dir(), "results.json"), "w") as f:
    json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
  app.run(main)
