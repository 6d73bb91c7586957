r"""Aaren vs a Transformer on event forecasting: a marked temporal point process (nbp.tasks.events).

The two runs differ in `config.model.attention` only ("aaren" or "softmax"):
the same nbp.models.sequence.SequenceModel, data, loss and budget.

Launch (CPU, 2 cores):
  python -m experiments.train --config experiments/configs/aaren_events.py:aaren,local \
      --workdir runs/aaren_events_local
  python -m experiments.train --config experiments/configs/aaren_events.py:softmax,local \
      --workdir runs/softmax_events_local
Full setting (GPU; not yet run): drop `local` (3 marks, 8000 sequences of 128 events, 5000 steps).

Argument "ATTENTION[,local]": ATTENTION softmax|aaren; `local` the 2-core CPU budget.

Data: a 3-mark Hawkes process with exponential kernels (nbp.data.hawkes; its
parameters are drawn once from a seeded Generator and recorded in the cache's
metadata.json), 2000 train and 500 test sequences of 64 events from t = 0,
simulated once under config.data.dir; 10% of the train sequences are carved
out as the validation split (config.data.validation_fraction). Each event's
output parameterises the next: a mixture of 8 log-normals for the inter-event
time and a categorical mark. The split_metrics evaluator "metrics" scores every
validation sequence at the end (metrics/log_likelihood in nats per event, in
the process's time units, its parts metrics/time_log_likelihood and
metrics/mark_log_likelihood, metrics/true_log_likelihood of the true process on
the same sequences: the ceiling, metrics/time_mse, metrics/mark_accuracy);
`eval_test_at_end` scores the test sequences once after it (test/metrics/...,
the headline).

Expected (local, seed 0, measured on the 200 validation sequences; 90-115 s on
2 CPU cores shared with other jobs): a log-likelihood of -0.655 (aaren) and
-0.653 (softmax) nats per event against the true process's -0.634, mark
accuracy 0.55. The test figures over seeds 0-2 are
experiments/benchmark_aaren.py's.
"""

import ml_collections

from experiments.configs import aaren_common
from nbp.training import config as config_lib

ATTENTIONS = aaren_common.ATTENTIONS


def get_config(arg: str = "aaren,local"):
  attention, _, local = aaren_common.parse_arg(arg, "aaren_events.py", None)

  c = config_lib.base_config()
  c.family = "events"
  c.seed = 0

  c.model.attention = attention
  c.model.variant = "tiny"  # 2 layers, width 64, 4 heads
  c.model.input_dim = 0  # 1 + K, from the data
  c.model.output_dim = 0  # 3 M + K, from the data and config.loss.num_components
  c.model.position = "sinusoidal"
  c.model.max_len = 128 if local else 256  # >= seq_len
  c.model.dtype = "float32"

  c.data.name = "hawkes"
  c.data.dir = "data"
  c.data.num_marks = 3 if local else 5
  c.data.seq_len = 64 if local else 128  # events per sequence
  c.data.num_train = 2000 if local else 8000  # simulated; validation_fraction of them become the validation split
  c.data.num_test = 500 if local else 2000

  c.loss.num_components = 8  # M: log-normal components of the inter-event time

  c.batch_size = 32 if local else 64
  c.num_steps = 400 if local else 5000
  c.optimizer.lr = 2e-3 if local else 1e-3
  c.optimizer.warmup_steps = 50 if local else 200
  c.optimizer.weight_decay = 0.01
  c.log_every = 100
  c.checkpoint_every = c.num_steps  # one at the end
  c.evals = ml_collections.ConfigDict()
  # Every validation sequence once, at the end; the test sequences once after it.
  c.evals.metrics = dict(type="split_metrics", pred="score", split="validation", every=0)
  c.eval_test_at_end = True
  c.lock()
  return c
