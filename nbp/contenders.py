"""The paradigms side by side: what a comparison needs of a trained run, whatever its family.

A `Contender` wraps one trained run and one sampler setting, and gives
experiments/compare.py the same views of every paradigm:

- `generate(rng, labels)`: class-conditional videos, uint8 [B, F, H, W, 1];
- `continue_frames(rng, labels, given)`: the first G frames given (uint8
  [B, G, H, W, 1]), the rest predicted under the class: uint8 [B, F, H, W, 1];
- `sequential_calls(given)`: model calls one video waits on, one after the
  other, at sampling (a guided batch of doubled rows counts once);
- `compiled_sampler(batch)`: the whole sampler compiled for a batch, for its
  speed and memory, and `forward_flops(batch)`: the FLOPs of one uncached
  forward pass over whole videos, the arithmetic any sampler must do at least.

Families: next_block (next-token and next-block prediction, with softmax or
Aaren attention).

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
from nbp.tasks import next_block
from nbp.training import loop as train
from nbp.training import metrics as metrics_lib
from nbp.training import sharding
from nbp.training import workdir as workdir_lib


def num_params(config: ml_collections.ConfigDict) -> int:
  """Parameters of `config`'s model (its abstract state: nothing is computed)."""
  s = train.setup(config)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(s.abstract_state.params)))


def train_step_flops(config: ml_collections.ConfigDict) -> float:
  """FLOPs of one training step of `config` (per device), as XLA counts them for the compiled step on a real
  batch of its data."""
  s = train.setup(config)
  state = train.init_state(s, config.seed)
  batch = sharding.global_batch(next(train.data_iterator(s, "train", config.seed)), s.batch_sharding)
  with s.context():
    _, flops = train.aot_compile(train.compile_train_step(s), state, batch, jax.random.key(0))
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
  """A trained run of the next_block family with one sampler setting (`sampler`: keywords of
  nbp.tasks.next_block.sample over the run's own config.sampler)."""

  config: ml_collections.ConfigDict
  params: Any
  sampler: dict

  @property
  def model(self) -> next_block.Model:
    return self._task.model

  @functools.cached_property
  def _task(self) -> tasks.Task:
    return tasks.make_task(self.config)

  @functools.cached_property
  def _kwargs(self) -> dict:
    settings = {**self.config.sampler.to_dict(), **self.sampler}
    settings.pop("num_samples", None)
    return next_block.sampler_kwargs(self.model, settings)

  @property
  def video_shape(self) -> tuple[int, ...]:
    return tuple(self.model.grid) + (1,)

  def _videos(self, tokens) -> np.ndarray:
    return np.asarray(self._task.predict_fn("to_videos")(tokens))

  @functools.cache
  def _sampler(self, batch: int, given: int):
    """The sampler jitted whole for `batch` videos and `given` frames: fn(params, rng, labels, prompt)."""
    del batch  # (one jit per shape: the cache key)

    def sample(params, rng, labels, prompt):
      return next_block.sample(self.model, params, rng, num_samples=labels.shape[0], labels=labels,
                               prompt=prompt if given else None, **self._kwargs)
    return jax.jit(sample)

  def _prompt(self, given_videos: np.ndarray | None, batch: int, given: int):
    if not given:
      return jnp.zeros((batch, 1, *self.model.grid[1:]), jnp.int32)  # unused
    return jnp.asarray(self._task.predict_fn("from_videos")(given_videos))[:, :given]

  def generate(self, rng, labels: np.ndarray) -> np.ndarray:
    labels = jnp.asarray(labels, jnp.int32)
    fn = self._sampler(labels.shape[0], 0)
    return self._videos(fn(self.params, rng, labels, self._prompt(None, labels.shape[0], 0)))

  def continue_frames(self, rng, labels: np.ndarray, given: np.ndarray) -> np.ndarray:
    """given: uint8 [B, G, H, W, 1], the first G frames; returns the whole videos with them unchanged."""
    labels = jnp.asarray(labels, jnp.int32)
    g = given.shape[1]
    padded = np.concatenate([given, np.zeros((given.shape[0], self.model.grid[0] - g, *given.shape[2:]),
                                              given.dtype)], axis=1)  # the tokenizer of pixels wants whole videos
    fn = self._sampler(labels.shape[0], g)
    return self._videos(fn(self.params, rng, labels, self._prompt(padded, labels.shape[0], g)))

  def sequential_calls(self, given: int = 0) -> int:
    """Sampler calls one video waits on: one per drawn block (the prefill draws the first)."""
    f, h, w = self.model.grid
    return (f - given) * h * w // self.model.block_len

  def compiled_sampler(self, batch: int):
    """(the generation sampler compiled for `batch` videos, its arguments)."""
    labels = jnp.arange(batch, dtype=jnp.int32) % self.model.num_classes
    args = (self.params, jax.random.key(0), labels, self._prompt(None, batch, 0))
    return self._sampler(batch, 0).lower(*args).compile(), args

  def forward_flops(self, batch: int) -> float:
    """FLOPs of one uncached forward pass over `batch` whole videos, doubled when guided (two rows each)."""
    rows = batch * (2 if self._kwargs.get("guidance_scale") is not None else 1)
    tokens = jnp.zeros((rows, self.model.num_tokens), jnp.int32)
    inputs, _ = next_block.next_block_targets(self.model, tokens)
    labels = jnp.zeros((rows,), jnp.int32)
    compiled = jax.jit(lambda p, x, c: self.model.apply({"params": p}, x, labels=c)).lower(
        self.params, inputs, labels).compile()
    return roofline.compiled_flops(compiled)


def load(workdir: str, sampler: dict) -> Contender:
  """The run trained in `workdir` (its newest checkpoint) with the sampler setting `sampler`."""
  config = workdir_lib.read_config(workdir)
  if config.family != "next_block":
    raise ValueError(f"the run in {workdir} is of family {config.family!r}; contenders are next_block runs")
  return Contender(config, tasks.load_run(workdir).params, dict(sampler))
