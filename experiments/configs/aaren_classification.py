r"""Aaren against a Transformer on UCR/UEA time-series classification.

Family "ts_classification": nbp.models.sequence.SequenceModel reads a series
step by step (causal), its outputs averaged over the valid steps give the class
logits (`config.loss.pooling`). The only difference between the two models is
`config.model.attention`: "aaren" or "softmax" (the Transformer baseline).

Argument: "ATTENTION[,DATASET][,local]", e.g. "aaren,BasicMotions,local".
DATASET is one of the classification sets shipped inside sktime's wheel
(nbp.data.ucr.dataset_names(): ACSF1, ArrowHead, BasicMotions, GunPoint,
ItalyPowerDemand, JapaneseVowels, OSULeaf, PLAID, ...), default
JapaneseVowels; a user's .ts pair: `--config.data.train_path=... --config.data.test_path=...`.
Channels, classes and lengths come from the files; nothing else changes.

Launch (CPU, 2 cores):
  python -m experiments.train --config experiments/configs/aaren_classification.py:aaren,local \
      --workdir runs/aaren_classification_local
and the same with `softmax,local`. The headline metric is `test/accuracy`
(split_metrics: every test example once) in the workdir's metrics.jsonl;
`eval/accuracy` is over a few shuffled test batches.

`local`: the "tiny" model (2 layers, width 64, 4 heads), batch 32, 400 steps,
lr 2e-3. Without `local`: variant "S" (3 layers, width 128), batch 64, 3000
steps (not yet run).

Measured (local, JapaneseVowels, 2 CPU cores shared with other jobs): about
22-27 s wall (30-35 s of CPU, compile included; 50-55 steps/s once compiled);
train accuracy 1.0 from step ~150. test/accuracy (370 test series, majority
class 0.24) over seeds 0, 1, 2: aaren 0.957, 0.965, 0.970; softmax 0.965, 0.962,
0.973. Other sets at the same settings, seed 0 (slower: longer series):
GunPoint (T = 150, majority 0.51) aaren 0.940, softmax 0.980, 80-110 s of CPU;
ArrowHead (T = 251, 36 train series, majority 0.39) 0.697 both, 120-210 s of CPU;
BasicMotions (T = 100, 6 channels, 40 train series, chance 0.25) aaren 0.950, softmax 0.975.
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
  c.data.dataset = dataset or DEFAULT_DATASET  # a set inside sktime's wheel
  c.data.train_path = ""  # a user's .ts pair instead of `dataset`
  c.data.test_path = ""
  c.data.max_len = 0  # T: longer series are cut (0: the longest)

  c.loss.pooling = "mean"  # "mean" over valid steps or "last" valid step
  c.loss.label_smoothing = 0.0

  c.batch_size = 32 if local else 64
  c.num_steps = 400 if local else 3000
  c.optimizer.lr = 2e-3 if local else 1e-3
  c.optimizer.warmup_steps = 40 if local else 200
  c.optimizer.weight_decay = 0.01
  c.log_every = 50 if local else 100
  c.checkpoint_every = c.num_steps  # one checkpoint, at the end
  c.evals.eval = dict(type="loss", every=0, steps=4)  # test loss and accuracy on 4 shuffled batches
  c.evals.test = dict(type="split_metrics", every=0, split="test")  # accuracy over the whole test split
  del c.evals["sample"]  # a classifier has no sampler
  c.lock()
  return c
