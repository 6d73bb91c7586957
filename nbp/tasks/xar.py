"""xAR as a task: flow matching per entity with noisy context, the entity-by-entity sampler, data and images.

The network is nbp.models.xar (`config.model` is its fields).

Tokens. An image becomes a token grid [h, w, C] (h, w = `config.model.grid`):
  pixels   (`config.data.name` digits or imagenet2012): scaled to [-1, 1] and
           cut into p x p patches, p = image_size / h, C = p*p*channels;
  latents  (`config.data.name` latents, nbp.data.latents): a KL VAE's scaled
           latents, one per token (C = latent channels).
The patch size is what the data's side and the model's grid imply (latents:
one latent per token); the token_dim must match, and a mismatch names both
keys.

Flow matching (the loss). For the grid's entity sequence x [B, S, C], every
entity of every sample draws its own t ~ logit-normal(t_mean, t_std) and its
own noise eps: x_t = (1 - t) x + t eps, and the network's outputs at entity
i regress its velocity eps_i - x_i (plain MSE over every token and channel).
Noisy Context Learning is exactly this: the context an entity sees is the
other entities at their own noise levels, in one pass. With
`config.model.teacher_forcing` the network sees the clean sequence first and
the loss is over the noisy copy (nbp.models.xar). Class dropout
(`config.loss.class_dropout`) replaces the label by the null class.

Sampling (`sample`), jitted whole. Entity by entity: the entity starts as
noise at t = 1 and is integrated to t = 0 by Euler (ODE) or Euler-Maruyama
(SDE) steps, at the times of `solver_times` (uniform from 1 to t_end, then
one step without noise to 0), each step one model call on that entity over
the KV cache of the finished ones. Guidance runs the conditional and
null-class rows as one doubled batch; its scale grows linearly across the AR
steps (`guidance_scale_at`). Times are embedded continuously (t * 1000, not
floored to an integer as the official code does).

What the cache holds. The official code writes each finished entity into the
cache clean, at t = 0: a context the noisy-context model never saw in
training (its context is always noisy). Here the cache keeps the keys and
values of the entity's last solver call, the state at t = t_end with its t
embedding: a noisy context of the kind training drew, and it costs no extra
model call. A teacher-forced model was trained on clean context, so its
sampler writes the clean entity (one more call at t = 0), as it was trained.
`use_cache=False` runs the same sampler by full forward passes over the whole
sequence (later slots hold zeros and, the mask being causal across entities,
change nothing): the reference the cached sampler is tested against.

Dimensions: B batch, S slots, C token channels, K entities, L tokens of one
entity, N solver steps, h/w the token grid, H/W the image.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from layers import attention as attention_lib
from nbp import decoding
from nbp import tasks
from nbp import visualization
from nbp.data import images as images_lib
from nbp.data import latents as latents_lib
from nbp.data import pipeline
from nbp.models.xar import XAR as Model
from nbp.tasks import kl_vae
from nbp.tasks import next_block

DATASETS = ("digits", "imagenet2012", "latents")
SOLVERS = ("sde", "ode")


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


# ---------------------------------------------------------------------------
# Flow matching with noisy context.


def logit_normal(rng, shape, mean: float, std: float) -> jax.Array:
  """t = sigmoid(mean + std * n), n ~ N(0, 1): a time in (0, 1) per entry."""
  return jax.nn.sigmoid(mean + std * jax.random.normal(rng, shape))


def flow_matching_loss(model: Model, params, x, t_entity, eps, labels):
  """MSE of the velocity at per-entity times: x, eps [B, S, C], t_entity [B, K], labels [B] -> (loss, v, target)."""
  t = t_entity[:, model.entities.entity_of_slot()]  # [B, S]
  x_t = (1.0 - t[..., None]) * x + t[..., None] * eps
  target = eps - x
  if model.teacher_forcing:  # the clean copy at t = 0, then the noisy one; velocities of the noisy copy
    inputs, times = jnp.concatenate([x, x_t], axis=1), jnp.concatenate([jnp.zeros_like(t), t], axis=1)
    v = model.apply({"params": params}, inputs, times, labels)[:, model.seq_len:]
  else:
    v = model.apply({"params": params}, x_t, t, labels)
  return jnp.mean(jnp.square(v - target)), v, target


def loss(model: Model, params, batch, rng, *, class_dropout: float = 0.1, t_mean: float = 0.0, t_std: float = 1.0):
  """Flow-matching MSE with an independent logit-normal t and noise per entity; per-entity-position losses.

  class_dropout: probability of the null class (guidance). t_mean, t_std: the
  logit-normal's location and scale.
  """
  ents = model.entities
  grid = batch["tokens"] if "tokens" in batch else batch["latent"]  # pixel patches or scaled latents
  x = ents.decompose(grid.astype(jnp.float32))  # [B, S, C]
  b = x.shape[0]
  key_t, key_eps, key_drop = jax.random.split(rng, 3)
  t_entity = logit_normal(key_t, (b, ents.num_entities), t_mean, t_std)  # [B, K]
  eps = jax.random.normal(key_eps, x.shape)
  labels = next_block.drop_condition(key_drop, batch["class"], class_dropout, model.num_classes)
  value, v, target = flow_matching_loss(model, params, x, t_entity, eps, labels)
  metrics = {"num_targets": jnp.asarray(x.size, jnp.float32)}
  per_entity = jnp.mean(jnp.square(v - target), axis=(0, 2))  # [S]
  first, last = ents.sizes[0], ents.sizes[-1]
  metrics["mse_first_entity"] = jnp.mean(per_entity[:first])
  metrics["mse_last_entity"] = jnp.mean(per_entity[-last:])
  return value, metrics


# ---------------------------------------------------------------------------
# Sampling.


def solver_times(num_steps: int, t_end: float) -> np.ndarray:
  """float32 [N + 1]: N times uniform from 1 down to t_end, then 0 (the final deterministic step's end)."""
  if num_steps < 1 or not 0.0 < t_end < 1.0:
    raise ValueError(f"config.sampler.num_steps={num_steps} must be >= 1 and t_end={t_end} in (0, 1)")
  return np.append(np.linspace(1.0, t_end, num_steps), 0.0).astype(np.float32)


def guidance_scale_at(k, num_entities: int, guidance_scale: float, schedule: str):
  """The guidance scale of AR step k of K.

  "linear": 1 + (scale - 1) k / (K - 1), from no guidance on the first entity
  to the full scale on the last (the official schedule; one entity: the
  scale); "constant": the scale throughout.
  """
  if schedule not in ("linear", "constant"):
    raise ValueError(f"config.sampler.guidance_schedule={schedule!r}: choose 'linear' or 'constant'")
  if schedule == "constant" or num_entities == 1:
    return guidance_scale
  return 1.0 + (guidance_scale - 1.0) * k / (num_entities - 1)


def solver_step(x, v, t, t_next, noise, *, solver: str, noise_scale: float = 1.0):
  """One step from t to t_next < t given the velocity v at (x, t); noise None: no noise (the final step).

  ODE (Euler): x + (t_next - t) v. SDE (Euler-Maruyama) of the reverse-time
  SDE with the flow's marginals and diffusion w(t) = 2t: with the score
  -(x + (1 - t) v) / t, the drift v - (w/2) score is (2 - t) v + x, and the
  noise sqrt(w (t - t_next)) * noise_scale * noise. The final step from
  t_end to 0 is the same drift without noise (as the official sampler does).
  """
  dt = t_next - t  # negative
  if solver == "ode":
    return x + dt * v
  drift = (2.0 - t) * v + x
  x = x + dt * drift
  if noise is None:
    return x
  return x + jnp.sqrt(2.0 * t * -dt) * noise_scale * noise


def sample(model: Model, params, rng, *, num_samples: int = 8, labels: jax.Array | None = None,
           num_steps: int = 40, solver: str = "sde", t_end: float = 0.04, noise_scale: float = 1.0,
           guidance_scale: float | None = None, guidance_schedule: str = "linear", use_cache: bool = True,
           cache_phases: int = 2) -> jax.Array:
  """Draws `num_samples` token grids [B, h, w, C] entity by entity (module docstring); jit it whole.

  labels: int [B] classes (default 0, 1, 2, ... mod num_classes).
  num_steps: solver steps (model calls) per entity; t_end: where the last
    stochastic step ends before the final deterministic one.
  solver: "sde" (Euler-Maruyama) or "ode" (Euler); noise_scale scales the SDE's noise.
  guidance_scale: None for the conditional model alone; a number runs the doubled
    batch with the scale growing linearly over the entities (guidance_schedule
    "linear"; "constant" keeps it).
  use_cache: False runs full forward passes instead of the KV cache (the reference).
  Entity k starts from the noise normal(fold_in(rng, k)); its solver step j
  draws fold_in(fold_in(rng, k), j + 1).
  """
  if solver not in SOLVERS:
    raise ValueError(f"config.sampler.solver={solver!r}: choose one of {SOLVERS}")
  ents = model.entities
  b, c, s = num_samples, model.token_dim, model.seq_len
  guided = guidance_scale is not None
  rows = 2 * b if guided else b
  labels = jnp.arange(b, dtype=jnp.int32) % model.num_classes if labels is None else labels
  row_labels = jnp.concatenate([labels, jnp.full((b,), model.num_classes, jnp.int32)]) if guided else labels
  times = jnp.asarray(solver_times(num_steps, t_end))
  context_t = 0.0 if model.teacher_forcing else float(solver_times(num_steps, t_end)[-2])

  def velocity(state, x, t, start):
    """v [rows, L, C] of the current entity x [B, L, C] at slots start..; the state with its keys written."""
    length = x.shape[1]
    inputs = jnp.concatenate([x, x]) if guided else x  # [rows, L, C]
    t_tokens = jnp.full((rows, length), t, jnp.float32)
    if use_cache:
      cache = attention_lib.set_cache_index(state, start)
      slots = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (rows, length))
      v, state = decoding.apply_decoding(model, params, cache, inputs, t_tokens, row_labels, slots=slots)
    else:  # the whole sequence: the context so far, this entity at its slots, zeros after
      seq_x, seq_t = state
      seq_x = jax.lax.dynamic_update_slice(seq_x, inputs, (0, start, 0))
      seq_t = jax.lax.dynamic_update_slice(seq_t, t_tokens, (0, start))
      v = jax.lax.dynamic_slice_in_dim(model.apply({"params": params}, seq_x, seq_t, row_labels), start, length, 1)
    return v, state

  def entity_step(k, start, length, state, out):
    """Integrates entity k (slots start..start+L-1) from noise to t = 0; writes it into the context and `out`."""
    key = jax.random.fold_in(rng, k)
    scale = guidance_scale_at(k, ents.num_entities, guidance_scale, guidance_schedule) if guided else None

    def guided_velocity(state, x, t):
      v, state = velocity(state, x, t, start)
      return (decoding.guide(v, scale) if guided else v), state

    def step(j, carry):
      x, state = carry
      v, state = guided_velocity(state, x, times[j])
      noise = jax.random.normal(jax.random.fold_in(key, j + 1), x.shape)
      return solver_step(x, v, times[j], times[j + 1], noise, solver=solver, noise_scale=noise_scale), state

    x = jax.random.normal(key, (b, length, c))
    x, state = jax.lax.fori_loop(0, num_steps - 1, step, (x, state))
    last_input = x  # the state the last call sees: the noisy context the cache keeps
    v, state = guided_velocity(state, x, times[num_steps - 1])
    x = solver_step(x, v, times[num_steps - 1], 0.0, None, solver=solver)  # the final deterministic step
    context = x if model.teacher_forcing else last_input
    context = jnp.concatenate([context, context]) if guided else context
    if use_cache and model.teacher_forcing:  # the clean entity's keys, as training saw them
      _, state = velocity(state, x, 0.0, start)
    elif not use_cache:
      seq_x, seq_t = state
      state = (jax.lax.dynamic_update_slice(seq_x, context, (0, start, 0)),
               jax.lax.dynamic_update_slice(seq_t, jnp.full((rows, length), context_t, jnp.float32), (0, start)))
    return state, jax.lax.dynamic_update_slice(out, x, (0, start, 0))

  out = jnp.zeros((b, s, c), jnp.float32)
  if use_cache:
    state = decoding.init_cache(model, ents.sizes[0], jnp.zeros((rows, 1, c)), jnp.zeros((rows, 1)), row_labels)
  else:
    state = (jnp.zeros((rows, s, c), jnp.float32), jnp.zeros((rows, s), jnp.float32))
  if ents.uniform:
    length = ents.sizes[0]

    def ar_step(k, state, out):
      return entity_step(k, k * length, length, state, out)

    if use_cache:
      state, out = decoding.decode_in_phases(ar_step, state, out, 0, ents.num_entities,
                                             cache_len=lambda k1: k1 * length, phases=cache_phases)
    else:
      state, out = jax.lax.fori_loop(0, ents.num_entities, lambda k, so: ar_step(k, *so), (state, out))
  else:  # entities of several sizes (scales): one traced step per entity, the cache grown to each one's end
    for k, (start, length) in enumerate(zip(ents.starts.tolist(), ents.sizes)):
      if use_cache:
        state = attention_lib.resize_cache(state, start + length)
      state, out = entity_step(k, start, length, state, out)
  return ents.reconstruct(out)


def sampler_kwargs(sampler_cfg) -> dict:
  """`sample`'s keywords from `config.sampler`; guidance scale 1 means no guidance (the same velocities)."""
  kwargs = dict(sampler_cfg)
  if kwargs.get("guidance_scale") == 1.0:
    kwargs["guidance_scale"] = None
  return kwargs


# ---------------------------------------------------------------------------
# Data and images.


def make_data(model: Model, data_cfg, split: str, *, seed: int, process_index: int, process_count: int,
              batch_size: int):
  """A checkpointable grain iterator of {"tokens" (pixels) or "latent": float32 [b, h, w, C], "class": int32 [b]}."""
  patch, _ = data_geometry(model, data_cfg)
  if data_cfg.name == "latents":
    return latents_lib.latent_iterator(
        data_cfg.latent_dir, split, seed=seed, process_index=process_index, process_count=process_count,
        batch_size=batch_size, worker_count=data_cfg.worker_count)
  source = images_lib.image_source(data_cfg, split)

  def to_tokens(example):
    pixels = example["image"].astype(np.float32) / 127.5 - 1.0  # [H, W, c] in [-1, 1]
    return {"tokens": patchify(pixels, patch), "class": np.int32(example["label"])}

  return pipeline.make_iterator(
      source, global_batch_size=batch_size * process_count, seed=seed, shuffle=True, transforms=(to_tokens,),
      process_index=process_index, process_count=process_count, worker_count=data_cfg.worker_count)


@functools.cache
def _vae(latent_dir: str):
  """(jitted decode of unscaled latents, params, scaling factor) of the VAE that wrote `latent_dir`."""
  metadata = latents_lib.read_metadata(latent_dir)
  vae, params = kl_vae.load_vae(metadata["vae_workdir"])
  decode = jax.jit(functools.partial(kl_vae.decode_latents, vae))
  return decode, params, float(metadata["scaling_factor"])


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
  if config.data.name != "latents" and model.num_classes != images_lib.num_classes(config.data):
    raise ValueError(f"config.model.num_classes={model.num_classes}, but {config.data.name} has "
                     f"{images_lib.num_classes(config.data)} classes.")
  sampler = sampler_kwargs(config.get("sampler", {}))
  conditioned = {k: v for k, v in sampler.items() if k != "num_samples"}

  def sample_images(params, rng, labels):
    return sample(model, params, rng, num_samples=labels.shape[0], labels=labels, **conditioned)

  def init_inputs():
    s = model.seq_len * (2 if model.teacher_forcing else 1)
    return {"x_t": jnp.zeros((1, s, model.token_dim)), "t": jnp.zeros((1, s)), "labels": jnp.zeros((1,), jnp.int32)}

  return tasks.Task(
      model=model,
      init_inputs=init_inputs,
      loss=functools.partial(loss, model, **config.get("loss", {})),
      evaluate=functools.partial(loss, model, class_dropout=0.0,
                                 **{k: v for k, v in config.get("loss", {}).items() if k != "class_dropout"}),
      data=functools.partial(make_data, model, config.data),
      sample=functools.partial(sample, model, **sampler),
      write_samples=functools.partial(write_samples, model, config.data),
      sample_images=sample_images,
      to_images=functools.partial(tokens_to_images, model, config.data),
  )
