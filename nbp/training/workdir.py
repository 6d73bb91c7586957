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

from nbp.training import checkpoint as checkpoint_lib

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


def changed_keys(workdir: str, config: ml_collections.ConfigDict) -> list[str]:
  """The dotted keys where `config` differs from the config the run in `workdir` was trained with ([] if the
  workdir holds no run yet): a caller that resumes runs by workdir refuses another config's run."""
  if not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
    return []
  before = _flat(json.loads(read_config(workdir).to_json_best_effort()))
  now = _flat(json.loads(config.to_json_best_effort()))
  return sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
  return out


def abstract_params(model: nn.Module, init_inputs: dict[str, Any]):
  """ShapeDtypeStructs of `model`'s parameters (nothing computed)."""
  variables = jax.eval_shape(lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                                                **init_inputs))
  return nn.meta.unbox(variables["params"])


def load_params(workdir: str, model: nn.Module, init_inputs: dict[str, Any], *,
                step: int | None = None, raw: bool = False) -> tuple[Any, str, int]:
  """(params, which, step) of the newest readable checkpoint of `workdir` (or of `step`) for `model`.

  which is "ema_params" when the run kept an EMA (then those are returned),
  else "params"; with `raw`, the raw parameters ("params") even of a run
  that kept an EMA. Only parameters are read, never the optimizer state; a
  damaged step is skipped with a warning (nbp.training.checkpoint).
  """
  directory = checkpoint_lib.checkpoint_dir(workdir)
  if not os.path.isdir(directory) or not any(name.isdigit() for name in os.listdir(directory)):
    raise FileNotFoundError(f"No checkpoint in workdir {workdir!r}: train first (experiments.train).")
  step, restored = checkpoint_lib.restore_params(workdir, abstract_params(model, init_inputs),
                                                 names=("params", "ema_params"), step=step)
  which = "ema_params" if restored["ema_params"] is not None and not raw else "params"
  return restored[which], which, step
