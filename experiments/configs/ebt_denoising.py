r"""Image denoising on the digits: a bidirectional EBT against a flow transformer of the same size.

Family "ebt_denoising" (nbp.tasks.ebt_denoising): sklearn's digit scans
(1,293 train, 144 validation carved from the train pool, 360 test) resized
to 16x16, pixels in [-1, 1], cut into 2x2 patches (64 tokens, as the
official 128x128 images in 16x16 patches), corrupted by x + sigma * eps.

Argument: "KIND[,SIZE][,local]".
  KIND   ebt: the bidirectional EBT, trained by the official System 2
              denoising recipe: the candidate starts at the noisy image, 2-3
              steps drawn per batch, alpha randomised in [alpha / 2,
              alpha * 2], no detach, truncated (second order through the last
              step only), no Langevin noise, no replay, smooth L1 at the last
              step; denoised at inference in 1, 2, 3, 4, 6, 8 steps;
         flow: a flow-matching transformer of the same backbone and size
              (rectified flow trained on t in [0, t*]), denoised by 1, 2, 4,
              8, 16, 32 Euler steps from t* (the official baseline is a
              diffusion transformer run by its deterministic reverse process
              from the noise level down to 0).
  SIZE   a key of nbp.models.ebt.SIZES (default: tiny with `local`, else xxs;
         large is the official denoising size).
  local  the 2-core CPU budget: batch 32, 1,000 steps, lr 1e-3.
Without `local`: the official optimisation (lr 1e-4, 10k warm-up, cosine to
lr / 10, weight decay 0.01 for the EBT and 0 for the diffusion baseline,
clipping at 1.0, batch 256, 100k steps; not yet run here).

The noise level. The official recipe noises with the diffusion forward
process at timestep 99 of a 500-step linear schedule (its 100 training steps
divided by the level 0.2): sqrt(abar) x + sqrt(1 - abar) eps with
abar = 0.660 (1 - abar = 0.34), on images standardised per channel. Divided
by sqrt(abar) that is x + 0.718 eps at unit data scale. The digits in
[-1, 1] have a pixel standard deviation of 0.637, so sigma = 0.718 * 0.637
= 0.46 puts the same noise against the same signal.

The step size. The official alpha (3000) belongs to 16x16x3 patches; here a
2x2 patch has 4 values, and the energy's gradient per pixel is far larger at
the same width, so the local alpha is smaller: `LOCAL_ALPHA` = 300, chosen on
validation after 200 steps (PSNR at 3 thinking steps, seed 0: 19.75, 19.78,
19.81, 19.89 and 16.43 dB at alpha 10, 30, 100, 300 and 3000; noisy input
14.53 dB).

Launch (2 CPU cores):
  python -m experiments.train --config experiments/configs/ebt_denoising.py:ebt,local --workdir runs/denoise_ebt
  python -m experiments.train --config experiments/configs/ebt_denoising.py:flow,local --workdir runs/denoise_flow
The split_metrics evaluator (`psnr`) reports, on the whole validation split
at the end of training, the PSNR of the noisy input and after each step
count, with the forward and backward passes per image; the test split once
with `python -m experiments.evaluate ... --split test`, or both models side
by side with `python -m experiments.benchmark_ebt --ebt_parts denoising`.
Expected (1,000 steps, tiny, seeds 0-2; docs/ebt.md has the table): from
14.53 dB noisy, the EBT reaches 20.29 dB on validation at 3 thinking steps
(fewer or more steps score lower), the flow 20.40 dB at one Euler step and
less with more steps.
"""

import ml_collections

from nbp.models import ebt
from nbp.tasks import ebt_denoising
from nbp.training import config as config_lib

KINDS = ("ebt", "flow")
IMAGE_SIZE = 16
PATCH_SIZE = 2
OFFICIAL_ALPHA = 3000.0
LOCAL_ALPHA = 300.0  # see the module docstring
STEPS = {"ebt": (1, 2, 3, 4, 6, 8), "flow": (1, 2, 4, 8, 16, 32)}  # step counts the PSNR is reported at


def get_config(arg: str = "ebt,local"):
  kind, *rest = arg.split(",")
  local = "local" in rest
  sizes = [r for r in rest if r != "local"]
  if kind not in KINDS or len(sizes) > 1 or (sizes and sizes[0] not in ebt.SIZES):
    raise ValueError(f"ebt_denoising.py:{arg}: expected KIND[,SIZE][,local] with KIND in {KINDS} and SIZE one of "
                     f"{list(ebt.SIZES)}")
  c = config_lib.base_config()
  c.family = "ebt_denoising"
  c.seed = 0

  c.data.name = "digits"
  c.data.image_size = IMAGE_SIZE

  c.model.kind = kind
  c.model.patch_size = PATCH_SIZE
  c.model.channels = 1
  c.model.variant = sizes[0] if sizes else ("tiny" if local else "xxs")

  c.loss = ml_collections.ConfigDict(dict(sigma=ebt_denoising.SIGMA))
  c.sampler = ml_collections.ConfigDict(dict(num_samples=8, steps=STEPS[kind]))
  if kind == "ebt":
    c.model.alpha = LOCAL_ALPHA if local else OFFICIAL_ALPHA
    c.model.learn_alpha = False
    c.loss.update(num_steps=2, num_steps_max=3, alpha_scale=2.0, detach=False, truncate=True)
  else:
    c.loss.max_t = 0.0  # t* of sigma: the noise levels denoising visits

  c.optimizer.clip_norm = 1.0
  c.optimizer.final_lr_fraction = 0.1
  c.optimizer.weight_decay = 0.01 if kind == "ebt" else 0.0
  if local:
    c.batch_size = 32
    c.num_steps = 1000
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 50
    c.log_every = 50
    c.checkpoint_every = 500
    c.evals.eval = dict(type="loss", every=0, steps=4)
    c.evals.psnr = dict(type="split_metrics", every=0, split="validation")
  else:
    c.batch_size = 256
    c.num_steps = 100_000
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 10_000
    c.checkpoint_every = 5000
    c.evals.eval = dict(type="loss", every=5000, steps=4)
    c.evals.psnr = dict(type="split_metrics", every=5000, split="validation")
  c.lock()
  return c
