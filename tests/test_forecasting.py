"""Forecasting: the series table, the CSV reader and its errors, train-only normalisation, windows, metrics, steps."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest
import statsmodels.api as sm

from experiments.configs import aaren_forecasting
from nbp import tasks
from nbp.data import forecasting as data
from nbp.tasks import forecasting
from nbp.training import config as config_lib
from nbp.training import loop as train
from tests.conftest import apply_overrides

ETT_COLUMNS = ("HUFL", "HULL", "MUFL", "OT")


def _write_ett(path, rows=40, bad=None):
  """An ETT-like CSV: date, HUFL, HULL, MUFL, OT (hourly); `bad` = (row, column, text) spoils one cell."""
  rng = np.random.default_rng(0)
  frame = pd.DataFrame(rng.normal(size=(rows, len(ETT_COLUMNS))).round(3), columns=ETT_COLUMNS)
  frame.insert(0, "date", pd.date_range("2016-07-01", periods=rows, freq="h").astype(str))
  frame = frame.astype(object)
  if bad:
    frame.loc[bad[0], bad[1]] = bad[2]
  frame.to_csv(path, index=False)
  return frame


def _tiny_config(attention, dataset="co2", **overrides):
  c = aaren_forecasting.get_config(f"{attention},{dataset},local")
  return apply_overrides(c, {"batch_size": 8, "num_steps": 2, "log_every": 1, "checkpoint_every": 2,
                             "optimizer.warmup_steps": 1,
                             "model.num_layers": 1, "model.width": 16, "model.num_heads": 2,
                             "data.lookback": 12, "data.horizon": 4, **overrides})


def test_every_named_series_loads_and_co2_gaps_are_filled_from_its_train_rows():
  for name in data.SERIES:
    values = data.load_series(name)
    assert values.ndim == 2 and values.dtype == np.float32 and len(values) >= 30, name
    assert np.isfinite(values).all() or name == "co2", name
  assert data.load_series("co2").shape == (2284, 1) and data.load_series("macrodata").shape == (203, 12)
  assert data.load_series("elnino").shape == (732, 1) and data.load_series("uschange").shape == (187, 5)
  raw = sm.datasets.co2.load_pandas().data["co2"].to_numpy()
  gaps = np.isnan(raw)
  assert gaps.sum() == 59 and np.isnan(data.load_series("co2")[:, 0]).sum() == 59  # kept until the split
  s = data.split_series(data.load_series("co2"), lookback=104, horizon=26, test_fraction=0.2,
                        validation_fraction=0.1)
  assert s.sizes == (1644, 183, 457) and np.flatnonzero(gaps).max() < 1644  # every gap in the train rows
  t = np.arange(1644)
  train_raw, train_gaps = raw[:1644], gaps[:1644]
  filled = np.interp(t[train_gaps], t[~train_gaps], train_raw[~train_gaps])  # linear in time, train values only
  np.testing.assert_allclose(s.values[:1644][train_gaps, 0] * s.std[0] + s.mean[0], filled, rtol=1e-5)
  with pytest.raises(ValueError, match="config.data.dataset='nope'"):
    data.load_series("nope")
  assert set(aaren_forecasting.WINDOWS) == set(data.SERIES) | {"csv"}  # the config has a window per series


def test_gaps_are_filled_without_borrowing_from_a_later_split():
  values = np.arange(20, dtype=np.float64)[:, None] * [1.0, 10.0]
  values[[0, 3, 11, 12, 16], 0] = np.nan  # train rows 0-11 (sizes 12, 4, 4): gaps at 0, 3, 11; later 12, 16
  values[13, 1] = np.nan
  filled = data.fill_gaps(values, 12)
  np.testing.assert_array_equal(filled[[0, 3, 11], 0], [1.0, 3.0, 10.0])  # ends: the nearest train value
  np.testing.assert_array_equal(filled[[12, 16], 0], [10.0, 15.0])  # later rows: the last earlier value
  assert filled[13, 1] == 120.0
  later = values.copy()
  later[12:] = -1000.0  # whatever the later rows hold, the train rows' filling is the same
  np.testing.assert_array_equal(data.fill_gaps(later, 12)[:12], filled[:12])
  test_changed = values.copy()
  test_changed[16:] = 7.0  # nor does the test period change the validation rows
  np.testing.assert_array_equal(data.fill_gaps(test_changed, 12)[:16], filled[:16])
  empty = values.copy()
  empty[:12, 1] = np.nan
  with pytest.raises(ValueError, match="channel 1 has no observed value in its 12 train rows"):
    data.fill_gaps(empty, 12)


def test_csv_reader_reads_ett_columns_and_names_what_is_wrong(tmp_path):
  path = str(tmp_path / "ETTh1.csv")
  frame = _write_ett(path)
  values, names = data.read_csv_series(path)
  assert names == ETT_COLUMNS and values.shape == (40, 4)
  np.testing.assert_allclose(values, frame[list(ETT_COLUMNS)].to_numpy(float), rtol=1e-6)
  values, names = data.read_csv_series(path, ("OT", "HUFL"))
  assert names == ("OT", "HUFL")
  np.testing.assert_allclose(values, frame[["OT", "HUFL"]].to_numpy(float), rtol=1e-6)

  with pytest.raises(FileNotFoundError, match="missing.csv"):
    data.read_csv_series(str(tmp_path / "missing.csv"))
  with pytest.raises(ValueError, match=r"ETTh1.csv: no column 'LULL'"):
    data.read_csv_series(path, ("HUFL", "LULL"))
  spoilt = str(tmp_path / "spoilt.csv")
  _write_ett(spoilt, bad=(7, "MUFL", "n/a"))
  with pytest.raises(ValueError, match=r"spoilt.csv: column 'MUFL', row 8 \(line 9.*'n/a' is not a number"):
    data.read_csv_series(spoilt)
  _write_ett(spoilt, bad=(3, "OT", ""))  # an empty cell
  with pytest.raises(ValueError, match=r"spoilt.csv: column 'OT', row 4 "):
    data.read_csv_series(spoilt, ("OT",))
  data.read_csv_series(spoilt, ("HUFL",))  # the spoilt column is not read


def test_normalisation_uses_the_train_rows_only():
  rng = np.random.default_rng(1)
  raw = (np.arange(50)[:, None] * [1.0, -2.0] + rng.normal(size=(50, 2)) + [3.0, 5.0]).astype(np.float32)
  raw[:, 1] = np.where(np.arange(50) < 36, 7.0, raw[:, 1])  # constant over the train rows
  s = data.split_series(raw, lookback=5, horizon=3, test_fraction=0.2, validation_fraction=0.1)
  assert s.sizes == (36, 4, 10) and s.num_train == 36  # test: the last 10; validation: the last 4 before them
  np.testing.assert_allclose(s.mean, raw[:36].mean(axis=0), rtol=1e-5)  # not the validation rows'
  np.testing.assert_allclose(s.std, [raw[:36, 0].std(), 1.0], rtol=1e-5)  # a constant channel: std 1
  np.testing.assert_allclose(s.values, (raw - s.mean) / s.std, rtol=1e-5, atol=1e-5)
  assert abs(s.values[:36, 0].mean()) < 1e-5 and abs(s.values[40:, 0].mean()) > 1.0  # the trend leaves the range
  with pytest.raises(ValueError, match="config.data.test_fraction"):
    data.split_series(raw, lookback=5, horizon=3, test_fraction=1.0)
  with pytest.raises(ValueError, match="no test window of config.data.lookback=5 \\+ config.data.horizon=20"):
    data.split_series(raw, lookback=5, horizon=20, test_fraction=0.2).windows("test")
  with pytest.raises(ValueError, match="split_rows=\\(30, 10, 20\\) needs 60 rows but it has 50"):
    data.split_series(raw, lookback=5, horizon=3, test_fraction=0.2, split_rows=(30, 10, 20))


def test_windows_are_the_raw_slices_and_the_first_target_of_a_split_its_first_step():
  raw = np.random.default_rng(2).normal(size=(64, 3)).astype(np.float32)
  # 45 train rows, 7 validation, 12 test: split_rows as the ETT protocol gives them, rows past 64 unused
  s = data.split_series(raw, lookback=8, horizon=4, test_fraction=0.5, split_rows=(45, 7, 12))
  np.testing.assert_allclose(s.mean, raw[:45].mean(0), rtol=1e-5)
  norm = (raw - s.mean) / s.std
  windows = {split: s.windows(split) for split in data.SPLITS}
  targets = {"train": range(8, 45 - 4 + 1), "validation": range(45, 52 - 4 + 1), "test": range(52, 64 - 4 + 1)}
  for split, source in windows.items():
    assert len(source) == len(targets[split]), split
    arrays = source.arrays()
    assert arrays["x"].shape == (len(source), 8, 3) and arrays["y"].shape == (len(source), 4, 3)
    for i, t in enumerate(targets[split]):
      np.testing.assert_allclose(arrays["x"][i], norm[t - 8:t], atol=1e-5)  # the lookback may reach back
      np.testing.assert_allclose(arrays["y"][i], norm[t:t + 4], atol=1e-5)  # the targets stay in the split
      np.testing.assert_array_equal(source[i]["y"], arrays["y"][i])
  with pytest.raises(IndexError):
    windows["test"][len(windows["test"])]
  with pytest.raises(ValueError, match="split 'dev'"):
    s.windows("dev")


def _write_rows(path, rows, columns=ETT_COLUMNS):
  """A long ETT-like CSV (hourly dates, columns of random walks) written with numpy: fast for 10^4 rows."""
  rng = np.random.default_rng(4)
  values = np.cumsum(rng.normal(size=(rows, len(columns))), axis=0).round(3)
  dates = np.datetime64("2016-07-01T00") + np.arange(rows).astype("timedelta64[h]")
  with open(path, "w") as f:
    f.write(",".join(("date",) + tuple(columns)) + "\n")
    for date, row in zip(dates, values):
      f.write(str(date).replace("T", " ") + ":00:00," + ",".join(map(repr, row.tolist())) + "\n")
  return values


@pytest.mark.parametrize("name,horizon", [("ETTh1", 96), ("ETTh2", 720)])
def test_the_ett_protocol_12_4_4_months_lookback_96(tmp_path, name, horizon):
  c = aaren_forecasting.get_config(f"aaren,{name}:{horizon}")
  assert (c.data.name, c.data.lookback, c.data.horizon, tuple(c.data.split_rows)) == (
      "csv_series", 96, horizon, (8640, 2880, 2880))
  tasks.check_config(c)  # split_rows is a key of the csv_series section
  path = str(tmp_path / f"{name}.csv")
  values = _write_rows(path, 14_400 + 500)  # ETTh files hold about 17,420 rows; the last ones are unused
  c.data.path = path
  s = data.series_from_config(c.data)
  assert s.sizes == (8640, 2880, 2880) and len(s.values) == 14_400
  np.testing.assert_allclose(s.mean, values[:8640].mean(0), rtol=1e-4, atol=1e-3)  # the first 12 months only
  counts = {split: len(s.windows(split)) for split in data.SPLITS}
  # The benchmark's counts: 8640 - 96 - H + 1 train windows, 2880 - H + 1 for validation and test.
  assert counts == {"train": 8640 - 96 - horizon + 1, "validation": 2880 - horizon + 1, "test": 2880 - horizon + 1}
  last_test = s.windows("test").arrays()["y"][-1, -1]
  np.testing.assert_allclose(last_test, (values[14_399] - s.mean) / s.std, rtol=1e-4, atol=1e-4)


def test_the_benchmark_files_and_horizons_of_the_config():
  assert aaren_forecasting.get_config("aaren,ETTm1:336").data.split_rows == (34560, 11520, 11520)  # 15 minutes
  assert aaren_forecasting.get_config("softmax,ETTh1").data.horizon == 96
  for name in ("weather", "electricity", "traffic", "exchange_rate"):
    c = aaren_forecasting.get_config(f"aaren,{name}:192")
    assert (c.data.split_rows, c.data.test_fraction, c.data.validation_fraction) == ((), 0.2, 0.125)
    assert c.data.path == f"data/{name}.csv" and (c.data.lookback, c.data.horizon) == (96, 192)
  assert data.split_sizes(52_696, test_fraction=0.2, validation_fraction=0.125) == (36_887, 5_270, 10_539)  # 70/10/20
  with pytest.raises(ValueError, match="horizon '100'"):
    aaren_forecasting.get_config("aaren,ETTh1:100")
  with pytest.raises(ValueError, match="dataset 'co2:26'"):
    aaren_forecasting.get_config("aaren,co2:26")


def test_naive_baseline_and_horizon_metrics_by_hand():
  assert forecasting.horizons(26) == (1, 6, 13, 26) and forecasting.horizons(1) == (1,)
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(5, 7, 2)).astype(np.float32), rng.normal(size=(5, 8, 2)).astype(np.float32)
  naive = np.asarray(forecasting.naive_forecast(jnp.asarray(x), 8))
  np.testing.assert_array_equal(naive, np.repeat(x[:, -1:], 8, axis=1))
  out = forecasting.horizon_errors(jnp.asarray(naive), jnp.asarray(y), forecasting.horizons(8), "naive_")
  assert sorted(out) == sorted(f"naive_{m}@{h}" for m in ("mse", "mae") for h in (1, 2, 4, 8))
  for h in (1, 2, 4, 8):
    want_mse = np.array([np.mean((y[b, :h] - x[b, -1]) ** 2) for b in range(5)])
    want_mae = np.array([np.mean(np.abs(y[b, :h] - x[b, -1])) for b in range(5)])
    np.testing.assert_allclose(out[f"naive_mse@{h}"][0], want_mse, rtol=1e-5)
    np.testing.assert_allclose(out[f"naive_mae@{h}"][0], want_mae, rtol=1e-5)
    np.testing.assert_array_equal(out[f"naive_mse@{h}"][1], np.ones(5))
  # Dense targets: step t's next H values of [x; y].
  z = np.concatenate([x, y], axis=1)
  targets = np.asarray(forecasting.next_values(jnp.asarray(x), jnp.asarray(y)))
  assert targets.shape == (5, 7, 8, 2)
  for t in range(7):
    np.testing.assert_array_equal(targets[:, t], z[:, t + 1:t + 9])


@pytest.mark.parametrize("attention", ["aaren", "softmax"])
def test_one_training_step_and_score(attention):
  c = _tiny_config(attention)
  config_lib.validate(c)
  tasks.check_config(c)
  task = tasks.make_task(c)
  assert (task.model.input_dim, task.model.output_dim, task.model.attention) == (1, 4, attention)
  params = task.model.init(jax.random.key(0), **task.init_inputs())["params"]
  train_batch = next(task.data("train", seed=0, process_index=0, process_count=1, batch_size=8))
  assert train_batch["x"].shape == (8, 12, 1) and train_batch["y"].shape == (8, 4, 1)
  batch = {k: v[:8] for k, v in task.predict_fns["split_arrays"]("validation").items()}  # one compiled shape

  def everything(params, batch):  # one compilation for all the values checked below
    return (jax.value_and_grad(task.loss, has_aux=True)(params, batch, None),
            task.predict_fns["score"](params, batch),
            task.model.apply({"params": params}, batch["x"] - batch["x"][:, :1]),
            forecasting.loss(task.model, params, batch, None, dense=True)[0])

  ((value, metrics), grads), out, raw_out, dense_loss = jax.jit(everything)(params, batch)
  assert metrics["num_targets"] == 8 * 4  # the last step's H values (dense=False)
  assert 0 < float(optax.global_norm(grads)) < np.inf
  assert sorted(out) == sorted(f"{p}{m}@{h}" for p in ("", "naive_") for m in ("mse", "mae") for h in (1, 2, 4))
  # The forecast is the last lookback step's output, an offset from the last value (relative).
  raw_out = np.asarray(raw_out).reshape(8, 12, 4, 1)
  forecast = batch["x"][:, -1:] + raw_out[:, -1]
  np.testing.assert_allclose(out["mse@4"][0], np.mean((forecast - batch["y"]) ** 2, axis=(1, 2)), rtol=1e-4)
  np.testing.assert_allclose(value, np.mean(out["mse@4"][0]), rtol=1e-4)  # the loss: mse@H's batch mean
  # Dense: every step's offsets from x[t] against z[t+1..t+H].
  z = np.concatenate([batch["x"], batch["y"]], axis=1)
  dense = np.mean([(batch["x"][:, t, None] + raw_out[:, t] - z[:, t + 1:t + 5]) ** 2 for t in range(12)])
  np.testing.assert_allclose(dense_loss, dense, rtol=1e-4)


@pytest.mark.slow
def test_train_and_evaluate_on_an_ett_csv_logs_validation_then_test_metrics_and_the_naive_baseline(tmp_path):
  path = str(tmp_path / "ETTh1.csv")
  _write_ett(path, rows=120)
  c = _tiny_config("aaren", dataset="csv", **{"data.path": path})
  train.train_and_evaluate(c, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    final = {}
    for line in f:
      final.update(json.loads(line))
  series = data.series_from_config(c.data)
  assert series.sizes == (86, 10, 24)  # the last 24 of 120 hours test, the last 10 of the rest validation
  for prefix, split in (("metrics/", "validation"), ("test/metrics/", "test")):
    windows = series.windows(split).arrays()
    assert windows["x"].shape == ({"validation": 10, "test": 24}[split] - 4 + 1, 12, 4)
    assert final[prefix + "num_examples"] == len(windows["x"])
    naive = np.mean((windows["y"] - windows["x"][:, -1:]) ** 2)
    np.testing.assert_allclose(final[prefix + "naive_mse@4"], naive, rtol=1e-4)
    assert np.isfinite(final[prefix + "mse@1"]) and np.isfinite(final[prefix + "mae@4"])
