"""Time-series classification (UCR/UEA sets) with a causal sequence model: Aaren or a Transformer.

The network is nbp.models.sequence.SequenceModel (`config.model` is its
fields; `attention` "aaren" or "softmax" is the only difference between the
two models compared). It reads a series x [B, T, F] with its valid mask and
gives causal outputs y [B, T, K]; a readout over time turns them into the
class logits [B, K]:

  "mean"  the mean of the outputs over the valid steps;
  "last"  the output at the last valid step (what a streaming model has after
          reading the whole series, in constant memory for Aaren).

The loss is the cross-entropy of those logits (optionally label-smoothed);
the predict function "score" gives every example's correctness for the
split_metrics evaluator: its accuracy over the whole validation split guides
choices, and over the whole test split (evaluated once) is the headline number.

Data: `config.data.name` "ucr" (nbp.data.ucr). F, K and T come from the
files: `config.model.input_dim` / `output_dim` left 0 are filled from them, and
`config.model.max_len` is raised to T when the set is longer.

Dimension letters: B batch, T steps, F inputs per step, K classes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from nbp import tasks
from nbp.data import ucr
from nbp.models import sequence
from nbp.models.sequence import SequenceModel as Model

DATASETS = ("ucr",)
POOLINGS = ("mean", "last")


def readout(y, valid, pooling: str):
  """Causal outputs y [B, T, K] and valid bool [B, T] -> logits [B, K] (rows without a valid step: 0 / y[:, 0])."""
  if pooling == "mean":
    weights = valid.astype(y.dtype)[..., None]  # [B, T, 1]
    return jnp.sum(y * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
  if pooling == "last":
    last = jnp.maximum(jnp.sum(valid.astype(jnp.int32), axis=1) - 1, 0)  # [B], right-padded series
    return jnp.take_along_axis(y, last[:, None, None], axis=1)[:, 0]
  raise ValueError(f"config.loss.pooling={pooling!r}: choose one of {POOLINGS}.")


def logits(model: Model, params, batch, pooling: str):
  """batch {"x": [B, T, F], "valid": [B, T]} -> class logits float32 [B, K]."""
  y = model.apply({"params": params}, batch["x"], valid=batch["valid"])
  return readout(y.astype(jnp.float32), batch["valid"], pooling)


def loss(model: Model, params, batch, rng, *, pooling: str = "mean", label_smoothing: float = 0.0):
  """Cross-entropy of the readout's logits (mean over examples), and the batch accuracy."""
  del rng  # no dropout
  z = logits(model, params, batch, pooling)
  targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], z.shape[-1]), label_smoothing)
  value = jnp.mean(optax.softmax_cross_entropy(z, targets))
  accuracy = jnp.mean((jnp.argmax(z, axis=-1) == batch["label"]).astype(jnp.float32))
  return value, {"accuracy": accuracy}


def score(model: Model, params, batch, *, pooling: str = "mean"):
  """Per example: {"accuracy": (correct [B], 1), "loss": (cross-entropy [B], 1)} (split_metrics' sums)."""
  z = logits(model, params, batch, pooling)
  ones = jnp.ones(z.shape[:1], jnp.float32)
  correct = (jnp.argmax(z, axis=-1) == batch["label"]).astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(z, batch["label"])
  return {"accuracy": (correct, ones), "loss": (nll, ones)}


def sized_model(model: Model, data: ucr.UCRData) -> Model:
  """`model` with input_dim / output_dim filled from the data (0: from the data) and max_len >= T."""
  model = sequence.with_data_sizes(model, input_dim=data.input_dim, output_dim=data.num_classes, data=data.name)
  return dataclasses.replace(model, max_len=max(model.max_len, data.max_len))


def make_task(config) -> tasks.Task:
  data = ucr.load(config.data)
  model = sized_model(tasks.build_model(Model, config.model), data)
  loss_cfg = dict(config.get("loss", {}))
  pooling = loss_cfg.get("pooling", "mean")
  if pooling not in POOLINGS:
    raise ValueError(f"config.loss.pooling={pooling!r}: choose one of {POOLINGS}.")
  shape = (1, data.max_len)
  return tasks.Task(
      model=model,
      init_inputs=lambda: {"x": jnp.zeros((*shape, data.input_dim), jnp.float32),
                           "valid": jnp.ones(shape, bool)},
      loss=functools.partial(loss, model, **loss_cfg),
      data=functools.partial(ucr.make_iterator, config.data),
      predict_fns={
          "eval_loss": functools.partial(loss, model, pooling=pooling),  # no label smoothing on held-out batches
          "split_arrays": lambda split: dict(ucr.split_arrays(config.data, split)),
          "score": functools.partial(score, model, pooling=pooling),
      },
  )
