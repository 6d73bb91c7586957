"""xAR as a task: flow matching per entity with noisy context, data and images; the sampler is nbp.samplers.xar.

The network is nbp.models.xar (`config.model` is its fields); the sampler,
entity by entity over a KV cache, is nbp.samplers.xar (`config.sampler` is
the keywords of its `sample`).

Tokens. An image becomes a token grid [h, w, C] (h, w = `config.model.grid`):
  pixels   (`config.data.name` digits or imagenet2012): scaled to [-1, 1] and
           cut into p x p patches, p = image_size / h, C = p*p*channels;
  videos   (`config.data.name` moving_digits, ucf101 or video_folder): the F
           frames of H x W stacked top to bottom into one F*H x W image
           (requantised to `config.data.levels` grey levels first, as the
           token models see them), then as pixels with p = W / w, so
           h = F*H/p, C = p*p*channels; cells of
           (H/p) x (W/p) tokens are whole frames, and the entity sequence is
           the frames in order;
  latents  (`config.data.name` latents, nbp.data.latents): a KL VAE's scaled
           latents, one per token (C = latent channels).
The patch size is what the data's side and the model's grid imply (latents:
one latent per token); the token_dim must match, and a mismatch names both
keys.

Latents (`config.loss.posterior`): "mean" trains on the VAE posterior's mean
of every image; "sample" draws mean + std * eps from the posterior afresh at
every training step (what MAR and xAR do), from the moments the latent cache
stores. A cache written before the moments were stored holds means only and
is refused for "sample" with the command that encodes it again.

Flow matching (the loss). For the grid's entity sequence x [B, S, C], every
entity of every sample draws its own t ~ logit-normal(t_mean, t_std) and its
own noise eps: x_t = (1 - t) x + t eps, and the network's outputs at entity
i regress its velocity eps_i - x_i (plain MSE over every token and channel).
Noisy Context Learning is exactly this: the context an entity sees is the
other entities at their own noise levels, in one pass. With
`config.model.teacher_forcing` the network sees the clean sequence first and
the loss is over the noisy copy (nbp.models.xar). Class dropout
(`config.loss.class_dropout`) replaces the label by the null class; the
model's own `dropout`, when set, is on in the training loss only.

Images. Samples decode to uint8 images by unpatchifying pixels, or, for
latents, by the decoder of the VAE run that wrote them (loaded by its workdir,
nbp.tasks.load_run, and called through its "decode" predict function).

Dimensions: B batch, S slots, C token channels, K entities, h/w the token
grid, H/W the image.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from nbp import decoding
from nbp import tasks
from nbp import visualization
from nbp.data import images as images_lib
from nbp.data import latents as latents_lib
from nbp.data import pipeline
from nbp.data import video_sources
from nbp.models.xar import XAR as Model
from nbp.samplers import xar as sampler_lib

DATASETS = ("digits", "imagenet2012", "latents", *video_sources.NAMES)
POSTERIORS = ("mean", "sample")
sample = sampler_lib.sample  # the schema of config.sampler (nbp.tasks.check_config)


# ---------------------------------------------------------------------------
# Tokens.


def patchify(x: np.ndarray | jax.Array, patch: int):
  """[..., H, W, c] -> [..., H/p, W/p, p*p*c] (a patch's pixels row-major, channels last)."""
  *lead, h, w, c = x.shape
  x = x.reshape(*lead, h // patch, patch, w // patch, patch, c)
  n = len(lead)
  x = x.transpose(*range(n), n, n + 2, n + 1, n + 3, n + 4)
  return x.reshape(*lead, h // patch, w // patch, patch * patch * c)


def unpatchify(x: np.ndarray | jax.Array, patch: int):
  """[..., h, w, p*p*c] -> [..., h*p, w*p, c]: the inverse of `patchify`."""
  *lead, h, w, d = x.shape
  c = d // (patch * patch)
  x = x.reshape(*lead, h, w, patch, patch, c)
  n = len(lead)
  x = x.transpose(*range(n), n, n + 2, n + 1, n + 3, n + 4)
  return x.reshape(*lead, h * patch, w * patch, c)


def data_geometry(model: Model, data_cfg) -> tuple[int, int]:
  """(patch size p, channels c) of the data, checked against the model's grid and token_dim."""
  h, w = model.grid
  if data_cfg.name == "latents":
    side, _, channels = latents_lib.read_metadata(data_cfg.latent_dir)["latent_shape"]
    if side != h:
      raise ValueError(f"config.model.grid={tuple(model.grid)}: the latents in config.data.latent_dir are "
                       f"{side}x{side}; a latent run's grid is the latent grid (one latent per token).")
    what = f"latents of side {side} (config.data.latent_dir)"
  elif data_cfg.name in video_sources.NAMES:
    frames, size = data_cfg.num_frames, data_cfg.frame_size
    if size % w or h * (size // w) != frames * size:
      raise ValueError(f"config.model.grid={tuple(model.grid)}: {frames} frames of {size}x{size} stacked into a "
                       f"{frames * size}x{size} image need a grid ({frames * size}/p, {size}/p) for a patch p "
                       "dividing the frame size.")
    patch, channels = size // w, video_sources.num_channels(data_cfg)
    if model.token_dim != patch * patch * channels:
      raise ValueError(f"config.model.token_dim={model.token_dim}, but {size}x{size} frames of {channels} "
                       f"channels on a grid {tuple(model.grid)} give {patch}x{patch} patches: token_dim "
                       f"{patch * patch * channels}.")
    return patch, channels
  else:
    side, channels = data_cfg.image_size, {"digits": 1, "imagenet2012": 3}[data_cfg.name]
    what = f"config.data.image_size={side}"
  if h != w or side % h:
    raise ValueError(f"config.model.grid={tuple(model.grid)} must be square and divide {what}.")
  patch = side // h
  if model.token_dim != patch * patch * channels:
    raise ValueError(f"config.model.token_dim={model.token_dim}, but {what} on a {h}x{w} grid gives "
                     f"{patch}x{patch} patches of {channels} channels: token_dim {patch * patch * channels}.")
  return patch, channels


def check_posterior(posterior: str, data_cfg) -> None:
  """config.loss.posterior must name a choice the data can give: a ValueError names the key and the cache."""
  if posterior not in POSTERIORS:
    raise ValueError(f"config.loss.posterior={posterior!r}: choose one of {POSTERIORS}")
  if posterior == "mean":
    return
  if data_cfg.name != "latents":
    raise ValueError(f"config.loss.posterior={posterior!r} samples a VAE posterior; config.data.name="
                     f"{data_cfg.name!r} is pixels (set it to 'mean', or train on latents).")
  if not latents_lib.read_metadata(data_cfg.latent_dir).get("moments"):
    raise ValueError(f"config.loss.posterior='sample' needs the posterior's moments, but the latent cache "
                     f"config.data.latent_dir={data_cfg.latent_dir!r} holds its means only (encoded before "
                     f"the moments were stored): encode it again ({latents_lib.ENCODE_HINT}), or use 'mean'.")


# ---------------------------------------------------------------------------
# Flow matching with noisy context.


def logit_normal(rng, shape, mean: float, std: float) -> jax.Array:
  """t = sigmoid(mean + std * n), n ~ N(0, 1): a time in (0, 1) per entry."""
  return jax.nn.sigmoid(mean + std * jax.random.normal(rng, shape))


def flow_matching_loss(model: Model, params, x, t_entity, eps, labels, dropout_rng=None):
  """MSE of the velocity at per-entity times: x, eps [B, S, C], t_entity [B, K], labels [B] -> (loss, v, target).

  dropout_rng: the model's dropout on (training), None: off.
  """
  t = t_entity[:, model.entities.entity_of_slot()]  # [B, S]
  x_t = (1.0 - t[..., None]) * x + t[..., None] * eps
  target = eps - x
  train = {} if dropout_rng is None else {"deterministic": False, "rngs": {"dropout": dropout_rng}}
  if model.teacher_forcing:  # the clean copy at t = 0, then the noisy one; velocities of the noisy copy
    inputs, times = jnp.concatenate([x, x_t], axis=1), jnp.concatenate([jnp.zeros_like(t), t], axis=1)
    v = model.apply({"params": params}, inputs, times, labels, **train)[:, model.seq_len:]
  else:
    v = model.apply({"params": params}, x_t, t, labels, **train)
  return jnp.mean(jnp.square(v - target)), v, target


def training_grid(batch, posterior: str, rng) -> jax.Array:
  """The token grid [B, h, w, C] a step trains on: pixel patches, or latents (the posterior mean or a draw)."""
  if "tokens" in batch:
    return batch["tokens"]
  if posterior == "mean":
    return batch["latent"]
  if "latent_std" not in batch:
    raise ValueError("config.loss.posterior='sample': the batches hold no posterior std (a latent cache of means "
                     f"only): encode the latents again ({latents_lib.ENCODE_HINT}).")
  return batch["latent"] + batch["latent_std"] * jax.random.normal(rng, batch["latent"].shape)


def loss(model: Model, params, batch, rng, *, class_dropout: float = 0.1, t_mean: float = 0.0, t_std: float = 1.0,
         posterior: str = "mean"):
  """Flow-matching MSE with an independent logit-normal t and noise per entity; per-entity-position losses.

  class_dropout: probability of the null class (guidance). t_mean, t_std: the
  logit-normal's location and scale. posterior: "mean" or "sample" (latents;
  module docstring). The model's dropout is on.
  """
  return objective(model, params, batch, rng, class_dropout=class_dropout, t_mean=t_mean, t_std=t_std,
                   posterior=posterior, train=True)


def eval_loss(model: Model, params, batch, rng, *, class_dropout: float = 0.1, t_mean: float = 0.0,
              t_std: float = 1.0, posterior: str = "mean"):
  """The held-out loss: `loss` with the true classes (no class dropout) and the model's dropout off."""
  del class_dropout
  return objective(model, params, batch, rng, class_dropout=0.0, t_mean=t_mean, t_std=t_std, posterior=posterior,
                   train=False)


def objective(model: Model, params, batch, rng, *, class_dropout: float, t_mean: float, t_std: float,
              posterior: str, train: bool):
  """(loss, metrics) of `loss`; train: the model's dropout on."""
  ents = model.entities
  key_t, key_eps, key_drop, key_posterior, key_dropout = jax.random.split(rng, 5)
  grid = training_grid(batch, posterior, key_posterior)
  x = ents.decompose(grid.astype(jnp.float32))  # [B, S, C]
  b = x.shape[0]
  t_entity = logit_normal(key_t, (b, ents.num_entities), t_mean, t_std)  # [B, K]
  eps = jax.random.normal(key_eps, x.shape)
  labels = decoding.drop_condition(key_drop, batch["class"], class_dropout, model.num_classes)
  dropout_rng = key_dropout if train and model.dropout else None
  value, v, target = flow_matching_loss(model, params, x, t_entity, eps, labels, dropout_rng)
  metrics = {"num_targets": jnp.asarray(x.size, jnp.float32)}
  per_entity = jnp.mean(jnp.square(v - target), axis=(0, 2))  # [S]
  first, last = ents.sizes[0], ents.sizes[-1]
  metrics["mse_first_entity"] = jnp.mean(per_entity[:first])
  metrics["mse_last_entity"] = jnp.mean(per_entity[-last:])
  return value, metrics


# ---------------------------------------------------------------------------
# Data and images.


def make_data(model: Model, data_cfg, split: str, *, seed: int, process_index: int, process_count: int,
              batch_size: int):
  """A checkpointable grain iterator of {"tokens" (pixels) or "latent" (+ "latent_std"): float32 [b, h, w, C],
  "class": int32 [b]}; split one of train, validation, test."""
  patch, _ = data_geometry(model, data_cfg)
  if data_cfg.name == "latents":
    return latents_lib.latent_iterator(
        data_cfg.latent_dir, split, seed=seed, process_index=process_index, process_count=process_count,
        batch_size=batch_size, worker_count=data_cfg.worker_count)
  if data_cfg.name in video_sources.NAMES:
    source = video_sources.video_source(data_cfg, split)
    levels = data_cfg.get("levels", 0)

    def video_tokens(example):
      video = pipeline.requantize(np.asarray(example["video"]), levels)  # [F, H, W, 1]
      pixels = video.reshape(-1, *video.shape[2:]).astype(np.float32) / 127.5 - 1.0  # [F*H, W, 1]
      return {"tokens": patchify(pixels, patch), "class": pipeline.label_class(np.reshape(example["label"], -1))}

    return pipeline.make_iterator(
        source, global_batch_size=batch_size * process_count, seed=seed, shuffle=True, transforms=(video_tokens,),
        process_index=process_index, process_count=process_count, worker_count=data_cfg.worker_count)
  source = images_lib.image_source(data_cfg, split)

  def to_tokens(example):
    pixels = example["image"].astype(np.float32) / 127.5 - 1.0  # [H, W, c] in [-1, 1]
    return {"tokens": patchify(pixels, patch), "class": np.int32(example["label"])}

  return pipeline.make_iterator(
      source, global_batch_size=batch_size * process_count, seed=seed, shuffle=True, transforms=(to_tokens,),
      process_index=process_index, process_count=process_count, worker_count=data_cfg.worker_count)


def num_classes(data_cfg) -> int:
  if data_cfg.name in video_sources.NAMES:
    return video_sources.num_classes(data_cfg)
  return images_lib.num_classes(data_cfg)


def tokens_to_videos(model: Model, data_cfg, tokens) -> np.ndarray:
  """Token grids [N, h, w, C] of stacked frames -> uint8 videos [N, F, H, W, channels]."""
  images = tokens_to_images(model, data_cfg, tokens)  # [N, F*H, W, 1]
  return images.reshape(images.shape[0], data_cfg.num_frames, -1, *images.shape[2:])


def videos_to_tokens(model: Model, data_cfg, videos) -> np.ndarray:
  """uint8 videos [N, F, H, W, channels] -> token grids [N, h, w, C], as training reads them (requantised)."""
  patch, _ = data_geometry(model, data_cfg)
  videos = pipeline.requantize(np.asarray(videos), data_cfg.get("levels", 0))
  pixels = videos.reshape(videos.shape[0], -1, *videos.shape[3:]).astype(np.float32) / 127.5 - 1.0
  return patchify(pixels, patch)


@functools.cache
def _vae(latent_dir: str):
  """(jitted decode of unscaled latents to [-1, 1] images, params, scaling factor) of the VAE behind `latent_dir`."""
  metadata = latents_lib.read_metadata(latent_dir)
  run = tasks.load_run(metadata["vae_workdir"])
  decode = jax.jit(run.task.predict_fn("decode", who="xAR's latent samples"))
  return decode, run.params, float(metadata["scaling_factor"])


def tokens_to_images(model: Model, data_cfg, tokens) -> np.ndarray:
  """Token grids [N, h, w, C] -> uint8 images [N, H, W, c]: pixels unpatchified, or latents decoded by the VAE."""
  patch, _ = data_geometry(model, data_cfg)
  x = unpatchify(np.asarray(tokens, np.float32), patch)
  if data_cfg.name == "latents":
    decode, params, scaling = _vae(data_cfg.latent_dir)
    x = np.asarray(decode(params, jnp.asarray(x / scaling)))
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def write_samples(model: Model, data_cfg, tokens: np.ndarray, out_dir: str, step: int, *,
                  columns: int = 10) -> dict[str, float]:
  """The samples as a PNG grid, `columns` per row (classes 0, 1, 2, ... in order; the last row padded black)."""
  images = tokens_to_images(model, data_cfg, tokens)
  rows = -(-len(images) // columns)
  padded = np.zeros((rows * columns, *images.shape[1:]), np.uint8)
  padded[:len(images)] = images
  title = f"{model.entity} entities ({model.entities.num_entities}), step {step}"
  visualization.save_frame_grid(os.path.join(out_dir, f"step_{step:07d}.png"),
                                padded.reshape(rows, columns, *images.shape[1:]), max_videos=rows, title=title)
  return {}


def make_task(config) -> tasks.Task:
  model = tasks.build_model(Model, config.model)
  model.check()
  data_geometry(model, config.data)
  if config.data.name != "latents" and model.num_classes != num_classes(config.data):
    raise ValueError(f"config.model.num_classes={model.num_classes}, but {config.data.name} has "
                     f"{num_classes(config.data)} classes.")
  loss_cfg = dict(config.get("loss", {}))
  check_posterior(loss_cfg.get("posterior", "mean"), config.data)
  sampler = sampler_lib.sampler_kwargs(config.get("sampler", {}))
  conditioned = {k: v for k, v in sampler.items() if k != "num_samples"}
  sampler_lib.check_kwargs(sampler)

  def sample_images(params, rng, labels):
    return sampler_lib.sample(model, params, rng, num_samples=labels.shape[0], labels=labels, **conditioned)

  def init_inputs():
    s = model.seq_len * (2 if model.teacher_forcing else 1)
    return {"x_t": jnp.zeros((1, s, model.token_dim)), "t": jnp.zeros((1, s)), "labels": jnp.zeros((1,), jnp.int32)}

  return tasks.Task(
      model=model,
      init_inputs=init_inputs,
      loss=functools.partial(loss, model, **loss_cfg),
      data=functools.partial(make_data, model, config.data),
      predict_fns={
          "eval_loss": functools.partial(eval_loss, model, **loss_cfg),
          "sample": functools.partial(sampler_lib.sample, model, **sampler),
          "write_samples": functools.partial(write_samples, model, config.data),
          "sample_images": sample_images,
          "to_images": functools.partial(tokens_to_images, model, config.data),
          **({"to_videos": functools.partial(tokens_to_videos, model, config.data),
              "from_videos": functools.partial(videos_to_tokens, model, config.data)}
             if config.data.name in video_sources.NAMES else {}),
      },
  )

