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

Predict functions. Everything else a family offers (its held-out loss, its
sampler, a whole split as arrays, a per-example score, a rollout, an
encoder, ...) is a named function in `Task.predict_fns`; `PREDICT_FNS` lists
the standard names. An evaluator's config names the one it calls, so the
loop and the evaluators never branch on the family.

A trained run is loaded by its workdir alone (`load_run`): its config.json
rebuilds the task, and its newest checkpoint gives the parameters. A family
that uses another's trained model (NBP's tokenizer, xAR's VAE, the judges of
the in-domain FVD and FID) calls that run's predict functions, never the other
family's module.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from nbp import data as data_lib
from nbp.training import workdir as workdir_lib

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
    "ebt": "nbp.tasks.ebt",  # energy-based transformers: prediction by optimisation, thinking at inference
    "frame_regression": "nbp.tasks.frame_regression",  # next-frame regression: EBT's video baseline
    "ebt_denoising": "nbp.tasks.ebt_denoising",  # image denoising: a bidirectional EBT or a flow transformer
}


# The names a family's `predict_fns` may offer, and what each one is. An evaluator's config names the
# function it uses (its `pred` field, as big_vision's evaluators do), so neither the loop nor the evaluators
# know which family they serve; a family offers the names it has, and may add its own.
PREDICT_FNS = {
    "eval_loss": "(params, batch, rng) -> (loss, metrics): the held-out loss (default: the training loss)",
    "sample": "(params, rng) -> samples (a pytree of arrays); the caller jits it whole",
    "write_samples": "(samples as numpy, out_dir, step) -> dict of numbers to log (may be empty)",
    "sample_conditioned": "(params, rng, labels int [B], prompt [B, ...]) -> samples of B, conditioned like a "
                          "real set (classes, first frames); unjitted",
    "sample_images": "(params, rng, labels int [B]) -> samples of B images of those classes; unjitted",
    "to_images": "samples as numpy -> uint8 images [N, H, W, C]",
    "to_videos": "samples as numpy -> uint8 videos [N, F, H, W, C]",
    "from_videos": "uint8 videos -> what the sampler takes as a prompt (the inverse of to_videos)",
    "encode": "(params, inputs) -> codes: an autoencoder's encoder (videos -> tokens, images -> latents)",
    "decode": "(params, codes) -> outputs in [-1, 1]: its decoder",
    "features": "(params, uint8 videos [N, F, H, W, C]) -> [N, E]: a classifier's penultimate features",
    "logits": "(params, uint8 videos [N, F, H, W, C]) -> [N, K]: a classifier's logits",
    "split_arrays": "split -> {name: array [N, ...]}: the whole split as arrays (small datasets)",
    "score": "(params, batch) -> {metric: (value [B], count [B])}: per-example sums and their counts",
    "rollout": "(params, rng, *, target_return, num_episodes) -> {metric: number}: episodes in the environment",
}


@dataclasses.dataclass(frozen=True)
class Task:
  """A family's contribution: model, loss, data, and the named functions evaluators and scripts call."""

  model: nn.Module
  # Keyword inputs of `model.init`, at a small batch size (shapes only matter).
  init_inputs: Callable[[], dict[str, Any]]
  loss: LossFn
  # (split, seed, process_index, process_count, batch_size) -> checkpointable iterator of local batches;
  # split is one of nbp.data.splits.SPLITS.
  data: Callable[..., Iterator[Batch]]
  # params -> a pytree of group names (optax.multi_transform labels), for a second optimizer
  # (config.param_groups); None: one group.
  param_labels: Callable[[Any], Any] | None = None
  # () -> a pytree the loss carries from step to step (EBT's replay buffer), part of the checkpointed train
  # state; with it the loss is loss(params, batch, rng, loss_state) -> (loss, metrics, new loss_state).
  init_loss_state: Callable[[], Any] | None = None
  # name -> function: what evaluators and scripts call by name (PREDICT_FNS lists the standard names).
  predict_fns: Mapping[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)

  def predict_fn(self, name: str, who: str = "") -> Callable[..., Any]:
    """predict_fns[name], or a ValueError naming `who` (the evaluator asking) and the names this family offers.

    "eval_loss" falls back on the training loss.
    """
    if name in self.predict_fns:
      return self.predict_fns[name]
    if name == "eval_loss":
      return self.loss
    asker = f"{who} asks for" if who else "no"
    raise ValueError(f"{asker} predict function {name!r}, which this family does not offer; it offers "
                     f"{sorted(self.predict_fns)}.")

  def offers(self, name: str) -> bool:
    return name in self.predict_fns or name == "eval_loss"


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
  """A trained run loaded from its workdir: its config, task and evaluation parameters (EMA when kept)."""

  workdir: str
  config: ml_collections.ConfigDict
  task: Task
  params: Any

  def predict(self, name: str) -> Callable[..., Any]:
    """The run's predict function `name` with its parameters bound: fn(*args) = predict_fns[name](params, *args)."""
    fn = self.task.predict_fn(name, who=f"a user of the run in {self.workdir}")
    return functools.partial(fn, self.params)


@functools.cache
def load_run(workdir: str) -> Run:
  """The run trained in `workdir` (its config.json and newest readable checkpoint), loaded once per process.

  Its parameters are replicated on every device, so a jitted call of the run
  works inside any mesh over them (a training loop's several CPU devices or
  chips, where the run decodes or judges the samples) as well as outside one.
  """
  config = workdir_lib.read_config(workdir)
  task = make_task(config)
  params, _, _ = workdir_lib.load_params(workdir, task.model, task.init_inputs())
  everywhere = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("devices",)),
                                          jax.sharding.PartitionSpec())
  return Run(workdir, config, task, jax.device_put(params, everywhere))


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
