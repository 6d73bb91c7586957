"""Real time series cut into forecasting windows: lookback in, horizon out.

Dimension letters: N time steps of a series, C channels (variables), L lookback
(input steps), H horizon (predicted steps), W windows of a split.

Two `config.data` sections:

  series      a real series shipped with statsmodels or sktime, by `dataset` (a
              name of `SERIES`, each loader returning float [N, C]);
  csv_series  an ETT/Weather-style CSV file at `path`: a date column first, then
              one numeric column per variable; `columns` picks some by name
              (empty: every column after the date that holds numbers).

Both take `lookback` (L), `horizon` (H) and `test_fraction`; csv_series also
`split_rows`.

Splits are chronological, in this order: train, validation, test.

  fractions   (default) the last round(N * test_fraction) time steps are the
              test split; of the steps before them, the last
              round(. * config.data.validation_fraction) are the validation
              split (`nbp.data.splits.carve_chronological`), the rest train.
  split_rows  (csv_series) (train, validation, test) row counts from the first
              row; rows after them are not used. The ETT protocol of the
              long-horizon benchmark is (8640, 2880, 2880) for the hourly files
              (12/4/4 months of 30 days) and four times that for the 15-minute
              ones; its 70/10/20 files (Weather, ECL, Traffic, Exchange) are
              test_fraction 0.2 with validation_fraction 0.125 (10% of the
              whole; the row counts agree with int(0.7 N), int(0.2 N) to within
              a row).

Every channel is normalised by the mean and standard deviation of the train
rows only (a constant channel by std 1), so no statistic sees the validation
or test period.

Windows. A window whose first target step is t has input x = series[t-L:t]
[L, C] and target y = series[t:t+H] [H, C], both normalised. Train windows lie
wholly in the train rows (t from L to num_train - H); a validation or test
window has every target step in its split's rows and its lookback may reach
back into the rows before (the past), as is usual: the first validation target
is the first validation step. `WindowSource` gives random access ({"x", "y"}
per window, for grain) and `arrays()` the whole split at once.

Missing values. statsmodels' weekly co2 record has 59 missing weeks (gaps of
1 to 8 weeks in 1958-1967, all in its train rows); the loaders keep them as
NaN and `fill_gaps` fills them once the split is known, borrowing nothing from
a later split: the train rows by linear interpolation in time between train
values (a gap at either end of the train rows repeats the nearest train
value), the validation and test rows by carrying the last earlier value
forward (the past only, so no window's input holds a value derived from its
own targets). No other series of the table has gaps. A CSV file must be
complete: an empty or non-numeric cell is an error naming the file, the column
and the row.

Nothing is downloaded or cached: the series ship inside the installed
statsmodels and sktime packages and load in milliseconds.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, SupportsIndex

import numpy as np
import pandas as pd
import sktime.datasets
import statsmodels.api as sm

from nbp.data import splits as splits_lib

SPLITS = splits_lib.SPLITS


# ---------------------------------------------------------------------------
# The series table.


def fill_gaps(values: np.ndarray, num_train: int, what: str = "series") -> np.ndarray:
  """NaN in float [N, C] filled without borrowing from a later split (see the module docstring).

  Rows 0..num_train-1: linear interpolation in time between train values, the
  nearest train value at either end; the rows after: the last earlier value
  carried forward. Raises ValueError naming `what` when a channel has no
  observed train value.
  """
  frame = pd.DataFrame(np.asarray(values, np.float64))
  train = frame.iloc[:num_train]
  empty = np.flatnonzero(train.isna().all().to_numpy())
  if empty.size:
    raise ValueError(f"{what}: channel {int(empty[0])} has no observed value in its {num_train} train rows")
  train = train.interpolate(method="linear", limit_direction="both")
  later = frame.iloc[num_train:]
  filled = pd.concat([train, later]).ffill()  # train rows are complete, so every later gap has a past value
  return filled.to_numpy(np.float64)


def _statsmodels(name: str, columns: tuple[str, ...] | None = None) -> Callable[[], np.ndarray]:
  def load() -> np.ndarray:
    frame = getattr(sm.datasets, name).load_pandas().data
    return (frame[list(columns)] if columns else frame).to_numpy(np.float64)  # gaps stay NaN
  return load


def _elnino() -> np.ndarray:
  """Monthly sea-surface temperature, 1950-2010: the year-by-month table read row by row -> [732, 1]."""
  frame = sm.datasets.elnino.load_pandas().data.drop(columns="YEAR")
  return frame.to_numpy(np.float64).reshape(-1, 1)


def _sktime(loader: Callable[[], object]) -> Callable[[], np.ndarray]:
  def load() -> np.ndarray:
    out = loader()
    if isinstance(out, tuple):  # (y, X): the target variable first, then the others
      y, x = out
      return pd.concat([y.to_frame(), x], axis=1).to_numpy(np.float64)
    frame = out.to_frame() if isinstance(out, pd.Series) else out
    return frame.to_numpy(np.float64)
  return load


_MACRO = ("realgdp", "realcons", "realinv", "realgovt", "realdpi", "cpi", "m1", "tbilrate", "unemp", "pop",
          "infl", "realint")

# name -> loader of float [N, C] (N time steps, C variables), in time order.
SERIES: dict[str, Callable[[], np.ndarray]] = {
    "co2": _statsmodels("co2"),  # Mauna Loa CO2, weekly 1958-2001: [2284, 1] (59 gaps, NaN until fill_gaps)
    "sunspots": _statsmodels("sunspots", ("SUNACTIVITY",)),  # yearly sunspot activity 1700-2008: [309, 1]
    "elnino": _elnino,  # monthly El Nino sea-surface temperature 1950-2010: [732, 1]
    "nile": _statsmodels("nile", ("volume",)),  # yearly Nile flow at Aswan 1871-1970: [100, 1]
    "macrodata": _statsmodels("macrodata", _MACRO),  # US macroeconomic quarters 1959-2009: [203, 12]
    "airline": _sktime(sktime.datasets.load_airline),  # monthly airline passengers 1949-1960: [144, 1]
    "lynx": _sktime(sktime.datasets.load_lynx),  # yearly lynx trappings 1821-1934: [114, 1]
    "shampoo_sales": _sktime(sktime.datasets.load_shampoo_sales),  # monthly shampoo sales, 3 years: [36, 1]
    "pbs": _sktime(sktime.datasets.load_PBS_dataset),  # monthly Australian prescription scripts: [204, 1]
    # quarterly US changes 1970-2016 (consumption, income, production, savings, unemployment): [187, 5]
    "uschange": _sktime(sktime.datasets.load_uschange),
}


@functools.cache
def _load_series_cached(name: str) -> np.ndarray:
  values = np.asarray(SERIES[name](), np.float32)
  if values.ndim != 2 or np.isinf(values).any():
    raise ValueError(f"series {name!r}: the loader gave shape {values.shape} or infinite values")
  values.setflags(write=False)
  return values


def load_series(name: str) -> np.ndarray:
  """The named real series as float32 [N, C], NaN at its gaps; raises ValueError naming config.data.dataset."""
  if name not in SERIES:
    raise ValueError(f"config.data.dataset={name!r} is not a known series; choose one of {sorted(SERIES)}.")
  return _load_series_cached(name)


# ---------------------------------------------------------------------------
# ETT/Weather-style CSV files.


def read_csv_series(path: str, columns=()) -> tuple[np.ndarray, tuple[str, ...]]:
  """(float32 [N, C], column names) of a CSV file: a date column first, then numeric columns.

  `columns` names the variables to keep, in that order; empty keeps every
  column after the date column that holds numbers (a column of text only, such
  as a label, is left out). Raises FileNotFoundError naming the file, and
  ValueError naming the file and the column for an unknown column, and the
  file, the column and the row (its line in the file, and its date) for an
  empty or non-numeric cell.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.data.path={path!r}: no such CSV file.")
  frame = pd.read_csv(path, dtype=str, keep_default_na=False)
  if frame.shape[1] < 2:
    raise ValueError(f"{path}: needs a date column and at least one variable column, found {list(frame.columns)}")
  variables = list(frame.columns[1:])
  numeric = {name: pd.to_numeric(frame[name].str.strip(), errors="coerce") for name in variables}
  if columns:
    missing = [c for c in columns if c not in variables]
    if missing:
      raise ValueError(f"{path}: no column {missing[0]!r} (config.data.columns); its variables are {variables}")
    chosen = list(columns)
  else:
    chosen = [name for name in variables if numeric[name].notna().any()]
    if not chosen:
      raise ValueError(f"{path}: no numeric column after the date column {frame.columns[0]!r}")
  for name in chosen:
    bad = np.flatnonzero(numeric[name].isna().to_numpy())
    if bad.size:
      row = int(bad[0])
      raise ValueError(f"{path}: column {name!r}, row {row + 1} (line {row + 2}, {frame.columns[0]} "
                       f"{frame.iloc[row, 0]!r}): {frame[name].iloc[row]!r} is not a number")
  values = np.stack([numeric[name].to_numpy(np.float64) for name in chosen], axis=1)
  if not np.isfinite(values).all():
    row, col = np.argwhere(~np.isfinite(values))[0]
    raise ValueError(f"{path}: column {chosen[col]!r}, row {row + 1} (line {row + 2}): not a finite number")
  return values.astype(np.float32), tuple(chosen)


# ---------------------------------------------------------------------------
# Splits, normalisation, windows.


def split_sizes(num_steps: int, *, test_fraction: float, validation_fraction: float = 0.0,
                split_rows=(), what: str = "series") -> tuple[int, int, int]:
  """(train, validation, test) time steps, in that order from the first (see the module docstring)."""
  if split_rows:
    sizes = tuple(int(r) for r in split_rows)
    if len(sizes) != 3 or min(sizes) < 0 or sizes[0] < 1 or sizes[2] < 1:
      raise ValueError(f"config.data.split_rows={tuple(split_rows)} must be three row counts (train, validation, "
                       "test), train and test >= 1")
    if sum(sizes) > num_steps:
      raise ValueError(f"{what}: config.data.split_rows={sizes} needs {sum(sizes)} rows but it has {num_steps}")
    return sizes
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"config.data.test_fraction={test_fraction} must lie strictly between 0 and 1")
  num_test = int(round(num_steps * test_fraction))
  num_validation = splits_lib.num_held_out(num_steps - num_test, validation_fraction)
  return num_steps - num_test - num_validation, num_validation, num_test


def normalise(values: np.ndarray, num_train: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(normalised float32 [N, C], mean [C], std [C]): statistics of rows 0..num_train-1 only (std 0 -> 1)."""
  train = values[:num_train].astype(np.float64)
  mean, std = train.mean(axis=0), train.std(axis=0)
  std = np.where(std > 0, std, 1.0)
  return ((values - mean) / std).astype(np.float32), mean.astype(np.float32), std.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class WindowSource:
  """Random access to the windows of one split: {"x": float32 [L, C], "y": float32 [H, C]}.

  Window i has its first target step at t = first_target + i.
  """

  values: np.ndarray  # float32 [N, C]: the whole normalised series
  lookback: int  # L
  horizon: int  # H
  first_target: int  # t of window 0 (>= L)
  num_windows: int  # W

  def __len__(self) -> int:
    return self.num_windows

  def __getitem__(self, index: SupportsIndex) -> dict[str, np.ndarray]:
    i = int(index)
    if not 0 <= i < self.num_windows:
      raise IndexError(f"window {i} out of range [0, {self.num_windows})")
    t = self.first_target + i
    return {"x": self.values[t - self.lookback:t], "y": self.values[t:t + self.horizon]}

  def arrays(self) -> dict[str, np.ndarray]:
    """The whole split: {"x": float32 [W, L, C], "y": float32 [W, H, C]}."""
    t = self.first_target + np.arange(self.num_windows)
    x = self.values[t[:, None] + np.arange(-self.lookback, 0)]
    y = self.values[t[:, None] + np.arange(self.horizon)]
    return {"x": x, "y": y}


@dataclasses.dataclass(frozen=True)
class SplitSeries:
  """A series with its gaps filled and normalised by its train statistics, and its split rows."""

  values: np.ndarray  # float32 [N', C], normalised: the used rows (train, validation, test) only
  mean: np.ndarray  # float32 [C], of the train rows (raw units)
  std: np.ndarray  # float32 [C], of the train rows (raw units; 1 for a constant channel)
  sizes: tuple[int, int, int]  # rows of the train, validation and test splits, in this order
  lookback: int  # L
  horizon: int  # H
  what: str  # the dataset, for messages

  @property
  def num_channels(self) -> int:
    return self.values.shape[1]

  @property
  def num_train(self) -> int:
    return self.sizes[0]

  def rows(self, split: str) -> tuple[int, int]:
    """[start, stop) of the split's rows."""
    i = SPLITS.index(splits_lib.check(split, self.what))
    start = sum(self.sizes[:i])
    return start, start + self.sizes[i]

  def windows(self, split: str) -> WindowSource:
    """The split's windows; raises ValueError when the split is too short for one."""
    start, stop = self.rows(split)
    L, H = self.lookback, self.horizon
    first, last = max(start, L), stop - H
    count = last - first + 1
    if count < 1:
      train, validation, test = self.sizes
      raise ValueError(
          f"{self.what}: {sum(self.sizes)} time steps ({train} train, {validation} validation, {test} test) hold "
          f"no {split} window of config.data.lookback={L} + config.data.horizon={H}; shorten them or change "
          "config.data.test_fraction / validation_fraction (or split_rows).")
    return WindowSource(self.values, L, H, first, count)


def split_series(values: np.ndarray, *, lookback: int, horizon: int, test_fraction: float,
                 validation_fraction: float = 0.0, split_rows=(), what: str = "series") -> SplitSeries:
  """Chronological train/validation/test split of raw [N, C] values (NaN: gaps), filled and normalised by train."""
  if lookback < 1 or horizon < 1:
    raise ValueError(f"config.data.lookback={lookback} and config.data.horizon={horizon} must be >= 1")
  sizes = split_sizes(len(values), test_fraction=test_fraction, validation_fraction=validation_fraction,
                      split_rows=split_rows, what=what)
  used = fill_gaps(values[:sum(sizes)], sizes[0], what)
  normalised, mean, std = normalise(used, sizes[0])
  return SplitSeries(normalised, mean, std, sizes, lookback, horizon, what)


def raw_values(data_cfg) -> tuple[np.ndarray, str]:
  """(raw float32 [N, C], NaN at gaps; a description for messages) of a `series` or `csv_series` section."""
  if data_cfg.name == "series":
    return load_series(data_cfg.dataset), f"series {data_cfg.dataset!r}"
  if data_cfg.name == "csv_series":
    values, _ = read_csv_series(data_cfg.path, tuple(data_cfg.get("columns", ()) or ()))
    return values, f"CSV file {data_cfg.path!r}"
  raise ValueError(f"config.data.name={data_cfg.name!r} is not a forecasting dataset ('series', 'csv_series')")


def series_from_config(data_cfg) -> SplitSeries:
  """The split, filled, normalised series of `config.data` (name series or csv_series)."""
  values, what = raw_values(data_cfg)
  return split_series(values, lookback=data_cfg.lookback, horizon=data_cfg.horizon,
                      test_fraction=data_cfg.test_fraction,
                      validation_fraction=data_cfg.get("validation_fraction", splits_lib.VALIDATION_FRACTION),
                      split_rows=tuple(data_cfg.get("split_rows", ()) or ()), what=what)


def split_arrays(data_cfg, split: str) -> dict[str, np.ndarray]:
  """The whole split's windows: {"x": float32 [W, L, C], "y": float32 [W, H, C]}."""
  return series_from_config(data_cfg).windows(split).arrays()
