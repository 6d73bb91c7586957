"""The KL VAE as a task (xAR's latent space): reconstruction + KL loss, an optional GAN, data, and the latent API.

The network is nbp.models.kl_vae (`config.model` is its fields).

Loss (`config.loss`), per batch of images x in [-1, 1] with S*S*C = P values each:

  l1_weight * mean|x - x'| + mse_weight * mean (x - x')^2 + kl_weight * KL / P

x' decodes a reparameterised sample of the posterior, and KL is that
posterior's divergence from N(0, I) in nats per image (summed over the
latent's h*w*c values, averaged over the batch). Dividing it by P weighs it as
latent-diffusion KL autoencoders do, against the reconstruction error summed
over an image's pixels; kl_weight = 1e-6 (the default) is their value, a light
regulariser that keeps the latents bounded without costing reconstruction.
experiments/configs/kl_vae_digits.py compares it with 1e-3 on digits (the same
PSNR, a posterior 8x wider).

With `adversarial_weight` > 0 a hinge-loss 2D patch discriminator joins
(model.discriminator_channels > 0) and the parameters form two groups, "model"
and "discriminator" (`param_labels`), each with its own optimizer
(`config.param_groups.discriminator` overrides `config.optimizer`); the loss
returns one objective per group and the loop differentiates each only with
respect to its own group, as for the video tokenizer.

Batches are {"image": uint8 [b, S, S, C], "class": int32 [b]} of
nbp.data.images (digits or imagenet2012).

Dimensions: B batch (b: one host's), S image side, C image channels, h, w, c
latent height, width and channels (S / downsample, S / downsample,
latent_channels).

Other code loads a trained VAE by its workdir (nbp.tasks.load_run) and calls
its predict functions "encode" (images in [-1, 1] -> the posterior's moments
{"mean", "logvar"}) and "decode" (unscaled latents -> images in [-1, 1]);
xAR's sampler decodes its latents so. `encode_latents` (the library side of
experiments.encode_latents) writes a dataset's latents once, the moments of
every image of the train, validation and test splits (nbp.data.latents), and
the measured scaling factor into the VAE workdir as latent_scale.json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nbp import reconstruction as reconstruction_lib
from nbp import tasks
from nbp import visualization
from nbp.data import images as images_lib
from nbp.data import latents as latents_lib
from nbp.data import pipeline
from nbp.data import splits as splits_lib
from nbp.models.kl_vae import KLVAE as Model
from nbp.training import workdir as workdir_lib

DATASETS = images_lib.IMAGE_DATASETS  # ("digits", "imagenet2012")
DISCRIMINATOR = reconstruction_lib.DISCRIMINATOR  # the parameter group (and subtree) of the discriminator
param_labels = reconstruction_lib.param_labels
CHANNELS = {"digits": 1, "imagenet2012": 3}  # C of each dataset's images

psnr = reconstruction_lib.psnr  # mean PSNR (dB) on the [0, 1] scale of inputs in [-1, 1]: any [B, ...] shape
to_uint8 = reconstruction_lib.to_uint8  # [-1, 1] -> uint8, rounded and clipped


# ---------------------------------------------------------------------------
# Loss.


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)) in nats, summed over all but the batch axis, mean over the batch.

  Closed form per value: (mean^2 + exp(logvar) - 1 - logvar) / 2.
  """
  mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
  per_value = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.mean(jnp.sum(per_value.reshape(per_value.shape[0], -1), axis=-1))


def normalize(images: jax.Array) -> jax.Array:
  """uint8 [...] in 0..255 -> float32 in [-1, 1]."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def loss(model: Model, params, batch, rng, *, l1_weight: float = 1.0, mse_weight: float = 0.0,
         kl_weight: float = 1e-6, adversarial_weight: float = 0.0):
  """(loss, metrics) of one batch {"image": uint8 [B, S, S, C], ...} (see the module docstring).

  l1_weight, mse_weight: the reconstruction terms, per pixel on the [-1, 1] scale.
  kl_weight: the KL (nats per image) divided by the image's S*S*C values.
  adversarial_weight: > 0 needs model.discriminator_channels > 0; the loss is
    then {"model": VAE objective + weight * generator term, "discriminator": hinge loss}.
  """
  images = normalize(batch["image"])
  reconstruction, mean, logvar = model.apply({"params": params}, images, rng)
  error = reconstruction - images
  l1, mse = jnp.mean(jnp.abs(error)), jnp.mean(jnp.square(error))
  kl = kl_divergence(mean, logvar)
  values_per_image = int(np.prod(images.shape[1:]))
  value = l1_weight * l1 + mse_weight * mse + kl_weight * kl / values_per_image
  metrics = {"l1": l1, "mse": mse, "kl": kl, "psnr": psnr(images, reconstruction),
             "posterior_std": jnp.mean(jnp.exp(0.5 * logvar)), "latent_std": jnp.std(mean),
             "num_targets": jnp.asarray(images.shape[0], jnp.float32)}  # images
  if adversarial_weight <= 0:
    return value, metrics
  if not model.discriminator_channels:
    raise ValueError("config.loss.adversarial_weight > 0 needs config.model.discriminator_channels > 0.")
  discriminate = lambda x: model.apply({"params": params}, x, method=Model.discriminate)
  return reconstruction_lib.with_adversarial_term(value, metrics, discriminate=discriminate, real=images,
                                                 reconstruction=reconstruction, weight=adversarial_weight)


# ---------------------------------------------------------------------------
# Data and samples.


@dataclasses.dataclass(frozen=True)
class ImageAndClass(grain.transforms.Map):
  """{"image": uint8 [S, S, C], "label", ...} -> {"image": uint8 [S, S, C], "class": int32}."""

  def map(self, element):
    return {"image": np.asarray(element["image"], np.uint8), "class": np.int32(element["label"])}


def make_data(data_cfg, split: str, *, seed: int, process_index: int, process_count: int, batch_size: int):
  """A checkpointable grain iterator of {"image": uint8 [b, S, S, C], "class": int32 [b]} batches."""
  source = images_lib.image_source(data_cfg, split)
  return pipeline.make_iterator(
      source, global_batch_size=batch_size * process_count, seed=seed, shuffle=True,
      transforms=(ImageAndClass(),), process_index=process_index, process_count=process_count,
      worker_count=data_cfg.worker_count)


@functools.cache
def _first_validation_images(data_cfg_json: str, num: int) -> np.ndarray:
  """uint8 [num, S, S, C]: the first `num` images of the validation split."""
  data_cfg = ml_collections.ConfigDict(json.loads(data_cfg_json))
  return images_lib.read_images(data_cfg, "validation", 0, num)["image"]


def sample(model: Model, params, rng, images: jax.Array, *, num_samples: int = 8):
  """The sampler: {"image", "reconstruction"} [n, S, S, C] in [-1, 1] of the first `num_samples` of `images` (uint8).

  Reconstructions decode the posterior mean. The task passes the first
  validation images, so every call shows the same ones.
  """
  del rng
  x = normalize(images[:num_samples])
  reconstruction, _, _ = model.apply({"params": params}, x)
  return {"image": x, "reconstruction": reconstruction}


def write_samples(samples, out_dir: str, step: int) -> dict[str, float]:
  """A PNG with one row per validation image: the image, then its reconstruction; returns their PSNR."""
  pairs = np.stack([to_uint8(samples["image"]), to_uint8(samples["reconstruction"])], axis=1)  # [n, 2, S, S, C]
  visualization.save_frame_grid(os.path.join(out_dir, f"step_{step:07d}.png"), pairs, max_videos=len(pairs),
                                title=f"image | reconstruction, step {step}")
  return {"psnr": float(psnr(jnp.asarray(samples["image"]), jnp.asarray(samples["reconstruction"])))}


def check_model_against_data(model: Model, data_cfg) -> None:
  """Raises ValueError naming config.model.channels / downsample when they do not fit config.data."""
  channels = CHANNELS[data_cfg.name]
  if model.channels != channels:
    raise ValueError(f"config.model.channels={model.channels} but {data_cfg.name!r} images have {channels}.")
  model.latent_shape(data_cfg.image_size)


def make_task(config) -> tasks.Task:
  model = tasks.build_model(Model, config.model)
  d = config.data
  check_model_against_data(model, d)
  loss_cfg = dict(config.get("loss", {}))
  adversarial = loss_cfg.get("adversarial_weight", 0.0) > 0
  if adversarial and not model.discriminator_channels:
    raise ValueError("config.loss.adversarial_weight > 0 needs config.model.discriminator_channels > 0.")
  num_samples = config.get("sampler", {}).get("num_samples", 8)

  def sample_fn(params, rng):  # the images are read when first sampled, not when the task is built
    return sample(model, params, rng, jnp.asarray(_first_validation_images(d.to_json(), num_samples)),
                  num_samples=num_samples)

  predict_fns = {
      "eval_loss": functools.partial(loss, model, **loss_cfg),  # held-out: psnr, kl, l1 (the GAN terms when on)
      "write_samples": write_samples,
      "to_images": lambda samples: to_uint8(samples["reconstruction"]),
      "encode": functools.partial(encode, model),
      "decode": functools.partial(decode, model),
  }
  if num_samples:
    predict_fns["sample"] = sample_fn
  return tasks.Task(
      model=model,
      init_inputs=lambda: {"images": jnp.zeros((1, d.image_size, d.image_size, model.channels), jnp.float32)},
      loss=functools.partial(loss, model, **loss_cfg),
      data=functools.partial(make_data, d),
      param_labels=param_labels if adversarial else None,
      predict_fns=predict_fns,
  )


# ---------------------------------------------------------------------------
# Encode / decode (the "encode" and "decode" predict functions) and the latent cache.


def encode(model: Model, params, images: jax.Array) -> dict[str, jax.Array]:
  """Images [B, S, S, C] in [-1, 1] -> the posterior's moments {"mean", "logvar"}, float32 [B, h, w, c] (unscaled)."""
  mean, logvar = model.apply({"params": params}, images, method=Model.encode)
  return {"mean": mean.astype(jnp.float32), "logvar": logvar.astype(jnp.float32)}


def decode(model: Model, params, latents: jax.Array) -> jax.Array:
  """Unscaled latents [B, h, w, c] (divide scaled ones by the scaling factor first) -> images in [-1, 1]."""
  return jnp.clip(model.apply({"params": params}, latents, method=Model.decode), -1.0, 1.0)


def _load(workdir: str) -> tuple[Model, Any, int, ml_collections.ConfigDict]:
  """(model, params, checkpoint step, config) of the VAE trained in `workdir` (EMA parameters when kept)."""
  config = workdir_lib.read_config(workdir)
  model = tasks.build_model(Model, config.model)
  params, _, step = workdir_lib.load_params(workdir, model, make_task(config).init_inputs())
  return model, params, step, config


def _path(path: str) -> str:
  return path if "://" in path else os.path.abspath(path)


def encode_latents(workdir: str, output_dir: str, *, data_cfg=None, splits=splits_lib.SPLITS, flips: bool = False,
                   batch_size: int = 64) -> dict:
  """Encodes the images of `data_cfg` (default: the VAE's own data) with the VAE of `workdir`.

  Writes nbp.data.latents' layout under `output_dir`: the posterior's moments
  (mean and log-variance) of every image of `splits`, one view per image, or
  the image and its mirror with `flips`; and the scaling factor measured on
  the train means into `<workdir>/latent_scale.json`. Returns the metadata.
  """
  model, params, step, config = _load(workdir)
  data_cfg = config.data if data_cfg is None else data_cfg
  if data_cfg.name not in DATASETS:
    raise ValueError(f"config.data.name={data_cfg.name!r}: latents are encoded from one of {DATASETS}.")
  check_model_against_data(model, data_cfg)
  encode_fn = jax.jit(lambda x: encode(model, params, normalize(x)))  # uint8 images -> moments
  sources = {split: images_lib.image_source(data_cfg, split) for split in splits}
  section = data_cfg.to_dict()
  section["dir"] = _path(section.get("dir", "data"))
  metadata = {
      "vae_workdir": _path(workdir),
      "vae_step": int(step),
      "data": section,
      "num_classes": images_lib.num_classes(data_cfg),
      "image_shape": [data_cfg.image_size, data_cfg.image_size, model.channels],
  }
  metadata = latents_lib.encode_latents(encode_fn, sources, output_dir, metadata=metadata, flips=flips,
                                        batch_size=batch_size)
  latents_lib.write_latent_scale(workdir, metadata, latent_dir=_path(output_dir), step=step)
  return metadata
