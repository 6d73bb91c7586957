"""What the Fréchet-distance evaluators share: the distance, batched features, and the videos they compare.

Shared by every distance of this kind: the I3D FVD (nbp.evaluators.fvd), the
in-domain FVD on moving digits (nbp.evaluators.fvd_digits), and later FID.

The videos. Per sampling seed s and N videos per set, from a data config's
test split:
  reference  real test videos 0..N-1;
  stand-in   real test videos (s+1)N..(s+2)N-1, disjoint from the reference;
  generated  N videos of the run's sampler, conditioned like the stand-in (its
             classes for class-conditional runs, its first frames for frame
             prediction, nothing for unconditional runs), decoded by the task
             (`Task.to_videos`: the tokenizer for token runs, the grey levels
             for pixel runs).
`compare_with_real` gives d(reference, generated) and, as the floor to read it
against, d(reference, stand-in): the distance N real videos already have.
Moving-digits test videos past the dataset's `num_test` are generated the
same way (same seed, same test pool of digit scans), so any N fits.

Dimension letters: N examples (videos), D feature width, B sampler batch,
F frames, H height, W width, C channels; f, h, w the token grid.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from nbp.data import moving_digits
from nbp.data import pipeline
from nbp.data import tokens as tokens_lib
from nbp.data import video_sources
from nbp.tasks import next_block
from nbp.tasks import video_tokenizer
from nbp.training import sharding
from nbp.training import workdir as workdir_lib

# ---------------------------------------------------------------------------
# The distance.


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix (negative eigenvalues clipped)."""
  values, vectors = np.linalg.eigh(sigma)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

  d = |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^(1/2)). The last trace is
  computed without a general matrix square root: with A = s1^(1/2) and
  B = s2^(1/2) (symmetric, by eigendecomposition), s1 s2 = A (A B B A) A^-1 has
  the eigenvalues of (A B)(A B)^T, so tr((s1 s2)^(1/2)) is the sum of the
  singular values of A B. This stays stable for rank-deficient covariances.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise ValueError(f"shapes do not match: mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}")
  s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
  cross = np.sum(np.linalg.svd(_psd_sqrt(s1) @ _psd_sqrt(s2), compute_uv=False))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * cross)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Features [N, D] -> mean [D] and unbiased covariance [D, D] (float64)."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"features must be [N >= 2, D], got shape {features.shape}")
  mu = features.mean(axis=0)
  centred = features - mu
  return mu, centred.T @ centred / (features.shape[0] - 1)


def frechet_distance_of_features(real_features, fake_features) -> float:
  return frechet_distance(*feature_statistics(real_features), *feature_statistics(fake_features))


@dataclasses.dataclass(eq=False)
class FeatureExtractor:
  """Videos -> features [N, D], in batches of a fixed size through one jitted function.

  `apply(variables, videos) -> features` receives raw videos (any preprocessing
  belongs inside it); the last batch is padded, so only one shape is compiled.
  """

  apply: Callable[[Any, jax.Array], jax.Array]
  variables: Any
  batch_size: int = 8
  dtype: Any = np.float64  # of the output: float64 for the distance, an int type for token encoders

  def __post_init__(self):
    self._jitted = jax.jit(self.apply)

  def __call__(self, videos) -> np.ndarray:
    videos = np.asarray(videos)
    n = videos.shape[0]
    if n == 0:
      raise ValueError("no videos to extract features from")
    out = []
    for start in range(0, n, self.batch_size):
      chunk = _pad_rows(videos[start:start + self.batch_size], self.batch_size)
      out.append(np.asarray(self._jitted(self.variables, chunk))[:min(self.batch_size, n - start)])
    return np.concatenate(out).astype(self.dtype)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """[n, ...] -> [rows, ...] by repeating the last row (one compiled shape for a short last batch)."""
  pad = rows - x.shape[0]
  return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad > 0 else x


# ---------------------------------------------------------------------------
# Real videos.


def real_videos(data_cfg, start: int, count: int) -> dict[str, np.ndarray]:
  """Test videos start..start+count-1 of a video data config.

  Returns video uint8 [N, F, H, W, C], label int32 [N, D] and class int32 [N]
  (sum_i label_i 10^i, the class condition of nbp.data.tokens.TokensAndClass).
  Moving digits are generated example by example (no dataset build; indices
  past num_test are valid); other datasets are read from their test split.
  """
  if data_cfg.name == "moving_digits":
    examples = [moving_digits.moving_digits_example(  # seed 0: the seed of builder_from_config's datasets
        i, seed=0, split="test", num_frames=data_cfg.num_frames, frame_size=data_cfg.frame_size,
        num_digits=data_cfg.num_digits, speed=float(data_cfg.speed)) for i in range(start, start + count)]
  else:
    source = video_sources.video_source(data_cfg, "test")
    if start + count > len(source):
      raise ValueError(f"{data_cfg.name!r} has {len(source)} test videos; videos {start}..{start + count - 1} "
                       "were asked for (fewer num_videos, or a smaller seed).")
    examples = [source[i] for i in range(start, start + count)]
  labels = np.stack([np.asarray(e["label"], np.int64).reshape(-1) for e in examples])  # [N, D]
  classes = np.sum(labels * 10 ** np.arange(labels.shape[1]), axis=1).astype(np.int32)
  return {"video": np.stack([np.asarray(e["video"], np.uint8) for e in examples]),
          "label": labels.astype(np.int32), "class": classes}


def tokenizer_workdir(token_dir: str) -> str:
  """The workdir of the tokenizer that wrote the tokens in `token_dir` (their metadata names it)."""
  workdir = tokens_lib.read_metadata(token_dir).get("tokenizer_workdir")
  if not workdir:
    raise ValueError(f"The tokens in {token_dir!r} do not name the tokenizer that wrote them "
                     f"({tokens_lib.METADATA} has no tokenizer_workdir): re-encode them with "
                     "experiments.encode_tokens.")
  return workdir


def run_video_data(config):
  """The data config of the videos a run models: its own, or for token runs its tokenizer's."""
  if config.data.name == "tokens":
    return workdir_lib.read_config(tokenizer_workdir(config.data.token_dir)).data
  if config.data.name not in video_sources.NAMES:
    raise ValueError(f"config.data.name={config.data.name!r}: not videos, so no FVD.")
  return config.data


# ---------------------------------------------------------------------------
# Generated videos: the run's sampler, conditioned like a real set.


def sampler_settings(config, model: next_block.Model) -> dict[str, Any]:
  """The keywords of `next_block.sample` in `config.sampler`, but the batch size and the conditions."""
  if config.family != "next_block":
    raise ValueError(f"config.family={config.family!r}: the FVD evaluators sample 'next_block' runs.")
  settings = {k: v for k, v in config.get("sampler", {}).items() if k != "num_samples"}
  if model.condition != "class" or settings.get("guidance_scale") == 1.0:
    settings["guidance_scale"] = None  # as next_block.make_task: scale 1 is the conditional model
  return settings


def conditioned_sampler(config, model: next_block.Model, batch_size: int):
  """(params, rng, labels int [B], prompt int [B, prefix_frames, h, w]) -> tokens [B, f, h, w]; unjitted.

  `nbp.tasks.next_block.sample` with the run's `config.sampler` settings (its
  guidance included), the conditions given explicitly: the task's own sampler
  always draws classes 0, 1, 2, ... and continues the first test videos.
  Labels and prompt are ignored where the model has no such condition.
  """
  settings = sampler_settings(config, model)

  def sample(params, rng, labels, prompt):
    return next_block.sample(model, params, rng, num_samples=batch_size,
                             labels=labels if model.condition == "class" else None,
                             prompt=prompt if model.condition == "frames" else None, **settings)
  return sample


@functools.cache
def _tokenizer_encoder(workdir: str, batch_size: int) -> FeatureExtractor:
  """uint8 videos [N, F, H, W, C] -> tokens int32 [N, f, h, w] by the tokenizer trained in `workdir`."""
  model, params = video_tokenizer.load_tokenizer(workdir)
  encode = lambda p, v: video_tokenizer.encode_video(model, p, v.astype(jnp.float32) / 127.5 - 1.0)
  return FeatureExtractor(encode, params, batch_size, dtype=np.int32)


def videos_to_tokens(config, videos: np.ndarray, *, batch_size: int) -> np.ndarray:
  """uint8 videos [N, F, H, W, C] -> the run's grid tokens [N, f, h, w] (the inverse of `Task.to_videos`)."""
  if config.data.name == "tokens":
    return _tokenizer_encoder(tokenizer_workdir(config.data.token_dir), batch_size)(videos)
  return pipeline.quantize_video(videos, config.model.codebook_size)[..., 0]  # grey levels are the tokens


def check_video_shape(task, expected: tuple[int, ...], judge: str) -> None:
  """The run's decoded videos [F, H, W, C] must be those of the real set: a ValueError names both."""
  if task.to_videos is None:
    raise ValueError("the run's samples are not videos (Task.to_videos is None): no FVD.")
  shape = task.to_videos(np.zeros((1, *task.model.grid), np.int32)).shape[1:]  # one decoded grid
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
    fn = conditioned_sampler(setup.config, setup.task.model, batch_size)
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
  task, config = setup.task, setup.config
  model = task.model
  check_video_shape(task, expected_shape, judge)
  n = len(conditions["class"])
  labels = conditions["class"].astype(np.int32)
  if model.condition == "class" and labels.max() >= model.num_classes:
    raise ValueError(f"the real videos of {judge} have classes up to {labels.max()} but the generator has "
                     f"config.model.num_classes={model.num_classes} (a different num_digits?).")
  prompt = np.zeros((n, model.prefix_frames, *model.grid[1:]), np.int32)
  if model.condition == "frames":
    prompt = videos_to_tokens(config, conditions["video"], batch_size=batch_size)[:, :model.prefix_frames]
  batches = -(-n // batch_size)
  labels, prompt = _pad_rows(labels, batches * batch_size), _pad_rows(prompt, batches * batch_size)
  with setup.context():
    compiled, compile_seconds = _compiled_sampler(setup, batch_size, params, rng, labels[:batch_size],
                                                  prompt[:batch_size])
    # Keys and inputs on the device first: only the sampler calls are timed.
    inputs = [jax.block_until_ready((jax.random.fold_in(rng, i), jnp.asarray(labels[i:i + batch_size]),
                                     jnp.asarray(prompt[i:i + batch_size])))
              for i in range(0, batches * batch_size, batch_size)]
    out, seconds = [], 0.0
    for args in inputs:
      start = time.perf_counter()
      tokens = jax.block_until_ready(compiled(params, *args))
      seconds += time.perf_counter() - start
      out.append(np.asarray(tokens))
  tokens = np.concatenate(out)[:n]
  videos = task.to_videos(tokens)
  return Generated(videos=videos, tokens=tokens, drawn=batches * batch_size,
                   frames=videos.shape[1] * model.num_predicted // model.num_tokens,
                   tokens_per_video=model.num_predicted, compile_seconds=compile_seconds, sample_seconds=seconds)


def compare_with_real(context, *, real_data, extract: Callable[[np.ndarray], np.ndarray], key: str,
                      num_videos: int, batch_size: int, seed: int, floor: bool, judge: str):
  """The body of an FVD evaluator: (metrics, stand-in set, Generated).

  metrics: {key: d(reference, generated), key + "_floor": d(reference,
  stand-in) when `floor`, and the generation's rates}. The real features come
  first, so a bad extractor setting fails before the sampler runs. The key is
  jax.random.key(seed), not the loop's: every evaluation of a run, and every
  run of a benchmark seed, uses the same conditions and keys.
  """
  reference = real_videos(real_data, 0, num_videos)
  stand_in = real_videos(real_data, (seed + 1) * num_videos, num_videos)
  reference_features = extract(reference["video"])
  metrics = {}
  if floor:
    metrics[key + "_floor"] = frechet_distance_of_features(reference_features, extract(stand_in["video"]))
  generated = generate_videos(context.setup, context.params, jax.random.key(seed), stand_in,
                              batch_size=batch_size, expected_shape=reference["video"].shape[1:], judge=judge)
  metrics[key] = frechet_distance_of_features(reference_features, extract(generated.videos))
  metrics.update(generated.rates(), num_videos=float(num_videos))
  return metrics, stand_in, generated
