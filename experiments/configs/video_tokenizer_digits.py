r"""NBP's video tokenizer (3D causal CNN + FSQ) on moving digits.

Trains nbp.models.video_tokenizer (nbp.tasks.video_tokenizer) with reconstruction loss (L1 + MSE); the evaluator
reports held-out reconstruction PSNR (dB, pixels on [0, 1]) as eval/psnr, and
the samples directory shows test videos above their reconstructions.

Launch (CPU, 2 cores):
  python -m experiments.train --config experiments/configs/video_tokenizer_digits.py:local \
      --workdir runs/video_tokenizer_local
then encode the dataset once into tokens for the transformer:
  python -m experiments.encode_tokens --config experiments/configs/video_tokenizer_digits.py:local \
      --workdir runs/video_tokenizer_local --output_dir runs/video_tokens_local

Argument: "local" or "pod".
- local (what `make demo` trains): 5 frames of 16x16 (1 digit) -> 5x8x8 = 320
  tokens (space 2x, no time compression), FSQ levels (5, 5, 5) = 125 codes,
  channels 16 x (1, 2, 4), one residual block per level, batch 8, 600 steps
  on 2 CPU cores (about 190 s alone in the demo). Expected: validation
  reconstruction PSNR 24.9 dB (eval/psnr, the `eval` evaluator: 32 validation
  videos); the demo's judge (video_classifier_digits.py:5x16) finds the digit
  in 0.93 of 128 validation reconstructions (0.98 of the real videos). Chosen
  on validation for the demo (docs/nbp.md, "The demo's samples"): more
  updates are what the tokenizer wants (batch 8: 300 steps 20.5 dB and
  0.57-0.77, 400 steps 22.7 dB and 0.84, 600 steps 24.9 dB and 0.93; batch 16
  for 300 steps 20.9 dB and 0.63, at about twice the time of batch 8). Levels
  (8, 5, 5, 5) (1,000 codes, of which 18% were used) at batch 16 for 300
  steps: 20.6 dB and 0.56. No time compression because, measured at 300
  steps, it is what costs most (docs/nbp.md compares three compressions); the
  pod setting keeps the paper's 4x.
  The official tokenizer's switches, measured at the earlier local setting
  (levels (8, 5, 5, 5), batch 16; eval/psnr after 300 steps, seeds 0 / 1;
  docs/nbp.md has the table): activation="swish_beta"
  20.5 / 20.8 dB, no better than plain swish (20.6 / 20.8), so swish is kept;
  resample="conv" 15.7 dB and both together 16.7 dB (seed 0), far below
  space-to-depth, so space-to-depth is kept on quality, and on speed: this
  config's training step takes 1.20-1.22x as long with resample="conv" (two
  CPU devices, alone; experiments.benchmark_throughput --step_variants).
- pod: 17 frames of 128x128 (2 digits, sprites scaled 4x) -> 5x16x16 = 1,280
  tokens (time 4x, space 8x), the paper's levels (8, 8, 8, 5, 5, 5) = 64,000
  codes, channels 128 x (1, 2, 2, 4), two residual blocks, batch 64, bfloat16.
  Not yet run: no expected figure yet.
  python -m experiments.train --config experiments/configs/video_tokenizer_digits.py:pod \
      --workdir gs://BUCKET/video_tokenizer_pod --multihost
"""

import math

from nbp.training import config as config_lib


def get_config(arg: str = "local"):
  if arg not in ("local", "pod"):
    raise ValueError(f"video_tokenizer_digits config argument must be 'local' or 'pod', got {arg!r}")
  local = arg == "local"
  c = config_lib.base_config()
  c.family = "video_tokenizer"
  c.seed = 0

  c.model.levels = (5, 5, 5) if local else (8, 8, 8, 5, 5, 5)  # FSQ; prod = codebook size
  c.model.channels = 16 if local else 128
  c.model.channel_multipliers = (1, 2, 4) if local else (1, 2, 2, 4)
  c.model.num_res_blocks = 1 if local else 2
  c.model.time_factor = 1 if local else 4  # 1 + 4k frames -> 1 + k latent frames
  c.model.space_factor = 2 if local else 8
  c.model.norm_groups = 8
  c.model.dtype = "float32" if local else "bfloat16"
  c.model.out_channels = 1  # grey videos
  c.model.discriminator_channels = 0  # > 0 (with loss.adversarial_weight > 0): a patch discriminator
  c.model.activation = "swish"  # "swish_beta" (the official's) measured no better here: see the docstring
  c.model.resample = "space_to_depth"  # "conv" (the official's) measured 4-5 dB worse here: the docstring

  c.loss.l1_weight = 1.0
  c.loss.mse_weight = 1.0
  c.loss.perceptual_weight = 0.0  # > 0 needs perceptual_weights_file or perceptual_features
  c.loss.perceptual_weights_file = ""  # a local LPIPS/VGG16 .npz (nbp/models/vgg.py); frames >= 16x16
  c.loss.perceptual_features = ""  # or "package.module:function": frames [N,H,W,C] -> features
  c.loss.adversarial_weight = 0.0  # > 0 trains the discriminator as its own parameter group (hinge loss)
  c.sampler.num_samples = 4  # test videos reconstructed at each sampling step

  c.data.name = "moving_digits"
  c.data.num_frames = 5 if local else 17
  c.data.frame_size = 16 if local else 128
  c.data.num_digits = 1 if local else 2
  c.data.speed = 2.0 if local else 8.0
  c.data.num_train = 2000 if local else 20000
  c.data.num_validation = 200 if local else 2000  # validation scans carved from the train pool
  c.data.num_test = 200 if local else 2000

  c.batch_size = 8 if local else 64
  c.num_steps = 600 if local else 100_000
  c.optimizer.lr = 2e-3 if local else 1e-4
  c.optimizer.warmup_steps = 20 if local else 2000
  c.optimizer.b2 = 0.99
  c.optimizer.weight_decay = 0.0 if local else 1e-4
  c.optimizer.ema_decay = 0.0 if local else 0.999
  c.log_every = 20 if local else 100
  c.checkpoint_every = 300 if local else 5000
  c.evals.eval.every = 300 if local else 5000
  c.evals.eval.steps = 4
  c.lock()
  return c


def codebook_size(tokenizer) -> int:
  """The FSQ codebook of a tokenizer config: the product of its levels."""
  return math.prod(tokenizer.model.levels)


def token_grid(tokenizer) -> tuple[int, int, int]:
  """(f, h, w) latent grid of a tokenizer config's videos: 1 + (F - 1) / time_factor, H / space_factor, ..."""
  m, d = tokenizer.model, tokenizer.data
  return (1 + (d.num_frames - 1) // m.time_factor, d.frame_size // m.space_factor, d.frame_size // m.space_factor)
