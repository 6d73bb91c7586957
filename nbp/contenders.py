"""The paradigms side by side: what a comparison needs of a trained run, whatever its family.

A `Contender` wraps one trained run and one sampler setting, and gives
experiments/compare.py the same views of every paradigm:

- `generate(rng, labels)`: class-conditional videos, uint8 [B, F, H, W, C];
- `continue_frames(rng, labels, given)`: the first G frames given (uint8
  [B, G, H, W, C]), the rest predicted under the class: uint8 [B, F, H, W, C]
  (token runs: the videos their tokenizer encodes and decodes, G frames
  given as the latent frames that hold them);
- `sequential_calls(given)`: model calls one video waits on, one after the
  other, at sampling (a guided batch of doubled rows counts once);
- `compiled_sampler(batch)`: the whole sampler compiled for a batch, for its
  speed and memory, and `sampler_flops(batch)`: the arithmetic its calls must
  do at least (XLA's count of the uncached forward passes over whole videos
  that it amounts to).

Families: next_block (next-token and next-block prediction, with softmax or
Aaren attention), xar (frames as entities) and ebt (frames as tokens after a
class token, thought into being one after the other).

The training budget is matched by FLOPs as XLA counts them for each compiled
train step (`train_step_flops`), and the size by parameter count
(`num_params`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nbp import roofline
from nbp import tasks
from nbp.data import pipeline
from nbp.data import tokens as tokens_lib
from nbp.data import video_sources
from nbp.evaluators import generation
from nbp.samplers import ebt as ebt_sampler
from nbp.samplers import xar as xar_sampler
from nbp.tasks import next_block
from nbp.training import loop as train
from nbp.training import metrics as metrics_lib
from nbp.training import workdir as workdir_lib


def num_params(config: ml_collections.ConfigDict) -> int:
  """Parameters of `config`'s model (its abstract state: nothing is computed)."""
  s = train.setup(config)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(s.abstract_state.params)))


def train_step_flops(config: ml_collections.ConfigDict) -> float:
  """FLOPs of one training step of `config` (per device), as XLA counts them for the compiled step on a real
  batch of its data."""
  _, flops, _, _ = train.compile_on_data(train.setup(config), config.seed)
  if flops is None:
    raise ValueError(f"XLA gives no FLOP count for the train step of {config.family!r}: no FLOPs matching.")
  return flops


def training_seconds(workdir: str) -> float:
  """Wall seconds of a run's training steps (compilation, evaluations and saves left out), from the step rates
  its metrics.jsonl logged."""
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  seconds, last = 0.0, 0
  for row in rows:
    if row.get("steps_per_sec", 0) > 0:
      seconds += (row["step"] - last) / row["steps_per_sec"]
      last = row["step"]
  return seconds


@dataclasses.dataclass(frozen=True, eq=False)
class Contender:
  """A trained run with one sampler setting (`sampler`: keywords of its family's sampler over the run's own
  config.sampler). Subclasses fill in the family's sampler."""

  config: ml_collections.ConfigDict
  params: Any
  sampler: dict

  @functools.cached_property
  def task(self) -> tasks.Task:
    return tasks.make_task(self.config)

  @property
  def model(self):
    return self.task.model

  @property
  def video_shape(self) -> tuple[int, ...]:
    d = generation.run_video_data(self.config)  # a token run's: its tokenizer's videos
    return (d.num_frames, d.frame_size, d.frame_size, video_sources.num_channels(d))

  def _videos(self, grids) -> np.ndarray:
    return np.asarray(self.task.predict_fn("to_videos")(np.asarray(grids)))

  def _grids(self, videos: np.ndarray):
    return jnp.asarray(self.task.predict_fn("from_videos")(videos))

  def _draw(self, batch: int, given: int):
    """The sampler jitted whole for `batch` videos with `given` frames: fn(params, rng, labels, prompt grids)."""
    raise NotImplementedError

  @functools.cache
  def _jitted(self, batch: int, given: int):
    return jax.jit(self._draw(batch, given))

  def generate(self, rng, labels: np.ndarray) -> np.ndarray:
    """Videos of the classes `labels` int [B]: uint8 [B, F, H, W, C]."""
    labels = jnp.asarray(labels, jnp.int32)
    blank = np.zeros((labels.shape[0], *self.video_shape), np.uint8)
    return self._videos(self._jitted(labels.shape[0], 0)(self.params, rng, labels, self._grids(blank)))

  def continue_frames(self, rng, labels: np.ndarray, given: np.ndarray) -> np.ndarray:
    """given: uint8 [B, G, H, W, C], the first G frames; returns the whole videos with them unchanged (token runs:
    as their tokenizer reconstructs them)."""
    labels = jnp.asarray(labels, jnp.int32)
    g = given.shape[1]
    padded = np.zeros((given.shape[0], *self.video_shape), np.uint8)
    padded[:, :g] = given
    return self._videos(self._jitted(labels.shape[0], g)(self.params, rng, labels, self._grids(padded)))

  def sequential_calls(self, given: int = 0) -> int:
    """Model calls one video waits on, one after the other, at sampling (the guided rows of a call count once)."""
    raise NotImplementedError

  def compiled_sampler(self, batch: int):
    """(the generation sampler compiled for `batch` videos, its arguments)."""
    labels = jnp.arange(batch, dtype=jnp.int32) % self.model.num_classes
    args = (self.params, jax.random.key(0), labels,
            self._grids(np.zeros((batch, *self.video_shape), np.uint8)))
    return self._jitted(batch, 0).lower(*args).compile(), args

  def sampler_flops(self, batch: int) -> float:
    """FLOPs the generation sampler's calls must do at least for `batch` videos (XLA's count of uncached forward
    passes over whole videos, as many as the sampler passes over each token; doubled rows when guided)."""
    raise NotImplementedError

  @property
  def guided(self) -> bool:
    return self._kwargs.get("guidance_scale") is not None


class NextBlock(Contender):
  """Next-token and next-block prediction (nbp.tasks.next_block): one call per drawn block, each token read
  once, so the arithmetic is one forward pass over the video."""

  @functools.cached_property
  def _kwargs(self) -> dict:
    settings = {**self.config.sampler.to_dict(), **self.sampler}
    settings.pop("num_samples", None)
    return next_block.sampler_kwargs(self.model, settings)

  def _grid_frames(self, frames: int) -> int:
    """The grid frames that hold the first `frames` video frames: themselves for pixel runs; for token runs the
    latent frames of a causal tokenizer, 1 + (G - 1) / its time factor."""
    if not frames or self.config.data.name != "tokens":
      return frames
    tokenizer = workdir_lib.read_config(tokens_lib.tokenizer_workdir(self.config.data.token_dir))
    factor = int(tokenizer.model.time_factor)
    if (frames - 1) % factor:
      raise ValueError(f"{frames} given frames: the tokenizer's latent frames hold 1, then {factor} frames each; "
                       f"give 1 + {factor}k frames (the compare config's given_frames).")
    return 1 + (frames - 1) // factor

  def _draw(self, batch: int, given: int):
    given = self._grid_frames(given)

    def sample(params, rng, labels, grids):
      return next_block.sample(self.model, params, rng, num_samples=batch, labels=labels,
                               prompt=grids[:, :given] if given else None, **self._kwargs)
    return sample

  def sequential_calls(self, given: int = 0) -> int:
    f, h, w = self.model.grid
    drawn = f - self._grid_frames(given)
    return drawn * h * w // self.model.block_len  # one per drawn block (the prefill draws the first)

  def sampler_flops(self, batch: int) -> float:
    rows = batch * (2 if self.guided else 1)
    inputs, _ = next_block.next_block_targets(self.model, jnp.zeros((rows, self.model.num_tokens), jnp.int32))
    labels = jnp.zeros((rows,), jnp.int32)
    return roofline.compiled_flops(jax.jit(lambda p, x, c: self.model.apply({"params": p}, x, labels=c)).lower(
        self.params, inputs, labels).compile())


class Xar(Contender):
  """xAR (nbp.samplers.xar) with a frame per entity: each entity integrated by `num_steps` calls (plus one that
  writes its context, except "t_end"), so the arithmetic is that many forward passes over the video."""

  @functools.cached_property
  def _kwargs(self) -> dict:
    settings = {**self.config.sampler.to_dict(), **self.sampler}
    settings.pop("num_samples", None)
    return xar_sampler.sampler_kwargs(settings)

  @property
  def _entities_per_frame(self) -> int:
    return self.model.entities.num_entities // self.config.data.num_frames

  @property
  def _calls_per_entity(self) -> int:
    return self._kwargs.get("num_steps", 40) + (self._kwargs.get("context", "clean") != "t_end")

  def _draw(self, batch: int, given: int):
    def sample(params, rng, labels, grids):
      return xar_sampler.sample(self.model, params, rng, num_samples=batch, labels=labels,
                                prompt=grids if given else None, given_entities=given * self._entities_per_frame,
                                **self._kwargs)
    return sample

  def sequential_calls(self, given: int = 0) -> int:
    drawn = self.model.entities.num_entities - given * self._entities_per_frame
    return drawn * self._calls_per_entity + (1 if given else 0)  # (one call writes the given frames)

  def sampler_flops(self, batch: int) -> float:
    rows = batch * (2 if self.guided else 1)
    s = self.model.seq_len
    compiled = jax.jit(lambda p, x, t, c: self.model.apply({"params": p}, x, t, c)).lower(
        self.params, jnp.zeros((rows, s, self.model.token_dim)), jnp.zeros((rows, s)),
        jnp.zeros((rows,), jnp.int32)).compile()
    return roofline.compiled_flops(compiled) * self._calls_per_entity


class Ebt(Contender):
  """The energy transformer with a class token (nbp.samplers.ebt.generate_frames): each frame thought into
  being by `num_steps` gradient steps on the energy (a forward and a backward pass each), of `best_of` runs."""

  @functools.cached_property
  def _kwargs(self) -> dict:
    keys = ("num_steps", "langevin_sigma", "best_of", "accept_lower", "alpha")
    settings = {**self.config.sampler.to_dict(), **self.sampler}
    return {k: settings[k] for k in keys if k in settings}

  @property
  def guided(self) -> bool:
    return False

  def _grids(self, videos: np.ndarray):
    """uint8 videos [B, F, H, W, 1] -> frames [B, F, H*W] in [-1, 1], requantised as in training."""
    videos = pipeline.requantize(np.asarray(videos), self.config.data.get("levels", 0))
    return jnp.asarray(videos.reshape(*videos.shape[:2], -1).astype(np.float32) / 127.5 - 1.0)

  def _videos(self, grids) -> np.ndarray:
    frames = np.asarray(grids).reshape(-1, *self.video_shape)
    return np.clip(np.round((frames + 1.0) * 127.5), 0, 255).astype(np.uint8)

  def _draw(self, batch: int, given: int):
    def sample(params, rng, labels, frames):
      return ebt_sampler.generate_frames(self.model, params, rng, labels, self.video_shape[0],
                                         prompt=frames[:, :given] if given else None, **self._kwargs)
    return sample

  @property
  def _calls_per_frame(self) -> int:
    steps, best_of = self._kwargs.get("num_steps", 2), self._kwargs.get("best_of", 1)
    per_run = steps * (2 if self._kwargs.get("accept_lower") else 1) + (1 if best_of > 1 else 0)
    return best_of * per_run  # (a best-of run ends with its final energy)

  def sequential_calls(self, given: int = 0) -> int:
    return (self.video_shape[0] - given) * self._calls_per_frame

  def sampler_flops(self, batch: int) -> float:
    """At least the thinking of every frame in one teacher-forced pass: steps x runs gradient calls over the
    whole video (a rollout reads each prefix again; that is the sampler's choice, not the floor)."""
    f, dim = self.video_shape[0], self.model.input_dim
    energy = lambda p, obs, cand, c: jnp.sum(self.model.apply({"params": p}, obs, cand, 0, labels=c))
    compiled = jax.jit(jax.grad(energy, argnums=2)).lower(
        self.params, jnp.zeros((batch, f - 1, dim)), jnp.zeros((batch, f, dim)),
        jnp.zeros((batch,), jnp.int32)).compile()
    return roofline.compiled_flops(compiled) * self._calls_per_frame


FAMILIES = {"next_block": NextBlock, "xar": Xar, "ebt": Ebt}


def load(workdir: str, sampler: dict) -> Contender:
  """The run trained in `workdir` (its newest checkpoint) with the sampler setting `sampler`."""
  config = workdir_lib.read_config(workdir)
  if config.family not in FAMILIES:
    raise ValueError(f"the run in {workdir} is of family {config.family!r}; contenders are of {sorted(FAMILIES)}")
  return FAMILIES[config.family](config, tasks.load_run(workdir).params, dict(sampler))
