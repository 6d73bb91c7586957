"""What a run's workdir holds for code that only reads it: the config, and parameters without the optimizer.

A workdir has `config.json` (written by the training loop at the start of a
run) and `checkpoints/<step>/state` (nbp.training.checkpoint). Sampling,
evaluation, token encoding and decoding need the parameters only:
`load_params` restores them, the EMA parameters when the run kept them, and
never reads the optimizer state. It imports no training loop, so models and
tasks can use it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

CONFIG_FILE = "config.json"


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes `config` as workdir/config.json (process 0 only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (workdir/config.json)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No {CONFIG_FILE} in workdir {workdir!r}: not a training run of this codebase "
                            "(experiments.train writes it at the start).")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def checkpoint_dir(path: str) -> str:
  """`path`/checkpoints when `path` is a workdir, else `path` (a checkpoints directory)."""
  path = os.path.abspath(path)
  if os.path.basename(path) != "checkpoints" and os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints")
  return path


def abstract_params(model: nn.Module, init_inputs: dict[str, Any]):
  """ShapeDtypeStructs of `model`'s parameters (nothing computed)."""
  variables = jax.eval_shape(lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                                                **init_inputs))
  return nn.meta.unbox(variables["params"])


def complete_steps(directory: str) -> list[int]:
  """The steps with a finished checkpoint under `directory`, newest first."""
  if not os.path.isdir(directory):
    return []
  steps = [int(name) for name in os.listdir(directory)
           if name.isdigit() and os.path.isdir(os.path.join(directory, name, "state"))]
  return sorted(steps, reverse=True)


def restore_params_at(directory: str, step: int, abstract) -> tuple[Any, str]:
  """(params, "ema_params" | "params") of one step: the EMA when the checkpoint holds one."""
  path = os.path.join(directory, str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path).item_metadata.tree
  which = "ema_params" if metadata.get("ema_params") else "params"
  target = {which: abstract}
  # Onto the abstract tree's shardings; without one, onto the first local device.
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(
      dtype=x.dtype, sharding=getattr(x, "sharding", None) or default), target)
  restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                                    partial_restore=True))
  return restored[which], which


def load_params(workdir: str, model: nn.Module, init_inputs: dict[str, Any]) -> tuple[Any, str]:
  """(params, which) of the latest checkpoint of `workdir` for `model`; which is "ema_params" or "params".

  Only the parameters are read (no optimizer state). A step that fails to
  restore (a damaged file) is skipped with a warning naming it, and the next
  older one is tried. Raises FileNotFoundError naming the workdir when it has
  no checkpoint, and ValueError listing each step's error when none restores.
  """
  directory = checkpoint_dir(workdir)
  steps = complete_steps(directory)
  if not steps:
    raise FileNotFoundError(f"No checkpoint in {workdir!r}: train first (experiments.train).")
  abstract = abstract_params(model, init_inputs)
  errors = []
  for step in steps:
    try:
      return restore_params_at(directory, step, abstract)
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many types for a damaged file)
      logging.warning("Checkpoint step %d under %s is damaged (%s: %s); trying the previous one.",
                      step, directory, type(e).__name__, e)
      errors.append(f"step {step}: {type(e).__name__}: {e}")
  raise ValueError(f"No checkpoint under {directory} could be restored: " + "; ".join(errors))
