r"""xAR's KL VAE at scale: ImageNet 256x256 RGB -> 16x16x16 latents, the KL-16 shape, with a patch GAN.

Launch (TPU pod or GPU hosts; every host runs the same command):
  python -m experiments.train --config experiments/configs/kl_vae_imagenet.py \
      --workdir gs://BUCKET/kl_vae_imagenet --multihost \
      --config.data.dir=/path/to/tensorflow_datasets
then encode ImageNet once into latents (one host; see experiments/encode_latents.py)
and train xAR on them (config.data.name = "latents"):
  python -m experiments.encode_latents --workdir gs://BUCKET/kl_vae_imagenet \
      --output_dir data/latents_imagenet256 --flips --batch_size 256

Data (nbp.data.images): tfds-prepared imagenet2012 under data.dir (1,281,167
train images, of which 10% are held out as our validation split; the test
split is the official 50,000 validation images), short side resized to 256
and centre cropped.

Model: the "kl16" row of nbp.models.kl_vae.SIZES, the usual KL-16 VAE of
latent-diffusion and autoregressive image models: width 128, channel_mult
(1, 1, 2, 2, 4) (128, 128, 256, 256, 512), two residual blocks per level,
self-attention in the middle, downsample 16, 16 latent channels; 64.4M
parameters. A hinge-loss patch discriminator (64 channels, 3 stride-2 layers:
a 32x32 grid of logits, one per 8 pixels; 0.66M parameters) trains as its own
parameter group (config.param_groups.discriminator).

Loss: L1 + KL (kl_weight 1e-6 per pixel, as latent-diffusion's KL
autoencoders) + 0.1 x the generator's hinge term. Those autoencoders also
use an LPIPS term, a discriminator that starts after 50k steps and an adaptive
adversarial weight; none of the three is here (no pretrained network ships
with this codebase), so expect blurrier reconstructions than theirs.

Training numbers (batch, learning rate, Adam betas (0.5, 0.9) as GAN
autoencoders usually take, steps, EMA) are our choice.

Sharding: the VAE's parameters carry no logical axis names, so they are
replicated (64M parameters, with Adam and EMA about 1 GB per chip in float32)
and the batch is split over every device: the mesh is data parallel.

Expected: not yet run. The public KL-16 VAEs reach rFID about 0.9 on the
ImageNet validation set at 256x256.
"""

from nbp.models import kl_vae
from nbp.training import config as config_lib


def get_config(arg: str = ""):
  if arg:
    raise ValueError(f"kl_vae_imagenet config takes no argument, got {arg!r}")
  c = config_lib.base_config()
  c.family = "kl_vae"
  c.seed = 0

  for key, value in kl_vae.SIZES["kl16"].items():
    c.model[key] = value
  c.model.channels = 3  # RGB
  c.model.norm_groups = 32
  c.model.discriminator_channels = 64
  c.model.discriminator_layers = 3
  c.model.dtype = "bfloat16"

  c.loss.l1_weight = 1.0
  c.loss.mse_weight = 0.0
  c.loss.kl_weight = 1e-6  # per pixel against the summed reconstruction (nbp.tasks.kl_vae)
  c.loss.adversarial_weight = 0.1
  c.sampler.num_samples = 8

  c.data.name = "imagenet2012"
  c.data.dir = "data/tensorflow_datasets"  # tfds data_dir holding imagenet2012/<version>/
  c.data.image_size = 256
  c.data.worker_count = 16  # JPEG decoding and resizing in grain worker processes

  c.batch_size = 256
  c.num_steps = 200_000
  c.optimizer.lr = 1e-4
  c.optimizer.warmup_steps = 5000
  c.optimizer.b1 = 0.5
  c.optimizer.b2 = 0.9
  c.optimizer.weight_decay = 0.0
  c.optimizer.ema_decay = 0.999
  c.param_groups.discriminator = dict(lr=1e-4)  # its own AdamW (same keys as config.optimizer)
  c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))  # parameters replicated (see the docstring)
  c.log_every = 100
  c.checkpoint_every = 5000
  c.evals.eval = dict(type="loss", pred="eval_loss", split="validation", every=5000, steps=4)
  c.evals.sample = dict(type="samples", pred="sample", every=5000)  # validation images beside reconstructions
  c.lock()
  return c
