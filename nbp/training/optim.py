"""The optimizer of every family, from `config.optimizer`.

AdamW with linear warmup and cosine decay (optax schedules), global-norm
clipping, and weight decay on matrices only ("kernel" and "embedding" leaves,
never biases, norm scales or learned scalars). The EMA of the parameters is kept
in the train state and updated with `optax.incremental_update`.
"""

from __future__ import annotations

import functools
import re

import jax
import ml_collections
import optax

# Parameter leaf names that get weight decay.
DECAYED_LEAVES = ("kernel", "embedding")


def learning_rate_schedule(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to cfg.lr, then constant, or cosine to cfg.lr * cfg.final_lr_fraction.

  The warmup reaches cfg.lr at step `warmup_steps` (cut to `num_steps - 1`, so a
  short run still gets there); the cosine ends at step `num_steps`. With
  `cosine_from` > 0 the rate stays at cfg.lr after the warmup until that share
  of the run, and the cosine takes the rest (xAR's schedule: constant to 75%).
  """
  warmup = min(int(cfg.warmup_steps), max(num_steps - 1, 0))
  hold = int(cfg.get("cosine_from", 0.0) * num_steps)
  if cfg.schedule == "cosine" and hold > warmup:
    rise = optax.warmup_constant_schedule(0.0, cfg.lr, warmup) if warmup else optax.constant_schedule(cfg.lr)
    fall = optax.cosine_decay_schedule(cfg.lr, max(num_steps - hold, 1), alpha=cfg.final_lr_fraction)
    return optax.join_schedules([rise, fall], [hold])
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1), end_value=cfg.lr * cfg.final_lr_fraction)
  if cfg.schedule == "constant":
    # optax's warmup over 0 steps would stay at its initial value (0) for ever.
    return optax.warmup_constant_schedule(0.0, cfg.lr, warmup) if warmup else optax.constant_schedule(cfg.lr)
  raise ValueError(f"config.optimizer.schedule={cfg.schedule!r}: expected 'cosine' or 'constant'.")


def _leaf_names(path) -> list[str]:
  """A parameter's key path -> its names ("decoder", "layer_0", ..., "kernel"), skipping the `.value` of a
  LogicallyPartitioned box (the state is initialised boxed)."""
  names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  return [str(n) for n in names if n not in (None, "value")]


def weight_decay_mask(params):
  """True for the leaves that are decayed: matrices named kernel or embedding."""
  def decayed(path, _):
    names = _leaf_names(path)
    return bool(names) and names[-1] in DECAYED_LEAVES
  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(cfg: ml_collections.ConfigDict, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns the optimizer and its learning-rate schedule (for logging)."""
  schedule = learning_rate_schedule(cfg, num_steps)
  if cfg.name != "adamw":
    raise ValueError(f"config.optimizer.name={cfg.name!r}: only 'adamw' is available.")
  chain = []
  if cfg.clip_norm:
    chain.append(optax.clip_by_global_norm(cfg.clip_norm))
  chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=weight_decay_mask))
  tx = optax.chain(*chain)
  if cfg.get("trainable"):  # the rest frozen: their updates are zero, no optimizer state kept
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               functools.partial(trainable_labels, cfg.trainable))
  return tx, schedule


def trainable_labels(pattern: str, params):
  """"train" for the leaves whose path ("decoder/layer_0/mlp/wo/kernel") re.search finds `pattern` in, else
  "frozen" (config.optimizer.trainable)."""
  label = lambda path, _: "train" if re.search(pattern, "/".join(_leaf_names(path))) else "frozen"
  labels = jax.tree_util.tree_map_with_path(label, params)
  if "train" not in jax.tree.leaves(labels):
    raise ValueError(f"config.optimizer.trainable={pattern!r} matches no parameter: every one would be frozen.")
  return labels
