r"""Training throughput of the next-token baseline on this machine.

  python -m experiments.benchmark_throughput [--sizes tiny,S,M] [--seq_len 512] [--batch 8] \
      [--attention_impls auto,xla]

For each size and attention implementation (kernels.dispatch; "auto", the
configs' default, is block-sparse XLA on CPU from 512 tokens, "xla" dense
masked softmax): tokens/s of the jitted train step (forward, backward, AdamW),
its achieved FLOP/s (XLA's own count of the compiled step) as a fraction of a
dense float32 matmul measured in the same run, and its speed relative to the
first implementation listed. The matmul is timed before and after the models
and the mean is used, so machine noise shows as a spread.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.configs import ntp_text
from nbp.training import loop as train
from nbp.training import sharding

SIZES = flags.DEFINE_list("sizes", ["tiny", "S", "M"], "Variants from nbp.models.block_transformer.SIZES.")
SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Tokens per sequence.")
BATCH = flags.DEFINE_integer("batch", 8, "Sequences per step.")
REPEATS = flags.DEFINE_integer("timed_steps", 5, "Timed steps per size (after one warm-up).")
MATMUL = flags.DEFINE_integer("matmul", 2048, "Side of the square float32 matmul used as the peak.")
IMPLS = flags.DEFINE_list("attention_impls", ["auto", "xla"], "kernels.dispatch implementations, side by side.")


def _time(fn, repeats: int) -> float:
  """Median seconds of fn() over repeats, after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def matmul_flops_per_sec(n: int, repeats: int) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  return 2 * n ** 3 / _time(lambda: dot(a, b), repeats)


def train_step_rate(size: str, impl: str, seq_len: int, batch: int, repeats: int) -> dict:
  config = ntp_text.get_config(f"{size},local")
  config.model.grid = (1, 1, seq_len)
  config.model.attention_impl = impl
  config.batch_size = batch
  config.model.scan_layers = False
  s = train.setup(config)
  state = train.init_state(s, 0)
  tokens = np.random.default_rng(0).integers(0, 256, (batch, seq_len), dtype=np.int32)
  batch_arrays = sharding.global_batch({"tokens": tokens}, s.batch_sharding)
  rng = jax.random.key(0)
  with s.context():
    step = train.compile_train_step(s)
    compiled = step.lower(state, batch_arrays, rng).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan")))
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch_arrays, rng)
    return metrics["loss"]

  seconds = _time(run, repeats)
  params = sum(x.size for x in jax.tree.leaves(holder["state"].params))
  return {"size": size, "attention_impl": impl, "params": int(params), "seconds_per_step": seconds,
          "tokens_per_sec": batch * seq_len / seconds, "step_flops": flops, "flops_per_sec": flops / seconds}


def main(argv):
  del argv
  before = matmul_flops_per_sec(MATMUL.value, REPEATS.value)
  rows = [train_step_rate(size, impl, SEQ_LEN.value, BATCH.value, REPEATS.value)
          for size in SIZES.value for impl in IMPLS.value]
  after = matmul_flops_per_sec(MATMUL.value, REPEATS.value)
  peak = (before + after) / 2
  print(f"device: {jax.devices()[0].device_kind}, {jax.device_count()} device(s); "
        f"float32 {MATMUL.value}^3 matmul: {before / 1e9:.1f} / {after / 1e9:.1f} GFLOP/s (before / after)")
  print(f"batch {BATCH.value} x {SEQ_LEN.value} tokens, float32, AdamW step")
  print(f"| size | params | attention | tokens/s | vs {IMPLS.value[0]} | step GFLOP | achieved GFLOP/s | "
        "fraction of matmul |")
  print("|---|---|---|---|---|---|---|---|")
  first = {r["size"]: r for r in rows if r["attention_impl"] == IMPLS.value[0]}
  for r in rows:
    r["fraction_of_matmul"] = r["flops_per_sec"] / peak
    r["speed_vs_first"] = r["tokens_per_sec"] / first[r["size"]]["tokens_per_sec"]
    print(f"| {r['size']} | {r['params'] / 1e6:.2f}M | {r['attention_impl']} | {r['tokens_per_sec']:.0f} | "
          f"{r['speed_vs_first']:.2f} | {r['step_flops'] / 1e9:.1f} | {r['flops_per_sec'] / 1e9:.1f} | "
          f"{r['fraction_of_matmul']:.2f} |")
  print(json.dumps({"matmul_flops_per_sec": [before, after], "rows": rows}))


if __name__ == "__main__":
  app.run(main)
