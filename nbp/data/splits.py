"""Train, validation and test: the three splits every dataset has, and how validation is carved from train.

Choices (defaults, budgets, sampler settings) are made on the validation split;
the test split is reported once. A dataset that ships a validation split uses
it. One that ships none holds out part of its train split, deterministically:

  examples   `carve(n, fraction, seed)`: a fixed permutation of the n train
             examples (numpy's Generator seeded by `seed`) and its first
             round(n * fraction) entries are validation, the rest train;
  series     `carve_chronological(n, fraction)`: the last round(n * fraction)
             train time steps are validation (the future is never trained on).

The two numbers are config keys of every dataset section
(`config.data.validation_fraction`, `config.data.validation_seed`), so a run's
config.json records exactly which examples were held out.
"""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "validation", "test")
VALIDATION_FRACTION = 0.1  # the default share of the train split held out as validation
VALIDATION_SEED = 0  # the default seed of that draw


def check(split: str, what: str) -> str:
  """Returns `split`, or raises ValueError naming `what` (the dataset) and the splits it has."""
  if split not in SPLITS:
    raise ValueError(f"split {split!r}: {what} has the splits {SPLITS}")
  return split


def num_held_out(num: int, fraction: float) -> int:
  """round(num * fraction), at least 1 and at most num - 1 (both parts non-empty) when 0 < fraction < 1."""
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"config.data.validation_fraction={fraction} must be in [0, 1)")
  if fraction == 0.0:
    return 0
  if num < 2:
    raise ValueError(f"config.data.validation_fraction={fraction}: a train split of {num} example(s) cannot be "
                     "divided into train and validation")
  return int(min(max(round(num * fraction), 1), num - 1))


def carve(num: int, fraction: float = VALIDATION_FRACTION,
          seed: int = VALIDATION_SEED) -> dict[str, np.ndarray]:
  """{"train": int64 [num - V], "validation": int64 [V]}: sorted indices into a train split of `num` examples."""
  held_out = num_held_out(num, fraction)
  order = np.random.default_rng(seed).permutation(num)
  return {"train": np.sort(order[held_out:]), "validation": np.sort(order[:held_out])}


def carve_chronological(num: int, fraction: float = VALIDATION_FRACTION) -> dict[str, np.ndarray]:
  """{"train": [0 .. num - V - 1], "validation": [num - V .. num - 1]}: the last steps of a series' train part."""
  held_out = num_held_out(num, fraction)
  return {"train": np.arange(num - held_out), "validation": np.arange(num - held_out, num)}


def select(indices_by_split: dict[str, np.ndarray], split: str, what: str) -> np.ndarray:
  """The indices of `split` from a `carve` result; raises naming `what` for a split it does not hold."""
  if split not in indices_by_split:
    raise ValueError(f"split {split!r}: {what} has the splits {tuple(indices_by_split)}")
  return indices_by_split[split]
