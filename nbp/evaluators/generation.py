"""Generated videos against real ones: what the FVD evaluators share besides the distance.

The videos. Per sampling seed s and N videos per set, from one split of a
data config (validation while choosing, test once):
  reference  real videos 0..N-1 of the split;
  stand-in   real videos (s+1)N..(s+2)N-1 of the split, disjoint from the reference;
  generated  N videos of the run's "sample_conditioned" predict function,
             conditioned like the stand-in (its classes for class-conditional
             runs, its first frames for frame prediction, nothing for
             unconditional runs), decoded by its "to_videos" (the tokenizer
             for token runs, the grey levels for pixel runs).
`compare_with_real` gives d(reference, generated) and, as the floor to read it
against, d(reference, stand-in): the distance N real videos already have.
Moving-digits videos past the split's size are generated the same way (same
seed, same pool of digit scans), so any N fits.

Dimension letters: N videos, B sampler batch, F frames, H height, W width,
C channels; f, h, w the token grid.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np

from nbp.data import moving_digits
from nbp.data import pipeline
from nbp.data import tokens as tokens_lib
from nbp.data import video_sources
from nbp.evaluators import frechet
from nbp.training import sharding
from nbp.training import workdir as workdir_lib


# ---------------------------------------------------------------------------
# Real videos.


def real_videos(data_cfg, start: int, count: int, split: str = "validation") -> dict[str, np.ndarray]:
  """Videos start..start+count-1 of a video data config's `split`.

  Returns video uint8 [N, F, H, W, C], label int32 [N, D] and class int32 [N]
  (sum_i label_i 10^i, the class condition of nbp.data.tokens.TokensAndClass).
  Moving digits are generated example by example (no dataset build; indices
  past the split's size are valid); other datasets are read from the split.
  """
  if data_cfg.name == "moving_digits":
    videos = moving_digits.videos_from_config(data_cfg, split, start, count)
    examples = [{"video": v, "label": l} for v, l in zip(videos["video"], videos["label"])]
  else:
    source = video_sources.video_source(data_cfg, split)
    if start + count > len(source):
      raise ValueError(f"{data_cfg.name!r} has {len(source)} {split} videos; videos {start}..{start + count - 1} "
                       "were asked for (fewer num_videos, or a smaller seed).")
    examples = [source[i] for i in range(start, start + count)]
  labels = np.stack([np.asarray(e["label"], np.int64).reshape(-1) for e in examples])  # [N, D]
  classes = pipeline.label_class(labels)
  return {"video": np.stack([np.asarray(e["video"], np.uint8) for e in examples]),
          "label": labels.astype(np.int32), "class": classes}


def run_video_data(config):
  """The data config of the videos a run models: its own, or for token runs its tokenizer's."""
  if config.data.name == "tokens":
    return workdir_lib.read_config(tokens_lib.tokenizer_workdir(config.data.token_dir)).data
  if config.data.name not in video_sources.NAMES:
    raise ValueError(f"config.data.name={config.data.name!r}: not videos, so no FVD.")
  return config.data


# ---------------------------------------------------------------------------
# Generated videos: the run's sampler, conditioned like a real set.


def check_video_shape(task, expected: tuple[int, ...], judge: str) -> None:
  """The run's decoded videos [F, H, W, C] must be those of the real set: a ValueError names both."""
  to_videos = task.predict_fn("to_videos", who="an FVD evaluator")
  shape = to_videos(np.zeros((1, *task.model.grid), np.int32)).shape[1:]  # one decoded grid
  if tuple(shape) != tuple(expected):
    raise ValueError(f"the generator's videos are [F, H, W, C] = {tuple(shape)} but {judge} has "
                     f"{tuple(expected)}: judge a run with a classifier (or real data) of its own video shape.")


@dataclasses.dataclass
class Generated:
  """The generated set and its timing."""

  videos: np.ndarray  # uint8 [N, F, H, W, C]
  tokens: np.ndarray  # int [N, f, h, w]
  drawn: int  # videos drawn: N rounded up to whole sampler batches
  frames: int  # video frames drawn per video: given frames not counted (tokens: by the share of latent frames)
  tokens_per_video: int  # tokens drawn per video
  compile_seconds: float
  sample_seconds: float  # sampler calls only, block_until_ready per batch

  def rates(self) -> dict[str, float]:
    return {"frames_per_s": self.drawn * self.frames / self.sample_seconds,
            "tokens_per_s": self.drawn * self.tokens_per_video / self.sample_seconds,
            "sample_seconds": self.sample_seconds, "compile_seconds": self.compile_seconds}


_COMPILED: dict[tuple[Any, int], tuple[Any, float]] = {}  # (setup, B) -> (compiled sampler, its compile seconds)


def _compiled_sampler(setup, batch_size: int, *example_args):
  """The run's conditioned sampler compiled once per setup and batch size (later seeds reuse it).

  One untimed call follows the compilation: the first call of an executable is
  slower (allocations), and would make the first seed's frames/s look worse.
  """
  key = (setup, batch_size)
  if key not in _COMPILED:
    fn = setup.task.predict_fn("sample_conditioned", who="an FVD evaluator")
    start = time.perf_counter()
    compiled = jax.jit(fn, out_shardings=sharding.replicated(setup.mesh)).lower(*example_args).compile()
    seconds = time.perf_counter() - start
    jax.block_until_ready(compiled(*example_args))
    _COMPILED[key] = (compiled, seconds)
  return _COMPILED[key]


def generate_videos(setup, params, rng, conditions: dict[str, np.ndarray], *, batch_size: int,
                    expected_shape: tuple[int, ...], judge: str) -> Generated:
  """N videos of the run's sampler conditioned like `conditions` (a `real_videos` set), decoded to uint8.

  Batch i of B draws with the key fold_in(rng, i * B). `expected_shape` is
  [F, H, W, C] of the videos the result is compared with; `judge` names where
  that shape comes from, for the error when they differ.
  """
  task = setup.task
  model = task.model
  check_video_shape(task, expected_shape, judge)
  n = len(conditions["class"])
  labels = conditions["class"].astype(np.int32)
  if model.condition == "class" and labels.max() >= model.num_classes:
    raise ValueError(f"the real videos of {judge} have classes up to {labels.max()} but the generator has "
                     f"config.model.num_classes={model.num_classes} (a different num_digits?).")
  prompt = np.zeros((n, model.prefix_frames, *model.grid[1:]), np.int32)
  if model.condition == "frames":
    prompt = task.predict_fn("from_videos", who="an FVD evaluator")(conditions["video"])[:, :model.prefix_frames]
  batches = -(-n // batch_size)
  labels, prompt = frechet.pad_rows(labels, batches * batch_size), frechet.pad_rows(prompt, batches * batch_size)
  with setup.context():
    compiled, compile_seconds = _compiled_sampler(setup, batch_size, params, rng, labels[:batch_size],
                                                  prompt[:batch_size])
    # Keys and inputs on the devices first, placed as the compiled sampler takes them (split over the
    # mesh's data axis where it is): only the sampler calls are timed.
    placed = compiled.input_shardings[0][1:]
    inputs = [jax.block_until_ready(jax.device_put(
        (jax.random.fold_in(rng, i), labels[i:i + batch_size], prompt[i:i + batch_size]), placed))
              for i in range(0, batches * batch_size, batch_size)]
    out, seconds = [], 0.0
    for args in inputs:
      start = time.perf_counter()
      tokens = jax.block_until_ready(compiled(params, *args))
      seconds += time.perf_counter() - start
      out.append(np.asarray(tokens))
  tokens = np.concatenate(out)[:n]
  videos = task.predict_fn("to_videos")(tokens)
  return Generated(videos=videos, tokens=tokens, drawn=batches * batch_size,
                   frames=videos.shape[1] * model.num_generated // model.num_tokens,
                   tokens_per_video=model.num_generated, compile_seconds=compile_seconds, sample_seconds=seconds)


# ---------------------------------------------------------------------------
# Frame prediction: the predicted frames against the true ones.


def given_video_frames(config) -> int:
  """Video frames a frame-prediction run is given: its prefix frames, or for token runs the video frames behind
  its prefix latent frames (the first alone, then `time_factor` per latent frame)."""
  p = config.model.prefix_frames
  if config.data.name != "tokens":
    return p
  tokenizer = workdir_lib.read_config(tokens_lib.tokenizer_workdir(config.data.token_dir))
  return 1 + (p - 1) * tokenizer.model.time_factor


def centres_of_mass(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Frames [..., H, W, C] -> (intensity-weighted centres [..., 2] as (row, col) in pixels, non-empty [...]).

  The weights are each frame's intensity above its darkest pixel: frames
  decoded from grey-level tokens have their background at the zero bin's
  centre (16 of 255 at 8 levels), not at 0, and a uniform background would
  pull their centre towards the middle of the frame.
  """
  mass = frames.astype(np.float64).mean(-1)  # [..., H, W]
  mass = mass - mass.min((-2, -1), keepdims=True)
  total = mass.sum((-2, -1))
  rows, cols = np.arange(mass.shape[-2]), np.arange(mass.shape[-1])
  safe = np.where(total > 0, total, 1.0)
  centre = np.stack([(mass.sum(-1) * rows).sum(-1) / safe, (mass.sum(-2) * cols).sum(-1) / safe], axis=-1)
  return centre, total > 0


def frame_prediction_metrics(real: np.ndarray, generated: np.ndarray, given: int) -> dict[str, float]:
  """The predicted frames (after the first `given`) of videos [N, F, H, W, C] on 0..255 (uint8, or the float mean
  of several draws) against the real ones.

  com_error_px: mean distance in pixels between the centres of mass of each
  predicted frame and its true frame, over frames that both have ink (the
  share of empty predicted frames is empty_frames); mse: pixel MSE on [0, 1].
  Beside them, the same for repeating the last given frame (repeat_last) and,
  for the MSE, for black frames (black).
  """
  if real.shape != generated.shape or not 0 < given < real.shape[1]:
    raise ValueError(f"real {real.shape} and generated {generated.shape} videos with {given} given frames")
  truth, predicted = real[:, given:], generated[:, given:]
  repeat = np.broadcast_to(real[:, given - 1:given], truth.shape)
  true_centre, true_ink = centres_of_mass(truth)

  def com_error(frames):
    centre, ink = centres_of_mass(frames)
    both = ink & true_ink  # no such frame: NaN
    distance = np.linalg.norm(centre - true_centre, axis=-1)[both]
    return float(distance.mean()) if both.any() else float("nan"), float(1.0 - ink[true_ink].mean())

  def mse(frames):
    return float(np.mean((frames.astype(np.float64) / 255.0 - truth.astype(np.float64) / 255.0) ** 2))

  com, empty = com_error(predicted)
  return {"com_error_px": com, "com_error_px_repeat_last": com_error(repeat)[0], "empty_frames": empty,
          "mse": mse(predicted), "mse_repeat_last": mse(repeat), "mse_black": mse(np.zeros_like(truth))}


def compare_with_real(context, *, real_data, extract: Callable[[np.ndarray], np.ndarray], key: str,
                      num_videos: int, batch_size: int, seed: int, floor: bool, judge: str,
                      split: str = "validation"):
  """The body of an FVD evaluator: (metrics, stand-in set, Generated).

  metrics: {key: d(reference, generated), key + "_floor": d(reference,
  stand-in) when `floor`, and the generation's rates}. The real features come
  first, so a bad extractor setting fails before the sampler runs. The key is
  jax.random.key(seed), not the loop's: every evaluation of a run, and every
  run of a benchmark seed, uses the same conditions and keys.
  """
  reference = real_videos(real_data, 0, num_videos, split)
  stand_in = real_videos(real_data, (seed + 1) * num_videos, num_videos, split)
  reference_features = extract(reference["video"])
  metrics = {}
  if floor:
    metrics[key + "_floor"] = frechet.frechet_distance_of_features(reference_features, extract(stand_in["video"]))
  generated = generate_videos(context.setup, context.params, jax.random.key(seed), stand_in,
                              batch_size=batch_size, expected_shape=reference["video"].shape[1:], judge=judge)
  metrics[key] = frechet.frechet_distance_of_features(reference_features, extract(generated.videos))
  metrics.update(generated.rates(), num_videos=float(num_videos))
  return metrics, stand_in, generated
