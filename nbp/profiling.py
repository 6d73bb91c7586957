r"""Where a compiled step's time goes: its XLA ops' times from a profiler trace, grouped.

`profile_ops(compiled_text, fn, repeats, logdir)` runs fn() `repeats` times
under `jax.profiler.trace`, reads the trace's events (one per XLA op the
runtime executes, on every thread that runs them), and gives each op of the
compiled program its exclusive seconds per call (time inside ops it encloses,
a while loop's body, is counted for those ops). Each op is labelled from the
compiled HLO text:

  kind    matmul (a dot or convolution, fused or not), layout copy (copy or
          transpose roots), loop (while/conditional control itself), or
          elementwise (every other fusion: pointwise maps, reductions, scans'
          arithmetic);
  where   the model path in the op's metadata (e.g. "decoder/layer_2/mlp"
          with the layer index and control flow dropped, so the layers add
          up); an op outside every module is named by its operation ("mul",
          "sqrt": mostly the optimizer's update), one without metadata
          "other".

`profile_steps` does the same for a step run in a loop, as samplers run their
steps. `summarise` adds seconds over either label. Times are core-seconds (the sum
over the threads that ran the ops), so on 2 cores they can add up to about
twice the wall time; the shares are what a profile is read for.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp

_CONTAINER = re.compile(r"^(ThunkExecutor|\$|PjRt|TfrtCpu)")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+) = .*? (\w[\w\-]*)\((.*)$")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_WRAPPERS = {"while", "body", "cond", "closed_call", "checkpoint", "remat"}  # control flow, not model paths
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+) .*\{\s*$")


def _computations(hlo_text: str) -> dict[str, list[tuple[bool, str, str, str]]]:
  """computation name -> [(is root, instruction, opcode, rest of its line)]."""
  out: dict[str, list[tuple[bool, str, str, str]]] = {}
  current = None
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head:
      current = out.setdefault(head.group(1), [])
      continue
    match = _INSTRUCTION.match(line)
    if match and current is not None:
      root, name, opcode, rest = match.groups()
      current.append((bool(root), name, opcode, rest))
  return out


def _where(op_name: str) -> str:
  """A model path from an op's metadata, without the jit/transform wrappers and layer indices."""
  parts = [p for p in op_name.split("/") if p and "(" not in p and not p.startswith("jit")]
  parts = [re.sub(r"_\d+$", "", p) for p in parts if p not in _WRAPPERS and not re.fullmatch(r"branch_\d+_fun", p)]
  return "/".join(p for p in parts if p not in ("dot_general", "add_any"))[:120] or "other"


def op_labels(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Every instruction of the compiled program -> (kind, where); see the module docstring."""
  computations = _computations(hlo_text)

  def kind_of(opcode: str, rest: str) -> str:
    if opcode in ("dot", "convolution") or "__ynn_fusion" in rest or "__onednn" in rest:
      return "matmul"
    if opcode in ("while", "conditional", "call"):
      return "loop"
    if opcode in ("copy", "transpose"):
      return "layout copy"
    if opcode == "fusion":
      called = _CALLS.search(rest)
      body = computations.get(called.group(1), []) if called else []
      opcodes = {op for _, _, op, _ in body}
      if opcodes & {"dot", "convolution"}:
        return "matmul"
      root = next((op for is_root, _, op, _ in body if is_root), "")
      if root in ("copy", "transpose") or (opcodes <= {"parameter", "copy", "transpose", "bitcast", "reshape"}
                                            and opcodes & {"copy", "transpose"}):
        return "layout copy"
    return "elementwise"

  labels = {}
  for body in computations.values():
    for _, name, opcode, rest in body:
      op_name = _OP_NAME.search(rest)
      labels[name] = (kind_of(opcode, rest), _where(op_name.group(1)) if op_name else "other")
  return labels


def trace_events(logdir: str) -> list[dict[str, Any]]:
  """The complete ('X') events of the newest perfetto trace under logdir."""
  paths = sorted(glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {logdir}")
  with gzip.open(paths[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return [e for e in events if e.get("ph") == "X"]


def exclusive_seconds(events: list[dict[str, Any]]) -> dict[str, float]:
  """Op name -> summed exclusive seconds: each event's duration less that of events it encloses on its thread."""
  by_thread = collections.defaultdict(list)
  for e in events:
    if not _CONTAINER.match(e["name"]):
      by_thread[(e.get("pid"), e.get("tid"))].append(e)
  totals: dict[str, float] = collections.defaultdict(float)
  for thread_events in by_thread.values():
    thread_events.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
    stack: list[tuple[dict, float]] = []  # (event, its end)
    for e in thread_events:
      start, dur = e["ts"], e.get("dur", 0)
      while stack and stack[-1][1] <= start:
        stack.pop()
      if stack:
        totals[stack[-1][0]["name"]] -= dur / 1e6
      totals[e["name"]] += dur / 1e6
      stack.append((e, start + dur))
  return dict(totals)


def profile_ops(hlo_text: str, fn: Callable[[], Any], repeats: int, logdir: str) -> list[dict[str, Any]]:
  """Per op of the compiled program: exclusive seconds per call of fn, kind and where (longest first)."""
  jax.block_until_ready(fn())  # compiled and warm before the trace
  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    for _ in range(repeats):
      jax.block_until_ready(fn())
  labels = op_labels(hlo_text)
  rows = [{"op": name, "seconds": seconds / repeats, "kind": labels[name][0], "where": labels[name][1]}
          for name, seconds in exclusive_seconds(trace_events(logdir)).items() if name in labels]
  return sorted(rows, key=lambda r: -r["seconds"])


def profile_steps(step: Callable[[Any, Any, Any], Any], args, carry, num_steps: int, repeats: int,
                  logdir: str) -> list[dict[str, Any]]:
  """profile_ops of `num_steps` calls of carry = step(i, args, carry) in one compiled loop; seconds per step.

  How a sampler runs its steps: a loop-carried cache is updated in place, where a step compiled alone
  would copy the cache it cannot donate, and that copy would show in its profile. `args` (the weights)
  are arguments of the compiled loop, not constants folded into it.
  """
  def loop(args, carry):
    return jax.lax.fori_loop(0, num_steps, lambda i, c: step(i, args, c), carry)

  looped = jax.jit(loop, donate_argnums=1).lower(args, carry).compile()
  # Each call consumes (donates) its own carry, copied before the trace: the loop then needs no copy of it.
  carries = [jax.tree.map(jnp.copy, carry) for _ in range(repeats + 1)]
  rows = profile_ops(looped.as_text(), lambda: looped(args, carries.pop()), repeats, logdir)
  return [{**r, "seconds": r["seconds"] / num_steps} for r in rows]


def summarise(rows: list[dict[str, Any]], key: str) -> list[tuple[str, float, float]]:
  """(label, seconds, share of the total) over rows grouped by `key` ("kind" or "where"), largest first."""
  totals: dict[str, float] = collections.defaultdict(float)
  for r in rows:
    totals[r[key]] += r["seconds"]
  whole = sum(totals.values()) or 1.0
  return sorted(((k, v, v / whole) for k, v in totals.items()), key=lambda t: -t[1])


def print_summary(name: str, ops: list[dict[str, Any]], top: int = 8):
  """A traced step's time by kind of op and by model path (shares of the ops' summed core time)."""
  print(f"\n{name}: {sum(r['seconds'] for r in ops) * 1e3:.2f} ms of ops per call (core time)")
  for key, count in (("kind", None), ("where", top)):
    print("  " + "; ".join(f"{label} {share:.0%}" for label, _, share in summarise(ops, key)[:count]))
