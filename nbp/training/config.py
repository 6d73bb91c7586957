"""The keys every experiment config has, and their checks.

A config file (experiments/configs/NAME.py) starts from `base_config()`, sets
`family`, fills `model` and `data` with its family's keys, and returns the
config locked, so a misspelt override on the command line fails at once.
`validate` runs before any compilation and names the offending key.
"""

from __future__ import annotations

import ml_collections

from nbp.data import splits
from nbp.training import sharding


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.family = ""  # which model family: see nbp.tasks.FAMILIES
  c.seed = 0  # parameters, data order and dropout all derive from it
  c.batch_size = 32  # global batch, over all hosts and accumulation steps
  c.num_steps = 1000  # optimizer steps
  c.grad_accum_steps = 1  # micro-batches per optimizer step
  c.init_from = ""  # a checkpoint directory to start from when the workdir has none

  c.model = ml_collections.ConfigDict()  # the fields of the family's Model: Model(**config.model)
  c.data = ml_collections.ConfigDict()  # one dataset's section: nbp.data.DATASET_KEYS[config.data.name]
  c.data.dir = "data"  # where tfds builds and reads ArrayRecord datasets
  c.data.worker_count = 0  # grain worker processes (0: in the main process)
  # A dataset that ships no validation split holds out this share of its train split (nbp.data.splits),
  # drawn with this seed (series: the last steps of the train part, no seed).
  c.data.validation_fraction = splits.VALIDATION_FRACTION
  c.data.validation_seed = splits.VALIDATION_SEED
  c.loss = ml_collections.ConfigDict()  # keyword arguments of the family's loss
  c.sampler = ml_collections.ConfigDict()  # keyword arguments of the family's sampler
  # name -> {type, every, ...}: see nbp.evaluators (every 0: only at the end of training).
  c.evals = ml_collections.ConfigDict()
  c.evals.eval = dict(type="loss", every=0, steps=4)  # logged as eval/<metric>
  c.evals.sample = dict(type="samples", every=0)  # written to workdir/samples
  # After the last step, also run every evaluator on the test split (logged as test/<name>/<key>). Off by
  # default: choices are made on validation, and test is evaluated once, here or by experiments.evaluate.
  c.eval_test_at_end = False
  # group -> config.optimizer keys to replace for a family's second parameter group (e.g. "discriminator").
  c.param_groups = ml_collections.ConfigDict()

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"
  c.optimizer.lr = 3e-4  # peak learning rate
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.01  # on kernels and embeddings only
  c.optimizer.clip_norm = 1.0  # global norm; 0 turns clipping off
  c.optimizer.warmup_steps = 100
  c.optimizer.schedule = "cosine"  # or "constant"
  c.optimizer.final_lr_fraction = 0.1  # cosine decays to lr * this
  c.optimizer.cosine_from = 0.0  # share of the run held at lr before the cosine starts (0: right after warmup)
  c.optimizer.ema_decay = 0.0  # EMA of parameters; 0 keeps none
  c.optimizer.trainable = ""  # a regex: only parameters whose path it finds train, the rest frozen ("": all)

  # Mesh axes and sizes (-1: all remaining devices), and the logical-axis rules.
  c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
  c.axis_rules = sharding.DEFAULT_AXIS_RULES

  c.checkpoint_every = 500  # steps between async checkpoints (and one at the end)
  c.keep_checkpoints = 3  # the last k are kept
  c.keep_checkpoint_steps = ()  # and these steps' checkpoints too (training curves: experiments.benchmark_fvd --steps)
  c.log_every = 50  # steps between metric writes and NaN checks
  c.profile_steps = ()  # (first, count): trace these steps to workdir/profile
  return c


TOP_LEVEL_KEYS = frozenset(base_config().keys())


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first unknown or ill-valued top-level or optimizer key.

  The family's sections (model, loss, sampler, data) are checked against its
  own schemas by nbp.tasks.check_config.
  """
  unknown = sorted(set(config.keys()) - TOP_LEVEL_KEYS)
  if unknown:
    raise ValueError(f"Unknown config key 'config.{unknown[0]}'. Known keys: {sorted(TOP_LEVEL_KEYS)}")
  opt_unknown = sorted(set(config.optimizer.keys()) - set(base_config().optimizer.keys()))
  if opt_unknown:
    raise ValueError(f"Unknown config key 'config.optimizer.{opt_unknown[0]}'.")
  for key in ("batch_size", "num_steps", "grad_accum_steps", "log_every"):
    if int(config[key]) <= 0:
      raise ValueError(f"config.{key} must be positive, got {config[key]}.")
  if config.profile_steps and len(config.profile_steps) != 2:
    raise ValueError(f"config.profile_steps must be (first_step, count), got {config.profile_steps}.")
