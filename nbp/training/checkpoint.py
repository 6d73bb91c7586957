"""Orbax checkpoints of the train state with the data iterator beside it.

One directory per run (`workdir/checkpoints/<step>/{state,data}`): `state` is
the sharded TrainState, `data` the grain iterator's position (one file per
process). Saves are asynchronous; orbax writes each step to a temporary name
and renames it when complete, so a run killed mid-save resumes from the last
complete step.

Damaged checkpoints. A step directory can be complete (renamed by orbax) and
still unreadable: a truncated or garbled `_METADATA`, data-iterator JSON or
array file (a full disk, a bad copy, a storage fault). Restoring tries the
steps newest first; a step that fails is logged with `logging.warning` (the
step, the error, the files that do not parse) and skipped, and the previous
step is tried. Nothing is deleted at restore time: the skipped directory stays
on disk for inspection and can be removed by hand. When no step restores,
`CheckpointRestoreError` names the directory and every step's error.

A run that resumed below a skipped step reaches that step again, and orbax
refuses to save over an existing step. `Checkpoints.save` therefore moves a
skipped step's directory aside to `<step>.damaged` (`<step>.damaged.1`, ... if
that exists) just before saving the step anew; orbax ignores names that are not
integers, so the moved directory is neither restored nor garbage-collected.
Until then a skipped step still counts toward `keep` (orbax's own bookkeeping).

Orbax does not checksum array data: a flipped byte inside an array file can
restore without error (wrong values); truncations, broken JSON and broken
OCDBT manifests are detected.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

T = TypeVar("T")

DAMAGED_SUFFIX = ".damaged"  # a skipped step's directory is renamed <step>.damaged before the step is saved again
_MAX_ERROR_CHARS = 800  # tensorstore errors carry their whole JSON spec; the head names the file and the failure
# Files orbax and grain write as JSON (names inside a step directory). A parse
# error from orbax does not say which file it was reading, so a failed restore
# re-reads these to name it.
_JSON_NAMES = ("_METADATA", "_CHECKPOINT_METADATA", "_sharding")


class CheckpointRestoreError(RuntimeError):
  """No step of a checkpoint directory could be restored."""


class _FixedIteratorState:
  """Stands in for a grain iterator at a position taken earlier (`get_state()`), for saving.

  grain's orbax handler writes `get_state()` of anything that is not a
  `DatasetIterator` as bytes of JSON, the same file a live iterator produces,
  so a restore into a real iterator reads it as usual.
  """

  def __init__(self, state: dict[str, Any]):
    self._state = state

  def get_state(self) -> bytes:
    return json.dumps(self._state, indent=4).encode()


def _unparsable_json_files(step_dir: str) -> list[tuple[str, str]]:
  """(path, error) of the JSON files under `step_dir` that do not parse."""
  bad = []
  for root, _, files in os.walk(step_dir):
    for name in sorted(files):
      if not (name in _JSON_NAMES or name.endswith(".json") or os.path.basename(root) == "array_metadatas"):
        continue
      path = os.path.join(root, name)
      try:
        with open(path, "rb") as f:
          json.loads(f.read())
      except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        bad.append((path, f"{type(e).__name__}: {e}"))
  return bad


def describe_failure(step_dir: str, error: BaseException) -> str:
  """The error of a failed restore (shortened), plus the JSON files of the step that do not parse."""
  message = f"{type(error).__name__}: {error}"
  message = message.split(" [tensorstore_spec=")[0]  # the rest is the store's whole JSON spec
  if len(message) > _MAX_ERROR_CHARS:
    message = message[:_MAX_ERROR_CHARS] + " [...]"
  bad = _unparsable_json_files(step_dir)
  if bad:
    # A parse error of the restore is usually one of these; say so once, with the file.
    message += "; files that do not parse: " + ", ".join(
        path if why == message else f"{path} ({why})" for path, why in bad)
  return message


def _all_processes_agree(ok: bool) -> bool:
  """True when the restore worked on every process (all hosts must resume from the same step)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def restore_newest(directory: str, steps: Sequence[int], restore_step: Callable[[int], T]
                   ) -> tuple[int, T, dict[int, str]]:
  """`restore_step(step)` for the newest step of `steps` that restores.

  Args:
    directory: the checkpoints directory (for messages; step s lives in
      `directory/s`).
    steps: the candidate steps, in any order.
    restore_step: restores one step; any exception marks the step as not
      restorable (orbax surfaces damage as JSON, tensorstore, OS or value
      errors, so no narrower type covers it).

  Returns:
    (step, what `restore_step` returned, {skipped step: why}).

  Raises:
    CheckpointRestoreError: no step restores; names `directory` and each
      step's error, chained to the newest step's exception.
  """
  skipped: dict[int, str] = {}
  first_error = None
  for step in sorted(steps, reverse=True):
    step_dir = os.path.join(directory, str(step))
    error = None
    try:
      result = restore_step(step)
    except Exception as e:  # pylint: disable=broad-except
      error = e
    if not _all_processes_agree(error is None):
      why = describe_failure(step_dir, error) if error is not None else "it failed on another process"
      skipped[step] = why
      first_error = first_error or error
      logging.warning("Checkpoint step %d in %s could not be restored: %s. Skipped it, trying the previous "
                      "step. Its directory %s is kept as it is and can be removed; if this run saves step %d "
                      "again it first moves it aside to %s%s.", step, directory, why, step_dir, step,
                      step_dir, DAMAGED_SUFFIX)
      continue
    if skipped:
      logging.warning("Restored step %d of %s instead of the damaged step(s) %s.", step, directory,
                      ", ".join(map(str, skipped)))
    return step, result, skipped
  lines = "\n".join(f"  step {s}: {why}" for s, why in skipped.items())
  raise CheckpointRestoreError(f"No checkpoint in {directory} could be restored (steps tried, newest "
                               f"first):\n{lines}") from first_error


# Train-state fields written only when set: checkpoints made before a field existed (or by runs without it)
# keep the same tree, so every run resumes whether or not its family uses the field.
OPTIONAL_FIELDS = ("loss_state",)


def saved_form(state: Any) -> Any:
  """The tree written for a train state: its fields as a dict, an unset optional field left out."""
  if not dataclasses.is_dataclass(state):
    return state
  fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
  return {k: v for k, v in fields.items() if not (k in OPTIONAL_FIELDS and v is None)}


def from_saved_form(restored: Any, like: Any) -> Any:
  """The train state `like` (abstract) with the fields of a restored `saved_form` tree."""
  return like.replace(**restored) if dataclasses.is_dataclass(like) else restored


class Checkpoints:
  """Keeps the last `keep` checkpoints (and those of `keep_steps`) and restores the latest one that is readable."""

  def __init__(self, directory: str, *, keep: int, keep_steps: Sequence[int] = (), async_save: bool = True):
    self.directory = os.path.abspath(directory)
    policies = [ocp.checkpoint_managers.LatestN(keep)]
    if keep_steps:
      policies.append(ocp.checkpoint_managers.CustomSteps(list(keep_steps)))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self.skipped: dict[int, str] = {}  # steps a restore skipped as damaged -> why

  def latest_step(self) -> int | None:
    """The newest complete step on disk (it may still turn out damaged on restore)."""
    return self.manager.latest_step()

  def has_step(self, step: int) -> bool:
    """Whether `step` is saved and was not skipped as damaged."""
    return step in self.manager.all_steps() and step not in self.skipped

  def save(self, step: int, state: Any, data_iterator=None, *, data_state: dict | None = None) -> bool:
    """Starts an async save of `step` (the caller decides when).

    Args:
      step: the step number (the directory name).
      state: the pytree to save.
      data_iterator: the grain iterator, saved at its current position.
      data_state: instead of `data_iterator`, a position taken earlier with
        `iterator.get_state()` (e.g. before a batch that failed to load).
    """
    self._move_aside_skipped(step)
    items = {"state": ocp.args.StandardSave(saved_form(state))}
    if data_state is not None:
      items["data"] = grain.checkpoint.CheckpointSave(_FixedIteratorState(data_state))
    elif data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def _move_aside_skipped(self, step: int) -> None:
    """Renames a skipped (damaged) step's directory to <step>.damaged so that `step` can be saved."""
    if step not in self.skipped:
      return
    self.manager.wait_until_finished()  # reload below must see every save in flight as finished
    source = os.path.join(self.directory, str(step))
    target = source + DAMAGED_SUFFIX
    n = 0
    while os.path.exists(target):
      n += 1
      target = f"{source}{DAMAGED_SUFFIX}.{n}"
    if jax.process_index() == 0 and os.path.exists(source):  # one process renames on shared storage
      os.rename(source, target)
      logging.warning("Moved the damaged checkpoint step %d aside to %s before saving step %d anew.",
                      step, target, step)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint_move_aside_{step}")
    del self.skipped[step]
    self.manager.reload()  # orbax caches the step list; step must no longer be in it

  def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
    """Restores the state onto the shardings of `abstract_state`; the iterator in place."""
    items = {"state": ocp.args.StandardRestore(saved_form(abstract_state))}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return from_saved_form(restored["state"], abstract_state)

  def restore_latest(self, abstract_state: Any, data_iterator=None) -> tuple[int, Any] | None:
    """(step, state) of the newest step that restores, the iterator in place; None without checkpoints.

    Damaged steps are skipped with a warning and remembered in `self.skipped`
    (see the module docstring); raises `CheckpointRestoreError` when every
    step fails. A failed attempt may leave the iterator half-set; the step
    that succeeds sets it again.
    """
    steps = self.manager.all_steps()
    if not steps:
      return None
    step, state, skipped = restore_newest(self.directory, steps,
                                          lambda s: self.restore(s, abstract_state, data_iterator))
    self.skipped.update(skipped)
    return step, state

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def checkpoint_dir(path: str) -> str:
  """`path`/checkpoints when `path` is a workdir, else `path` (a checkpoints directory)."""
  path = os.path.abspath(path)
  if os.path.basename(path) != "checkpoints" and os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints")
  return path


def _restore_readonly(directory: str, restore: Callable[[Any, int], T], step: int | None = None) -> tuple[int, T]:
  """restore(manager, step) for the newest readable step (or `step` itself) under a workdir or checkpoints directory."""
  directory = checkpoint_dir(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No checkpoint directory at {directory}.")
  manager = ocp.CheckpointManager(directory)
  try:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f"No complete checkpoint under {directory}.")
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(f"No checkpoint of step {step} under {directory} (it holds {sorted(steps)}); keep it "
                                "in training with config.keep_checkpoint_steps.")
      steps = [step]
    step, restored, _ = restore_newest(directory, steps, lambda step: restore(manager, step))
  finally:
    manager.close()
  return step, restored


def restore_state(directory: str, abstract_state: Any) -> tuple[int, Any]:
  """(step, whole train state) of the newest readable step under `directory` (a workdir or checkpoints/).

  Damaged steps are skipped with a warning, as in `Checkpoints.restore_latest`;
  nothing on disk is changed.
  """
  step, restored = _restore_readonly(directory, lambda manager, step: manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(saved_form(abstract_state)))))
  return step, from_saved_form(restored["state"], abstract_state)


def restore_params(directory: str, abstract_params: Any, names: Sequence[str] = ("params",), *,
                   step: int | None = None, missing_ok: bool = False) -> tuple[int, dict[str, Any]]:
  """(step, {name: parameters}) of the newest readable step (or of `step`): only the `names` items of the train state.

  `names` are TrainState fields holding parameter trees ("params",
  "ema_params"), each restored onto the shapes and shardings of
  `abstract_params`; the optimizer state is never read. A name the checkpoint
  holds no tree for (no EMA kept) comes back as None. With `missing_ok`,
  parameters of `abstract_params` the checkpoint lacks (a module added since)
  are left out of the restored trees instead of failing. Damaged steps are
  skipped with a warning, nothing on disk is changed.
  """
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  to_args = lambda x: ocp.ArrayRestoreArgs(dtype=x.dtype, sharding=getattr(x, "sharding", None) or default)

  def restore(manager, step):
    path = os.path.join(manager.directory, str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    held = checkpointer.metadata(path).item_metadata.tree
    present = [n for n in names if held.get(n)]
    target = {n: _held_part(abstract_params, held[n]) if missing_ok else abstract_params for n in present}
    if any(not jax.tree.leaves(t) for t in target.values()):
      raise ValueError(f"{path} holds none of this model's parameters (another model's checkpoint?).")
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=jax.tree.map(to_args, target), partial_restore=True))
    return {n: restored.get(n) for n in names}
  return _restore_readonly(directory, restore, step)


def _held_part(tree: Any, held: Any) -> Any:
  """The nested-dict `tree` cut down to the keys the checkpoint's metadata tree `held` also has."""
  if not isinstance(tree, dict):
    return tree
  return {k: _held_part(v, held[k]) for k, v in tree.items() if isinstance(held, dict) and k in held}


def abstract_with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
