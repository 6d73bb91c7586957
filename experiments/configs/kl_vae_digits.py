r"""xAR's KL VAE on digit images, on a CPU: 16x16 grey digits -> 4x4x4 latents.

Trains nbp.models.kl_vae (nbp.tasks.kl_vae) with L1 reconstruction and a KL
term; the evaluators report held-out reconstruction PSNR (dB, pixels on
[0, 1]) as eval/psnr and the KL (nats per image) as eval/kl on the validation
split, and the samples directory shows validation images beside their
reconstructions.

Launch (CPU, 2 cores, 2-3 minutes: 1,500 steps at 12-18 steps/s):
  python -m experiments.train --config experiments/configs/kl_vae_digits.py:local \
      --workdir runs/kl_vae_local
then encode the digits once into latents for xAR: the posterior's mean and
log-variance of every train, validation and test image (no --flips: a
mirrored digit is not a digit; flips are ImageNet's augmentation):
  python -m experiments.encode_latents --workdir runs/kl_vae_local \
      --output_dir runs/latents_local

Argument: "local": sklearn's digits resized to 16x16, downsample 4 -> 4x4x4
latents (64 values for 256 pixels), the "tiny" size of nbp.models.kl_vae.SIZES
(0.23M parameters), batch 32, 1,500 steps, kl_weight 1e-3 (the ImageNet
config's 1e-6 gave the same PSNR with a posterior 8x narrower).
Expected: held-out PSNR about 40 dB; reconstructions indistinguishable from
the inputs by eye (measured figures: docs/xar.md).
"""

from nbp.models import kl_vae
from nbp.training import config as config_lib


def get_config(arg: str = "local"):
  if arg != "local":
    raise ValueError(f"kl_vae_digits config argument must be 'local', got {arg!r}")
  c = config_lib.base_config()
  c.family = "kl_vae"
  c.seed = 0

  for key, value in kl_vae.SIZES["tiny"].items():
    c.model[key] = value  # latent_channels 4, downsample 4, width 16, channel_mult (1, 2, 2), 1 block
  c.model.channels = 1  # grey digits
  c.model.norm_groups = 8
  c.model.discriminator_channels = 0  # > 0 (with loss.adversarial_weight > 0): a patch discriminator
  c.model.discriminator_layers = 2
  c.model.dtype = "float32"

  c.loss.l1_weight = 1.0
  c.loss.mse_weight = 0.0
  c.loss.kl_weight = 1e-3  # per pixel against the summed reconstruction (nbp.tasks.kl_vae); see the docstring
  c.loss.adversarial_weight = 0.0  # > 0 trains the discriminator as its own parameter group (hinge loss)
  c.sampler.num_samples = 8  # validation images reconstructed at each sampling step

  c.data.name = "digits"
  c.data.image_size = 16

  c.batch_size = 32
  c.num_steps = 1500
  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 50
  c.optimizer.b2 = 0.99
  c.optimizer.weight_decay = 0.0
  c.optimizer.ema_decay = 0.0
  c.log_every = 50
  c.checkpoint_every = 500
  c.evals.eval = dict(type="loss", pred="eval_loss", split="validation", every=500, steps=4)
  c.evals.sample = dict(type="samples", pred="sample", every=0)  # validation images beside reconstructions
  c.evals.psnr = dict(type="psnr", pred="sample", every=500)  # the reconstruction PSNR of those images
  c.lock()
  return c
