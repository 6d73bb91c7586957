"""Next-frame regression: a causal transformer that predicts each next frame directly (EBT's video baseline).

Dimension letters: B batch, L + 1 frames, F values per frame (H * W * C).

The network is nbp.models.sequence.SequenceModel reading the flattened frames
x [B, L + 1, F] (pixels in [-1, 1]) and giving one output per frame; output i
is the prediction of frame i + 1, and the loss is its smooth L1 distance to
that frame, the loss EBT's video recipe optimises its candidates under
(nbp/tasks/ebt.py). `config.model.input_dim` and `output_dim` left 0 are
filled with F.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import optax

from nbp import tasks
from nbp import visualization
from nbp.data import video_sources
from nbp.models import sequence
from nbp.models.sequence import SequenceModel as Model

DATASETS = ("moving_digits",)


def _frames(batch):
  video = jnp.asarray(batch["video"], jnp.float32)  # [B, L + 1, H, W, C]
  return video.reshape(*video.shape[:2], -1)  # [B, L + 1, F]


def loss(model: Model, params, batch, rng):
  """Smooth L1 (Huber, delta 1) of each predicted next frame; the MSE beside it."""
  del rng
  frames = _frames(batch)
  y = model.apply({"params": params}, frames[:, :-1])  # [B, L, F]
  targets = frames[:, 1:]
  value = jnp.mean(optax.huber_loss(y, targets, delta=1.0))
  return value, {"mse": jnp.mean((y - targets) ** 2)}


def predict_frames(model: Model, params, videos):
  """videos [B, L + 1, H, W, C] -> the same shape: frame 0 given, frame i + 1 predicted from frames 0..i."""
  frames = videos.reshape(*videos.shape[:2], -1)
  y = model.apply({"params": params}, frames[:, :-1])
  return jnp.clip(jnp.concatenate([videos[:, :1], y.reshape(videos[:, 1:].shape)], axis=1), -1.0, 1.0)


def sample(model: Model, params, rng, *, num_samples: int = 8, videos=None):
  """Next-frame predictions of the first `num_samples` of `videos` (the task passes validation videos)."""
  del rng
  return predict_frames(model, params, videos[:num_samples])


def make_task(config) -> tasks.Task:
  d = config.data
  pixels = int(d.frame_size) ** 2 * video_sources.num_channels(d)
  model = tasks.build_model(Model, config.model)
  model = sequence.with_data_sizes(model, input_dim=pixels, output_dim=pixels, data=f"frames of {d.frame_size}x"
                                   f"{d.frame_size}")
  model.check()
  num_samples = config.get("sampler", {}).get("num_samples", 8)

  def sample_fn(params, rng):
    videos = jnp.asarray(video_sources.first_videos(d.to_json(), num_samples))
    return sample(model, params, rng, num_samples=num_samples, videos=videos)

  def data(split, **kwargs):
    return video_sources.video_iterator(d, split, **kwargs)

  return tasks.Task(
      model=model,
      init_inputs=lambda: {"x": jnp.zeros((1, int(d.num_frames) - 1, pixels))},
      loss=functools.partial(loss, model),
      data=data,
      predict_fns={"sample": sample_fn, "write_samples": visualization.save_predicted_frames},
  )
