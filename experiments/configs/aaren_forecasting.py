r"""Aaren vs a Transformer on multi-horizon forecasting (nbp.tasks.forecasting).

The two runs differ in `config.model.attention` only ("aaren" or "softmax"):
the same nbp.models.sequence.SequenceModel, data, loss and budget.

Argument "ATTENTION[,DATASET][,local]": ATTENTION softmax|aaren; `local` the
2-core CPU budget; DATASET one of

  a real series    a name of nbp.data.forecasting.SERIES (default co2: statsmodels'
                   weekly Mauna Loa record 1958-2001, lookback L=104 weeks, horizon
                   H=26), the last 20% of time as test and the last 10% of the rest
                   as validation;
  a benchmark file NAME[:H] with NAME one of PAPER_FILES (ETTh1, ETTh2, ETTm1,
                   ETTm2, weather, electricity, traffic, exchange_rate) and H one of
                   96, 192, 336, 720 (default 96): the long-horizon protocol of the
                   Transformer forecasting benchmark the Aaren paper follows, read
                   from the CSV at config.data.path (default data/NAME.csv): every
                   variable (multivariate), lookback 96, the standard chronological
                   splits as data keys (ETT: split_rows 12/4/4 months of 30 days,
                   (8640, 2880, 2880) hourly rows, four times that at 15 minutes;
                   the others 70/10/20: test_fraction 0.2 and validation_fraction
                   0.125 of the rest);
  csv              any ETT-style CSV at config.data.path (all numeric columns,
                   L=96, H=96, fractions as for a real series).

Launch (CPU, 2 cores):
  python -m experiments.train --config experiments/configs/aaren_forecasting.py:aaren,local \
      --workdir runs/aaren_forecasting_local
  python -m experiments.train --config experiments/configs/aaren_forecasting.py:softmax,local \
      --workdir runs/softmax_forecasting_local
An ETT file (GPU; not yet run):
  python -m experiments.train --config experiments/configs/aaren_forecasting.py:aaren,ETTh1:336 \
      --config.data.path=/data/ETT-small/ETTh1.csv --workdir runs/aaren_etth1_336

The split_metrics evaluator "metrics" scores every validation window at the end
(metrics/mse@h, metrics/mae@h and the naive last-value forecast's
metrics/naive_mse@h, naive_mae@h, h in 1, H/4, H/2, H, normalised units);
`eval_test_at_end` scores every test window once after it (test/metrics/...,
the headline).

`local`: the tiny size (2 layers, width 64, 4 heads), batch 32, 300 steps of
AdamW at lr 2e-3 (30 warm-up steps, cosine), the last lookback step
supervised, inputs and outputs relative to the window (both chosen on
validation: nbp.tasks.forecasting); 100-240 s on 2 CPU cores shared with
other jobs. Expected on co2 (seed 0, measured on the 158 validation windows):
mse@26 0.0036 (aaren) and 0.0035 (softmax) against the naive forecast's 0.088.
The test figures over seeds 0-2 are experiments/benchmark_aaren.py's.
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
PAPER_LOOKBACK = 96  # the benchmark's input length
PAPER_HORIZONS = (96, 192, 336, 720)
ETT_HOUR_ROWS = (12 * 30 * 24, 4 * 30 * 24, 4 * 30 * 24)  # 8640, 2880, 2880: 12/4/4 months of hourly rows
ETT_MINUTE_ROWS = tuple(4 * r for r in ETT_HOUR_ROWS)  # 15-minute rows: 34560, 11520, 11520
# name -> (the benchmark's file name, split_rows; () for the 70/10/20 split).
PAPER_FILES = {
    "ETTh1": ("ETTh1.csv", ETT_HOUR_ROWS),
    "ETTh2": ("ETTh2.csv", ETT_HOUR_ROWS),
    "ETTm1": ("ETTm1.csv", ETT_MINUTE_ROWS),
    "ETTm2": ("ETTm2.csv", ETT_MINUTE_ROWS),
    "weather": ("weather.csv", ()),
    "electricity": ("electricity.csv", ()),
    "traffic": ("traffic.csv", ()),
    "exchange_rate": ("exchange_rate.csv", ()),
}


def parse_dataset(dataset: str, arg: str) -> tuple[str, int | None]:
  """DATASET or NAME:H -> (name, H or None); an error names the config argument."""
  name, _, horizon = dataset.partition(":")
  if name in PAPER_FILES:
    h = int(horizon) if horizon else PAPER_HORIZONS[0]
    if h not in PAPER_HORIZONS:
      raise ValueError(f"aaren_forecasting.py: horizon {horizon!r} in {arg!r}; choose one of {PAPER_HORIZONS}")
    return name, h
  if horizon or name not in WINDOWS:
    raise ValueError(f"aaren_forecasting.py: dataset {dataset!r} in {arg!r}; choose one of {sorted(WINDOWS)} or "
                     f"NAME[:H] with NAME in {sorted(PAPER_FILES)} and H in {PAPER_HORIZONS}")
  return name, None


def get_config(arg: str = "aaren,local"):
  attention, dataset, local = aaren_common.parse_arg(arg, "aaren_forecasting.py", "DATASET")
  dataset, paper_horizon = parse_dataset(dataset or DEFAULT_DATASET, arg)
  lookback, horizon = (PAPER_LOOKBACK, paper_horizon) if paper_horizon else WINDOWS[dataset]

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

  c.data.lookback = lookback
  c.data.horizon = horizon
  c.data.test_fraction = 0.2  # the last 20% of time steps (unless split_rows)
  c.data.validation_fraction = 0.1  # the last 10% of the steps before the test split
  if dataset in PAPER_FILES:
    file_name, split_rows = PAPER_FILES[dataset]
    c.data.name = "csv_series"
    c.data.path = f"data/{file_name}"  # date, then the variables
    c.data.columns = ()  # every numeric column: the multivariate setting
    c.data.split_rows = split_rows  # (train, validation, test) rows from the first; () uses the fractions
    if not split_rows:
      c.data.validation_fraction = 0.125  # 70/10/20: 10% of all rows is 12.5% of the 80% before the test split
  elif dataset == "csv":
    c.data.name = "csv_series"
    c.data.path = "data/ETTh1.csv"  # date, then the variables (ETTh1: HUFL, HULL, MUFL, MULL, LUFL, LULL, OT)
    c.data.columns = ()  # empty: every numeric column (the fractions above split it)
  else:
    c.data.name = "series"
    c.data.dataset = dataset

  c.loss.dense = False  # supervise the last lookback step only (chosen on validation: nbp.tasks.forecasting)
  c.loss.relative = True  # inputs relative to the window's first value, outputs offsets from the last seen

  c.batch_size = 32 if local else 64
  c.num_steps = 300 if local else 5000
  c.optimizer.lr = 2e-3 if local else 1e-3
  c.optimizer.warmup_steps = 30 if local else 200
  c.optimizer.weight_decay = 0.01
  c.log_every = 50
  c.checkpoint_every = c.num_steps  # one at the end
  c.evals = ml_collections.ConfigDict()
  # Every validation window once, at the end; the test windows once after it.
  c.evals.metrics = dict(type="split_metrics", pred="score", split="validation", every=0, batch_size=144)
  c.eval_test_at_end = True
  c.lock()
  return c
