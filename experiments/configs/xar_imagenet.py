r"""xAR-B / L / H on ImageNet 256x256: class-conditional next-cell prediction on cached KL-VAE latents.

Pipeline (pod; ImageNet is not on the development machines, so no run here):
  1. the VAE: python -m experiments.train --config experiments/configs/kl_vae_imagenet.py \
         --workdir gs://BUCKET/kl_vae_imagenet --config.data.dir=gs://BUCKET/tfds
  2. the latent cache, both flips, and the scaling factor from the data (on one host):
       python -m experiments.encode_latents --workdir gs://BUCKET/kl_vae_imagenet \
           --output_dir data/latents_imagenet256 --flips --batch_size 256
  3. xAR: python -m experiments.train --config experiments/configs/xar_imagenet.py:B \
         --workdir gs://BUCKET/xar_B --config.data.latent_dir=data/latents_imagenet256
Latents are 16x16x16 (16x downsampling); entities are 8x8 cells, 4 AR steps.

From the paper and its official code: sizes B 172M (16 blocks of 768, 12
heads; "8+8" encoder and decoder blocks), L 608M (32 of 1024, 16 heads),
H 1.1B (40 of 1280, 16 heads); AdamW betas (0.9, 0.96), weight decay 0.02,
lr 4e-4 at batch 2048, gradient clipping 1.0, EMA 0.9999, 800 epochs with 100
epochs of warmup, the rate held to epoch 600 then a cosine to 1e-5; class
dropout 0.1; logit-normal(0, 1) times per cell. Sampling: Euler-Maruyama with
40 steps and guidance 2.7 (B), 50 and 2.3 (L), 50 and 2.2 (H), the guidance
growing linearly over the 4 cells. Published FID 1.72 / 1.28 / 1.24.

The network's documented differences from the official one are switched to
the official values here (nbp.models.xar.OFFICIAL: qkv biases, the input
RMSNorm, dropout 0.1, xavier-initialised adaLN modulation, integer time
embeddings), and the sampler caches each finished entity clean, at t = 0, as
the official sampler does. What remains ours: every block adaLN-conditioned in
one stack (no encoder/decoder split), the modulated final norm, no dropout on
the attention probabilities, bfloat16, scanned layers with remat, and the
mesh: parameters and optimizer state over 8-way FSDP, the batch over all
devices.

Argument: "SIZE[,fid]", SIZE one of B, L, H; `fid` adds the standard FID at the
end of training (50k images, Inception-v3 from `--config.evals.fid.inception_path`).
"""

from nbp.models import xar
from nbp.training import config as config_lib

# size -> (solver steps, guidance scale), the official sampling settings.
SAMPLING = {"B": (40, 2.7), "L": (50, 2.3), "H": (50, 2.2)}
INCEPTION_PATH = "weights/inception_v3_fid.npz"  # nbp.models.inception's .npz format
EPOCH_STEPS = 1_281_167 // 2048  # ImageNet train images per optimizer step of batch 2048


def get_config(arg: str = "B"):
  arg, *flags = arg.split(",")
  if arg not in SAMPLING or set(flags) - {"fid"}:
    raise ValueError(f"xar_imagenet argument: a size of {sorted(SAMPLING)}, then optionally ',fid'; got {arg!r}")
  fid = "fid" in flags
  num_steps, guidance = SAMPLING[arg]
  c = config_lib.base_config()
  c.family = "xar"
  c.seed = 0

  c.data.name = "latents"
  c.data.latent_dir = "data/latents_imagenet256"  # experiments.encode_latents --output_dir
  c.model.token_dim = 16  # latent channels
  c.model.grid = (16, 16)  # 256 / 16
  c.model.num_classes = 1000
  c.model.entity = "cell"
  c.model.cell = 8  # 4 cells of 64 tokens
  c.model.variant = arg  # nbp.models.xar.SIZES
  c.model.scan_layers = True
  c.model.remat_policy = "dots_with_no_batch_dims_saveable"
  c.model.attention_impl = "auto"  # Pallas block-causal attention on GPU/TPU
  c.model.dtype = "bfloat16"
  for key, value in xar.OFFICIAL.items():  # qkv_bias, input_norm, dropout, adaln_init, time_embedding
    c.model[key] = value

  c.loss.class_dropout = 0.1
  c.loss.t_mean = 0.0
  c.loss.t_std = 1.0
  c.loss.posterior = "sample"  # a fresh VAE posterior draw per step, as MAR and xAR train (the cache has both moments)
  c.sampler.num_samples = 16
  c.sampler.num_steps = num_steps
  c.sampler.solver = "sde"
  c.sampler.t_end = 0.04
  c.sampler.guidance_scale = guidance
  c.sampler.guidance_schedule = "linear"
  c.sampler.context = "clean"  # the official cache: each finished entity at t = 0 (nbp/samplers/xar.py)

  c.batch_size = 2048
  c.num_steps = 800 * EPOCH_STEPS
  c.optimizer.lr = 4e-4
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.96
  c.optimizer.weight_decay = 0.02
  c.optimizer.clip_norm = 1.0
  c.optimizer.warmup_steps = 100 * EPOCH_STEPS
  c.optimizer.schedule = "cosine"
  c.optimizer.cosine_from = 600 / 800
  c.optimizer.final_lr_fraction = 1e-5 / 4e-4
  c.optimizer.ema_decay = 0.9999
  c.mesh = (("data", -1), ("fsdp", 8), ("tensor", 1))
  c.log_every = 100
  c.checkpoint_every = 5_000
  c.evals.eval = dict(type="loss", pred="eval_loss", split="validation", every=10 * EPOCH_STEPS, steps=8)
  c.evals.sample = dict(type="samples", pred="sample", every=10 * EPOCH_STEPS)
  if fid:  # Inception-v3 weights from a local file (nothing is downloaded): --config.evals.fid.inception_path=...
    c.evals.fid = dict(type="fid", pred="sample_images", split="validation", inception_path=INCEPTION_PATH,
                       num_images=50_000, batch_size=256, every=0)
  c.lock()
  return c
