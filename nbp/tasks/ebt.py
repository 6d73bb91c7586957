"""EBT on text and on video frames: prediction by optimisation against a learned energy.

Dimension letters: B batch (R replayed rows on top), L positions, V
vocabulary (256 bytes), F values per frame (H * W * channels).

Text: a batch is windows of L + 1 bytes: x = window[:-1] observed, the targets
window[1:]. Every position's candidate starts from N(0, 1) noise over the
vocabulary (or, with the replay buffer, some rows from their stored final
candidates) and takes the recipe's optimisation steps (nbp/samplers/ebt.py);
the loss is the cross-entropy of log_softmax(y) after each step against the
targets: averaged over the steps, or at the last step only.

Video (`config.data.name` moving_digits, ucf101 or video_folder): each frame
is one token, its pixels in [-1, 1] flattened (F values, projected to the
width by the model);
the task is next-frame prediction. With `config.model.num_classes`, a class
token opens the observed stream and every frame is predicted, the first from
the class alone (`config.loss.class_dropout`: the null class in training), so
the model generates videos frame by frame (nbp.samplers.ebt.generate_frames);
frames are requantised to `config.data.levels` grey levels first, as the
token models see them. Candidates start from N(0, 1), are not
normalised, and the loss is the smooth L1 distance to the next frame
(`config.model.input_dim` left 0 is filled with F).

The two recipes are configs (experiments/configs/ebt_text.py):
- System 1: 2 steps with 2 step embeddings, alpha learned in its own
  parameter group, each step detached (its own second-order term), the loss
  averaged over steps, no Langevin noise, no replay;
- System 2: 1 step embedding, alpha fixed and randomised per position in
  [alpha / s, alpha * s], 2-3 steps drawn per batch (`num_steps` to
  `num_steps_max`), Langevin noise, steps not detached but truncated (only
  the last keeps its second-order term), the replay buffer, the loss at the
  last step.

Replay buffer (`replay_size` > 0): a FIFO of whole windows and their final
candidates, part of the train state (Task.init_loss_state), so a resumed run
is bit-identical. Each step appends round(replay_fraction * B) stored rows,
drawn without replacement, which start from their stored candidate; rows
drawn while the buffer holds fewer than that weigh 0. The fresh rows' final
candidates then replace the oldest entries.

Held out (`eval_loss`): teacher-forced, with the sampler's thinking
(`config.sampler`: steps, Langevin noise, best-of-N, accept-lower), no
randomness in alpha or the step count, no replay. Its "nll" is the final
step's cross-entropy in nats per byte; the loss evaluator reports
perplexity = exp(mean nll).
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nbp import decoding
from nbp import tasks
from nbp import visualization
from nbp.data import pipeline
from nbp.data import video_sources
from nbp.models.ebt import EBT
from nbp.samplers import ebt as thinking

Model = EBT
DATASETS = ("text", *video_sources.NAMES)
LOSS_AT = ("mean", "last")


def cross_entropy(y, targets, weights):
  """Weighted mean cross-entropy (nats) of log_softmax(y) [B, L, V] against targets int [B, L]; weights [B]."""
  nll = optax.softmax_cross_entropy_with_integer_labels(y.astype(jnp.float32), targets)  # [B, L]
  per_row = jnp.mean(nll, axis=-1)
  return jnp.sum(per_row * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def smooth_l1(y, targets, weights):
  """Weighted mean smooth L1 (Huber, delta 1) of frames y [B, L, F] against target frames [B, L, F]; weights [B]."""
  per_row = jnp.mean(optax.huber_loss(y.astype(jnp.float32), targets, delta=1.0), axis=(-2, -1))
  return jnp.sum(per_row * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def split_window(model: EBT, batch):
  """(observed [B, L(, F)], targets [B, L(, F)], the whole window) of a batch: bytes or flattened frames. A
  class-conditioned model predicts every frame, the first from the class alone: targets [B, L + 1, F]."""
  if model.continuous:
    video = jnp.asarray(batch["video"], jnp.float32)  # [B, L + 1, H, W, C] in [-1, 1]
    window = video.reshape(*video.shape[:2], -1)  # [B, L + 1, F]
  else:
    window = batch["tokens"]  # [B, L + 1]
  return window[:, :-1], window if model.num_classes else window[:, 1:], window


def prediction_loss(model: EBT, y, targets, weights):
  """The loss of finished candidates: cross-entropy (text) or smooth L1 (frames)."""
  return smooth_l1(y, targets, weights) if model.continuous else cross_entropy(y, targets, weights)


# ---------------------------------------------------------------------------
# The replay buffer.


def init_replay(size: int, seq_len: int, candidate_dim: int, *, continuous: bool = False) -> dict:
  """An empty buffer of `size` windows ([size, L + 1] bytes or [size, L + 1, F] frames) and final candidates."""
  window = (size, seq_len + 1, candidate_dim) if continuous else (size, seq_len + 1)
  return {"windows": jnp.zeros(window, jnp.float32 if continuous else jnp.int32),
          "candidates": jnp.zeros((size, seq_len, candidate_dim), jnp.float32),
          "count": jnp.zeros((), jnp.int32),  # entries filled (at most size)
          "next": jnp.zeros((), jnp.int32)}  # the slot the next entry overwrites (the oldest once full)


def draw_replay(buffer: dict, rng, num: int):
  """`num` stored (windows, candidates, weights): distinct filled entries first; weight 0 past the filled ones."""
  size = buffer["windows"].shape[0]
  keys = jax.random.uniform(rng, (size,))
  keys = jnp.where(jnp.arange(size) < buffer["count"], keys, 2.0)  # unfilled slots sort last
  chosen = jnp.argsort(keys)[:num]
  weights = (jnp.arange(num) < buffer["count"]).astype(jnp.float32)
  return buffer["windows"][chosen], buffer["candidates"][chosen], weights


def push_replay(buffer: dict, windows, candidates) -> dict:
  """The buffer with `windows` [B, L + 1] and `candidates` [B, L, V] written over its oldest entries."""
  size = buffer["windows"].shape[0]
  slots = (buffer["next"] + jnp.arange(windows.shape[0])) % size
  return {"windows": buffer["windows"].at[slots].set(windows),
          "candidates": buffer["candidates"].at[slots].set(jax.lax.stop_gradient(candidates).astype(jnp.float32)),
          "count": jnp.minimum(buffer["count"] + windows.shape[0], size),
          "next": (buffer["next"] + windows.shape[0]) % size}


# ---------------------------------------------------------------------------
# The loss.


def loss(model: EBT, params, batch, rng, loss_state=None, *, num_steps: int = 2, num_steps_max: int = 0,
         alpha_scale: float = 1.0, langevin_sigma: float = 0.0, detach: bool = True, truncate: bool = False,
         loss_at: str = "mean", replay_size: int = 0, replay_fraction: float = 0.5, class_dropout: float = 0.0):
  """The training loss of one recipe (module docstring); with a replay buffer, also its new state.

  num_steps_max > num_steps draws the step count per batch uniformly in
  [num_steps, num_steps_max] (each count is its own compiled branch).
  class_dropout: a class-conditioned model sees the null class with this
  probability (the unconditional model of the same weights).
  """
  del replay_size  # the buffer's size: make_task builds it (Task.init_loss_state)
  if loss_at not in LOSS_AT:
    raise ValueError(f"config.loss.loss_at={loss_at!r}: expected one of {LOSS_AT}")
  _, _, windows = split_window(model, batch)  # [B, L + 1(, F)]
  b = windows.shape[0]
  noise_rng, alpha_rng, think_rng, replay_rng, count_rng = jax.random.split(rng, 5)
  weights = jnp.ones((b,), jnp.float32)
  labels = None
  if model.num_classes:
    labels = decoding.drop_condition(jax.random.fold_in(rng, 7), batch["class"], class_dropout, model.num_classes)
  predicted = windows.shape[1] - (0 if model.num_classes else 1)
  y0 = jax.random.normal(noise_rng, (b, predicted, model.candidate_dim))
  if loss_state is not None:
    num = max(1, round(replay_fraction * b))
    old_windows, old_candidates, old_weights = draw_replay(loss_state, replay_rng, num)
    windows = jnp.concatenate([windows, old_windows])
    y0 = jnp.concatenate([y0, old_candidates])
    weights = jnp.concatenate([weights, old_weights])
  observed, targets = windows[:, :-1], windows[:, windows.shape[1] - predicted:]
  alpha = thinking.randomized_alpha(alpha_rng, thinking.step_size(model, params), (*targets.shape[:2], 1),
                                    alpha_scale)
  energy = thinking.model_energy(model, params, observed, labels)

  def run(steps: int):
    thought = thinking.think(model, energy, y0, num_steps=steps, alpha=alpha, rng=think_rng,
                             langevin_sigma=langevin_sigma, detach=detach, truncate=truncate)
    losses = [prediction_loss(model, y, targets, weights) for y in thought.ys]
    value = jnp.mean(jnp.stack(losses)) if loss_at == "mean" else losses[-1]
    metrics = {"initial_step_loss": losses[0], "final_step_loss": losses[-1],
               "energy_gap": jnp.mean(thought.energies[0] - thought.energies[-1])}
    return value, metrics, thought.ys[-1]

  counts = list(range(num_steps, max(num_steps, num_steps_max) + 1))
  if len(counts) == 1:
    value, metrics, final = run(num_steps)
  else:
    which = jax.random.randint(count_rng, (), 0, len(counts))
    value, metrics, final = jax.lax.switch(which, [functools.partial(run, n) for n in counts])
    metrics["num_steps"] = jnp.asarray(counts, jnp.float32)[which]
  metrics = dict(metrics, alpha=thinking.step_size(model, params))  # perplexity: the eval (exp of a mean nll)
  if loss_state is None:
    return value, metrics
  return value, metrics, push_replay(loss_state, windows[:b], final[:b])


def eval_loss(model: EBT, params, batch, rng, *, num_steps: int = 2, langevin_sigma: float = 0.0,
              best_of: int = 1, accept_lower: bool = False, alpha: float | None = None, attention_impl: str = ""):
  """Teacher-forced held-out cross-entropy of the final candidates under the given thinking (module docstring)."""
  model = with_impl(model, attention_impl)
  observed, targets, _ = split_window(model, batch)
  energy = thinking.model_energy(model, params, observed, batch["class"] if model.num_classes else None)
  y, e = thinking.think_best_of(model, energy, rng, (*targets.shape[:2], model.candidate_dim), best_of=best_of,
                                num_steps=num_steps, alpha=thinking.step_size(model, params, alpha),
                                langevin_sigma=langevin_sigma, accept_lower=accept_lower)
  ones = jnp.ones((targets.shape[0],), jnp.float32)
  if model.continuous:
    value = smooth_l1(y, targets, ones)
    return value, {"mse": jnp.mean((y - targets) ** 2), "final_energy": jnp.mean(e)}
  nll = cross_entropy(y, targets, ones)
  accuracy = jnp.mean((jnp.argmax(y, axis=-1) == targets).astype(jnp.float32))
  return nll, {"nll": nll, "accuracy": accuracy, "final_energy": jnp.mean(e)}


# ---------------------------------------------------------------------------
# Sampling: text continued from validation prompts, frames predicted from validation videos.


def with_impl(model: EBT, attention_impl: str) -> EBT:
  """The model with the observed stream's attention replaced (inference differentiates once: kernels may serve)."""
  return model.clone(attention_impl=attention_impl) if attention_impl else model


def sample(model: EBT, params, rng, *, num_samples: int = 4, prompt_len: int = 32, num_new: int = 64,
           num_steps: int = 2, langevin_sigma: float = 0.0, best_of: int = 1, accept_lower: bool = False,
           alpha: float | None = None, temperature: float = 0.0, attention_impl: str = "", prompt=None):
  """Tokens [num_samples, prompt_len + num_new]: `prompt` [>= num_samples, >= prompt_len] continued by cached
  generation (zeros when None)."""
  if prompt is None:
    prompt = jnp.zeros((num_samples, prompt_len), jnp.int32)
  model = with_impl(model, attention_impl)
  return thinking.generate(model, params, rng, prompt[:num_samples, :prompt_len], num_new, num_steps=num_steps,
                           alpha=alpha, langevin_sigma=langevin_sigma, best_of=best_of,
                           accept_lower=accept_lower, temperature=temperature)


def write_samples(tokens, out_dir: str, step: int) -> dict[str, float]:
  with open(os.path.join(out_dir, f"step_{step:07d}.txt"), "w") as f:
    for row in np.asarray(tokens):
      f.write(bytes(np.clip(row, 0, 255).astype(np.uint8)).decode("utf-8", errors="replace") + "\n---\n")
  return {}


def predict_frames(model: EBT, params, rng, videos, *, num_steps: int = 2, langevin_sigma: float = 0.0,
                   best_of: int = 1, accept_lower: bool = False, alpha: float | None = None, attention_impl: str = ""):
  """Next-frame predictions, teacher-forced: videos float [B, L + 1, H, W, C] in [-1, 1] -> the same shape,
  frame 0 given and frame i + 1 predicted from frames 0..i."""
  if model.num_classes:
    raise ValueError("predict_frames is for unconditioned frame models; a class-conditioned one generates "
                     "(nbp.samplers.ebt.generate_frames, with the given frames as its prompt)")
  model = with_impl(model, attention_impl)
  observed, targets, _ = split_window(model, {"video": videos})
  energy = thinking.model_energy(model, params, observed)
  y, _ = thinking.think_best_of(model, energy, rng, targets.shape, best_of=best_of, num_steps=num_steps,
                                alpha=thinking.step_size(model, params, alpha), langevin_sigma=langevin_sigma,
                                accept_lower=accept_lower)
  frames = jnp.concatenate([videos[:, :1], y.reshape(videos[:, 1:].shape)], axis=1)
  return jnp.clip(frames, -1.0, 1.0)


# ---------------------------------------------------------------------------
# Data and the task.


def make_data(seq_len: int, data_cfg, split: str, *, seed: int, process_index: int, process_count: int,
              batch_size: int):
  """A checkpointable grain iterator of byte windows {"tokens": int32 [b, seq_len + 1]} (text) or of videos
  {"video": float32 [b, F, H, W, C] in [-1, 1], "class"} (videos)."""
  if data_cfg.name in video_sources.NAMES:
    levels = data_cfg.get("levels", 0)

    def frames_and_class(example):  # requantised as the token models see them (0: raw), then in [-1, 1]
      video = pipeline.requantize(np.asarray(example["video"]), levels).astype(np.float32) / 127.5 - 1.0
      return {"video": video, "class": pipeline.label_class(np.reshape(example["label"], -1))}

    return pipeline.make_iterator(
        video_sources.video_source(data_cfg, split), global_batch_size=batch_size * process_count, seed=seed,
        shuffle=True, transforms=(frames_and_class,), process_index=process_index, process_count=process_count,
        worker_count=data_cfg.worker_count)
  fraction, validation_seed = pipeline.validation_keys(data_cfg)
  source = pipeline.text_bytes_source(split, seq_len, validation_fraction=fraction, validation_seed=validation_seed)
  return pipeline.make_iterator(
      source, global_batch_size=batch_size * process_count, seed=seed, shuffle=True, transforms=(),
      process_index=process_index, process_count=process_count, worker_count=data_cfg.worker_count)


@functools.cache
def _validation_windows(data_json: str, seq_len: int, num: int) -> np.ndarray:
  """The first `num` validation byte windows [num, seq_len + 1] (the split's order)."""
  data_cfg = ml_collections.ConfigDict(json.loads(data_json))
  fraction, validation_seed = pipeline.validation_keys(data_cfg)
  source = pipeline.text_bytes_source("validation", seq_len, validation_fraction=fraction,
                                      validation_seed=validation_seed)
  return np.stack([source[i]["tokens"] for i in range(num)])


def _param_labels(params):
  """"alpha" for the learned step size (its own optimizer group), "model" for everything else."""
  return {k: jax.tree.map(lambda _: "alpha" if k == "alpha" else "model", v) for k, v in params.items()}


def frame_values(data_cfg) -> int:
  """F: the values of one frame of a video data config (its pixels times channels)."""
  return int(data_cfg.frame_size) ** 2 * video_sources.num_channels(data_cfg)


def check_data(model: EBT, data_cfg) -> int:
  """The observed length L of the data (bytes per window, or frames - 1); a ValueError names a mismatch."""
  if data_cfg.name in video_sources.NAMES:
    if not model.continuous:
      raise ValueError(f"config.model.vocab_size={model.vocab_size}: video frames are continuous candidates; "
                       "set vocab_size 0")
    pixels = frame_values(data_cfg)
    if model.input_dim != pixels:
      raise ValueError(f"config.model.input_dim={model.input_dim}: frames of {data_cfg.frame_size}x"
                       f"{data_cfg.frame_size}x{video_sources.num_channels(data_cfg)} have {pixels} values (leave 0 "
                       "to fill it)")
    return int(data_cfg.num_frames) - 1
  if model.vocab_size != 256:
    raise ValueError(f"config.model.vocab_size={model.vocab_size}: text is bytes, set 256")
  seq_len = int(data_cfg.get("seq_len", 0))
  if seq_len < 1:
    raise ValueError(f"config.data.seq_len={seq_len}: the observed bytes per window must be >= 1")
  return seq_len


def make_task(config) -> tasks.Task:
  model = tasks.build_model(Model, config.model)
  if config.data.name in video_sources.NAMES and model.input_dim == 0:
    model = model.clone(input_dim=frame_values(config.data))
  model.check()
  seq_len = check_data(model, config.data)
  loss_cfg = dict(config.get("loss", {}))
  if model.attention_impl != "xla":
    raise ValueError(f"config.model.attention_impl={model.attention_impl!r}: training differentiates through "
                     "dE/dp, a second-order gradient, and only the 'xla' attention is twice differentiable "
                     "(the Pallas kernels' custom VJPs are not); set 'xla'. Thinking at inference "
                     "differentiates once: config.sampler.attention_impl may name a kernel")
  thinking.check_alpha_group(model, config)
  if model.num_classes and (config.data.name not in video_sources.NAMES or int(loss_cfg.get("replay_size", 0))):
    raise ValueError(f"config.model.num_classes={model.num_classes}: class-conditioned EBT models videos "
                     "(config.data.name) without a replay buffer (config.loss.replay_size 0)")
  if model.num_classes and model.num_classes != video_sources.num_classes(config.data):
    raise ValueError(f"config.model.num_classes={model.num_classes}, but the videos of config.data.name="
                     f"{config.data.name!r} have {video_sources.num_classes(config.data)} classes")
  sampler = dict(config.get("sampler", {}))
  think_keys = ("num_steps", "langevin_sigma", "best_of", "accept_lower", "alpha", "attention_impl")
  think_kwargs = {k: sampler[k] for k in think_keys if k in sampler}
  replay_size = int(loss_cfg.get("replay_size", 0))
  num_samples = sampler.get("num_samples", 4)

  def sample_fn(params, rng):
    """Validation examples continued: text from their first bytes, frames predicted one by one (the examples
    are a trace-time constant)."""
    if model.num_classes:  # two of each class while they last, generated frame by frame
      labels = jnp.arange(num_samples, dtype=jnp.int32) % model.num_classes
      frames = thinking.generate_frames(model, params, rng, labels, int(config.data.num_frames),
                                        **{k: v for k, v in think_kwargs.items() if k != "attention_impl"})
      return jnp.clip(frames, -1.0, 1.0).reshape(num_samples, config.data.num_frames, config.data.frame_size,
                                                config.data.frame_size, video_sources.num_channels(config.data))
    if model.continuous:
      videos = jnp.asarray(video_sources.first_videos(config.data.to_json(), num_samples))
      return predict_frames(model, params, rng, videos, **think_kwargs)
    prompts = jnp.asarray(_validation_windows(config.data.to_json(), seq_len, num_samples))
    return sample(model, params, rng, prompt=prompts, **sampler)

  def init_inputs():
    observed = jnp.zeros((1, 4, model.input_dim)) if model.continuous else jnp.zeros((1, 4), jnp.int32)
    inputs = {"observed": observed, "candidates": jnp.zeros((1, 4 + bool(model.num_classes), model.candidate_dim))}
    return dict(inputs, labels=jnp.zeros((1,), jnp.int32)) if model.num_classes else inputs

  def init_loss_state():
    return init_replay(replay_size, seq_len, model.candidate_dim, continuous=model.continuous)

  return tasks.Task(
      model=model,
      init_inputs=init_inputs,
      loss=functools.partial(loss, model, **loss_cfg),
      data=functools.partial(make_data, seq_len, config.data),
      param_labels=_param_labels if model.learn_alpha else None,
      init_loss_state=init_loss_state if replay_size else None,
      predict_fns={
          "eval_loss": functools.partial(eval_loss, model, **think_kwargs),
          "sample": sample_fn,
          "write_samples": visualization.save_predicted_frames if model.continuous else write_samples,
      },
  )
