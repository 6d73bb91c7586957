"""nbp.data.splits: the three splits, and how validation is carved from train (by example, or by time)."""

import numpy as np
import pytest

from nbp import data as data_lib
from nbp.data import splits
from nbp.training import config as config_lib


@pytest.mark.parametrize("num,fraction", [(100, 0.1), (1437, 0.1), (7, 0.5), (50, 0.25)])
def test_carve_is_deterministic_disjoint_and_covers_every_index(num, fraction):
  carved = splits.carve(num, fraction, seed=3)
  again = splits.carve(num, fraction, seed=3)
  assert set(carved) == {"train", "validation"}
  for part in ("train", "validation"):
    np.testing.assert_array_equal(carved[part], again[part])  # the same call, the same carve
    assert carved[part].dtype.kind == "i" and np.all(np.diff(carved[part]) > 0)  # sorted, no repeats
  assert not set(carved["train"].tolist()) & set(carved["validation"].tolist())
  np.testing.assert_array_equal(np.sort(np.concatenate([carved["train"], carved["validation"]])), np.arange(num))


@pytest.mark.parametrize("num,fraction,held_out", [
    (100, 0.1, 10), (1000, 0.25, 250), (10, 0.33, 3), (1437, 0.1, 144),
    (3, 0.1, 1),  # round(0.3) is 0: at least one validation example
    (10, 0.99, 9),  # round(9.9) is 10: at least one train example
    (2, 0.5, 1)])
def test_carve_sizes_are_rounded_with_both_parts_non_empty(num, fraction, held_out):
  carved = splits.carve(num, fraction, seed=0)
  assert len(carved["validation"]) == held_out and len(carved["train"]) == num - held_out


def test_fraction_zero_holds_out_nothing():
  carved = splits.carve(10, 0.0, seed=0)
  np.testing.assert_array_equal(carved["train"], np.arange(10))
  assert carved["validation"].size == 0


def test_another_seed_gives_another_carve():
  draws = {seed: tuple(splits.carve(200, 0.1, seed)["validation"].tolist()) for seed in range(4)}
  assert len(set(draws.values())) == 4
  assert draws[0] == tuple(splits.carve(200, 0.1)["validation"].tolist())  # seed 0 is the default


def test_carve_is_not_the_first_or_last_examples():
  """A permutation, not a slice: validation is spread over the train split (which may be sorted by class)."""
  validation = splits.carve(1000, 0.1, seed=0)["validation"]
  assert validation.min() < 100 and validation.max() >= 900


def test_carve_chronological_keeps_the_order():
  carved = splits.carve_chronological(20, 0.25)
  np.testing.assert_array_equal(carved["train"], np.arange(15))
  np.testing.assert_array_equal(carved["validation"], np.arange(15, 20))  # the last train steps
  short = splits.carve_chronological(5, 0.1)
  np.testing.assert_array_equal(short["train"], np.arange(4))
  np.testing.assert_array_equal(short["validation"], [4])


@pytest.mark.parametrize("fraction", [1.0, 1.5, -0.1])
def test_a_bad_fraction_names_the_config_key(fraction):
  for carve in (lambda: splits.carve(10, fraction, 0), lambda: splits.carve_chronological(10, fraction)):
    with pytest.raises(ValueError, match=rf"config\.data\.validation_fraction={fraction}"):
      carve()


def test_a_train_split_too_small_to_divide_names_the_config_key():
  for carve in (lambda: splits.carve(1, 0.1, 0), lambda: splits.carve_chronological(1, 0.1)):
    with pytest.raises(ValueError, match=r"config\.data\.validation_fraction=0\.1: a train split of 1"):
      carve()


def test_split_names_are_checked():
  assert splits.SPLITS == ("train", "validation", "test")
  for split in splits.SPLITS:
    assert splits.check(split, "moving digits") == split
  with pytest.raises(ValueError, match=r"split 'val': moving digits has the splits \('train', 'validation', 'test'\)"):
    splits.check("val", "moving digits")
  carved = splits.carve(10, 0.2, 0)
  np.testing.assert_array_equal(splits.select(carved, "validation", "x"), carved["validation"])
  with pytest.raises(ValueError, match=r"split 'test': the UCR set has the splits \('train', 'validation'\)"):
    splits.select(carved, "test", "the UCR set")


def test_every_config_records_how_validation_is_carved():
  """The two keys are common to every data section, so config.json says which examples were held out."""
  data = config_lib.base_config().data
  assert (data.validation_fraction, data.validation_seed) == (splits.VALIDATION_FRACTION, splits.VALIDATION_SEED)
  assert {"validation_fraction", "validation_seed"} <= set(data_lib.COMMON_KEYS)
