r"""Training throughput and model FLOPs utilisation (MFU) of every family's local config.

  python -m experiments.benchmark_throughput [--families ntp,nbp,xar,aaren,ebt] [--sizes S,M] \
      [--attention_impls config] [--batch 0] [--timed_steps 5] [--throughput_data_dir DIR] \
      [--throughput_profile DIR]
  # one config's step instead, e.g. the demo's, on N CPU devices:
  python -m experiments.benchmark_throughput --step_config experiments/configs/nbp_digits.py:XS,local,tokens,row \
      --step_config.data.token_dir=runs/demo/tokens --attention_impls xla,xla_blocksparse [--num_cpu_devices 2]
  # two settings of one config, side by side (the step-time ratio to the first is printed):
  python -m experiments.benchmark_throughput --step_config experiments/configs/video_tokenizer_digits.py:local \
      --step_variants model.resample=space_to_depth --step_variants model.resample=conv

For each family, size and attention implementation: the jitted train step
(forward, backward, AdamW) of the family's local config with `model.variant`
set to the size, on a batch of its own training data. It prints the step
time, XLA's FLOP count of the compiled step, the achieved FLOP/s and the MFU:
that rate over the matmul rate the training loop measures at start-up
(nbp.roofline.peak_matmul_rate: a square matmul in the config's dtype),
measured here before and after the models, their mean used. The target for
the M sizes is an MFU of at least 0.5. Where a model falls short, the last
two columns say how much of it its width explains: the rate of a
[4096, E] @ [E, 4E] matmul (E the model's width) over the peak, and the
step's rate over that one. `--throughput_profile DIR` also traces each row's step
(nbp.profiling) and prints where its time goes: by kind of XLA op (matmul,
elementwise, layout copy, loop) and by model path.

`--step_variants` (repeated; with `--step_config`) times the config once per
variant, each "KEY=VALUE[,KEY=VALUE...]" of dotted config keys, one after the
other in the same process, and prints each step time's ratio to the first
variant's.

Families (their config, the variant set to SIZE):
  ntp    ntp_text.py:SIZE,local             bytes, 256-byte windows, batch 16
  nbp    nbp_digits.py:SIZE,local,row       moving digits as pixels, 576 tokens, batch 8
  xar    xar_digits.py:cell,SIZE            sklearn digits, 4x4 cells, batch 64
  aaren  aaren_forecasting.py:aaren,local   ETT-like series (the embedded default), Aaren layers
  ebt    ebt_text.py:s2,local,SIZE          bytes, System 2 (2 thinking steps), batch 16
`--attention_impls` sets model.attention_impl where the model has it ("config":
the config's own); `--batch` > 0 overrides every config's batch.
"""

from __future__ import annotations

import ast
import functools
import importlib
import json
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from experiments import common
from nbp import profiling, roofline
from nbp.training import loop as train

FAMILIES = {  # family: (config module, argument with {size})
    "ntp": ("ntp_text", "{size},local"),
    "nbp": ("nbp_digits", "{size},local,row"),
    "xar": ("xar_digits", "cell,{size}"),
    "aaren": ("aaren_forecasting", "aaren,local"),
    "ebt": ("ebt_text", "s2,local,{size}"),
}

FAMILIES_FLAG = flags.DEFINE_list("families", list(FAMILIES), f"Families: {list(FAMILIES)}.")
SIZES = flags.DEFINE_list("sizes", ["S", "M"], "model.variant values (each family's SIZES table).")
IMPLS = flags.DEFINE_list("attention_impls", ["config"], "model.attention_impl values, side by side; "
                          "'config': the config's own.")
BATCH = flags.DEFINE_integer("batch", 0, "Examples per step; 0: each config's own.")
REPEATS = flags.DEFINE_integer("timed_steps", 5, "Timed steps per row (after one warm-up).")
DATA_DIR = flags.DEFINE_string("throughput_data_dir", "", "Overrides config.data.dir (where generated datasets "
                               "are cached).")
STEP_CONFIG = config_flags.DEFINE_config_file(
    "step_config", None, "One config to time instead of the families' (e.g. the demo's "
    "nbp_digits.py:XS,local,tokens,row with --step_config.data.token_dir=runs/demo/tokens).")
VARIANTS = flags.DEFINE_multi_string("step_variants", [], "With --step_config: KEY=VALUE[,KEY=VALUE...] of dotted "
                                      "config keys; each one is timed, side by side.")
PROFILE = flags.DEFINE_string("throughput_profile", "", "If set, a directory: each row's step is traced there "
                              "and its time split by kind of op and by model path.")


def parse_variant(text: str) -> dict[str, str]:
  """{dotted key: value text} of a --step_variants item "KEY=VALUE[,KEY=VALUE...]"."""
  out = {}
  for item in text.split(","):
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--step_variants {text!r}: expected KEY=VALUE[,KEY=VALUE...], got {item!r}")
    out[key] = value
  return out


def set_key(config, key: str, text: str) -> None:
  """config[key] = text, typed like the value it replaces (a dotted key the config lacks is an error naming it)."""
  try:
    old = functools.reduce(lambda node, part: node[part], key.split("."), config)
  except (KeyError, AttributeError, TypeError):  # a missing part, or a part below a leaf
    raise KeyError(f"--step_variants: the config has no key {key!r}") from None
  if isinstance(old, bool):
    if text not in ("True", "False", "true", "false"):
      raise ValueError(f"--step_variants {key}={text!r}: expected True or False")
    value = text in ("True", "true")
  elif old is None or isinstance(old, (tuple, list)):
    value = ast.literal_eval(text)
  else:
    value = type(old)(text)
  config.update_from_flattened_dict({key: value})


def family_config(family: str, size: str, impl: str = "config", batch: int = 0, data_dir: str = "",
                  given=None, overrides: dict[str, str] | None = None):
  """The family's local config at `size` (model.variant), or the `given` config as it is, with the attention impl,
  batch and dotted-key `overrides` given."""
  if given is not None:
    config = given.copy_and_resolve_references()
    config.unlock()
    what = f"the given {family} config's"
  else:
    module, arg = FAMILIES[family]
    what = f"{module}.py's"
    config = importlib.import_module(f"experiments.configs.{module}").get_config(arg.format(size=size))
    config.unlock()
    config.model.variant = size
    for key in ("num_layers", "width", "num_heads", "num_kv_heads"):  # explicit sizes would override the variant
      if key in config.model:
        config.model[key] = None
  if impl != "config":
    if "attention_impl" not in config.model:
      raise ValueError(f"--attention_impls={impl}: {what} model has no attention_impl")
    config.model.attention_impl = impl
  if batch:
    config.batch_size = batch
  if data_dir:
    config.data.dir = data_dir
  for key, text in (overrides or {}).items():
    set_key(config, key, text)
  config.lock()
  return config


def train_step_rate(config, repeats: int, profile_dir: str = "") -> dict:
  """Seconds per train step of `config` on one batch of its training data, and XLA's FLOPs of the step.

  With profile_dir, also "profile": the step's ops traced there (nbp.profiling.profile_ops), longest first.
  """
  s = train.setup(config)
  compiled, flops, state, batch = train.compile_on_data(s)
  rng = jax.random.key(0)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch, rng)
    return metrics["loss"]

  seconds = roofline.median_seconds(run, repeats)
  width = getattr(s.task.model, "embed_dim", None)  # (a convolutional model has none)
  # What matmuls as narrow as the model's reach: [4096, E] @ [E, 4E], the shape of its widest projection.
  width_rate = roofline.measure_matmul_rate(4096, width, 4 * width, repeats=repeats) if width else float("nan")
  row = {"params": int(params), "batch": config.batch_size, "width": width, "seconds_per_step": seconds,
         "step_flops": flops, "flops_per_sec": flops / seconds, "width_matmul_flops_per_sec": width_rate}
  if profile_dir:
    row["profile"] = profiling.profile_ops(compiled.as_text(), run, repeats, profile_dir)
  return row


def main(argv):
  del argv
  common.initialize()  # --num_cpu_devices: CPU devices the batch is split over
  dtype = "float32"  # the local configs' dtype
  before = roofline.measure_matmul_rate(*(3 * [roofline.PEAK_MATMUL_SIDE.get(jax.default_backend(), 8192)]),
                                        repeats=REPEATS.value)
  rows = []
  cases = [(f, size) for f in FAMILIES_FLAG.value for size in SIZES.value]
  if VARIANTS.value and STEP_CONFIG.value is None:
    raise ValueError("--step_variants needs --step_config (the config whose keys it sets)")
  variants = VARIANTS.value or [""]
  if STEP_CONFIG.value is not None:
    cases = [(STEP_CONFIG.value.family, STEP_CONFIG.value.model.get("variant", ""))]
  for family, size in cases:
    for impl in IMPLS.value:
      for variant in variants:
        overrides = parse_variant(variant) if variant else {}
        config = family_config(family, size, impl, BATCH.value, DATA_DIR.value, STEP_CONFIG.value, overrides)
        name = "_".join(filter(None, [family, size, impl, variant.replace("=", "-").replace(",", "_")]))
        profile_dir = os.path.join(PROFILE.value, name) if PROFILE.value else ""
        row = {"family": family, "size": size, "attention_impl": impl, "variant": variant,
               **train_step_rate(config, REPEATS.value, profile_dir)}
        ops = row.pop("profile", None)
        print(json.dumps(row), flush=True)
        if ops:
          profiling.print_summary(f"{family} {size} ({impl}{', ' + variant if variant else ''})", ops)
        rows.append(row)
  after = roofline.measure_matmul_rate(*(3 * [roofline.PEAK_MATMUL_SIDE.get(jax.default_backend(), 8192)]),
                                       repeats=REPEATS.value)
  peak = (before + after) / 2
  if jax.default_backend() == "cpu":  # CPU devices (--num_cpu_devices) share the host's cores; FLOPs are per device
    peak /= jax.local_device_count()
  print(f"\n{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; {dtype} matmul (the loop's start-up "
        f"measure): {before / 1e9:.1f} / {after / 1e9:.1f} GFLOP/s before / after; median of {REPEATS.value} "
        "steps\n")
  print("| family | size | variant | params | width | attention | batch | ms/step | of the first variant's | "
        "GFLOP/step (XLA) | achieved GFLOP/s | MFU | width's matmul / peak | of the width's matmul |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  first = {}
  for r in rows:
    r["mfu"] = r["flops_per_sec"] / peak
    r["width_matmul_of_peak"] = r["width_matmul_flops_per_sec"] / peak
    r["of_width_matmul"] = r["flops_per_sec"] / r["width_matmul_flops_per_sec"]
    base = first.setdefault((r["family"], r["size"], r["attention_impl"]), r["seconds_per_step"])
    r["of_first_variant"] = r["seconds_per_step"] / base
    print(f"| {r['family']} | {r['size']} | {r['variant'] or '-'} | {r['params'] / 1e6:.2f}M | {r['width']} | "
          f"{r['attention_impl']} | {r['batch']} | {1e3 * r['seconds_per_step']:.1f} | {r['of_first_variant']:.2f} | "
          f"{r['step_flops'] / 1e9:.2f} | "
          f"{r['flops_per_sec'] / 1e9:.1f} | {r['mfu']:.2f} | {r['width_matmul_of_peak']:.2f} | "
          f"{r['of_width_matmul']:.2f} |")
  print(json.dumps({"matmul_flops_per_sec": [before, after], "rows": rows}))


if __name__ == "__main__":
  app.run(main)
