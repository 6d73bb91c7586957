"""Attention kernels side by side: times and ratios measured in one run.

CPU (default), float32, forward + backward (jit of the gradient of a sum):
  1. xla_blocksparse (kernels/blocksparse.py) vs the dense XLA reference
     (kernels.reference.xla_attention with the dense block-causal mask),
     B=1, H=4, D=64, T in {1024, 4096, 8192}, L in {16, T/8}.
  2. Aaren scan attention (kernels.scan_attention.scan_attention_auto, impl
     "auto" = the chunked XLA scan on CPU) vs the best CPU causal attention
     (kernels.dispatch.attention, impl "auto" = xla_blocksparse) at the same T.

    python -m experiments.benchmark_kernels                # ~6 min on 2 cores
    python -m experiments.benchmark_kernels --lengths 1024 --repeats 3   # quick

Memory: a dense float32 score matrix is B*H*T^2*4 bytes, 1 GiB at T=8192, H=4;
the dense forward + backward keeps about four of them. A case whose estimate
exceeds 70% of the free memory is skipped with a note (24 GB machines run it).

GPU (--gpu), bfloat16, forward + backward:
  3. Pallas block_attention vs jax.nn.dot_product_attention(implementation=
     "cudnn") given the same dense mask, H=16, D=128, T in {2048, 8192, 16384,
     32768} (B=4 up to 8192, then 1), L in {16, 256, T/8}: times, ratio and
     TFLOP/s counted on the visible tiles only (visible_tile_fraction: 4*T*S*D*H
     per forward on the visible area, 2.5x that for the backward), and
     Pallas's TFLOP/s as a fraction of a bf16 8192^3 matmul timed in the run
     (the chip's reachable peak). The dense bool mask at 32k is 1 GiB, fine
     on an H200.
  4. Pallas scan_attention vs the associative-scan reference, forward+backward,
     and against its memory floor: the bytes it must move (inputs read in
     both passes, the output, its cotangent and the gradients) over the
     bandwidth of a large reduction timed in the run (nbp.roofline).
  --budget_s stops starting new cases when the time is spent (experiments/
  gpu_checks.sh gives it ~4 minutes).

Ratios > 1 mean the second-named (new) implementation is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels import block_attention
from kernels import blocksparse
from kernels import dispatch
from kernels import masks
from kernels import reference
from kernels import scan_attention
from nbp import roofline


def _sync(x):
  return jax.block_until_ready(x)


def time_side_by_side(fns: dict, args: tuple, repeats: int) -> dict:
  """Median seconds per call of each jitted fn, runs interleaved so that load affects all alike."""
  compile_s = {}
  for name, fn in fns.items():
    start = time.perf_counter()
    _sync(fn(*args))  # compile + first run
    compile_s[name] = time.perf_counter() - start
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      _sync(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}, compile_s


def grad_of_sum(fn):
  """jit(grad(sum(fn(*args)))) over every argument: the forward + backward pass."""
  return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=tuple(range(3))))


def free_bytes() -> int:
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError):
    return 1 << 62


def randn(key, shape, dtype):
  return jax.random.normal(jax.random.key(key), shape, jnp.float32).astype(dtype)


# ----------------------------------------------------------------------------
# CPU


def cpu_blocksparse_vs_dense(lengths, heads, dim, repeats, rows):
  print(f"\n## CPU: xla_blocksparse vs dense xla, float32, fwd+bwd, B=1 H={heads} D={dim}")
  print(f"{'T':>6} {'L':>5} {'dense s':>9} {'sparse s':>9} {'dense/sparse':>12} {'compile d/s s':>14}")
  for t in lengths:
    q, k, v = (randn(i, (1, t, heads, dim), jnp.float32) for i in range(3))
    for block_len in (16, t // 8):
      fns = {"sparse": grad_of_sum(lambda q, k, v, L=block_len: blocksparse.block_attention_blocksparse(
          q, k, v, block_len=L))}
      need = 4 * heads * t * t * 4
      if need < 0.7 * free_bytes():
        # The dense [1, 1, T, S] mask is built inside the jitted function (not a baked-in constant).
        fns["dense"] = grad_of_sum(lambda q, k, v, L=block_len: reference.xla_attention(
            q, k, v, masks.block_causal_mask(t, t, block_len=L)[None, None]))
      med, comp = time_side_by_side(fns, (q, k, v), repeats if t < 4096 else max(2, repeats - 2))
      dense = med.get("dense", float("nan"))
      note = "" if "dense" in med else f"  (dense skipped: ~{need / 2**30:.1f} GiB needed)"
      print(f"{t:>6} {block_len:>5} {dense:>9.4f} {med['sparse']:>9.4f} {dense / med['sparse']:>12.2f} "
            f"{comp.get('dense', float('nan')):>6.1f}/{comp['sparse']:<6.1f}{note}", flush=True)
      rows.append(dict(section="cpu_blocksparse", T=t, L=block_len, dense_s=dense, sparse_s=med["sparse"],
                       ratio=dense / med["sparse"]))


def cpu_scan_vs_causal(lengths, heads, dim, repeats, rows):
  print(f"\n## CPU: scan attention (scan_attention_auto, impl auto) vs causal attention "
        f"(dispatch auto), float32, fwd+bwd, B=1 H={heads} D={dim}")
  print(f"{'T':>6} {'causal s':>9} {'scan s':>9} {'causal/scan':>12} {'causal impl':>16}")
  causal = masks.MaskSpec("causal")
  for t in lengths:
    q, k, v = (randn(i, (1, t, heads, dim), jnp.float32) for i in range(3))
    s = randn(3, (1, t, heads), jnp.float32) * 2.0
    impl = dispatch.resolve_impl("auto", jax.default_backend(), t, t, 0)
    attend = grad_of_sum(lambda q, k, v: dispatch.attention(q, k, v, mask=causal, impl="auto"))
    scan = jax.jit(jax.grad(lambda s, v: jnp.sum(scan_attention.scan_attention_auto(s, v)), argnums=(0, 1)))
    # Interleaved by hand: the two take different arguments. First calls compile.
    _sync(attend(q, k, v))
    _sync(scan(s, v))
    ta, ts = [], []
    for _ in range(repeats if t < 4096 else max(2, repeats - 2)):
      start = time.perf_counter(); _sync(attend(q, k, v)); ta.append(time.perf_counter() - start)
      start = time.perf_counter(); _sync(scan(s, v)); ts.append(time.perf_counter() - start)
    a, sc = float(np.median(ta)), float(np.median(ts))
    print(f"{t:>6} {a:>9.4f} {sc:>9.4f} {a / sc:>12.2f} {impl:>16}", flush=True)
    rows.append(dict(section="cpu_scan", T=t, causal_s=a, scan_s=sc, ratio=a / sc, causal_impl=impl))


# ----------------------------------------------------------------------------
# GPU


def gpu_block_attention_vs_cudnn(lengths, block_lens, heads, dim, block, repeats, deadline, rows):
  peak = roofline.measure_matmul_rate(8192, 8192, 8192, jnp.bfloat16, repeats)
  print(f"\n## GPU: Pallas block_attention vs cuDNN (dense mask), bfloat16, fwd+bwd, H={heads} D={dim}, "
        f"tiles {block}x{block}; bf16 8192^3 matmul: {peak / 1e12:.1f} TFLOP/s (the peak below)")
  print(f"{'B':>2} {'T':>6} {'L':>5} {'visible':>7} {'cudnn ms':>9} {'pallas ms':>9} {'cudnn/pallas':>12} "
        f"{'pallas TF/s':>11} {'of peak':>7} {'cudnn TF/s':>10}")
  for t in lengths:
    batch = 4 if t <= 8192 else 1
    q, k, v = (randn(i, (batch, t, heads, dim), jnp.bfloat16) for i in range(3))
    for block_len in block_lens(t):
      if time.monotonic() > deadline:
        print(f"   (time budget spent: T={t} L={block_len} and later cases skipped)", flush=True)
        return
      frac = block_attention.visible_tile_fraction(t, t, block_len, 0, block, block)
      flops = 3.5 * 4.0 * batch * t * t * dim * heads * frac  # fwd + 2.5x bwd, visible tiles only
      fns = {
          "pallas": grad_of_sum(lambda q, k, v, L=block_len: block_attention.block_attention(
              q, k, v, block_len=L, block_q=block, block_k=block)),
          # The same mask as a dense [1, 1, T, S] bool, built inside the jitted function.
          "cudnn": grad_of_sum(lambda q, k, v, L=block_len: jax.nn.dot_product_attention(
              q, k, v, mask=masks.block_causal_mask(t, t, block_len=L)[None, None],
              implementation="cudnn")),
      }
      try:
        med, _ = time_side_by_side(fns, (q, k, v), repeats)
      except Exception as e:  # pylint: disable=broad-except
        print(f"{batch:>2} {t:>6} {block_len:>5}  failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        continue
      p, c = med["pallas"], med["cudnn"]
      print(f"{batch:>2} {t:>6} {block_len:>5} {frac:>7.3f} {c * 1e3:>9.2f} {p * 1e3:>9.2f} {c / p:>12.2f} "
            f"{flops / p / 1e12:>11.1f} {flops / p / peak:>7.2f} {flops / c / 1e12:>10.1f}", flush=True)
      rows.append(dict(section="gpu_block_attention", B=batch, T=t, L=block_len, visible=frac, cudnn_s=c,
                       pallas_s=p, ratio=c / p, pallas_tflops=flops / p / 1e12, pallas_of_peak=flops / p / peak,
                       peak_tflops=peak / 1e12))


def gpu_scan(lengths, heads, dim, repeats, deadline, rows):
  bandwidth = roofline.measure_bandwidth(repeats=repeats)
  print(f"\n## GPU: Pallas scan_attention vs associative scan, fwd+bwd, H={heads} D={dim}, v bfloat16; "
        f"memory-bound: floor = (3 x scores + 5 x values bytes: inputs read twice, output, its cotangent and "
        f"the gradients once) / {bandwidth / 1e9:.0f} GB/s (a 256 MB reduction)")
  print(f"{'B':>2} {'T':>6} {'assoc ms':>9} {'pallas ms':>9} {'assoc/pallas':>12} {'floor ms':>8} {'pallas/floor':>12}")
  for t in lengths:
    if time.monotonic() > deadline:
      print(f"   (time budget spent: T={t} and later skipped)", flush=True)
      return
    batch = 4 if t <= 8192 else 1
    s = randn(0, (batch, t, heads), jnp.float32) * 2.0
    v = randn(1, (batch, t, heads, dim), jnp.bfloat16)
    fns = {name: jax.jit(jax.grad(lambda s, v, f=f: jnp.sum(f(s, v).astype(jnp.float32)), argnums=(0, 1)))
           for name, f in (("pallas", scan_attention.scan_attention),
                           ("assoc", scan_attention.scan_attention_reference))}
    try:
      med, _ = time_side_by_side(fns, (s, v), repeats)
    except Exception as e:  # pylint: disable=broad-except
      print(f"{batch:>2} {t:>6}  failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
      continue
    floor = (3 * s.nbytes + 5 * v.nbytes) / bandwidth
    print(f"{batch:>2} {t:>6} {med['assoc'] * 1e3:>9.2f} {med['pallas'] * 1e3:>9.2f} "
          f"{med['assoc'] / med['pallas']:>12.2f} {floor * 1e3:>8.3f} {med['pallas'] / floor:>12.2f}", flush=True)
    rows.append(dict(section="gpu_scan", B=batch, T=t, assoc_s=med["assoc"], pallas_s=med["pallas"],
                     ratio=med["assoc"] / med["pallas"], floor_s=floor, pallas_of_floor=med["pallas"] / floor))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--gpu", action="store_true", help="the GPU section instead of the CPU one")
  parser.add_argument("--lengths", type=int, nargs="*", default=None, help="sequence lengths T")
  parser.add_argument("--repeats", type=int, default=5, help="timed runs per case after warm-up")
  parser.add_argument("--budget_s", type=float, default=240.0, help="GPU: start no case after this")
  parser.add_argument("--block", type=int, default=64, help="GPU: Pallas tile rows (q and k)")
  parser.add_argument("--json", default=None, help="also write the measured rows here")
  parser.add_argument("--skip_scan", action="store_true")
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
  rows = []
  if args.gpu:
    if jax.default_backend() != "gpu":
      sys.exit("--gpu needs a GPU backend (jax[cuda12])")
    deadline = time.monotonic() + args.budget_s
    lengths = args.lengths or [2048, 8192, 16384, 32768]
    gpu_block_attention_vs_cudnn(lengths, lambda t: (16, 256, t // 8), 16, 128, args.block, args.repeats,
                                 deadline, rows)
    if not args.skip_scan:
      gpu_scan([t for t in lengths if t != 16384], 16, 128, args.repeats, deadline + 60, rows)
  else:
    lengths = args.lengths or [1024, 4096, 8192]
    cpu_blocksparse_vs_dense(lengths, 4, 64, args.repeats, rows)
    if not args.skip_scan:
      cpu_scan_vs_causal(lengths, 4, 64, args.repeats, rows)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
