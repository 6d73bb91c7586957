"""Evaluators chosen in the config, run by the training loop on schedule and by experiments.evaluate alone.

`config.evals` maps a name to a section {type, every, ...}: `type` names a
module nbp.evaluators.<type> whose `Evaluator(**rest_of_the_section)` has
`run(context) -> dict of numbers`; `every` is the step interval (0: only at
the end of training). Each result is logged as "<name>/<key>". An evaluator
calls the family's functions by name (its `pred` field and the like, see
nbp.tasks.PREDICT_FNS), never the family's module.

Splits. An evaluator that reads data has a `split` field, "validation" by
default: what training watches and what choices are made on. The test split
is evaluated once: by `python -m experiments.evaluate --split test` on the
final checkpoint, or with `config.eval_test_at_end`, which runs every
evaluator on test after the last step and logs it as "test/<name>/<key>".
`Context.split`, when set, replaces every evaluator's own split.

  loss        the task's held-out loss and metrics over `steps` batches of a split
  samples     the sampler's output written as GIF/PNG (or text) in workdir/samples
  psnr        reconstruction PSNR of a tokenizer's sampler (video vs reconstruction)
  fvd_digits  in-domain FVD of generated videos against real ones, judged by a
              moving-digits classifier trained here (`classifier_workdir`)
  fvd         the standard I3D FVD, with I3D weights from a local file (`i3d_path`)
  fid_digits  in-domain FID of generated digit images against real ones, judged by a
              digit image classifier trained here (`classifier_workdir`)
  fid         the standard Inception-v3 FID, with weights from a local file (`inception_path`)
  split_metrics  the task's `score` over every example of a split once (accuracy, MSE/MAE at
              horizons, log-likelihood per event), as sum / count
  rollout     episodes in the environment with the policy acting step by step (returns)
  frame_prediction  predicted frames of a frame-prediction run against the true ones (centre-of-mass
              error, pixel MSE) beside repeating the last given frame; with `draws` K, also the
              pixel mean of K draws per video, a forecast; with `belief`, the model's own belief
              over where the digit goes, against its sampler's draws

Every evaluator gets the same parameters, the EMA ones when the run keeps
them (`Context.params_name` says which).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import jax

TYPES = ("loss", "samples", "psnr", "fvd_digits", "fvd", "fid_digits", "fid", "split_metrics", "rollout",
         "frame_prediction")


@dataclasses.dataclass
class Context:
  """What an evaluator may use: the loop's setup, the parameters and where to write."""

  setup: Any  # nbp.training.loop.Setup: config, task, mesh, shardings
  params: Any
  params_name: str  # "ema_params" or "params"
  step: int
  workdir: str
  rng: jax.Array
  split: str | None = None  # when set, the split every evaluator reads instead of its own

  def split_of(self, evaluator) -> str:
    """The split `evaluator` reads: the context's override, else its own `split` field."""
    return self.split or evaluator.split


def build(evals_cfg) -> dict[str, tuple[int, Any]]:
  """name -> (every, Evaluator) from `config.evals`; an unknown type or key, or a bad value, names the section."""
  out = {}
  for name, section in evals_cfg.items():
    section = dict(section)
    kind = section.pop("type", name)
    every = int(section.pop("every", 0))
    if kind not in TYPES:
      raise ValueError(f"config.evals.{name}.type={kind!r}: choose one of {TYPES}.")
    module = importlib.import_module(f"nbp.evaluators.{kind}")
    try:
      out[name] = (every, module.Evaluator(**section))
    except TypeError as e:
      raise ValueError(f"config.evals.{name}: {e}") from e
    except (ValueError, FileNotFoundError) as e:  # a bad value of the section: the same error, naming it
      raise type(e)(f"config.evals.{name}: {e}") from e
  return out


# Evaluator fields that name one of the family's predict functions (nbp.tasks.PREDICT_FNS).
PREDICT_FIELDS = ("pred", "arrays", "to_images", "write")


def check_predict_fns(built: dict[str, tuple[int, Any]], task) -> None:
  """Raises ValueError naming `config.evals.<name>.<field>` when it names a function the family does not offer.

  Runs before the first training step. An evaluator class with `OPTIONAL_PREDICT_FNS` (the samples writer,
  in every config by default) does nothing for a family without them, and is not checked.
  """
  for name, (_, evaluator) in built.items():
    if getattr(evaluator, "OPTIONAL_PREDICT_FNS", False):
      continue
    for field in PREDICT_FIELDS:
      fn_name = getattr(evaluator, field, None)
      if fn_name is not None and not task.offers(fn_name):
        raise ValueError(f"config.evals.{name}.{field}={fn_name!r}: this family does not offer it; it offers "
                         f"{sorted(task.predict_fns)}.")


def due(every: int, step: int, final: bool) -> bool:
  return final or bool(every and step % every == 0)


def run(evaluators: dict[str, tuple[int, Any]], context: Context, *, final: bool,
        only_due: bool = True) -> dict[str, float]:
  """Runs the evaluators due at context.step; returns {"<name>/<key>": value}."""
  out = {}
  for name, (every, evaluator) in evaluators.items():
    if only_due and not due(every, context.step, final):
      continue
    rng = jax.random.fold_in(context.rng, len(out))
    result = evaluator.run(dataclasses.replace(context, rng=rng))
    out.update({f"{name}/{k}": v for k, v in result.items()})
  return out
