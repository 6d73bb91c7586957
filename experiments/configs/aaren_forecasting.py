r"""Aaren vs a Transformer on multi-horizon forecasting of a real series (nbp.tasks.forecasting).

The two runs differ in `config.model.attention` only ("aaren" or "softmax"):
the same nbp.models.sequence.SequenceModel, data, loss and budget.

Launch (CPU, 2 cores, about a minute):
  python -m experiments.train --config experiments/configs/aaren_forecasting.py:aaren,local \
      --workdir runs/aaren_forecasting_local
  python -m experiments.train --config experiments/configs/aaren_forecasting.py:softmax,local \
      --workdir runs/softmax_forecasting_local
Full setting (GPU; not yet run): drop `local`. An ETT/Weather CSV file:
  ...aaren_forecasting.py:aaren,csv --config.data.path=/data/ETTh1.csv

Argument "ATTENTION[,DATASET][,local]": ATTENTION softmax|aaren; DATASET a
name of nbp.data.forecasting.SERIES (default co2) or `csv` (an ETT-style CSV
at config.data.path, all its numeric columns, L=96, H=96); `local` the 2-core
CPU budget.

Default: statsmodels' weekly Mauna Loa CO2 record (2,284 weeks 1958-2001, 59
missing weeks interpolated), lookback L=104 weeks (two years), horizon H=26
(half a year), the last 20% of time as the test split (432 test windows whose
targets cover the last 457 weeks). Metrics land in metrics.jsonl as
test/mse@h, test/mae@h and the naive last-value forecast's
test/naive_mse@h, test/naive_mae@h, h in 1, 6, 13, 26, in normalised units.

`local`: the tiny size (2 layers, width 64, 4 heads), batch 32, 300 steps of
AdamW at lr 2e-3 (30 warm-up steps, cosine), the last lookback step
supervised, inputs and outputs relative to the window (see
nbp.tasks.forecasting).

Measured (local, co2, seed 0, 2 CPU cores shared with other jobs), test
windows in normalised units (the train split's std is 1; about 15 ppm):

  run                  mse@1   mse@6   mse@13  mse@26  mae@26  wall
  aaren                0.0013  0.0017  0.0020  0.0024  0.038   56 s (about 9 steps/s)
  softmax              0.0013  0.0016  0.0019  0.0024  0.038   72 s (about 5.7 steps/s)
  naive (last value)   0.0016  0.0088  0.0275  0.0619  0.206

Both models learn the seasonal cycle the naive forecast misses: 26 times
lower MSE at half a year, and about the naive forecast at one week. With the
loss on every lookback step instead (`--config.loss.dense=True`, 600 steps)
mse@26 was 0.0063 (aaren) and 0.0043 (softmax); without the relative
parameterisation (`--config.loss.relative=False`, dense, 600 steps) 0.55. On macrodata
(`aaren,macrodata,local`: 12 quarterly series, L=16, H=4, 143 train windows,
about 30 s) mse@4 was 0.33 (aaren) and 0.31 (softmax) against the naive 0.37.
"""

import ml_collections

from experiments.configs import aaren_common
from nbp.training import config as config_lib

ATTENTIONS = aaren_common.ATTENTIONS
DEFAULT_DATASET = "co2"
# dataset -> (lookback L, horizon H), chosen for the series' length and period.
WINDOWS = {
    "co2": (104, 26),  # weekly: two years in, half a year out
    "sunspots": (44, 11),  # yearly, an 11-year cycle: four cycles in, one out
    "elnino": (48, 12),  # monthly: four years in, one out
    "nile": (20, 5),  # yearly, 100 years
    "macrodata": (16, 4),  # quarterly: four years in, one out
    "airline": (24, 6),  # monthly, 144 months
    "lynx": (20, 5),  # yearly, a ~10-year cycle
    "shampoo_sales": (6, 3),  # monthly, 36 months only
    "pbs": (24, 6),  # monthly
    "uschange": (16, 4),  # quarterly
    "csv": (96, 96),  # ETT-style hourly files: the usual 96 in, 96 out
}


def get_config(arg: str = "aaren,local"):
  attention, dataset, local = aaren_common.parse_arg(arg, "aaren_forecasting.py", "DATASET")
  dataset = dataset or DEFAULT_DATASET
  if dataset not in WINDOWS:
    raise ValueError(f"aaren_forecasting.py: dataset {dataset!r} in {arg!r}; choose one of {sorted(WINDOWS)}")
  lookback, horizon = WINDOWS[dataset]

  c = config_lib.base_config()
  c.family = "forecasting"
  c.seed = 0

  c.model.attention = attention
  c.model.num_layers = 2  # the "tiny" size, explicit so a command line can change it
  c.model.width = 64
  c.model.num_heads = 4
  c.model.input_dim = 0  # C, from the data
  c.model.output_dim = 0  # H * C, from the data
  c.model.position = "sinusoidal"
  c.model.max_len = max(lookback, 128)
  c.model.dtype = "float32"

  if dataset == "csv":
    c.data.name = "csv_series"
    c.data.path = "data/ETTh1.csv"  # date, then the variables (ETTh1: HUFL, HULL, MUFL, MULL, LUFL, LULL, OT)
    c.data.columns = ()  # empty: every numeric column
  else:
    c.data.name = "series"
    c.data.dataset = dataset
  c.data.lookback = lookback
  c.data.horizon = horizon
  c.data.test_fraction = 0.2  # the last 20% of time steps

  c.loss.dense = False  # supervise the last lookback step only (measured better; see nbp.tasks.forecasting)
  c.loss.relative = True  # inputs relative to the window's first value, outputs offsets from the last seen

  c.batch_size = 32 if local else 64
  c.num_steps = 300 if local else 5000
  c.optimizer.lr = 2e-3 if local else 1e-3
  c.optimizer.warmup_steps = 30 if local else 200
  c.optimizer.weight_decay = 0.01
  c.log_every = 50
  c.checkpoint_every = c.num_steps  # one at the end
  c.evals = ml_collections.ConfigDict()
  c.evals.test = dict(type="split_metrics", every=0, split="test", batch_size=144)  # every window once, at the end
  c.lock()
  return c

