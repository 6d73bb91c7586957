r"""Aaren against a Transformer on UCR/UEA time-series classification.

Family "ts_classification": nbp.models.sequence.SequenceModel reads a series
step by step (causal), its outputs averaged over the valid steps give the class
logits (`config.loss.pooling`). The only difference between the two models is
`config.model.attention`: "aaren" or "softmax" (the Transformer baseline).

Argument: "ATTENTION[,DATASET][,local]", e.g. "aaren,BasicMotions,local".
DATASET (default JapaneseVowels) is read from `config.data.dir`/DATASET/
DATASET_{TRAIN,TEST}.ts when that folder exists, else from the sets shipped
inside sktime's wheel (nbp.data.ucr.dataset_names(): ACSF1, ArrowHead,
BasicMotions, GunPoint, ItalyPowerDemand, JapaneseVowels, OSULeaf, PLAID, ...).
The ten UEA sets of the Aaren paper's classification table
(nbp.data.ucr.PAPER_UEA_SETS: EthanolConcentration, FaceDetection, Handwriting,
Heartbeat, JapaneseVowels, PEMS-SF, SelfRegulationSCP1, SelfRegulationSCP2,
SpokenArabicDigits, UWaveGestureLibrary) need the UEA archive's folders, e.g.
  python -m experiments.train --config experiments/configs/aaren_classification.py:aaren,Heartbeat \
      --config.data.dir=/data/Multivariate_ts --workdir runs/aaren_heartbeat
(a missing file is an error naming its path). A user's .ts pair:
`--config.data.train_path=... --config.data.test_path=...`. Channels, classes
and lengths come from the train file; nothing else changes.

Splits: the files' test split; validation is 10% of the train file
(config.data.validation_fraction, validation_seed), carved by example. The
split_metrics evaluator "metrics" scores the whole validation split at the
end of training (metrics/accuracy); `eval_test_at_end` scores the test split once
after the last step (test/metrics/accuracy, the headline).

Launch (CPU, 2 cores):
  python -m experiments.train --config experiments/configs/aaren_classification.py:aaren,local \
      --workdir runs/aaren_classification_local
and the same with `softmax,local`: 400 steps of the "tiny" model (2 layers,
width 64, 4 heads; batch 32, lr 2e-3), 75-100 s each on 2 CPU cores shared
with other jobs (compile included). Expected (JapaneseVowels: 243 train, 27
validation and 370 test series, 9 speakers, majority class 0.24; seed 0,
measured): validation accuracy 1.0 for both models. The test accuracy over
seeds 0-2 is experiments/benchmark_aaren.py's (--parts tasks). Without
`local`: variant "S" (3 layers, width 128), batch 64, 3000 steps (not yet run).
"""

from experiments.configs import aaren_common
from nbp.training import config as config_lib

ATTENTIONS = aaren_common.ATTENTIONS
DEFAULT_DATASET = "JapaneseVowels"  # 12 channels, 9 speakers, 7..29 steps: well above chance within a minute


def get_config(arg: str = "aaren,local"):
  attention, dataset, local = aaren_common.parse_arg(arg, "aaren_classification.py", "DATASET")
  c = config_lib.base_config()
  c.family = "ts_classification"
  c.seed = 0

  c.model.attention = attention  # the switch between Aaren and the Transformer baseline
  c.model.variant = "tiny" if local else "S"  # nbp.models.sequence.SIZES
  c.model.num_layers = None  # set, these three override the variant's sizes
  c.model.width = None
  c.model.num_heads = None
  c.model.position = "sinusoidal"
  c.model.dtype = "float32"

  c.data.name = "ucr"
  c.data.dataset = dataset or DEFAULT_DATASET  # data.dir/DATASET/ if there, else a set inside sktime's wheel
  c.data.train_path = ""  # a user's .ts pair instead of `dataset`
  c.data.test_path = ""
  c.data.max_len = 0  # T: longer series are cut (0: the longest train series)
  c.data.validation_fraction = 0.1  # of the train file's examples, carved by example (nbp.data.splits.carve)
  c.data.validation_seed = 0

  c.loss.pooling = "mean"  # "mean" over valid steps or "last" valid step
  c.loss.label_smoothing = 0.0

  c.batch_size = 32 if local else 64
  c.num_steps = 400 if local else 3000
  c.optimizer.lr = 2e-3 if local else 1e-3
  c.optimizer.warmup_steps = 40 if local else 200
  c.optimizer.weight_decay = 0.01
  c.log_every = 50 if local else 100
  c.checkpoint_every = c.num_steps  # one checkpoint, at the end
  c.evals.eval = dict(type="loss", pred="eval_loss", split="validation", every=0, steps=4)  # 4 shuffled batches
  del c.evals["sample"]  # a classifier has no sampler
  # Accuracy and cross-entropy over every validation series, at the end; the test split once after it.
  c.evals.metrics = dict(type="split_metrics", pred="score", split="validation", every=0)
  c.eval_test_at_end = True
  c.lock()
  return c
