r"""What the machine allows a compiled step: its floor, measured in the same run.

A step must at least read the bytes it depends on (weights, and the cache it
attends over) and do its arithmetic. Both rates are measured on this machine,
in this process, with the threads the caller's programs use:

  bandwidth    bytes/s of a large float32 array reduction (one pass over
               memory, far larger than the caches; the fastest of a full
               sum and two vector-matrix products);
  matmul rate  FLOP/s XLA reaches on a matmul of the step's own shape and
               dtype (a (M, K) @ (K, N) product, M the rows the step feeds
               through its projections: batch x tokens per step).

The floor of a step is the larger of bytes / bandwidth and FLOPs / matmul
rate, with the FLOPs as XLA counts them for the compiled step
(`compiled.cost_analysis()`), so the arithmetic the program really does, not
a formula. `Floor.bound` names which term wins. A step whose weights and
cache sit in caches can beat the bandwidth term: a ratio under 1 says so.
Benchmarks print time, floor and their ratio (`as_dict`); the training
loop logs model FLOPs utilisation against `peak_matmul_rate`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

BANDWIDTH_BYTES = 1 << 28  # 256 MiB: well beyond any cache
PEAK_MATMUL_SIDE = {"cpu": 1024}  # the start-up "peak" matmul side per platform; others 8192
MATMUL_FLOPS_PER_CALL = 2e9  # work per timed call of measure_matmul_rate (about 20-50 ms on 2 CPU cores)


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """Median wall seconds of fn() (blocked until ready) over `repeats`, after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure_bandwidth(num_bytes: int = BANDWIDTH_BYTES, repeats: int = 5) -> float:
  """Bytes/s of reading a float32 array of `num_bytes` once: the fastest of three reductions.

  A full sum, and a vector-matrix product over the array as [1024, N] and as
  [4096, N] (how a decode step reads its weights; on 2 CPU cores the full sum
  reached about half the rate of the [4096, N] product). The fastest is what
  the machine allows.
  """
  x = jnp.ones((num_bytes // 4,), jnp.float32)
  total, product = jax.jit(jnp.sum), jax.jit(jnp.dot)
  times = [median_seconds(lambda: total(x), repeats)]
  for rows in (1024, 4096):
    matrix, vector = x.reshape(rows, -1), jnp.ones((rows,), jnp.float32)
    times.append(median_seconds(lambda: product(vector, matrix), repeats))
  return x.nbytes / min(times)


def measure_matmul_rate(m: int, k: int, n: int, dtype=jnp.float32, repeats: int = 5,
                        flops_per_call: float = MATMUL_FLOPS_PER_CALL) -> float:
  """FLOP/s of (m, k) @ (k, n) matmuls in `dtype`, as a compiled loop would run them.

  One jitted call runs enough of them in a `lax.fori_loop` to do about
  `flops_per_call` FLOPs, so a small shape (a decode step's few rows) is timed
  without the per-call dispatch a sampler's jitted loop does not pay. Each
  iteration shifts the left operand by its index so the product cannot be
  hoisted out of the loop (an m x k add beside 2mkn FLOPs).
  """
  a = jax.random.normal(jax.random.key(0), (m, k), dtype)
  b = jax.random.normal(jax.random.key(1), (k, n), dtype) / np.sqrt(k)
  iterations = int(np.clip(flops_per_call // (2 * m * k * n), 1, 100_000))

  @jax.jit
  def products(a, b):
    def body(i, acc):
      return acc + jnp.dot(a + i.astype(dtype), b, preferred_element_type=jnp.float32)
    return jax.lax.fori_loop(0, iterations, body, jnp.zeros((m, n), jnp.float32))

  return 2 * m * k * n * iterations / median_seconds(lambda: products(a, b), repeats)


@functools.lru_cache(maxsize=None)
def peak_matmul_rate(dtype: str = "float32") -> float:
  """FLOP/s of a square matmul on the default device, measured once per process.

  The side is 1024 on CPU (a few hundred ms) and 8192 on accelerators, large
  enough that launch overheads vanish. This is the denominator of the
  training loop's model FLOPs utilisation.
  """
  side = PEAK_MATMUL_SIDE.get(jax.default_backend(), 8192)
  return measure_matmul_rate(side, side, side, jnp.dtype(dtype), repeats=3)


@dataclasses.dataclass(frozen=True)
class Machine:
  """The two rates a floor needs, measured in this run."""
  bandwidth: float  # bytes/s
  matmul_rate: float  # FLOP/s at the step's shape and dtype



def compiled_flops(compiled) -> float:
  """FLOPs of one call of a compiled program, as XLA counts them (per device under SPMD)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  if not flops > 0:
    raise ValueError("XLA reported no FLOP count for this program (cost_analysis() has no positive 'flops').")
  return flops


def tree_bytes(*trees) -> int:
  """Bytes of every array leaf of `trees` (weights, caches)."""
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for t in trees for x in jax.tree.leaves(t)))


@dataclasses.dataclass(frozen=True)
class Floor:
  """The least time a step can take on a machine: max(bytes / bandwidth, FLOPs / matmul rate)."""
  bytes_read: int
  flops: float
  memory_seconds: float
  compute_seconds: float

  @property
  def seconds(self) -> float:
    return max(self.memory_seconds, self.compute_seconds)

  @property
  def bound(self) -> str:
    return "bandwidth" if self.memory_seconds >= self.compute_seconds else "compute"


def floor(bytes_read: int, flops: float, machine: Machine) -> Floor:
  return Floor(bytes_read=int(bytes_read), flops=float(flops), memory_seconds=bytes_read / machine.bandwidth,
               compute_seconds=flops / machine.matmul_rate)


def as_dict(seconds: float, step_floor: Floor) -> dict[str, Any]:
  """The floor's fields beside a measured time, for a benchmark's JSON rows."""
  return {"floor_ms": 1e3 * step_floor.seconds, "floor_bound": step_floor.bound,
          "floor_bytes": step_floor.bytes_read, "floor_flops": step_floor.flops,
          "of_floor": seconds / step_floor.seconds}
