r"""Generation speed of next-block vs next-token prediction, same model and weights, KV cache on both.

  python -m experiments.benchmark_generation [--settings paper,small] [--batches 1,8] [--repeats 3] \
      [--blocks 1x1x16] [--cache_phases 4] [--before REV]

Both samplers are `nbp.tasks.next_block.sample` (a prefill call, then one model call
per block in `--cache_phases` jitted `lax.fori_loop`s; a list such as 1,4 times
each) on the same `nbp.models.block_transformer` weights, frame prediction from given
frames, float32, top-p 0.9: block (1, 1, 1) is next-token prediction (NTP), each of `--blocks`
(t x h x w; default the 1x1x16 row of a 16x16 latent, the official benchmark's
16-token row block) a next-block (NBP) sampler. Every sampler is compiled and
run once, then the samplers are timed in turns (`--repeats` rounds, one
generation each, median), so that the load of a shared machine falls on all
of them alike. The prefill call alone is timed the same way.

Per setting and batch it prints, for every sampler: generated tokens/s and
latent frames/s of the whole generation (prefill included; the video frames
are 4x the latent frames for a 4x time-compressing tokenizer), the prefill's
seconds, the milliseconds of one block step after it, and the speed-up over
NTP, both for the whole generation and for the block steps alone.

Beside each time it prints its floor (nbp.roofline), from rates measured in
the same run: the memory bandwidth, and the matmul rate at the step's own
shape (batch x block rows through the width-to-MLP projection; the prefill's
rows for the prefill). A block step must read the weights and the cache it
attends over (the slots written so far: the mean over the generation's
steps) and do the FLOPs XLA counts for one step compiled alone at the mean
cache length (the model call and the top-p draw, as the sampler's loop body
does it); the prefill, its weights and the FLOPs of its compiled call.
`--generation_profile DIR` traces those two compiled calls and prints where their time
goes (nbp.profiling: by kind of XLA op and by model path).

--before REV also times the samplers of git revision REV (e.g. the commit
before a change) in a child process that waits for its turn, interleaved with
this checkout's: rows marked "(REV)". The child builds the same weights (same
init key) from REV's code.

Settings:
  paper  the setting in which the NBP authors' PyTorch sampler was measured on a like CPU:
         8 layers, width 512, 8 heads, vocab 1024, a 5x16x16 grid with 2 given
         frames (512-token prefix) and 3 generated (768 tokens)
  small  4 layers, width 256, 4 heads, vocab 1024, 5x8x8 grid, 2 given frames
         (128-token prefix), 3 generated (192 tokens); blocks wider than 8 are
         cut to the row (1x1x8)
SwiGLU MLP (hidden 8E/3), learned absolute positions, unstacked layers.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

try:
  from nbp import roofline
except ImportError:  # the --before child runs this file against a revision older than nbp.roofline
  roofline = None
try:
  from nbp import profiling
except ImportError:  # and than nbp.profiling (the child never profiles)
  profiling = None

SETTINGS = {  # name: (layers, width, heads, vocab, grid, given frames)
    "paper": (8, 512, 8, 1024, (5, 16, 16), 2),
    "small": (4, 256, 4, 1024, (5, 8, 8), 2),
}
TOP_P = 0.9

SETTINGS_FLAG = flags.DEFINE_list("settings", ["paper", "small"], f"Rows of the table: {list(SETTINGS)}.")
BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds (after one compile-and-run of every sampler).")
BLOCKS = flags.DEFINE_list("blocks", ["1x1x16"], "NBP blocks t x h x w (NTP, 1x1x1, always runs).")
CACHE_PHASES = flags.DEFINE_list("cache_phases", ["4"], "Decoding phases of nbp.tasks.next_block.sample (a list: each).")
BEFORE = flags.DEFINE_string("before", "", "A git revision whose samplers to time alongside (e.g. HEAD~1).")
PROFILE = flags.DEFINE_string("generation_profile", "", "If set, a directory where each model's block step and prefill "
                              "are traced; where their time goes is printed (nbp.profiling).")
BREAKDOWN = flags.DEFINE_bool("breakdown", False, "Also time the parts of each sampler's block step "
                              "(step_breakdown).")


def parse_block(text: str, grid) -> tuple[int, int, int]:
  block = tuple(int(x) for x in text.lower().split("x"))
  if len(block) != 3:
    raise ValueError(f"--blocks entry {text!r}: expected t x h x w, e.g. 1x1x16")
  return tuple(min(b, g) for b, g in zip(block, grid))


class Api:
  """The sampler API of a checkout: this one (nbp.tasks.next_block) or an older one (nbp.next_block).

  The --before child runs this file against an older revision's packages, so
  the benchmark reaches the model and sampler through here only.
  """

  def __init__(self):
    # Imported by name: the modules are those of whichever checkout is first on sys.path. The old
    # module is tried first: an installed (editable) checkout can still resolve the new names.
    try:  # a revision before the models/tasks layout
      self.model_module = self.tasks = importlib.import_module("nbp.next_block")
      self.new = False
    except ModuleNotFoundError:
      self.model_module = importlib.import_module("nbp.models.block_transformer")
      self.tasks = importlib.import_module("nbp.tasks.next_block")
      self.decoding = importlib.import_module("nbp.decoding")
      self.sampling = importlib.import_module("nbp.sampling")
      self.new = True

  def build(self, setting: str, block):
    """The setting's model with `block`."""
    layers, width, heads, vocab, grid, given = SETTINGS[setting]
    sizes = dict(grid=grid, block=tuple(block), condition="frames", prefix_frames=given, num_layers=layers,
                 width=width, num_heads=heads, num_kv_heads=heads, position="learned", scan_layers=False,
                 attention_impl="xla")
    if self.new:
      return self.model_module.NextBlockTransformer(codebook_size=vocab, **sizes)
    return self.model_module.NextBlockTransformer(vocab_size=vocab + 1, **sizes)

  def sample(self, model, params, rng, batch: int, prompt, phases):
    kwargs = {} if phases is None else {"cache_phases": phases}
    size = {"num_samples": batch} if self.new else {"batch_size": batch}
    return self.tasks.sample(model, params, rng, top_k=0, top_p=TOP_P, prompt=prompt, **size, **kwargs)

  def prefill(self, model, params, first):
    """The sampler's first call: the prefix and the start block into a cache that just fits them."""
    batch, length = first.shape
    if self.new:
      cache = self.decoding.init_cache(model, length, jnp.zeros((batch, 1), jnp.int32))
    elif "length" in inspect.signature(self.tasks.init_cache).parameters:
      cache = self.tasks.init_cache(model, batch, length=length)
    else:
      cache = self.tasks.init_cache(model, batch)
    call_kwargs = {"last": model.block_len} if "last" in inspect.signature(type(model).__call__).parameters else {}
    return model.apply({"params": params, "cache": cache}, first, decode=True, mutable=["cache"], **call_kwargs)


def compiled_runs(api: Api, setting: str, batch: int, blocks, cache_phases: list[int] | None):
  """{name: (run_sampler, run_prefill, model)}: callables timing one call each, compiled and warmed up.

  cache_phases None: the sampler of a revision without phases (its defaults);
  with more than one value, one sampler per value ("ntp, 4 phases").
  """
  models = {("ntp" if b == (1, 1, 1) else "nbp " + "x".join(map(str, b))): api.build(setting, b)
            for b in [(1, 1, 1)] + list(blocks)}
  first_model = list(models.values())[-1]
  params = jax.jit(first_model.init)(jax.random.key(0), jnp.zeros((1, first_model.num_tokens), jnp.int32))["params"]
  grid = first_model.grid
  prompt = jax.random.randint(jax.random.key(1), (batch, first_model.prefix_frames, *grid[1:]), 0,
                              first_model.vocab_size - 1)
  runs = {}
  variants = [(name, model, None) for name, model in models.items()] if cache_phases is None else [
      (name if len(cache_phases) == 1 else f"{name}, {n} phases", model, n)
      for name, model in models.items() for n in cache_phases]
  for name, model, phases in variants:
    sample = jax.jit(lambda p, r, x, model=model, phases=phases: api.sample(model, p, r, batch, x, phases))
    first = jnp.zeros((batch, model.prefix_len + model.block_len), jnp.int32)
    prefill = jax.jit(lambda p, x, model=model: api.prefill(model, p, x))
    start = time.perf_counter()
    jax.block_until_ready(sample(params, jax.random.key(0), prompt))  # compile and warm up
    first_call = time.perf_counter() - start
    jax.block_until_ready(prefill(params, first))

    def run_sampler(seed, sample=sample):
      start = time.perf_counter()
      jax.block_until_ready(sample(params, jax.random.key(seed), prompt))
      return time.perf_counter() - start

    def run_prefill(seed, prefill=prefill, first=first):
      del seed
      start = time.perf_counter()
      jax.block_until_ready(prefill(params, first))
      return time.perf_counter() - start

    run_sampler.first_call = first_call
    run_sampler.params = params
    runs[name] = (run_sampler, run_prefill, model)
  return runs


def step_floors(api: Api, model, params, batch: int, bandwidth: float, repeats: int = 5,
                profile_dir: str = "") -> dict:
  """{"step": Floor, "prefill": Floor} of `model`'s sampler at `batch` (this checkout's API only).

  With profile_dir, the step and the prefill are also traced there and where their time goes is printed.
  """
  block_len, start = model.block_len, model.prefix_len
  example = jnp.zeros((batch, 1), jnp.int32)
  slot_bytes = (roofline.tree_bytes(api.decoding.init_cache(model, 2, example))
                - roofline.tree_bytes(api.decoding.init_cache(model, 1, example)))  # keys and values of one slot
  weights = roofline.tree_bytes(params)
  # Step k (1 .. num_blocks - 1) attends over the start + (k + 1) L slots written once it has run.
  attended = [start + (k + 1) * block_len for k in range(1, model.num_blocks)]
  mean_len = int(round(np.mean(attended)))

  def one_step(params, cache, block, rng):  # the sampler's loop body: feed a block, draw the next
    slots = jnp.broadcast_to(mean_len - block_len + jnp.arange(block_len, dtype=jnp.int32), block.shape)
    logits, cache = api.decoding.apply_decoding(model, params, cache, block, slots=slots)
    return api.sampling.sample_tokens(rng, logits[..., :model.bos], top_p=TOP_P), cache

  cache = api.decoding.init_cache(model, mean_len, example)
  block = jnp.zeros((batch, block_len), jnp.int32)
  step = jax.jit(one_step).lower(params, cache, block, jax.random.key(0)).compile()
  first = jnp.zeros((batch, model.prefix_len + block_len), jnp.int32)
  prefill = jax.jit(lambda p, x: api.prefill(model, p, x)).lower(params, first).compile()
  if profile_dir:  # the step as the sampler runs it (in a loop carrying the cache), then the prefill
    def body(i, params, carry):
      cache, block = carry
      return one_step(params, cache, block, jax.random.fold_in(jax.random.key(0), i))[::-1]

    profiling.print_summary(f"{profile_dir}: step", profiling.profile_steps(
        body, params, (cache, block), 8, repeats, os.path.join(profile_dir, "step")))
    profiling.print_summary(f"{profile_dir}: prefill", profiling.profile_ops(
        prefill.as_text(), lambda: prefill(params, first), repeats, os.path.join(profile_dir, "prefill")))

  def rate(rows):
    return roofline.measure_matmul_rate(rows, model.embed_dim, api.model_module.mlp_dim(
        model.embed_dim, model.activation), repeats=repeats)

  return {
      "step": roofline.floor(weights + slot_bytes * float(np.mean(attended)), roofline.compiled_flops(step),
                             roofline.Machine(bandwidth, rate(batch * block_len))),
      "prefill": roofline.floor(weights + slot_bytes * first.shape[1], roofline.compiled_flops(prefill),
                                roofline.Machine(bandwidth, rate(batch * first.shape[1]))),
  }


def step_breakdown(api: Api, model, params, batch: int, repeats: int, iterations: int = 20) -> dict:
  """Milliseconds of one block step and of its parts, each compiled alone and run `iterations` times in a loop.

  "step": the sampler's loop body at the mean cache length (feed a block, draw
  the next at top-p); "model call": the same with a greedy draw (argmax), so
  the top-p draw costs the difference; "model call, no cache": with a cache of
  just the block's slots, so attention over the cache costs the difference;
  "top-p draw": the draw alone on logits of the step's shape.
  """
  block_len, start = model.block_len, model.prefix_len
  example = jnp.zeros((batch, 1), jnp.int32)
  mean_len = int(round(np.mean([start + (k + 1) * block_len for k in range(1, model.num_blocks)])))
  key = jax.random.key(0)

  def looped(body, *carry):
    fn = jax.jit(lambda p, *c: jax.lax.fori_loop(0, iterations, lambda i, c: body(p, i, *c), c))
    return 1e3 * roofline.median_seconds(lambda: fn(params, *carry), repeats) / iterations

  def feed(length, draw):
    slots = jnp.broadcast_to(length - block_len + jnp.arange(block_len, dtype=jnp.int32), (batch, block_len))

    def body(p, i, cache, block):
      logits, cache = api.decoding.apply_decoding(model, p, cache, block, slots=slots)
      return cache, draw(jax.random.fold_in(key, i), logits[..., :model.bos])
    return looped(body, api.decoding.init_cache(model, length, example), jnp.zeros((batch, block_len), jnp.int32))

  top_p = lambda k, logits: api.sampling.sample_tokens(k, logits, top_p=TOP_P)
  greedy = lambda k, logits: jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def draw_alone(p, i, logits):
    tokens = top_p(jax.random.fold_in(key, i), logits)
    return (logits + 1e-9 * tokens[..., None],)  # each draw depends on the last: none is hoisted

  logits = jax.random.normal(key, (batch, block_len, model.bos))
  return {"step": feed(mean_len, top_p), "model call": feed(mean_len, greedy),
          "model call, no cache": feed(block_len, greedy), "top-p draw": looped(draw_alone, logits)}


# The child process of --before: builds REV's samplers, then times one call per line of stdin.
CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(1, sys.argv[2])
import benchmark_generation_child_support as support
spec = json.loads(sys.argv[3])
runs = support.compiled_runs(support.Api(), spec["setting"], spec["batch"], [tuple(b) for b in spec["blocks"]], None)
print(json.dumps({n: [m.num_blocks, m.num_predicted] for n, (_, _, m) in runs.items()}), flush=True)
for line in sys.stdin:
  name, what, seed = line.rstrip("\n").split("|")
  run_sampler, run_prefill, _ = runs[name]
  print((run_sampler if what == "sample" else run_prefill)(int(seed)), flush=True)
"""


class Before:
  """REV's samplers in a child process, timed one call at a time."""

  def __init__(self, rev: str, setting: str, batch: int, blocks):
    self.rev = rev
    self.dir = tempfile.mkdtemp(prefix="nbp_before_")
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          check=True).stdout.strip()
    archive = subprocess.run(["git", "-C", root, "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", self.dir], input=archive, check=True)
    self.support_dir = tempfile.mkdtemp(prefix="nbp_before_support_")
    support = os.path.join(self.support_dir, "benchmark_generation_child_support.py")
    with open(__file__) as src, open(support, "w") as dst:
      dst.write(src.read())
    spec = json.dumps({"setting": setting, "batch": batch, "blocks": [list(b) for b in blocks]})
    self.proc = subprocess.Popen([sys.executable, "-c", CHILD, self.dir, os.path.dirname(support), spec],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.shapes = json.loads(self.proc.stdout.readline())

  def time(self, name: str, what: str, seed: int) -> float:
    self.proc.stdin.write(f"{name}|{what}|{seed}\n")
    self.proc.stdin.flush()
    return float(self.proc.stdout.readline())

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()
    shutil.rmtree(self.dir, ignore_errors=True)
    shutil.rmtree(self.support_dir, ignore_errors=True)


def measure(setting: str, batch: int, blocks, repeats: int, cache_phases: list[int], before_rev: str,
            bandwidth: float, profile_root: str = ""):
  """Rows of one setting and batch: every sampler timed in turns, beside its floors (profiled under profile_root)."""
  api = Api()
  runs = compiled_runs(api, setting, batch, blocks, cache_phases)
  floors = {}  # by model: the floors depend on its shapes, not on the phases or the revision
  for name, (run_sampler, _, model) in runs.items():
    base = name.split(", ")[0]
    if base not in floors:
      profile_dir = os.path.join(profile_root, f"{setting}_{base.replace(' ', '_')}_batch{batch}") \
          if profile_root else ""
      floors[base] = step_floors(api, model, run_sampler.params, batch, bandwidth, repeats + 2, profile_dir)
  timers = {name: (r[0], r[1]) for name, r in runs.items()}
  first_calls = {name: r[0].first_call for name, r in runs.items()}  # compile + one run
  shapes = {name: (r[2].num_blocks, r[2].num_predicted) for name, r in runs.items()}
  before = None
  if before_rev:
    before = Before(before_rev, setting, batch, blocks)
    for name, shape in before.shapes.items():
      tag = f"{name} ({before_rev})"
      timers[tag] = (lambda seed, n=name: before.time(n, "sample", seed),
                     lambda seed, n=name: before.time(n, "prefill", seed))
      shapes[tag] = tuple(shape)
  times = {name: {"sample": [], "prefill": []} for name in timers}
  try:
    for r in range(repeats):
      for name, (run_sampler, run_prefill) in timers.items():
        times[name]["sample"].append(run_sampler(r + 1))
        times[name]["prefill"].append(run_prefill(r + 1))
  finally:
    if before is not None:
      before.close()

  frames = SETTINGS[setting][4][0] - SETTINGS[setting][5]
  rows = []
  for name in timers:
    seconds = float(np.median(times[name]["sample"]))
    prefill = float(np.median(times[name]["prefill"]))
    num_blocks, num_predicted = shapes[name]
    ms_per_step = 1000 * (seconds - prefill) / max(num_blocks - 1, 1)
    floor = floors[name.split(", ")[0].split(" (")[0]]
    step_floor = {f"step_{k}": v for k, v in roofline.as_dict(ms_per_step / 1000, floor["step"]).items()}
    prefill_floor = {f"prefill_{k}": v for k, v in roofline.as_dict(prefill, floor["prefill"]).items()}
    rows.append({
        **step_floor, **prefill_floor,
        "setting": setting, "batch": batch, "sampler": name, "seconds": seconds, "prefill_seconds": prefill,
        "tokens_per_s": batch * num_predicted / seconds, "frames_per_s": batch * frames / seconds,
        "ms_per_step": ms_per_step,
        "steps_seconds": seconds - prefill, "all_seconds": times[name]["sample"],
        "first_call_seconds": first_calls.get(name)})
  for row in rows:  # speed-ups over the NTP sampler of the same code
    phases = row["sampler"].split(", ")[1].split(" (")[0] if ", " in row["sampler"] else None
    ntp_name = "ntp" + (f", {phases}" if phases else "") + (f" ({before_rev})" if "(" in row["sampler"] else "")
    ntp = next(r for r in rows if r["sampler"] == ntp_name)
    row["speedup"] = ntp["seconds"] / row["seconds"]
    row["steps_speedup"] = ntp["steps_seconds"] / row["steps_seconds"]
  return rows


def main(argv):
  del argv
  bandwidth = roofline.measure_bandwidth(repeats=REPEATS.value + 2)
  all_rows, breakdowns = [], []
  for setting in SETTINGS_FLAG.value:
    grid = SETTINGS[setting][4]
    blocks = [parse_block(b, grid) for b in BLOCKS.value]
    for batch in map(int, BATCHES.value):
      rows = measure(setting, batch, blocks, REPEATS.value, [int(n) for n in CACHE_PHASES.value], BEFORE.value,
                     bandwidth, PROFILE.value)
      for row in rows:
        print(json.dumps(row), flush=True)
      all_rows += rows
      if BREAKDOWN.value:
        api = Api()
        for block in [(1, 1, 1)] + blocks:
          model = api.build(setting, block)
          params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, model.num_tokens), jnp.int32))["params"]
          parts = step_breakdown(api, model, params, batch, REPEATS.value + 2)
          breakdowns.append({"setting": setting, "batch": batch, "block": "x".join(map(str, block)), **parts})
          print(json.dumps(breakdowns[-1]), flush=True)
  print(f"\n{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
        f"cache_phases={','.join(CACHE_PHASES.value)}, top-p {TOP_P}, median of {REPEATS.value} interleaved runs; "
        f"memory bandwidth {bandwidth / 1e9:.1f} GB/s\n")
  print("| setting | batch | sampler | tokens/s | latent frames/s | prefill s | prefill floor s | of floor | "
        "ms/step | step floor ms | of floor | speed-up | speed-up, steps only |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in all_rows:
    print(f"| {r['setting']} | {r['batch']} | {r['sampler']} | {r['tokens_per_s']:.0f} | "
          f"{r['frames_per_s']:.2f} | {r['prefill_seconds']:.2f} | {r['prefill_floor_ms'] / 1e3:.2f} "
          f"({r['prefill_floor_bound']}) | {r['prefill_of_floor']:.2f}x | {r['ms_per_step']:.1f} | "
          f"{r['step_floor_ms']:.1f} ({r['step_floor_bound']}) | {r['step_of_floor']:.2f}x | "
          f"{r['speedup']:.1f}x | {r['steps_speedup']:.1f}x |")
  if breakdowns:
    print("\nWhere a block step's time goes (ms, each part compiled alone at the mean cache length):\n")
    print("| setting | batch | block | step | model call (greedy) | attention over the cache | top-p draw "
          "(in the step) | top-p draw alone |\n|---|---|---|---|---|---|---|---|")
    for r in breakdowns:
      print(f"| {r['setting']} | {r['batch']} | {r['block']} | {r['step']:.2f} | {r['model call']:.2f} | "
            f"{r['model call'] - r['model call, no cache']:.2f} | {r['step'] - r['model call']:.2f} | "
            f"{r['top-p draw']:.2f} |")


if __name__ == "__main__":
  app.run(main)
