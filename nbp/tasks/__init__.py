"""What a model family gives the shared training loop, the registry of families, and the config schema.

A task module (nbp/tasks/<family>.py) defines

  Model       the network class (from nbp/models/); its fields are `config.model`,
              built as `Model(**config.model)`;
  loss        loss(model, params, batch, rng, *, <config.loss keys>) -> (loss, metrics);
  sample      sample(model, params, rng, *, <config.sampler keys>) (optional);
  DATASETS    the `config.data.name`s it reads;
  make_task(config) -> Task.

`check_config` holds a config against those schemas before anything is
compiled, naming the first unknown key: the keyword parameters of `loss` and
`sample` are the schemas of `config.loss` and `config.sampler`, as the module's
fields are that of `config.model`; nothing lists them a second time.

Loss contract. `metrics` may hold "num_targets", the number of loss terms the
loss averages over (weighted tokens, pixels, ...): gradient accumulation then
weights micro-batches by it, and the loop reports it summed and per second.
`Task.evaluate` has the loss's type, (loss, metrics), and defaults to the loss.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable, Iterator

import flax.linen as nn
import ml_collections
import numpy as np

from nbp import data as data_lib

Batch = dict[str, np.ndarray]
# params, batch, rng -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[Any, Batch, Any], tuple[Any, dict[str, Any]]]

FAMILIES = {
    "next_block": "nbp.tasks.next_block",  # NBP, and next-token prediction as its 1x1x1 blocks
    "video_tokenizer": "nbp.tasks.video_tokenizer",  # MAGVIT-v2-style 3D causal CNN + FSQ
    "video_classifier": "nbp.tasks.video_classifier",  # the judge of the in-domain FVD (and FID) on digits
    "xar": "nbp.tasks.xar",  # next-X prediction of images with flow matching
    "kl_vae": "nbp.tasks.kl_vae",  # xAR's latent space: a KL-regularised image autoencoder
    # Aaren's four settings; each runs softmax attention or Aaren by config.model.attention.
    "ts_classification": "nbp.tasks.ts_classification",  # UCR/UEA time-series classification
    "forecasting": "nbp.tasks.forecasting",  # multi-horizon time-series forecasting
    "decision": "nbp.tasks.decision",  # offline RL: a return-conditioned policy (Decision-Transformer style)
    "events": "nbp.tasks.events",  # event forecasting: a marked temporal point process
}


@dataclasses.dataclass(frozen=True)
class Task:
  """A family's contribution to training: model, loss, data, sampler, and what evaluators need."""

  model: nn.Module
  # Keyword inputs of `model.init`, at a small batch size (shapes only matter).
  init_inputs: Callable[[], dict[str, Any]]
  loss: LossFn
  # (split, seed, process_index, process_count, batch_size) -> checkpointable iterator of local batches.
  data: Callable[..., Iterator[Batch]]
  # The held-out loss, of the loss's type (loss, metrics); None: the loss itself.
  evaluate: LossFn | None = None
  # params, rng -> samples (a pytree of arrays); jitted whole by the caller.
  sample: Callable[[Any, Any], Any] | None = None
  # (samples as numpy, out_dir, step) -> dict of numbers to log (may be empty).
  write_samples: Callable[[Any, str, int], dict[str, float]] | None = None
  # samples as numpy -> uint8 videos [N, F, H, W, C] (the FVD evaluators' input); None: not videos.
  to_videos: Callable[[Any], np.ndarray] | None = None
  # uint8 videos -> what the sampler takes as a prompt (its inverse, e.g. tokens); None: no prompts.
  from_videos: Callable[[np.ndarray], Any] | None = None
  # params -> a pytree of group names (optax.multi_transform labels), for a second optimizer
  # (config.param_groups); None: one group.
  param_labels: Callable[[Any], Any] | None = None
  # (params, rng, labels int [B]) -> samples of B images, conditioned on the labels; unjitted (the FID
  # evaluators jit it). None: the family draws no class-conditional images.
  sample_images: Callable[[Any, Any, Any], Any] | None = None
  # samples as numpy -> uint8 images [N, H, W, C] (the FID evaluators' input); None: not images.
  to_images: Callable[[Any], np.ndarray] | None = None
  # split -> the whole split as arrays {name: [N, ...]} (small datasets: the split_metrics evaluator batches
  # them itself, every example once). None: no such view.
  examples: Callable[[str], dict[str, np.ndarray]] | None = None
  # (params, batch) -> {metric: (value [B], count [B])}: per-example sums and their counts; the split_metrics
  # evaluator reports sum(value) / sum(count) over a split (accuracy: (correct, 1); per-event
  # log-likelihood: (sum over a sequence's events, its number of events)). Jitted by the caller.
  score: Callable[[Any, Batch], dict[str, tuple[Any, Any]]] | None = None
  # (params, rng, target_return, num_episodes) -> {metric: number}: episodes in the environment, the policy
  # acting step by step (the rollout evaluator). None: not a control task.
  rollout: Callable[..., dict[str, float]] | None = None


def family_module(name: str):
  if name not in FAMILIES:
    raise ValueError(f"config.family={name!r} is not a known family; choose one of {sorted(FAMILIES)}.")
  return importlib.import_module(FAMILIES[name])


def make_task(config) -> Task:
  return family_module(config.family).make_task(config)


# ---------------------------------------------------------------------------
# The config schema: module fields and keyword parameters.


def module_fields(module_class: type[nn.Module]) -> tuple[str, ...]:
  """The dataclass fields of a linen Module class (its constructor keywords), without parent/name."""
  return tuple(f.name for f in dataclasses.fields(module_class) if f.name not in ("parent", "name"))


def keyword_parameters(fn: Callable) -> tuple[str, ...]:
  """The keyword-only parameters of `fn`: the schema of its config section."""
  return tuple(p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY)


def _check_keys(section: str, given, allowed) -> None:
  extra = sorted(set(given) - set(allowed))
  if extra:
    raise ValueError(f"Unknown config key 'config.{section}.{extra[0]}'. Known keys: {sorted(allowed)}")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first key of model/loss/sampler/data its family does not take."""
  module = family_module(config.family)
  _check_keys("model", config.model.keys(), module_fields(module.Model))
  _check_keys("loss", config.get("loss", {}).keys(), keyword_parameters(module.loss))
  sample = getattr(module, "sample", None)
  _check_keys("sampler", config.get("sampler", {}).keys(), keyword_parameters(sample) if sample else ())
  data_lib.check_data_config(config.data, module.DATASETS)


def build_model(module_class: type[nn.Module], model_cfg) -> nn.Module:
  """`module_class(**config.model)`, lists turned into tuples (linen fields must hash)."""
  as_tuple = lambda v: tuple(as_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v
  kwargs = {k: as_tuple(v) for k, v in model_cfg.to_dict().items()}
  return module_class(**kwargs)
