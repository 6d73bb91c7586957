"""Moving digits: Moving-MNIST-style videos from sklearn's real 8x8 digit scans.

Dimension letters: N examples, F frames, H height, W width, C channels (1),
D digits per video, S sprite side (8 * digit_scale).

The 1,797 scans of `sklearn.datasets.load_digits()` are split once, by a fixed
permutation, into a train pool (80%) and a test pool (20%). The validation pool
is carved from the train pool by `nbp.data.splits.carve` with
`config.data.validation_fraction` and `validation_seed` (10% and 0 by default),
and the train split keeps the rest. A video of a split only shows scans of its
own pool, so no validation or test scan is ever seen in training, whatever the
seed, and the test pool never changes. Example i of a split is drawn from its
own generator `np.random.default_rng([seed, split_id, i])`: examples are random
access and do not depend on how many are generated.

Each digit starts at a random position, moves `speed` pixels per frame in a
random direction and bounces off the borders; digits are combined by max.

Two tfds builders write the data as ArrayRecord without TensorFlow:
`MovingDigits` (configs named from their knobs, see `moving_digits_config`) and
`Digits` (the still 8x8 scans, configs named by `digits_config`), each with
the splits train, validation and test. `build` prepares either into a data_dir.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from nbp.data import generated
from nbp.data import pipeline
from nbp.data import splits
from nbp.data.generated import GeneratedBuilder

SPLIT_IDS = {"train": 0, "test": 1, "validation": 2}  # split name -> id folded into the RNG
TRAIN_FRACTION = 0.8  # share of the sklearn scans in the train pool (train + validation)
_POOL_SEED = 20240511  # fixed: the train/test pools never change


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [1797, 8, 8] in 0..255, labels int32 [1797])."""
  d = load_digits()
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
  return images, d.target.astype(np.int32)


@functools.cache
def _pools(validation_fraction: float, validation_seed: int) -> dict[str, np.ndarray]:
  """split -> sorted sklearn scan indices; validation is carved from the fixed train pool."""
  n = len(_digits()[1])
  perm = np.random.default_rng(_POOL_SEED).permutation(n)
  n_train = int(TRAIN_FRACTION * n)
  train_pool = np.sort(perm[:n_train])
  carved = splits.carve(len(train_pool), validation_fraction, validation_seed)
  pools = {"train": train_pool[carved["train"]], "validation": train_pool[carved["validation"]],
           "test": np.sort(perm[n_train:])}
  for pool in pools.values():
    pool.setflags(write=False)  # cached: shared by every caller
  return pools


def digit_pool(split: str, validation_fraction: float = splits.VALIDATION_FRACTION,
               validation_seed: int = splits.VALIDATION_SEED) -> np.ndarray:
  """sklearn scan indices (int64 [P], sorted, read-only) a split may draw from; the three pools are disjoint.

  Raises ValueError naming the dataset for an unknown split, and naming
  `config.data.validation_fraction` when it holds out no validation scans.
  """
  splits.check(split, "moving digits")
  pool = _pools(float(validation_fraction), int(validation_seed))[split]
  if not len(pool):
    raise ValueError(f"config.data.validation_fraction={validation_fraction} holds out no digit scans: the "
                     "moving digits validation split is drawn from scans carved from the train pool, so the "
                     "fraction must be in (0, 1).")
  return pool


def default_digit_scale(frame_size: int) -> int:
  """Integer upscale of the 8x8 sprite: 1 up to 32 px frames, frame_size // 32 above."""
  return 1 if frame_size <= 32 else frame_size // 32


def _bounce(pos, vel, limit: float):
  """Reflects positions off the walls [0, limit] after one step: (pos, vel), floats or arrays alike."""
  pos = pos + vel
  vel = np.where(pos < 0, -vel, vel)
  pos = np.where(pos < 0, -pos, pos)
  vel = np.where(pos > limit, -vel, vel)
  pos = np.where(pos > limit, 2 * limit - pos, pos)
  return np.clip(pos, 0.0, limit), vel


def moving_digits_example(
    index: int,
    *,
    seed: int,
    split: str,
    num_frames: int = 16,
    frame_size: int = 32,
    num_digits: int = 2,
    speed: float = 2.0,
    digit_scale: int | None = None,
    validation_fraction: float = splits.VALIDATION_FRACTION,
    validation_seed: int = splits.VALIDATION_SEED,
) -> dict[str, np.ndarray]:
  """One video: video uint8 [F,H,W,1], label int32 [D], digit_index int32 [D].

  `split` (train, validation or test) picks the scan pool and the RNG stream;
  `validation_fraction` and `validation_seed` say how the validation pool was
  carved from the train pool (see `digit_pool`).
  """
  scale = digit_scale or default_digit_scale(frame_size)
  side = 8 * scale  # S
  if side > frame_size:
    raise ValueError(f"digit sprite {side}px does not fit a {frame_size}px frame")
  images, labels = _digits()
  pool = digit_pool(split, validation_fraction, validation_seed)
  rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
  chosen = rng.choice(pool, size=num_digits)  # [D]
  limit = float(frame_size - side)
  video = np.zeros((num_frames, frame_size, frame_size), np.uint8)
  for idx in chosen:
    sprite = np.kron(images[idx], np.ones((scale, scale), np.uint8))  # [S, S]
    y, x = rng.uniform(0, limit, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    vy, vx = speed * np.sin(angle), speed * np.cos(angle)
    for f in range(num_frames):
      r, c = int(round(y)), int(round(x))
      window = video[f, r:r + side, c:c + side]
      np.maximum(window, sprite, out=window)
      y, vy = _bounce(y, vy, limit)
      x, vx = _bounce(x, vx, limit)
  return {
      "video": video[..., None],
      "label": labels[chosen].astype(np.int32),
      "digit_index": chosen.astype(np.int32),
  }


def make_moving_digits(
    num_videos: int,
    *,
    seed: int,
    split: str,
    start: int = 0,
    num_frames: int = 16,
    frame_size: int = 32,
    num_digits: int = 2,
    speed: float = 2.0,
    digit_scale: int | None = None,
    validation_fraction: float = splits.VALIDATION_FRACTION,
    validation_seed: int = splits.VALIDATION_SEED,
) -> dict[str, np.ndarray]:
  """Videos start..start+N-1 of a split, stacked (see `moving_digits_example`).

  Returns:
    video: uint8 [N, F, H, W, 1] in 0..255 (H = W = frame_size).
    label: int32 [N, D], the classes 0..9 of the digits shown.
    digit_index: int32 [N, D], the sklearn scan each digit comes from.
  """
  examples = [
      moving_digits_example(
          i, seed=seed, split=split, num_frames=num_frames,
          frame_size=frame_size, num_digits=num_digits, speed=speed,
          digit_scale=digit_scale, validation_fraction=validation_fraction,
          validation_seed=validation_seed)
      for i in range(start, start + num_videos)
  ]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def motion_floors(*, num_frames: int, frame_size: int, speed: float, given: int, digit_scale: int | None = None,
                  num_paths: int = 200_000, seed: int = 0) -> dict[str, float]:
  """The centre-of-mass errors, in pixels, of two ideal predictors of one digit's frames after the first `given`.

  A digit's centre of mass moves with its sprite, so the error of a predicted
  frame is the distance between the sprite positions. The videos' random start
  and direction are simulated on `num_paths` paths; paths whose given frames
  show the same (rounded) positions form one group, so the future of a group
  is what the given frames leave open. Averaged, like
  `frame_prediction_metrics`, over paths and predicted frames:
    exact_sampler: a sample of the true conditional distribution: the distance
      between two paths of one group (each path against another, at random);
    best_point: one position per group and predicted frame, the grid point
      with the least mean distance to the group's futures (what the best single
      video a sampler can return scores);
    exact_mean: the group's mean future position, what the pixel mean of
      many draws of the true conditional distribution scores (the mean frame's
      centre of mass is the mean of the draws' centres, as every draw holds the
      whole digit);
    repeat_last: the last given frame's position, for scale.
  """
  if not 0 < given < num_frames:
    raise ValueError(f"given={given} frames of {num_frames}: at least one given and one predicted")
  side = 8 * (digit_scale or default_digit_scale(frame_size))
  limit = float(frame_size - side)
  rng = np.random.default_rng(seed)
  pos = rng.uniform(0, limit, size=(num_paths, 2))  # (y, x), as the videos draw them
  angle = rng.uniform(0, 2 * np.pi, size=num_paths)
  vel = speed * np.stack([np.sin(angle), np.cos(angle)], axis=-1)
  frames = []
  for _ in range(num_frames):
    frames.append(np.round(pos).astype(np.int64))
    pos, vel = _bounce(pos, vel, limit)  # every path and axis at once
  paths = np.stack(frames, axis=1)  # [paths, F, 2] integer positions 0..limit
  grid = int(limit) + 1
  past = paths[:, :given].reshape(num_paths, -1)
  group = np.unique(np.ravel_multi_index(past.T, (grid,) * past.shape[1]), return_inverse=True)[1].reshape(-1)
  future = paths[:, given:]  # [paths, F - given, 2]
  sizes = np.bincount(group)
  kept = sizes[group] > 1  # a path alone in its group has no other to be compared with
  # Each path against the next one of its group, after shuffling: an independent draw from the same condition.
  order = np.lexsort((rng.permutation(num_paths), group))
  starts = np.cumsum(sizes) - sizes
  rank = np.empty(num_paths, np.int64)
  rank[order] = np.arange(num_paths) - starts[group[order]]
  partner = order[starts[group] + (rank + 1) % sizes[group]]
  exact = np.linalg.norm(future - future[partner], axis=-1)[kept].mean()
  # Best point: counts of the futures on the grid per (group, frame), against every grid point.
  points = np.stack(np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij"), -1).reshape(-1, 2)  # [G2, 2]
  apart = np.linalg.norm(points[:, None] - points[None], axis=-1)  # [G2, G2]
  cell = future[..., 0] * grid + future[..., 1]  # [paths, F - given]
  best = 0.0
  for f in range(num_frames - given):
    counts = np.zeros((len(sizes), grid * grid))
    np.add.at(counts, (group, cell[:, f]), 1.0)
    best += (counts @ apart).min(axis=1).sum() / num_paths  # the best grid point of each group
  mean = np.stack([np.bincount(group, weights=future[:, f, a]) / sizes
                   for f in range(num_frames - given) for a in range(2)], axis=-1)[group]
  exact_mean = np.linalg.norm(future - mean.reshape(future.shape), axis=-1).mean()
  repeat = np.linalg.norm(future - paths[:, given - 1:given], axis=-1).mean()
  return {"exact_sampler": float(exact), "best_point": float(best / (num_frames - given)),
          "exact_mean": float(exact_mean), "repeat_last": float(repeat)}


def videos_from_config(data_cfg, split: str, start: int, count: int) -> dict[str, np.ndarray]:
  """Videos start..start+count-1 of a split of a moving_digits `config.data`, generated directly (no build).

  The same videos as the built dataset's (seed 0, the config's knobs and
  validation carve); indices past the split's size are valid too.
  """
  fraction, validation_seed = pipeline.validation_keys(data_cfg)
  return make_moving_digits(
      count, seed=0, split=split, start=start, num_frames=data_cfg.num_frames,
      frame_size=data_cfg.frame_size, num_digits=data_cfg.num_digits, speed=float(data_cfg.speed),
      validation_fraction=fraction, validation_seed=validation_seed)



# ----------------------------------------------------------------- tfds builders


@dataclasses.dataclass(eq=False)
class MovingDigitsConfig(tfds.core.BuilderConfig):
  """The knobs of a moving digits dataset."""
  num_frames: int = 16  # F
  frame_size: int = 32  # H = W
  num_digits: int = 2  # D digits per video
  speed: float = 2.0  # pixels per frame
  num_train: int = 10_000  # videos in the train split
  num_validation: int = 1_000  # videos in the validation split
  num_test: int = 1_000  # videos in the test split
  seed: int = 0  # folded with (split, index) into each example's RNG
  validation_fraction: float = splits.VALIDATION_FRACTION  # share of the train scan pool held out for validation
  validation_seed: int = splits.VALIDATION_SEED  # seed of that carve


_KNOBS = ("num_frames", "frame_size", "num_digits", "speed", "num_train", "num_validation", "num_test", "seed",
          "validation_fraction", "validation_seed")
_KNOB_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MovingDigitsConfig) if f.name in _KNOBS}
_SIZES = ("num_train", "num_validation", "num_test")


def _carve_name(fraction: float, seed: int) -> str:
  return f"valfrac{fraction:g}_valseed{seed}"


def _check_carve(fraction: float) -> None:
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"config.data.validation_fraction={fraction}: the digit datasets carve their validation "
                     "scans from the train pool, so the fraction must be in (0, 1).")


def moving_digits_config(name: str | None = None, **knobs) -> MovingDigitsConfig:
  """A config named from its knobs, e.g. "f16_s32_d2" or "f8_s16_d1_v3_n64-16-16_seed1".

  The name holds frames, size and digits always, and speed (v), split sizes
  (n: train-validation-test), seed and the validation carve (valfrac, valseed)
  only where they differ from the defaults. `name` overrides it (used for the
  registered configs); knobs are the fields of `MovingDigitsConfig`.
  """
  unknown = set(knobs) - set(_KNOB_DEFAULTS)
  if unknown:
    raise ValueError(f"unknown knobs {sorted(unknown)}; known: {sorted(_KNOB_DEFAULTS)}")
  k = {**_KNOB_DEFAULTS, **knobs}
  for key in _SIZES:
    if k[key] < 1:
      raise ValueError(f"config.data.{key}={k[key]}: every split of moving digits needs at least one video.")
  _check_carve(k["validation_fraction"])
  auto_name = f"f{k['num_frames']}_s{k['frame_size']}_d{k['num_digits']}"
  if k["speed"] != _KNOB_DEFAULTS["speed"]:
    auto_name += f"_v{k['speed']:g}"
  if any(k[key] != _KNOB_DEFAULTS[key] for key in _SIZES):
    auto_name += "_n" + "-".join(str(k[key]) for key in _SIZES)
  if k["seed"] != _KNOB_DEFAULTS["seed"]:
    auto_name += f"_seed{k['seed']}"
  if (k["validation_fraction"], k["validation_seed"]) != (splits.VALIDATION_FRACTION, splits.VALIDATION_SEED):
    auto_name += "_" + _carve_name(k["validation_fraction"], k["validation_seed"])
  if name is None:
    name = auto_name
  return MovingDigitsConfig(name=name, description=f"moving digits {k}", **k)


# 2.0.0: a validation split, whose scans are carved from the train pool (the train split lost them).
_RELEASE_NOTES = {"2.0.0": "Validation split; its digit scans are carved from the train pool.",
                  "1.0.0": "Train and test splits."}


class MovingDigits(GeneratedBuilder):
  """Moving digits videos; features video uint8 [F,H,W,1], label int32 [D]; splits train, validation, test."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = _RELEASE_NOTES
  BUILDER_CONFIGS = [
      moving_digits_config(),  # f16_s32_d2: 10k train, 1k validation, 1k test
      moving_digits_config(name="f8_s16_d1", num_frames=8, frame_size=16, num_digits=1,
                           num_train=512, num_validation=128, num_test=128),  # f8_s16_d1: tiny
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n")[0],
        features=tfds.features.FeaturesDict({
            "video": tfds.features.Tensor(
                shape=(c.num_frames, c.frame_size, c.frame_size, 1), dtype=np.uint8),
            "label": tfds.features.Tensor(shape=(c.num_digits,), dtype=np.int32),
            "digit_index": tfds.features.Tensor(shape=(c.num_digits,), dtype=np.int32),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # generated, nothing to download
    c = self.builder_config
    return {"train": self._generate_examples("train", c.num_train),
            "validation": self._generate_examples("validation", c.num_validation),
            "test": self._generate_examples("test", c.num_test)}

  def _generate_examples(self, split: str, num: int):
    c = self.builder_config
    for i in range(num):
      yield i, moving_digits_example(
          i, seed=c.seed, split=split, num_frames=c.num_frames,
          frame_size=c.frame_size, num_digits=c.num_digits, speed=c.speed,
          validation_fraction=c.validation_fraction, validation_seed=c.validation_seed)


@dataclasses.dataclass(eq=False)
class DigitsConfig(tfds.core.BuilderConfig):
  """How the validation scans of `Digits` are carved from the train pool."""
  validation_fraction: float = splits.VALIDATION_FRACTION  # share of the train pool held out for validation
  validation_seed: int = splits.VALIDATION_SEED  # seed of that carve


def digits_config(validation_fraction: float = splits.VALIDATION_FRACTION,
                  validation_seed: int = splits.VALIDATION_SEED) -> DigitsConfig:
  """The `Digits` config of a validation carve, named e.g. "valfrac0.1_valseed0" (the default)."""
  _check_carve(validation_fraction)
  return DigitsConfig(name=_carve_name(validation_fraction, validation_seed),
                      description=f"validation_fraction={validation_fraction}, validation_seed={validation_seed}",
                      validation_fraction=validation_fraction, validation_seed=validation_seed)


class Digits(GeneratedBuilder):
  """sklearn's 8x8 scans: image uint8 [8,8,1] (0..255), label int32, index int32.

  The train/validation/test splits are the scan pools `MovingDigits` draws
  from (`digit_pool`), for the config's validation carve.
  """

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = _RELEASE_NOTES
  BUILDER_CONFIGS = [digits_config()]  # tfds.builder("digits"): the default carve

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="sklearn load_digits 8x8 scans",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.Tensor(shape=(), dtype=np.int32),
            "digit_index": tfds.features.Tensor(shape=(), dtype=np.int32),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {s: self._generate_examples(s) for s in splits.SPLITS}

  def _generate_examples(self, split: str):
    c = self.builder_config
    images, labels = _digits()
    for idx in digit_pool(split, c.validation_fraction, c.validation_seed):
      yield int(idx), {"image": images[idx][..., None], "label": labels[idx],
                       "digit_index": np.int32(idx)}


def build(name_or_builder: str | tfds.core.DatasetBuilder,
          data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Prepares a generated dataset as ArrayRecord in data_dir; returns its builder.

  `name_or_builder` is a tfds name ("moving_digits/f8_s16_d1", "digits") or a
  builder, e.g. `MovingDigits(config=moving_digits_config(...), data_dir=d)`.
  Nothing is downloaded; an already prepared dataset is reused as is.
  """
  if isinstance(name_or_builder, str):
    remake = lambda: tfds.builder(name_or_builder, data_dir=data_dir, file_format="array_record")
    builder = remake()
  else:
    builder = name_or_builder
    if data_dir is not None and str(builder.data_dir_root) != str(data_dir):
      raise ValueError(f"builder writes to {builder.data_dir_root}, not {data_dir}")
    remake = lambda: type(builder)(config=builder.builder_config, data_dir=builder.data_dir_root)
  return generated.prepare(builder, remake)


def num_videos(data_cfg, split: str) -> int:
  """Videos in a split of a moving_digits `config.data`: num_train, num_validation or num_test.

  num_validation defaults to num_test where a config predates the key.
  """
  splits.check(split, "moving digits")
  if split == "validation":
    return int(data_cfg.get("num_validation", data_cfg.num_test))
  return int(data_cfg[f"num_{split}"])


def builder_from_config(data_cfg) -> tfds.core.DatasetBuilder:
  """The prepared builder for a config's data section.

  Reads `num_frames`, `frame_size`, `num_digits`, `speed`, `num_train`,
  `num_validation`, `num_test`, `validation_fraction`, `validation_seed` and
  `dir`; builds the ArrayRecord files on first use.
  """
  fraction, validation_seed = pipeline.validation_keys(data_cfg)
  knobs = moving_digits_config(
      num_frames=data_cfg.num_frames, frame_size=data_cfg.frame_size, num_digits=data_cfg.num_digits,
      speed=data_cfg.speed, num_train=num_videos(data_cfg, "train"),
      num_validation=num_videos(data_cfg, "validation"), num_test=num_videos(data_cfg, "test"),
      validation_fraction=fraction, validation_seed=validation_seed)
  return build(MovingDigits(config=knobs, data_dir=data_cfg.dir))


def digits_builder(data_cfg) -> tfds.core.DatasetBuilder:
  """The prepared `Digits` builder of a config's data section (its validation carve and `dir`)."""
  config = digits_config(*pipeline.validation_keys(data_cfg))
  # tfds tells a registered config from a custom one by identity: the default carve is the registered object.
  config = Digits.builder_configs.get(config.name, config)
  return build(Digits(config=config, data_dir=data_cfg.dir))
