"""What a model family gives the shared training loop, and the registry of families.

A family module (nbp/ntp.py, ...) has `make_task(config) -> Task` plus the
tuples `MODEL_FIELDS` and `DATA_FIELDS` naming the keys its config sections
accept. The loop in nbp/train.py only ever talks to a `Task`.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Iterator

import flax.linen as nn
import numpy as np

Batch = dict[str, np.ndarray]
# params, batch, rng -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[Any, Batch, Any], tuple[Any, dict[str, Any]]]

FAMILIES = {
    "ntp": "nbp.ntp",  # next-token baseline
    "video_tokenizer": "nbp.video_tokenizer",  # MAGVIT-v2-style 3D causal CNN + FSQ (issue 4)
    "next_block": "nbp.next_block",  # NBP: semi-autoregressive next-block prediction (issue 4)
    "video_classifier": "nbp.video_classifier",  # in-domain FVD features for moving digits (issue 4)
}


@dataclasses.dataclass(frozen=True)
class Task:
  """A family's contribution to training: model, loss, data, sampler, evaluator."""

  model: nn.Module
  # Keyword inputs of `model.init`, at a small batch size (shapes only matter).
  init_inputs: Callable[[], dict[str, Any]]
  loss: LossFn
  # (split, seed, process_index, process_count, local_batch_size) -> checkpointable iterator
  # of local batches (numpy dicts).
  data: Callable[..., Iterator[Batch]]
  # params, batch, rng -> dict of metrics, averaged over eval batches. Defaults to the loss.
  evaluate: LossFn | None = None
  # params, rng -> samples (a pytree of arrays); jitted by the caller.
  sample: Callable[[Any, Any], Any] | None = None
  # (samples as numpy, out_dir, step) -> dict of numbers to log (may be empty).
  write_samples: Callable[[Any, str, int], dict[str, float]] | None = None


def family_module(name: str):
  if name not in FAMILIES:
    raise ValueError(f"config.family={name!r} is not a known family; choose one of {sorted(FAMILIES)}.")
  return importlib.import_module(FAMILIES[name])


def make_task(config) -> Task:
  return family_module(config.family).make_task(config)
