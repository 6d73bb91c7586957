"""Multi-horizon time-series forecasting with a causal sequence model (Aaren or a Transformer).

Dimension letters: B batch, L lookback (input steps), H horizon (predicted
steps), C channels (variables), T = L + H a window with its targets.

Data (nbp.data.forecasting): `config.data.name` "series" (a real series of
statsmodels or sktime by name) or "csv_series" (an ETT/Weather-style CSV); a
window is x [L, C] and its target y [H, C], normalised by the train split's
per-channel statistics.

Model: nbp.models.sequence.SequenceModel with input_dim C and output_dim H * C
(filled from the data when config.model leaves them 0). The model is causal:
its output at step t of the lookback, read as [H, C], is a forecast of steps
t+1..t+H made from x[0..t]. The forecast of a window is the output at the last
lookback step, L - 1.

Two choices, keywords of `loss` (config.loss) and shared with `score`:

  dense     (default False) supervise every lookback step, each with its own
            next H values (step t's targets z[t+1..t+H] of z = [x; y] are all
            known for t <= L - 1), instead of the last step only. The dense
            loss spends the model on forecasts from a few steps of context,
            which the evaluation never asks for.
  relative  (default True) the model reads the window relative to its first
            value, x - x[0] (known at every step, so causal), and its output at
            step t is an offset from the last value it has seen, x[t]: the
            forecast is x[t] + output. A level the train split never reached (a
            trending series such as co2, whose later years lie above every
            train value) then changes neither the inputs' range nor the outputs'.

Both defaults were chosen on the validation split: co2 (L=104, H=26; 158
validation windows, the 183 weeks before the test period), the local config's
tiny model and 300 steps, seed 0, one run each through
nbp.training.loop.train_and_evaluate with the split_metrics evaluator on
validation (normalised units):

  loss                     aaren mse@26  softmax mse@26
  last step, relative      0.0036        0.0035      (the defaults)
  dense, relative          0.0129        0.0052
  last step, not relative  0.0241        0.0248
  naive last value         0.0882        0.0882

Metrics (predict function "score", the split_metrics evaluator): per window
of a split, the MSE and MAE over the first h forecast steps (all channels), for
h in `horizons(H)` =
1, H/4, H/2, H (rounded down, repeats dropped), named mse@h and mae@h; and the
same for the naive forecast that repeats the last observed value,
naive_mse@h and naive_mae@h. All in normalised units; count 1 per window (every
window holds the same number of values, so this is also the per-value mean).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from nbp import tasks
from nbp.data import forecasting as forecasting_data
from nbp.data import pipeline
from nbp.models import sequence
from nbp.models.sequence import SequenceModel as Model

DATASETS = ("series", "csv_series")


def horizons(horizon: int) -> tuple[int, ...]:
  """The horizons metrics are reported at: 1, H/4, H/2, H (rounded down, at least 1, repeats dropped)."""
  return tuple(sorted({1, max(1, horizon // 4), max(1, horizon // 2), horizon}))


def next_values(x, y):
  """Step t's targets: z[t+1..t+H] of z = [x; y]. x [B, L, C], y [B, H, C] -> [B, L, H, C]."""
  lookback, horizon = x.shape[1], y.shape[1]
  z = jnp.concatenate([x, y], axis=1)  # [B, L + H, C]
  index = jnp.arange(lookback)[:, None] + 1 + jnp.arange(horizon)[None, :]  # [L, H]
  return z[:, index]


def forecasts(model: Model, params, x, *, horizon: int, relative: bool):
  """Every lookback step's forecast of its next H values: x [B, L, C] -> [B, L, H, C]."""
  b, lookback, channels = x.shape
  inputs = x - x[:, :1] if relative else x
  out = model.apply({"params": params}, inputs).reshape(b, lookback, horizon, channels)
  return x[:, :, None, :] + out if relative else out


def loss(model: Model, params, batch, rng, *, dense: bool = False, relative: bool = True):
  """MSE in normalised units: over every lookback step's forecast (dense) or the last step's only."""
  del rng  # no dropout
  x, y = batch["x"], batch["y"]
  predicted = forecasts(model, params, x, horizon=y.shape[1], relative=relative)  # [B, L, H, C]
  last = jnp.mean(jnp.square(predicted[:, -1] - y))
  if dense:
    value = jnp.mean(jnp.square(predicted - next_values(x, y)))
  else:
    value = last
  return value, {"mse_last": last, "num_targets": jnp.asarray(predicted.size if dense else y.size, jnp.float32)}


def naive_forecast(x, horizon: int):
  """The last observed value repeated: x [B, L, C] -> [B, H, C]."""
  return jnp.repeat(x[:, -1:], horizon, axis=1)


def horizon_errors(predicted, y, steps: tuple[int, ...], prefix: str = "") -> dict[str, tuple]:
  """{prefix}mse@h and {prefix}mae@h per example over the first h steps: (value [B], count [B] of ones)."""
  ones = jnp.ones(y.shape[0], jnp.float32)
  out = {}
  for h in steps:
    error = predicted[:, :h] - y[:, :h]  # [B, h, C]
    out[f"{prefix}mse@{h}"] = (jnp.mean(jnp.square(error), axis=(1, 2)), ones)
    out[f"{prefix}mae@{h}"] = (jnp.mean(jnp.abs(error), axis=(1, 2)), ones)
  return out


def score(model: Model, params, batch, *, dense: bool = False, relative: bool = True) -> dict[str, tuple]:
  """Per-window MSE/MAE at `horizons(H)` of the model's forecast and of the naive last-value forecast."""
  del dense  # how the model was trained; the forecast is the last step's either way
  x, y = batch["x"], batch["y"]
  horizon = y.shape[1]
  predicted = forecasts(model, params, x, horizon=horizon, relative=relative)[:, -1]  # [B, H, C]
  steps = horizons(horizon)
  return dict(horizon_errors(predicted, y, steps), **horizon_errors(naive_forecast(x, horizon), y, steps, "naive_"))


def make_data(series: forecasting_data.SplitSeries, worker_count: int, split: str, *, seed: int,
              process_index: int, process_count: int, batch_size: int):
  """A checkpointable grain iterator of {"x": float32 [b, L, C], "y": float32 [b, H, C]}, shuffled."""
  return pipeline.make_iterator(
      series.windows(split), global_batch_size=batch_size * process_count, seed=seed, shuffle=True,
      process_index=process_index, process_count=process_count, worker_count=worker_count)


def split_arrays(series: forecasting_data.SplitSeries, split: str) -> dict[str, np.ndarray]:
  """The whole split as arrays {"x": [W, L, C], "y": [W, H, C]} (the split_metrics evaluator's input)."""
  return series.windows(split).arrays()


def make_task(config) -> tasks.Task:
  """The model (input_dim C, output_dim H * C from the data), the loss and score with config.loss, the data."""
  series = forecasting_data.series_from_config(config.data)
  series.windows("train")  # a series too short for one training window fails here, naming the keys
  lookback, horizon, channels = series.lookback, series.horizon, series.num_channels
  model = tasks.build_model(Model, config.model)
  model = sequence.with_data_sizes(model, input_dim=channels, output_dim=horizon * channels,
                                   data=f"the data ({channels} channels, horizon {horizon})")
  if model.position == "learned" and model.max_len < lookback:
    raise ValueError(f"config.model.max_len={model.max_len} is below config.data.lookback={lookback}")
  loss_kw = dict(config.get("loss", {}))
  return tasks.Task(
      model=model,
      init_inputs=lambda: {"x": jnp.zeros((1, lookback, channels), jnp.float32)},
      loss=functools.partial(loss, model, **loss_kw),
      data=functools.partial(make_data, series, config.data.worker_count),
      predict_fns={
          "split_arrays": functools.partial(split_arrays, series),
          "score": functools.partial(score, model, **loss_kw),
      },
  )
