"""UCR/UEA time-series classification sets read from .ts files, as padded arrays and a grain source.

Dimension letters: N examples, C channels of the file, T steps (the longest
series of the train split, or `max_len`), F model inputs per step (C, or 2C
with the missing-value indicators).

`config.data.name` "ucr" names a set by `dataset` or gives a .ts pair by
`train_path`/`test_path` (both given, `dataset` may then be empty). A name is
looked up in this order:

  1. the folder `config.data.dir`/NAME/ holding NAME_TRAIN.ts and NAME_TEST.ts
     (the layout of the UEA/UCR archives, for sets a user downloaded; a
     missing file there is an error naming it);
  2. the classification sets shipped inside sktime's wheel, listed at run time
     by `dataset_names()` (ArrowHead, BasicMotions, GunPoint, ItalyPowerDemand,
     JapaneseVowels, OSULeaf, PLAID, ACSF1, ...);
  3. else an error: for one of the ten UEA sets of the Aaren paper's
     classification table (`PAPER_UEA_SETS`), a FileNotFoundError naming the
     train file expected under `config.data.dir`.

Splits. The files ship train and test; validation is carved from the train
file by example (`nbp.data.splits.carve` with `config.data.validation_fraction`
and `validation_seed`, a fixed permutation), and "train" is the rest. Nothing
below is decided by the validation or test examples:

  channels    the .ts dimensions (C);
  classes     the train file's sorted label set (numerically when every label
              is a number, so "10" follows "9"), labels mapped to 0..K-1: the
              label space the set declares by its training file, so a class
              whose examples all fall in the carved validation part keeps its
              output; a test label missing from it is an error naming the file
              and example;
  lengths     T is the longest series of the train split (or `max_len` when
              smaller). Shorter series are right-padded with `valid` False; a
              longer one, which only a validation or test series (or any,
              under `max_len`) can be, is cut to its first T steps, and
              `UCRData.num_cut` counts them per split (logged at load). A case
              whose channels differ in length has its shorter channels padded
              with missing values;
  missing     "?" in the file (NaN). When the train split holds a missing value,
              every channel gets an indicator channel (1 where missing), so
              F = 2C; otherwise F = C, and a missing value of the validation or
              test split is only set to 0 (the train mean). After
              normalisation NaN becomes 0 either way;
  scale       each channel is normalised with the mean and std of the train
              split's observed values only (a constant channel: std 1).

Files are read with sktime's own loader (`load_from_tsfile`, as numpy3D for
equal-length sets, else as nested pandas); a file it cannot parse raises
`UCRFileError` naming the file. A split is small, so `split_arrays` gives it
whole ({"x": float32 [N, T, F], "valid": bool [N, T], "label": int32 [N]}),
and `pipeline.ArraySource` serves it to grain example by example.
"""

from __future__ import annotations

import dataclasses
import functools
import os

from absl import logging
import numpy as np
import sktime
from sktime.datasets import load_from_tsfile

from nbp.data import pipeline
from nbp.data import splits as splits_lib

SKTIME_DATA = os.path.join(os.path.dirname(sktime.__file__), "datasets", "data")
SPLITS = splits_lib.SPLITS
# The ten UEA multivariate sets of the Aaren paper's classification table (the usual Transformer time-series
# benchmark); read from config.data.dir/<Name>/<Name>_{TRAIN,TEST}.ts (JapaneseVowels also ships with sktime).
PAPER_UEA_SETS = ("EthanolConcentration", "FaceDetection", "Handwriting", "Heartbeat", "JapaneseVowels",
                  "PEMS-SF", "SelfRegulationSCP1", "SelfRegulationSCP2", "SpokenArabicDigits",
                  "UWaveGestureLibrary")


class UCRFileError(ValueError):
  """A .ts file could not be read, or holds what the classification task cannot use; names the file."""

  def __init__(self, message: str, path: str):
    super().__init__(message)
    self.path = path  # the offending file

  def __reduce__(self):  # keeps the path when grain's worker processes send it back
    return type(self), (str(self), self.path)


# ------------------------------------------------------------------ the files


def _header(path: str) -> dict[str, str]:
  """The lower-cased @keys of a .ts header (up to @data) -> the rest of their line."""
  out = {}
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      line = line.strip()
      if line.lower().startswith("@data"):
        break
      if line.startswith("@"):
        key, _, rest = line[1:].partition(" ")
        out.setdefault(key.lower(), rest.strip())
  return out


def is_classification_file(path: str) -> bool:
  """Whether a .ts file's header declares class labels (`@classLabel true ...`), not regression targets."""
  return _header(path).get("classlabel", "").lower().startswith("true")


@functools.cache
def dataset_names() -> tuple[str, ...]:
  """The classification sets inside sktime's wheel: folders NAME/ with NAME_TRAIN.ts and NAME_TEST.ts."""
  names = []
  for name in sorted(os.listdir(SKTIME_DATA)):
    train, test = (os.path.join(SKTIME_DATA, name, f"{name}_{s}.ts") for s in ("TRAIN", "TEST"))
    if os.path.isfile(train) and os.path.isfile(test) and is_classification_file(train):
      names.append(name)
  return tuple(names)


def folder_paths(data_dir: str, name: str) -> tuple[str, str]:
  """(DIR/NAME/NAME_TRAIN.ts, DIR/NAME/NAME_TEST.ts): the UEA/UCR archives' layout."""
  return tuple(os.path.join(data_dir, name, f"{name}_{s}.ts") for s in ("TRAIN", "TEST"))


def dataset_paths(data_cfg) -> tuple[str, str]:
  """(train .ts, test .ts) of `config.data`: its train_path/test_path, else `dataset` (see the module docstring)."""
  train_path, test_path = data_cfg.get("train_path", ""), data_cfg.get("test_path", "")
  if train_path or test_path:
    if not (train_path and test_path):
      missing = "test_path" if train_path else "train_path"
      raise ValueError(f"config.data.{missing} is empty: give both train_path and test_path (a .ts pair), "
                       "or neither and a dataset name.")
    for key, path in (("train_path", train_path), ("test_path", test_path)):
      if not os.path.isfile(path):
        raise FileNotFoundError(f"config.data.{key}={path!r}: no such file.")
    return os.path.abspath(train_path), os.path.abspath(test_path)
  name = data_cfg.get("dataset", "")
  data_dir = data_cfg.get("dir", "") or "."
  if name and os.path.isdir(os.path.join(data_dir, name)):
    paths = folder_paths(data_dir, name)
    for path in paths:
      if not os.path.isfile(path):
        raise FileNotFoundError(f"config.data.dataset={name!r}: no file {path} (a set read from "
                                f"config.data.dir={data_dir!r} needs {os.path.basename(paths[0])} and "
                                f"{os.path.basename(paths[1])} in {os.path.join(data_dir, name)}).")
    return tuple(os.path.abspath(p) for p in paths)
  if name in dataset_names():
    return tuple(os.path.join(SKTIME_DATA, name, f"{name}_{s}.ts") for s in ("TRAIN", "TEST"))
  if name in PAPER_UEA_SETS:
    raise FileNotFoundError(f"config.data.dataset={name!r}: no file {folder_paths(data_dir, name)[0]}. This UEA "
                            "set does not ship with sktime: put the archive's <Name>/<Name>_TRAIN.ts and _TEST.ts "
                            "under config.data.dir.")
  raise ValueError(f"config.data.dataset={name!r} is neither a folder {os.path.join(data_dir, str(name))}/ "
                   f"(config.data.dir) nor a classification set shipped with sktime; choose one of "
                   f"{dataset_names()}, or give config.data.train_path and test_path.")


def _as_series(X) -> list[np.ndarray]:
  """sktime's numpy3D [N, C, T] or nested DataFrame (a pd.Series per cell) -> N float64 arrays [C, T_n].

  In a case whose channels differ in length the shorter ones are padded with NaN (missing).
  """
  if isinstance(X, np.ndarray):
    return [np.asarray(case, np.float64) for case in X]
  out = []
  for row in X.itertuples(index=False):
    channels = [np.asarray(cell, np.float64).reshape(-1) for cell in row]
    length = max(len(c) for c in channels)
    out.append(np.stack([np.pad(c, (0, length - len(c)), constant_values=np.nan) for c in channels]))
  return out


def read_ts(path: str) -> tuple[list[np.ndarray], np.ndarray]:
  """A classification .ts file -> (N series float64 [C, T_n], NaN where missing; labels as str [N]).

  sktime's loader reads it as numpy3D (equal lengths), else as nested pandas.
  Raises UCRFileError naming the file when it does not parse, declares no class
  labels, or its cases differ in channel count.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"UCR/UEA file {path}: no such file.")
  try:
    header = _header(path)
    if not header.get("classlabel", "").lower().startswith("true"):
      raise UCRFileError(f"UCR/UEA file {path} declares no class labels ('@classLabel true ...'): it is not a "
                         "classification set (a regression set declares '@targetLabel').", path)
    X = None
    if header.get("equallength", "true").lower() != "false":  # numpy3D when every case has one length
      try:
        X, y = load_from_tsfile(path, return_data_type="numpy3D")
      except Exception:  # pylint: disable=broad-except  # unequal lengths after all: the nested form holds them
        X = None
    if X is None:
      X, y = load_from_tsfile(path, return_data_type="nested_univ")
    series = _as_series(X)
  except UCRFileError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # sktime raises OSError, ValueError, TypeError...
    raise UCRFileError(f"Cannot read UCR/UEA file {path}: {type(e).__name__}: {e}", path) from e
  if not series:
    raise UCRFileError(f"UCR/UEA file {path} holds no cases.", path)
  labels = np.asarray(y).astype(str)
  if len(labels) != len(series):
    raise UCRFileError(f"UCR/UEA file {path}: {len(series)} cases but {len(labels)} labels.", path)
  return series, labels


def sorted_labels(labels) -> tuple[str, ...]:
  """The distinct labels sorted, numerically when every one is a number ("2" before "10")."""
  distinct = set(str(l) for l in labels)
  try:
    return tuple(sorted(distinct, key=lambda l: (float(l), l)))
  except ValueError:
    return tuple(sorted(distinct))


# ---------------------------------------------------------------- the arrays


@dataclasses.dataclass(frozen=True)
class UCRData:
  """The three splits of a set as arrays, and what the model needs to know of them."""

  name: str  # the set (its name, or the train file's stem)
  paths: tuple[str, str]  # (train .ts, test .ts)
  splits: dict  # split -> {"x": float32 [N, T, F], "valid": bool [N, T], "label": int32 [N]}
  indices: dict  # "train"/"validation" -> int64 indices into the train file's examples (the carve)
  class_names: tuple[str, ...]  # label k of the arrays is class_names[k]
  channels: int  # C, channels of the files
  missing_indicators: bool  # whether x holds C indicator channels after the C values (F = 2C)
  mean: np.ndarray  # float64 [C], the train split's per-channel mean
  std: np.ndarray  # float64 [C], the train split's per-channel std (1 for a constant channel)
  num_cut: dict  # split -> how many of its series were longer than T and cut

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def input_dim(self) -> int:
    """F."""
    return self.channels * (2 if self.missing_indicators else 1)

  @property
  def max_len(self) -> int:
    """T."""
    return self.splits["train"]["x"].shape[1]


def _pad(series: list[np.ndarray], length: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
  """N arrays [C, T_n] -> (float64 [N, length, C] NaN-free only where observed, bool valid [N, length])."""
  x = np.zeros((len(series), length, channels))
  valid = np.zeros((len(series), length), bool)
  for n, s in enumerate(series):
    t = min(s.shape[1], length)
    x[n, :t] = s[:, :t].T
    valid[n, :t] = True
  return x, valid


def _labels_to_ints(labels: np.ndarray, class_names: tuple[str, ...], path: str) -> np.ndarray:
  index = {name: k for k, name in enumerate(class_names)}
  labels = [str(l) for l in labels]
  for n, label in enumerate(labels):
    if label not in index:
      raise UCRFileError(f"UCR/UEA file {path}: example {n} has label {label!r}, which the train split does not "
                         f"have (its classes: {class_names}).", path)
  return np.array([index[l] for l in labels], np.int32)


@functools.lru_cache(maxsize=8)
def load_pair(train_path: str, test_path: str, max_len: int = 0, name: str = "",
              validation_fraction: float = splits_lib.VALIDATION_FRACTION,
              validation_seed: int = splits_lib.VALIDATION_SEED) -> UCRData:
  """Reads and prepares a train/test .ts pair (see the module docstring); cached per process, arrays read-only."""
  if max_len < 0:
    raise ValueError(f"config.data.max_len={max_len} must be >= 0 (0: the longest train series).")
  (train_file, train_file_labels), (test, test_labels) = read_ts(train_path), read_ts(test_path)
  channels = train_file[0].shape[0]
  for path, series in ((train_path, train_file), (test_path, test)):
    for n, s in enumerate(series):
      if s.shape[0] != channels:
        raise UCRFileError(f"UCR/UEA file {path}: example {n} has {s.shape[0]} channels, the train split "
                           f"{channels}.", path)
  class_names = sorted_labels(train_file_labels)
  file_labels = _labels_to_ints(train_file_labels, class_names, train_path)
  indices = splits_lib.carve(len(train_file), validation_fraction, validation_seed)
  series = {split: [train_file[i] for i in idx] for split, idx in indices.items()}
  series["test"] = test
  labels = {split: file_labels[idx] for split, idx in indices.items()}
  labels["test"] = _labels_to_ints(test_labels, class_names, test_path)

  longest = max(s.shape[1] for s in series["train"])  # train only: no shape from validation or test
  length = min(longest, max_len) if max_len else longest
  num_cut = {split: int(sum(s.shape[1] > length for s in series[split])) for split in SPLITS}
  raw = {split: _pad(series[split], length, channels) for split in SPLITS}
  name = name or os.path.basename(train_path).rsplit(".", 1)[0].removesuffix("_TRAIN")
  if any(num_cut.values()):
    logging.info("UCR/UEA set %s: series longer than T=%d cut to their first T steps: %s", name, length, num_cut)

  x_train, valid_train = raw["train"]
  observed = x_train[valid_train]  # [steps, C]
  mean, std = np.nanmean(observed, axis=0), np.nanstd(observed, axis=0)
  if np.isnan(mean).any():
    channel = int(np.flatnonzero(np.isnan(mean))[0])
    raise UCRFileError(f"UCR/UEA file {train_path}: channel {channel} has no observed value in the train split.",
                       train_path)
  std = np.where(std > 0, std, 1.0)
  missing_indicators = bool(np.isnan(observed).any())  # decided by the train split alone

  arrays_by_split = {}
  for split, (x, valid) in raw.items():
    missing = np.isnan(x) & valid[..., None]  # [N, T, C]
    x = np.where(valid[..., None] & ~missing, (x - mean) / std, 0.0)
    if missing_indicators:
      x = np.concatenate([x, missing.astype(x.dtype)], axis=-1)  # [N, T, 2C]
    arrays = {"x": x.astype(np.float32), "valid": valid, "label": labels[split]}
    for a in arrays.values():
      a.setflags(write=False)
    arrays_by_split[split] = arrays
  return UCRData(name, (train_path, test_path), arrays_by_split, indices, class_names, channels,
                 missing_indicators, mean, std, num_cut)


def load(data_cfg) -> UCRData:
  """The three splits of `config.data` (name "ucr"), read once per process."""
  if data_cfg.name != "ucr":
    raise ValueError(f"config.data.name={data_cfg.name!r}: nbp.data.ucr reads 'ucr'.")
  train_path, test_path = dataset_paths(data_cfg)
  name = "" if data_cfg.get("train_path", "") else data_cfg.get("dataset", "")
  return load_pair(train_path, test_path, int(data_cfg.get("max_len", 0)), name,
                   float(data_cfg.get("validation_fraction", splits_lib.VALIDATION_FRACTION)),
                   int(data_cfg.get("validation_seed", splits_lib.VALIDATION_SEED)))


def split_arrays(data_cfg, split: str) -> dict[str, np.ndarray]:
  """The whole split: {"x": float32 [N, T, F], "valid": bool [N, T], "label": int32 [N]} (read-only)."""
  splits_lib.check(split, "a UCR/UEA set")
  return load(data_cfg).splits[split]


def source(data_cfg, split: str) -> pipeline.ArraySource:
  """A grain-compatible source of {"x": float32 [T, F], "valid": bool [T], "label": int32} examples."""
  return pipeline.ArraySource(split_arrays(data_cfg, split))


def make_iterator(data_cfg, split: str, *, seed: int, process_index: int, process_count: int, batch_size: int,
                  shuffle: bool = True):
  """A checkpointable grain iterator of this host's batches of `batch_size` examples, repeating forever."""
  return pipeline.make_iterator(
      source(data_cfg, split), global_batch_size=batch_size * process_count, seed=seed, shuffle=shuffle,
      process_index=process_index, process_count=process_count, worker_count=data_cfg.worker_count)
