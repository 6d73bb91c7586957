"""The video tokenizer as a task: reconstruction loss, an optional GAN, data, and the encode/decode API.

The network is nbp.models.video_tokenizer (`config.model` is its fields).

Loss (`config.loss`): L1 + MSE reconstruction, an optional perceptual term, and
an optional hinge-loss 3D patch discriminator. The perceptual term is either
LPIPS on VGG16 features (nbp.models.vgg), its weights read from a local file
the user names in `perceptual_weights_file` (nothing pretrained ships here and
nothing is downloaded), or the distance of features from a function the user
names in `perceptual_features`. With the discriminator the
parameters form two groups, "model" and "discriminator" (`param_labels`), each
with its own optimizer (`config.param_groups.discriminator` overrides
`config.optimizer`), and the loss returns one objective per group: the loop
differentiates each only with respect to its own group, so no stop_gradient
is needed to keep the generator and the discriminator apart.

Other code (NBP's token data, its samples, the demo) uses `load_tokenizer`,
`encode_video` and `decode_tokens`; a trained tokenizer is found by its workdir
alone (the loop writes the run's config.json there).
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from nbp import reconstruction as reconstruction_lib
from nbp import tasks
from nbp import visualization
from nbp.data import clips as clips_lib
from nbp.data import splits as splits_lib
from nbp.data import tokens as tokens_lib
from nbp.data import video_sources
from nbp.models import vgg
from nbp.models.video_tokenizer import VideoTokenizer as Model
from nbp.training import workdir as workdir_lib

DATASETS = video_sources.NAMES
DISCRIMINATOR = reconstruction_lib.DISCRIMINATOR  # the parameter group (and subtree) of the discriminator
param_labels = reconstruction_lib.param_labels
psnr = reconstruction_lib.psnr  # mean PSNR (dB) of [-1, 1] inputs
to_uint8 = reconstruction_lib.to_uint8


# ---------------------------------------------------------------------------
# Metrics and loss.


def codebook_usage(indices: jax.Array, codebook_size: int) -> jax.Array:
  """Fraction of the codebook's entries used at least once in `indices`."""
  counts = jnp.zeros((codebook_size,), jnp.int32).at[indices.reshape(-1)].add(1)
  return jnp.mean((counts > 0).astype(jnp.float32))


def perceptual_loss(features: Callable, video: jax.Array, reconstruction: jax.Array) -> jax.Array:
  """LPIPS-style distance: frames through `features`, unit-normalised channels, mean squared difference.

  `features(frames [N, H, W, C] in [-1, 1])` returns one array or a list of
  arrays [N, ..., K]; the distances of the arrays are summed.
  """
  frames = lambda v: v.reshape((-1,) + v.shape[2:])  # [B*F, H, W, C]
  real, fake = features(frames(video)), features(frames(reconstruction))
  real = real if isinstance(real, (list, tuple)) else [real]
  fake = fake if isinstance(fake, (list, tuple)) else [fake]
  unit = lambda a: a / (jnp.linalg.norm(a, axis=-1, keepdims=True) + 1e-8)
  return sum(jnp.mean(jnp.sum(jnp.square(unit(r) - unit(g)), axis=-1)) for r, g in zip(real, fake))


def lpips_loss(weights, video: jax.Array, reconstruction: jax.Array) -> jax.Array:
  """Mean LPIPS (VGG16, nbp.models.vgg) over the frames of videos [B, F, H, W, C] in [-1, 1]."""
  frames = lambda v: v.reshape((-1,) + v.shape[2:])  # [B*F, H, W, C]
  return jnp.mean(vgg.lpips(weights, frames(video), frames(reconstruction)))


def load_feature_function(spec: str) -> Callable:
  """"package.module:function" -> that function (e.g. one that loads VGG/LPIPS weights from a local file)."""
  module, _, name = spec.partition(":")
  if not module or not name:
    raise ValueError(f"config.loss.perceptual_features={spec!r}: expected 'package.module:function'.")
  return getattr(importlib.import_module(module), name)


def loss(model: Model, params, batch, rng, *, l1_weight: float = 1.0, mse_weight: float = 1.0,
         perceptual_weight: float = 0.0, perceptual_features: str | Callable = "",
         perceptual_weights_file: str | dict = "", adversarial_weight: float = 0.0):
  """(loss, metrics) of one batch {"video": [B, F, H, W, C] in [-1, 1]}.

  l1_weight, mse_weight: the reconstruction terms ([-1, 1] scale).
  perceptual_weight: > 0 needs one of
    perceptual_weights_file: LPIPS with VGG16 (nbp.models.vgg), its weights
      from this local .npz / .msgpack (or the loaded arrays);
    perceptual_features: a 'package.module:function' (or the function) mapping
      frames [N, H, W, C] in [-1, 1] to features (`perceptual_loss`).
  adversarial_weight: > 0 needs model.discriminator_channels > 0; the loss is
    then {"model": generator objective, "discriminator": hinge loss}.
  """
  del rng  # deterministic
  video = batch["video"]
  reconstruction, aux = model.apply({"params": params}, video)
  error = reconstruction - video
  l1, mse = jnp.mean(jnp.abs(error)), jnp.mean(jnp.square(error))
  recon = l1_weight * l1 + mse_weight * mse
  value = recon
  metrics = {"recon": recon, "l1": l1, "mse": mse, "psnr": psnr(video, reconstruction),
             "codebook_usage": codebook_usage(aux["indices"], model.codebook_size)}
  if perceptual_weight > 0:
    if bool(perceptual_weights_file) == bool(perceptual_features):
      raise ValueError("perceptual_weight > 0 needs one of perceptual_weights_file, perceptual_features "
                       "(see make_task)")
    if perceptual_weights_file:
      weights = (vgg.load_weights(perceptual_weights_file) if isinstance(perceptual_weights_file, str)
                 else perceptual_weights_file)
      metrics["perceptual"] = lpips_loss(weights, video, reconstruction)
    else:
      features = (load_feature_function(perceptual_features) if isinstance(perceptual_features, str)
                  else perceptual_features)
      metrics["perceptual"] = perceptual_loss(features, video, reconstruction)
    value = value + perceptual_weight * metrics["perceptual"]
  if adversarial_weight <= 0:
    return value, metrics
  if not model.discriminator_channels:
    raise ValueError("config.loss.adversarial_weight > 0 needs config.model.discriminator_channels > 0.")
  discriminate = lambda v: model.apply({"params": params}, v, method=Model.discriminate)
  return reconstruction_lib.with_adversarial_term(value, metrics, discriminate=discriminate, real=video,
                                                 reconstruction=reconstruction, weight=adversarial_weight)


# ---------------------------------------------------------------------------
# Data and samples.


def make_data(data_cfg, split: str, *, seed: int, process_index: int, process_count: int, batch_size: int):
  """A checkpointable grain iterator of {"video": float32 [b, F, H, W, C] in [-1, 1], "label"} batches.

  Any dataset of `nbp.data.video_sources.video_source` (moving digits, UCF-101, a video folder).
  """
  return video_sources.video_iterator(data_cfg, split, seed=seed, process_index=process_index,
                                     process_count=process_count, batch_size=batch_size)


def sample(model: Model, params, rng, videos: jax.Array, *, num_samples: int = 4):
  """The sampler: {"video", "reconstruction"} of the first `num_samples` of `videos` [N, F, H, W, C] in [-1, 1].

  The task passes the first validation videos, so every call shows the same ones.
  """
  del rng
  video = videos[:num_samples]
  reconstruction, _ = model.apply({"params": params}, video)
  return {"video": video, "reconstruction": reconstruction}


def write_samples(samples, out_dir: str, step: int) -> dict[str, float]:
  """A GIF and a PNG grid with each validation video above its reconstruction; returns their PSNR."""
  video, reconstruction = to_uint8(samples["video"]), to_uint8(samples["reconstruction"])
  pairs = np.stack([video, reconstruction], axis=1).reshape((-1,) + video.shape[1:])  # [2N, F, H, W, C]
  stem = os.path.join(out_dir, f"step_{step:07d}")
  visualization.save_gif(stem + ".gif", pairs)
  visualization.save_frame_grid(stem + ".png", pairs, max_videos=len(pairs),
                                title=f"tokenizer: input / reconstruction, step {step}")
  return {"psnr": float(psnr(jnp.asarray(samples["video"]), jnp.asarray(samples["reconstruction"])))}


def make_task(config) -> tasks.Task:
  model = tasks.build_model(Model, config.model)
  d = config.data
  channels = video_sources.num_channels(d)  # C: 1 (moving digits) or 3 (RGB)
  if model.out_channels != channels:
    raise ValueError(f"config.model.out_channels={model.out_channels} but {d.name!r} videos have {channels}.")
  model.latent_shape(d.num_frames, d.frame_size, d.frame_size)  # fails early on bad shapes
  loss_cfg = dict(config.get("loss", {}))
  adversarial = loss_cfg.get("adversarial_weight", 0.0) > 0
  if adversarial and not model.discriminator_channels:
    raise ValueError("config.loss.adversarial_weight > 0 needs config.model.discriminator_channels > 0.")
  weights_file, features = loss_cfg.get("perceptual_weights_file"), loss_cfg.get("perceptual_features")
  if loss_cfg.get("perceptual_weight", 0.0) > 0 and not (weights_file or features):
    raise ValueError(
        "config.loss.perceptual_weight > 0 but config.loss.perceptual_weights_file and "
        "config.loss.perceptual_features are empty: no pretrained network ships with this codebase; name a "
        "local LPIPS/VGG16 weight file (nbp/models/vgg.py says how to make one) or a 'package.module:function' "
        "that maps frames [N, H, W, C] in [-1, 1] to features.")
  if weights_file and features:
    raise ValueError("config.loss.perceptual_weights_file and config.loss.perceptual_features are both set: "
                     "name one perceptual network.")
  if loss_cfg.get("perceptual_weight", 0.0) > 0 and weights_file:
    loss_cfg["perceptual_weights_file"] = vgg.load_weights(weights_file)  # read once, at start (numpy constants)
  if features:
    loss_cfg["perceptual_features"] = load_feature_function(features)
  num_samples = config.get("sampler", {}).get("num_samples", 4)

  def sample_fn(params, rng):  # the videos are read when first sampled, not when the task is built
    return sample(model, params, rng, jnp.asarray(video_sources.first_videos(d.to_json(), num_samples)),
                  num_samples=num_samples)

  predict_fns = {
      "eval_loss": functools.partial(loss, model),  # held-out reconstruction: recon, psnr, codebook usage
      "write_samples": write_samples,
      "to_videos": lambda samples: to_uint8(samples["reconstruction"]),
      "encode": functools.partial(encode_video, model),
      "decode": functools.partial(decode_tokens, model),
  }
  if num_samples:
    predict_fns["sample"] = sample_fn
  return tasks.Task(
      model=model,
      init_inputs=lambda: {"video": jnp.zeros((1, d.num_frames, d.frame_size, d.frame_size, channels),
                                              jnp.float32)},
      loss=functools.partial(loss, model, **loss_cfg),
      data=functools.partial(make_data, d),
      param_labels=param_labels if adversarial else None,
      predict_fns=predict_fns,
  )


# ---------------------------------------------------------------------------
# Encode / decode API for other code (NBP's token data and samples, notebooks).


def load_tokenizer(workdir: str) -> tuple[Model, Any]:
  """(model, params) of the tokenizer trained in `workdir` (its config.json and latest checkpoint).

  The EMA parameters are returned when the run kept them (nbp.training.workdir.load_params).
  """
  config = workdir_lib.read_config(workdir)
  model = tasks.build_model(Model, config.model)
  params, _, _ = workdir_lib.load_params(workdir, model, make_task(config).init_inputs())
  return model, params


def encode_video(model: Model, params, video: jax.Array) -> jax.Array:
  """video [B, F, H, W, C] in [-1, 1] -> token indices int32 [B, f, h, w]."""
  return model.apply({"params": params}, video, method=Model.encode)[1]


def decode_tokens(model: Model, params, indices: jax.Array) -> jax.Array:
  """token indices [B, f, h, w] -> video [B, F, H, W, C] clipped to [-1, 1]."""
  return jnp.clip(model.apply({"params": params}, indices, method=Model.decode_indices), -1.0, 1.0)


def encode_tokens(workdir: str, output_dir: str, *, data_cfg=None, splits=splits_lib.SPLITS,
                  batch_size: int = 32, extra_metadata: dict | None = None,
                  train_clips: clips_lib.ClipPolicy = clips_lib.CENTRED) -> dict:
  """Encodes the videos of `data_cfg` (default: the tokenizer's own data) with the tokenizer of `workdir`.

  Writes nbp.data.tokens' layout under `output_dir`; the metadata names the
  tokenizer's workdir, so NBP's samples can be decoded from the tokens alone.
  The train split is encoded as the clips `train_clips` takes of each video
  (e.g. K random starts, half of them mirrored); validation and test always
  as one centred, unflipped clip per video, so evaluation stays deterministic.
  The metadata records each split's policy.
  """
  if train_clips != clips_lib.CENTRED and "train" not in splits:
    raise ValueError(f"Clips of the train split ({train_clips.flags()}) but the splits encoded are {list(splits)}.")
  if data_cfg is None:
    data_cfg = workdir_lib.read_config(workdir).data
  policies = {split: train_clips if split == "train" else clips_lib.CENTRED for split in splits}
  sources = {split: video_sources.clip_source(data_cfg, split, policy) for split, policy in policies.items()}
  model, params = load_tokenizer(workdir)
  encode = jax.jit(lambda v: encode_video(model, params, v))
  d = data_cfg
  metadata = {
      "latent_shape": list(model.latent_shape(d.num_frames, d.frame_size, d.frame_size)),
      "codebook_size": model.codebook_size,
      "levels": list(model.levels),
      "video_shape": [d.num_frames, d.frame_size, d.frame_size, model.out_channels],
      "tokenizer_workdir": workdir if "://" in workdir else os.path.abspath(workdir),
      **(extra_metadata or {}),
  }
  return tokens_lib.encode_dataset(encode, sources, output_dir, metadata=metadata, clips=policies,
                                   batch_size=batch_size)
