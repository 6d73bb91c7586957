"""Metrics to TensorBoard event files and a JSONL file (process 0 writes)."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
from tensorboardX import SummaryWriter


class MetricWriter:
  """Writes scalars to `workdir/tb` (TensorBoard) and `workdir/metrics.jsonl`."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for key, value in scalars.items():
      self._tb.add_scalar(key, value, step)
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps({"step": int(step), **scalars}) + "\n")

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def first_nonfinite(step_metrics: list[tuple[int, dict]]) -> tuple[int, str] | None:
  """(step, metric name) of the first NaN or Inf among fetched per-step metrics."""
  for step, metrics in step_metrics:
    for name, value in metrics.items():
      if not math.isfinite(float(np.asarray(value))):
        return step, name
  return None
