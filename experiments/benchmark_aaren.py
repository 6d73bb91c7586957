r"""Aaren against a Transformer of the same size: streaming cost, training step time, and the four tasks.

  python -m experiments.benchmark_aaren --parts streaming,train \
      [--contexts 64,1024,4096,16384] [--train_lengths 256,1024,4096] [--bench_variant S]
  python -m experiments.benchmark_aaren --parts tasks [--tasks classification,forecasting,decision,events] \
      [--task_seeds 0,1,2] [--aaren_runs_dir runs/aaren_benchmark]

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
shared loop (a finished run in aaren_runs_dir is reused); the final metrics
of its evaluators, then a Markdown table of mean and sd over seeds.

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

from nbp import tasks
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

# task -> the final metrics to tabulate: keys of the run's metrics.jsonl (evaluator name / metric).
TASK_METRICS = {
    "classification": ("test/accuracy",),
    "forecasting": ("test/mse@1", "test/mse@6", "test/mse@26", "test/mae@26", "test/naive_mse@26", "test/naive_mae@26"),
    "decision": ("rollout/return_mean@500", "rollout/normalized_score@500", "rollout/return_mean@250",
                 "rollout/normalized_score@250"),
    "events": ("test/log_likelihood", "test/true_log_likelihood", "test/time_mse", "test/mark_accuracy"),
}


def _task_config(task: str, attention: str, seed: int):
  name, _, extra = task.partition(":")
  module = importlib.import_module(f"experiments.configs.aaren_{name}")
  arg = ",".join([attention] + ([extra] if extra else []) + ["local"])
  config = module.get_config(arg)
  config.unlock()
  config.seed = seed
  config.lock()
  return name, arg, config


def final_metrics(workdir: str) -> dict[str, float]:
  """The last value of every key in the run's metrics.jsonl (the final evaluations included)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      out.update({k: v for k, v in json.loads(line).items() if isinstance(v, (int, float))})
  return out


def num_params(config) -> int:
  task = tasks.make_task(config)
  shapes = jax.eval_shape(lambda: task.model.init(jax.random.key(0), **task.init_inputs()))
  return sum(x.size for x in jax.tree.leaves(flax.core.meta.unbox(shapes["params"])))


def tasks_table(task_names, seeds) -> dict:
  results = {}
  path = os.path.join(RUNS_DIR.value, "results.json")
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
  for task in task_names:
    for attention in ATTENTIONS:
      for seed in seeds:
        key = f"{task}|{attention}|{seed}"
        if key in results:
          continue
        name, arg, config = _task_config(task, attention, seed)
        workdir = os.path.join(RUNS_DIR.value, task.replace(":", "_"), f"{attention}_seed{seed}")
        start = time.perf_counter()
        train.train_and_evaluate(config, workdir)
        metrics = dict(final_metrics(workdir), wall_s=time.perf_counter() - start)
        metrics["num_params"] = float(num_params(config))
        results[key] = dict(metrics, config=f"experiments/configs/aaren_{name}.py:{arg}")
        print(json.dumps({"run": key, **results[key]}), flush=True)
        os.makedirs(RUNS_DIR.value, exist_ok=True)
        with open(path, "w") as f:
          json.dump(results, f, indent=1)
  print_tables(results, task_names, seeds)
  return results


def print_tables(results, task_names, seeds) -> None:
  for task in task_names:
    keys = [k for k in TASK_METRICS[task.partition(":")[0]]]
    print(f"\n{task} ({len(seeds)} seeds, mean (sd))\n")
    print("| attention | " + " | ".join(keys) + " | params |")
    print("|---" * (len(keys) + 2) + "|")
    for attention in ATTENTIONS:
      runs = [results.get(f"{task}|{attention}|{s}") for s in seeds]
      runs = [r for r in runs if r]
      cells = []
      for k in keys:
        values = [r[k] for r in runs if k in r]
        cells.append(f"{np.mean(values):.4g} ({np.std(values):.2g})" if values else "-")
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
