r"""Aaren against a Transformer of the same size: streaming cost, training step time, and the four tasks.

  python -m experiments.benchmark_aaren --parts streaming,train \
      [--contexts 64,1024,4096,16384] [--train_lengths 256,1024,4096] [--bench_variant S]
  python -m experiments.benchmark_aaren --parts tasks [--tasks classification,forecasting,decision,events] \
      [--task_seeds 0,1,2] [--aaren_runs_dir runs/aaren_benchmark] [--task_num_steps N]

streaming: one token at a time through `nbp.models.sequence.step`, batch 1,
for each context C: Aaren (its (m, u, w) state) and the Transformer with a KV
cache of C slots (`max_len=C`), the same width and depth, each after a real
prefill of C - 1 steps (in chunks). Per-token latency is the median over
`--stream_repeats` rounds of `--stream_steps` jitted steps, the two models'
rounds interleaved; memory is the streaming state's bytes and the step's XLA
temporary buffers (`memory_analysis`). Printed with the Transformer / Aaren
ratios.

train: one optimizer step (forward, backward, AdamW) of each model on a
random regression batch of `--train_batch` sequences of T steps, for each T;
the median of interleaved timed steps and the ratio.

tasks: each task's config (experiments/configs/aaren_<task>.py) with
`ATTENTION,local` for both attentions and every seed, trained through the
shared loop (a finished run in aaren_runs_dir is reused). Its evaluators score
the validation split at the end of training (what choices are made on), and
`eval_test_at_end` the test split once after it; two Markdown tables per task,
validation then test, of mean (sd) over seeds. `--task_num_steps` shortens
every run (a smoke test; its runs are kept apart from full-length ones).

Run the timing parts on an idle machine: ratios are measured side by side,
absolute times on a shared CPU mean little.

Dimensions: B batch, T steps, C context, F features, E width.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from nbp import contenders
from nbp.models import sequence
from nbp.training import loop as train

PARTS = flags.DEFINE_list("parts", ["streaming", "train", "tasks"], "Which comparisons to run.")
CONTEXTS = flags.DEFINE_list("contexts", ["64", "1024", "4096", "16384"], "Streaming contexts C.")
LENGTHS = flags.DEFINE_list("train_lengths", ["256", "1024", "4096"], "Training sequence lengths T.")
BENCH_VARIANT = flags.DEFINE_string("bench_variant", "S", "nbp.models.sequence.SIZES key of the timed models.")
STREAM_STEPS = flags.DEFINE_integer("stream_steps", 50, "Jitted steps per timed streaming round.")
STREAM_REPEATS = flags.DEFINE_integer("stream_repeats", 7, "Timed rounds per model and context.")
TRAIN_BATCH = flags.DEFINE_integer("train_batch", 4, "Sequences per timed training step.")
TRAIN_REPEATS = flags.DEFINE_integer("train_repeats", 5, "Timed training steps per model and length.")
TASKS = flags.DEFINE_list("tasks", ["classification", "forecasting", "decision", "events"],
                          "Task configs experiments/configs/aaren_<task>.py, optionally TASK:EXTRA (e.g. "
                          "classification:JapaneseVowels).")
TASK_SEEDS = flags.DEFINE_list("task_seeds", ["0", "1", "2"], "Seeds of every task run.")
RUNS_DIR = flags.DEFINE_string("aaren_runs_dir", "runs/aaren_benchmark", "Task run workdirs and results.json.")
TASK_NUM_STEPS = flags.DEFINE_integer("task_num_steps", 0, "Training steps of every task run (0: the config's).")

FEATURES = 16  # F = O of the timed models
ATTENTIONS = ("softmax", "aaren")


def _model(attention: str, max_len: int) -> sequence.SequenceModel:
  return sequence.SequenceModel(input_dim=FEATURES, output_dim=FEATURES, attention=attention,
                                variant=BENCH_VARIANT.value, max_len=max_len)


def _params(model):
  x = jnp.zeros((1, 8, FEATURES))
  return flax.core.meta.unbox(jax.jit(model.init)(jax.random.key(0), x)["params"])


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------
# Streaming.


def prefill(model, params, state, steps: int, chunk: int = 256):
  """Feeds `steps` random steps into the state, `chunk` at a time (decode calls of several steps)."""
  apply = jax.jit(lambda p, c, x: model.apply({"params": p, "cache": c}, x, decode=True, mutable=["cache"])[1]["cache"])
  rng = np.random.default_rng(0)
  done = 0
  while done < steps:
    n = min(chunk, steps - done)
    state = apply(params, state, jnp.asarray(rng.normal(size=(1, n, FEATURES)), jnp.float32))
    done += n
  return state


def streaming(contexts) -> list[dict]:
  rows = []
  for context in contexts:
    prepared = {}
    for attention in ATTENTIONS:
      model = _model(attention, max_len=context)
      params = _params(model)
      state = prefill(model, params, sequence.init_state(model, params, 1), context - 1)
      step = jax.jit(functools.partial(sequence.step, model), donate_argnums=(1,))
      x_t = jnp.ones((1, FEATURES))
      compiled = step.lower(params, state, x_t).compile()
      temp = compiled.memory_analysis().temp_size_in_bytes
      state, y = step(params, state, x_t)  # warm
      y.block_until_ready()
      prepared[attention] = dict(step=step, params=params, state=state, x=x_t, temp=temp,
                                 state_bytes=_nbytes(state), times=[])
    for _ in range(STREAM_REPEATS.value):  # interleaved rounds
      for attention in ATTENTIONS:
        p = prepared[attention]
        start = time.perf_counter()
        state = p["state"]
        for _ in range(STREAM_STEPS.value):
          state, y = p["step"](p["params"], state, p["x"])
        y.block_until_ready()
        p["times"].append((time.perf_counter() - start) / STREAM_STEPS.value)
        p["state"] = state  # the context grows by these steps; beside C it is noise (< 1%)
    row = {"context": context}
    for attention in ATTENTIONS:
      p = prepared[attention]
      row[attention] = dict(ms_per_token=1e3 * float(np.median(p["times"])), state_bytes=p["state_bytes"],
                            temp_bytes=int(p["temp"]))
    row["latency_ratio"] = row["softmax"]["ms_per_token"] / row["aaren"]["ms_per_token"]
    row["state_ratio"] = row["softmax"]["state_bytes"] / row["aaren"]["state_bytes"]
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


# ---------------------------------------------------------------------------
# Training step time.


def train_steps(lengths) -> list[dict]:
  rows = []
  for length in lengths:
    prepared = {}
    for attention in ATTENTIONS:
      model = _model(attention, max_len=length)
      params = _params(model)
      tx = optax.adamw(1e-3)
      rng = np.random.default_rng(0)
      x = jnp.asarray(rng.normal(size=(TRAIN_BATCH.value, length, FEATURES)), jnp.float32)

      @functools.partial(jax.jit, donate_argnums=(0, 1))
      def step(params, opt_state, x, model=model, tx=tx):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((model.apply({"params": p}, x) - x) ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

      opt_state = tx.init(params)
      params, opt_state, loss = step(params, opt_state, x)  # compile and warm
      loss.block_until_ready()
      prepared[attention] = dict(step=step, params=params, opt=opt_state, x=x, times=[])
    for _ in range(TRAIN_REPEATS.value):
      for attention in ATTENTIONS:
        p = prepared[attention]
        start = time.perf_counter()
        p["params"], p["opt"], loss = p["step"](p["params"], p["opt"], p["x"])
        loss.block_until_ready()
        p["times"].append(time.perf_counter() - start)
    row = {"length": length, "batch": TRAIN_BATCH.value}
    for attention in ATTENTIONS:
      row[attention] = dict(ms_per_step=1e3 * float(np.median(prepared[attention]["times"])))
    row["step_ratio"] = row["softmax"]["ms_per_step"] / row["aaren"]["ms_per_step"]
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


# ---------------------------------------------------------------------------
# Tasks.

# task -> the final metrics to tabulate: "<evaluator>/<metric>" keys of the run's metrics.jsonl; the validation
# value has the key itself, the test value "test/" + key (config.eval_test_at_end).
TASK_METRICS = {
    "classification": ("metrics/accuracy", "metrics/loss"),
    # @*: every horizon the runs report; @H: the longest only
    "forecasting": ("metrics/mse@*", "metrics/mae@H", "metrics/naive_mse@H", "metrics/naive_mae@H"),
    "decision": ("rollout/return_mean@500", "rollout/normalized_score@500", "rollout/return_mean@250",
                 "rollout/normalized_score@250", "eval/accuracy"),
    "events": ("metrics/log_likelihood", "metrics/true_log_likelihood", "metrics/time_mse", "metrics/mark_accuracy"),
}
SPLIT_PREFIXES = {"validation": "", "test": "test/"}
PROTOCOL = "validation/test"  # results.json entries of earlier protocols are not reused


def _task_config(task: str, attention: str, seed: int):
  name, _, extra = task.partition(":")
  module = importlib.import_module(f"experiments.configs.aaren_{name}")
  arg = ",".join([attention] + ([extra] if extra else []) + ["local"])
  config = module.get_config(arg)
  config.unlock()
  config.seed = seed
  config.eval_test_at_end = True  # the test split once, after the validation evaluations
  if TASK_NUM_STEPS.value:
    config.num_steps = TASK_NUM_STEPS.value
    config.checkpoint_every = TASK_NUM_STEPS.value
    config.log_every = min(config.log_every, TASK_NUM_STEPS.value)
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, TASK_NUM_STEPS.value)
  config.lock()
  return name, arg, config


def final_metrics(workdir: str) -> dict[str, float]:
  """The last value of every key in the run's metrics.jsonl (the final evaluations included)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      out.update({k: v for k, v in json.loads(line).items() if isinstance(v, (int, float))})
  return out


num_params = contenders.num_params


def tasks_table(task_names, seeds) -> dict:
  results = {}
  path = os.path.join(RUNS_DIR.value, "results.json")
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
  steps = f"|steps{TASK_NUM_STEPS.value}" if TASK_NUM_STEPS.value else ""
  for task in task_names:
    for attention in ATTENTIONS:
      for seed in seeds:
        key = f"{task}|{attention}|{seed}{steps}"
        if results.get(key, {}).get("protocol") == PROTOCOL:
          continue
        name, arg, config = _task_config(task, attention, seed)
        workdir = os.path.join(RUNS_DIR.value, task.replace(":", "_"),
                               f"{attention}_seed{seed}{steps.replace('|', '_')}")
        start = time.perf_counter()
        train.train_and_evaluate(config, workdir)
        metrics = dict(final_metrics(workdir), wall_s=time.perf_counter() - start)
        metrics["num_params"] = float(num_params(config))
        results[key] = dict(metrics, config=f"experiments/configs/aaren_{name}.py:{arg}", protocol=PROTOCOL)
        print(json.dumps({"run": key, **results[key]}), flush=True)
        os.makedirs(RUNS_DIR.value, exist_ok=True)
        with open(path, "w") as f:
          json.dump(results, f, indent=1)
  print_tables(results, task_names, seeds, steps)
  return results


def metric_keys(task: str, runs: list[dict]) -> list[str]:
  """TASK_METRICS of the task, "@*" standing for every horizon the runs report and "@H" for the longest."""
  keys = []
  for key in TASK_METRICS[task.partition(":")[0]]:
    stem, at, which = key.rpartition("@")
    if at and which in ("*", "H"):
      found = sorted({k for r in runs for k in r if k.startswith(stem + "@")}, key=lambda k: int(k.rpartition("@")[2]))
      keys += found if which == "*" else found[-1:]
    else:
      keys.append(key)
  return keys


def print_tables(results, task_names, seeds, steps: str = "") -> None:
  """Per task: the validation table (choices are made on it), then the test table (reported once)."""
  for task in task_names:
    for split, prefix in SPLIT_PREFIXES.items():
      runs_by_attention = {a: [r for r in (results.get(f"{task}|{a}|{s}{steps}") for s in seeds) if r]
                           for a in ATTENTIONS}
      keys = metric_keys(task, [r for runs in runs_by_attention.values() for r in runs])
      print(f"\n{task}, {split} split ({len(seeds)} seeds, mean (sd))\n")
      print("| attention | " + " | ".join(prefix + k for k in keys) + " | params |")
      print("|---" * (len(keys) + 2) + "|")
      for attention in ATTENTIONS:
        runs = runs_by_attention[attention]
        cells = []
        for k in keys:
          values = [r[prefix + k] for r in runs if prefix + k in r]
          sd = np.std(values, ddof=1) if len(values) > 1 else 0.0  # the sample sd over seeds
          cells.append(f"{np.mean(values):.4g} ({sd:.2g})" if values else "-")
        params = runs[0].get("num_params", float("nan")) if runs else float("nan")
        print(f"| {attention} | " + " | ".join(cells) + f" | {params:,.0f} |")


def main(argv):
  del argv
  out = {}
  if "streaming" in PARTS.value:
    out["streaming"] = streaming([int(c) for c in CONTEXTS.value])
  if "train" in PARTS.value:
    out["train"] = train_steps([int(t) for t in LENGTHS.value])
  if "tasks" in PARTS.value:
    tasks_table(TASKS.value, [int(s) for s in TASK_SEEDS.value])
  for name, rows in out.items():
    print(f"\n{name}")
    for row in rows:
      print(json.dumps(row))


if __name__ == "__main__":
  app.run(main)
