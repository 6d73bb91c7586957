r"""EBT on moving digits: next-frame prediction by optimisation, against a regression transformer.

Family "ebt" (nbp.tasks.ebt) with `config.data.name` "moving_digits": each
frame is one token, its pixels in [-1, 1] flattened (16x16 = 256 values) and
projected to the width; the candidate next frame starts from N(0, 1) and is
optimised against the energy, the loss its smooth L1 distance to the real
frame. The baseline (`regression`) is a causal transformer of the same size
that regresses the next frame directly under the same loss
(nbp.tasks.frame_regression), the frame-level Transformer++.

Argument: "RECIPE[,SIZE][,local]" with RECIPE s1, s2 (experiments/configs/
ebt_text.py's recipes) or regression; SIZE a key of nbp.models.ebt.SIZES
(default tiny); `local`: 8 frames of 16x16, one digit, 2,000 training videos,
batch 16, 500 steps on 2 CPU cores.

Launch:
  python -m experiments.train --config experiments/configs/ebt_video.py:s2,local --workdir runs/ebt_video_s2
  python -m experiments.train --config experiments/configs/ebt_video.py:regression,local \
      --workdir runs/ebt_video_regression
The loss evaluator reports the validation smooth L1 and MSE of the next frames
(EBT under the sampler's thinking, config.sampler); the sample evaluator
writes each validation video's frames as predicted one by one.
Expected (500 steps, 3 seeds, validation, benchmark_ebt --ebt_parts video): smooth L1 0.45 for System 2
at its 3 steps (0.43 at 6 steps or best of 4) against 0.060 for the regression baseline and 0.108 for
repeating the last frame. At width 256 (a square frame embedding) System 2 is no better: 0.43 at 3 steps
(docs/ebt.md).
"""

import ml_collections

from experiments.configs import ebt_text
from nbp.training import config as config_lib


def get_config(arg: str = "s2,local"):
  recipe, *rest = arg.split(",")
  if recipe not in (*ebt_text.RECIPES, "regression"):
    raise ValueError(f"ebt_video.py:{arg}: the first field must be one of {(*ebt_text.RECIPES, 'regression')}")
  local = "local" in rest
  sizes = [r for r in rest if r != "local"]
  depth, width, heads = _size(sizes[0] if sizes else "tiny")
  c = config_lib.base_config()
  c.seed = 0
  c.data.name = "moving_digits"
  c.data.num_frames = 8
  c.data.frame_size = 16
  c.data.num_digits = 1
  c.data.speed = 2.0
  c.data.num_train = 2000 if local else 20000
  c.data.num_validation = 200 if local else 2000
  c.data.num_test = 200 if local else 2000
  c.sampler = ml_collections.ConfigDict(dict(num_samples=8))

  if recipe == "regression":
    c.family = "frame_regression"
    c.model.attention = "softmax"
    c.model.num_layers, c.model.width, c.model.num_heads = depth, width, heads
    c.model.variant = None
    c.model.activation, c.model.norm, c.model.position = "swiglu", "rmsnorm", "learned"
    c.model.max_len = c.data.num_frames
    c.optimizer.lr = 1.2e-3
    c.optimizer.weight_decay = 0.01
    c.optimizer.final_lr_fraction = 0.1
  else:
    c.family = "ebt"
    c.model.vocab_size = 0  # continuous candidates: frames
    c.model.num_layers, c.model.width, c.model.num_heads = depth, width, heads
    c.model.mlp_dim = 4 * width  # the regression baseline's MLP, so both have the same size within 10%
    c.model.variant = None
    c.model.attention_impl = "xla"
    c.sampler.update(langevin_sigma=0.0, best_of=1, accept_lower=False)
    ebt_text.set_recipe(c, recipe)
    if recipe == "s2" and local:
      # Chosen on validation (500 steps, seed 0, next-frame smooth L1 under 3 thinking steps): the text
      # recipe's Langevin sigma 3 on unnormalised frames in [-1, 1] gives 0.874; without noise 0.426
      # (alpha 1: 0.432; alpha 20 diverges).
      c.loss.langevin_sigma = 0.0

  c.batch_size = 16 if local else 256
  c.num_steps = 500 if local else 50_000
  c.optimizer.warmup_steps = 50 if local else 2000
  c.log_every = 25 if local else 100
  c.checkpoint_every = 250 if local else 2000
  c.evals.eval = dict(type="loss", every=0, steps=8)
  c.lock()
  return c


def _size(variant: str) -> tuple[int, int, int]:
  from nbp.models import ebt  # pylint: disable=g-import-not-at-top
  if variant not in ebt.SIZES:
    raise ValueError(f"ebt_video.py: size {variant!r} is not one of {list(ebt.SIZES)}")
  return ebt.SIZES[variant]
