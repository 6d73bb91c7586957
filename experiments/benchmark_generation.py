r"""Generation speed of next-block (row blocks) vs next-token prediction, same model, KV cache on both.

  python -m experiments.benchmark_generation [--settings paper,small] [--batches 1,8] [--repeats 2]

Both samplers are `nbp.next_block.sample` (one jitted `lax.fori_loop`, one
model call per block) on the same `NextBlockTransformer`, frame prediction
with a given prefix: block (1, 1, W) for NBP, (1, 1, 1) for NTP. Each is
compiled and run once, then timed `--repeats` times (median); it reports
generated latent frames/s and tokens/s of the whole generation (prefill
included), the time of one decode call after the prefill (one block: W tokens
for NBP, one for NTP), and the NBP/NTP ratio.

Settings:
  paper  the DESIGN's reference CPU measurement of the official PyTorch sampler:
         8 layers, width 512, 8 heads, vocab 1024, a 5x16x16 grid with 2 given
         frames (512-token prefix) and 3 generated (768 tokens; rows of 16)
  small  4 layers, width 256, 4 heads, vocab 1024, 5x8x8 grid, 2 given frames
         (128-token prefix), 3 generated (192 tokens; rows of 8)
SwiGLU MLP (hidden 8E/3), learned absolute positions, float32, unstacked layers.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from nbp import next_block

SETTINGS = {  # name: (layers, width, heads, vocab, grid, given frames)
    "paper": (8, 512, 8, 1024, (5, 16, 16), 2),
    "small": (4, 256, 4, 1024, (5, 8, 8), 2),
}

SETTINGS_FLAG = flags.DEFINE_list("settings", ["paper", "small"], f"Rows of the table: {list(SETTINGS)}.")
BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs per sampler (after one compile-and-run).")


def build(setting: str, block_w: int) -> next_block.NextBlockTransformer:
  layers, width, heads, vocab, grid, given = SETTINGS[setting]
  return next_block.NextBlockTransformer(
      vocab_size=vocab + 1, grid=grid, block=(1, 1, block_w), condition="frames", prefix_frames=given,
      num_layers=layers, width=width, num_heads=heads, num_kv_heads=heads, position="learned",
      scan_layers=False, attention_impl="xla")


def time_sampler(model, params, batch: int, repeats: int) -> float:
  """Median seconds of one whole generation (compiled beforehand)."""
  prompt = jax.random.randint(jax.random.key(1), (batch, model.prefix_frames, *model.grid[1:]), 0,
                              model.vocab_size - 1)
  fn = jax.jit(lambda p, r, x: next_block.sample(model, p, r, batch_size=batch, top_k=0, top_p=0.9,
                                                 prompt=x))
  jax.block_until_ready(fn(params, jax.random.key(0), prompt))  # compile and warm up
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(params, jax.random.key(i + 1), prompt))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def time_prefill(model, params, batch: int, repeats: int) -> float:
  """Median seconds of the prefill call alone (the given frames and the start block)."""
  first = jnp.zeros((batch, model.prefix_len + model.block_len), jnp.int32)
  fn = jax.jit(lambda p, x: model.apply({"params": p, "cache": next_block.init_cache(model, batch)}, x,
                                        decode=True, mutable=["cache"]))
  jax.block_until_ready(fn(params, first))
  times = []
  for _ in range(max(repeats, 2)):
    start = time.perf_counter()
    jax.block_until_ready(fn(params, first))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  del argv
  rows = []
  for setting in SETTINGS_FLAG.value:
    nbp_model = build(setting, SETTINGS[setting][4][2])
    ntp_model = build(setting, 1)
    inputs = jnp.zeros((1, nbp_model.num_tokens), jnp.int32)
    params = jax.jit(nbp_model.init)(jax.random.key(0), inputs)["params"]  # the same weights serve both
    frames = nbp_model.grid[0] - nbp_model.prefix_frames
    for batch in map(int, BATCHES.value):
      row = {"setting": setting, "batch": batch, "generated_tokens": nbp_model.num_predicted}
      for name, model in (("ntp", ntp_model), ("nbp", nbp_model)):
        seconds = time_sampler(model, params, batch, REPEATS.value)
        row[f"{name}_seconds"] = seconds
        row[f"{name}_frames_per_s"] = batch * frames / seconds
        row[f"{name}_tokens_per_s"] = batch * model.num_predicted / seconds
        prefill = time_prefill(model, params, batch, REPEATS.value)
        row[f"{name}_prefill_seconds"] = prefill
        row[f"{name}_ms_per_call"] = 1000 * (seconds - prefill) / (model.num_blocks - 1)  # block steps only
      row["speedup"] = row["ntp_seconds"] / row["nbp_seconds"]
      rows.append(row)
      print(json.dumps(row), flush=True)
  print("\n| setting | batch | NTP tok/s | NBP tok/s | NTP frames/s | NBP frames/s | NTP ms/call | "
        "NBP ms/call | NBP/NTP |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['setting']} | {r['batch']} | {r['ntp_tokens_per_s']:.0f} | {r['nbp_tokens_per_s']:.0f} | "
          f"{r['ntp_frames_per_s']:.3f} | {r['nbp_frames_per_s']:.2f} | {r['ntp_ms_per_call']:.1f} | "
          f"{r['nbp_ms_per_call']:.1f} | {r['speedup']:.1f}x |")


if __name__ == "__main__":
  app.run(main)
