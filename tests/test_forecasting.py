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


def test_every_named_series_loads_without_gaps():
  for name in data.SERIES:
    values = data.load_series(name)
    assert values.ndim == 2 and values.dtype == np.float32 and len(values) >= 30, name
    assert np.isfinite(values).all(), name
  assert data.load_series("co2").shape == (2284, 1) and data.load_series("macrodata").shape == (203, 12)
  assert data.load_series("elnino").shape == (732, 1) and data.load_series("uschange").shape == (187, 5)
  raw = sm.datasets.co2.load_pandas().data["co2"].to_numpy()
  gaps = np.isnan(raw)
  assert gaps.sum() == 59
  t = np.arange(len(raw))
  filled = np.interp(t[gaps], t[~gaps], raw[~gaps])  # linear in time
  np.testing.assert_allclose(data.load_series("co2")[gaps, 0], filled, rtol=1e-6)
  with pytest.raises(ValueError, match="config.data.dataset='nope'"):
    data.load_series("nope")
  assert set(aaren_forecasting.WINDOWS) == set(data.SERIES) | {"csv"}  # the config has a window per series


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
  raw[:, 1] = np.where(np.arange(50) < 40, 7.0, raw[:, 1])  # constant over the train rows
  s = data.split_series(raw, lookback=5, horizon=3, test_fraction=0.2)
  assert s.num_train == 40
  np.testing.assert_allclose(s.mean, raw[:40].mean(axis=0), rtol=1e-5)
  np.testing.assert_allclose(s.std, [raw[:40, 0].std(), 1.0], rtol=1e-5)  # a constant channel: std 1
  np.testing.assert_allclose(s.values, (raw - s.mean) / s.std, rtol=1e-5, atol=1e-5)
  assert abs(s.values[:40, 0].mean()) < 1e-5 and abs(s.values[40:, 0].mean()) > 1.0  # the trend leaves the range
  with pytest.raises(ValueError, match="config.data.test_fraction"):
    data.split_series(raw, lookback=5, horizon=3, test_fraction=1.0)
  with pytest.raises(ValueError, match="no test window of config.data.lookback=5 \\+ config.data.horizon=20"):
    data.split_series(raw, lookback=5, horizon=20, test_fraction=0.2).windows("test")


def test_windows_are_the_raw_slices_and_the_first_test_target_the_first_test_step():
  raw = np.random.default_rng(2).normal(size=(60, 3)).astype(np.float32)
  s = data.split_series(raw, lookback=8, horizon=4, test_fraction=0.25)  # 45 train steps, 15 test
  norm = (raw - s.mean) / s.std
  train, test = s.windows("train"), s.windows("test")
  assert (len(train), len(test)) == (45 - 8 - 4 + 1, 15 - 4 + 1)
  for source, targets in ((train, range(8, 45 - 4 + 1)), (test, range(45, 60 - 4 + 1))):
    arrays = source.arrays()
    assert arrays["x"].shape == (len(source), 8, 3) and arrays["y"].shape == (len(source), 4, 3)
    for i, t in enumerate(targets):
      np.testing.assert_allclose(arrays["x"][i], norm[t - 8:t], atol=1e-5)
      np.testing.assert_allclose(arrays["y"][i], norm[t:t + 4], atol=1e-5)
      np.testing.assert_array_equal(source[i]["y"], arrays["y"][i])
  assert train.first_target + len(train) - 1 + 4 == 45  # the last train target is the last train step
  with pytest.raises(IndexError):
    test[len(test)]


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
  batch = {k: v[:8] for k, v in task.examples("test").items()}  # one shape for every compiled function

  def everything(params, batch):  # one compilation for all the values checked below
    return (jax.value_and_grad(task.loss, has_aux=True)(params, batch, None), task.score(params, batch),
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
def test_train_and_evaluate_on_an_ett_csv_logs_the_test_metrics_and_naive_baseline(tmp_path):
  path = str(tmp_path / "ETTh1.csv")
  _write_ett(path, rows=120)
  c = _tiny_config("aaren", dataset="csv", **{"data.path": path})
  train.train_and_evaluate(c, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    final = [json.loads(line) for line in f][-1]
  windows = data.series_from_config(c.data).windows("test").arrays()
  assert windows["x"].shape == (24 - 4 + 1, 12, 4)  # the last 24 of 120 hours, 4 variables
  assert final["test/num_examples"] == len(windows["x"])
  naive = np.mean((windows["y"] - windows["x"][:, -1:]) ** 2)
  np.testing.assert_allclose(final["test/naive_mse@4"], naive, rtol=1e-4)
  assert np.isfinite(final["test/mse@1"]) and np.isfinite(final["test/mae@4"])
