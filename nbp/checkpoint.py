"""Orbax checkpoints of the train state with the data iterator beside it.

One directory per run (`workdir/checkpoints/<step>/{state,data}`): `state` is
the sharded TrainState, `data` the grain iterator's position (one file per
process). Saves are asynchronous; orbax writes each step to a temporary name
and renames it when complete, so a run killed mid-save resumes from the last
complete step.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpoints:
  """Keeps the last `keep` checkpoints and restores the latest."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator=None) -> bool:
    """Starts an async save of `step` (the caller decides when)."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
    """Restores the state onto the shardings of `abstract_state`; the iterator in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(directory: str, abstract_state: Any) -> Any:
  """The state saved at the latest step under `directory` (for `config.init_from`, sampling)."""
  directory = os.path.abspath(directory)
  if os.path.basename(directory) != "checkpoints" and os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No checkpoint directory at {directory}.")
  manager = ocp.CheckpointManager(directory)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"No complete checkpoint under {directory}.")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  manager.close()
  return step, restored["state"]


def abstract_with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
