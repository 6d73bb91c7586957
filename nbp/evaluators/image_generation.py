"""Generated images against real ones: what the FID evaluators share besides the distance.

The image counterpart of nbp.evaluators.generation. Per sampling seed s and N
images per set, from the run's image dataset (`images.image_data_config(
config.data)`: its own section, or for latent runs the images the latents were
encoded from):
  reference  real images 0..N-1 of the evaluator's split (validation while
             choosing, test once);
  stand-in   real train images sN..(s+1)N-1, with their classes;
  generated  N images of the run's "sample_images" predict function,
             conditioned on the stand-in's classes, decoded by its "to_images".
`compare_with_real_images` gives d(reference, generated) and, as the floor to
read it against, d(reference, stand-in): the distance N real images already
have (train against test, so it also holds the split's own shift). Every set
is held in memory as uint8 (50k ImageNet images at 256x256 take about 10 GB).

Dimension letters: N images, B sampler batch, H height, W width, C channels.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from nbp.data import images
from nbp.evaluators import frechet
from nbp.training import sharding

STAND_IN_SPLIT = "train"  # the stand-in's split: its classes condition the generator


def run_image_data(config):
  """The data config of the images a run models (for latent runs, the images behind its latents)."""
  data = images.image_data_config(config.data)
  if data.name not in images.IMAGE_DATASETS:
    raise ValueError(f"config.data.name={config.data.name!r}: not images, so no FID.")
  return data


def real_sets(data_cfg, *, num_images: int, seed: int,
              split: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(reference, stand-in): {"image": uint8 [N, S, S, C], "class": int32 [N]} each, as the module docstring says."""
  reference = images.read_images(data_cfg, split, 0, num_images)
  stand_in = images.read_images(data_cfg, STAND_IN_SPLIT, seed * num_images, num_images)
  return reference, stand_in


@dataclasses.dataclass(frozen=True)
class ImageFns:
  """The names of the run's predict functions an FID evaluator calls (its config's `pred` and `to_images`)."""

  pred: str = "sample_images"  # (params, rng, labels int [B]) -> samples of B images
  to_images: str = "to_images"  # samples as numpy -> uint8 [N, H, W, C]

  def get(self, task, who: str):
    return task.predict_fn(self.pred, who), task.predict_fn(self.to_images, who)


def check_image_shape(decoded: np.ndarray, expected: tuple[int, ...], judge: str) -> None:
  """Decoded images [B, H, W, C] must be uint8 of the real images' [H, W, C]: a ValueError names both shapes."""
  if decoded.ndim != 4 or decoded.dtype != np.uint8:
    raise ValueError(f"the run's to_images gave {decoded.dtype} of shape {tuple(decoded.shape)}; "
                     "expected uint8 [N, H, W, C].")
  if tuple(decoded.shape[1:]) != tuple(expected):
    raise ValueError(f"the generator's images are [H, W, C] = {tuple(decoded.shape[1:])} but {judge} has "
                     f"{tuple(expected)}: compare a run with real images of its own shape.")


@dataclasses.dataclass
class GeneratedImages:
  """The generated set and its timing."""

  images: np.ndarray  # uint8 [N, H, W, C]
  samples: Any  # what the sampler returned, as numpy, cut to N
  drawn: int  # images drawn: N rounded up to whole sampler batches
  compile_seconds: float
  sample_seconds: float  # sampler calls only, block_until_ready per batch

  def rates(self) -> dict[str, float]:
    return {"images_per_s": self.drawn / self.sample_seconds, "sample_seconds": self.sample_seconds,
            "compile_seconds": self.compile_seconds}


# (setup, sampler, B) -> (compiled sampler, its compile seconds)
_COMPILED: dict[tuple[Any, Any, int], tuple[Any, float]] = {}


def _compiled_sampler(setup, sample_images, batch_size: int, params, rng, labels):
  """`sample_images` compiled once per setup and batch size (later seeds and evaluations reuse it).

  One untimed call follows the compilation: the first call of an executable is
  slower (allocations), and would make the first seed's images/s look worse.
  """
  key = (setup, sample_images, batch_size)
  if key not in _COMPILED:
    start = time.perf_counter()
    compiled = jax.jit(sample_images, out_shardings=sharding.replicated(setup.mesh)).lower(
        params, rng, labels).compile()
    seconds = time.perf_counter() - start
    jax.block_until_ready(compiled(params, rng, labels))
    _COMPILED[key] = (compiled, seconds)
  return _COMPILED[key]


def _to_numpy(tree):
  return jax.tree.map(np.asarray, tree)


def generate_images(setup, params, rng, classes: np.ndarray, *, batch_size: int, expected_shape: tuple[int, ...],
                    judge: str, fns: ImageFns = ImageFns()) -> GeneratedImages:
  """N images of the run's sampler for `classes` int [N], decoded to uint8 [N, H, W, C].

  Batch i of B draws with the key fold_in(rng, i * B); the last batch is padded
  by repeating its last class. `expected_shape` is [H, W, C] of the images the
  result is compared with; `judge` names where that shape comes from. The
  first batch's images are checked against it before the others are drawn: a
  ValueError names both shapes.
  """
  task = setup.task
  sample_images, to_images = fns.get(task, who="an FID evaluator")
  n = len(classes)
  num_classes = getattr(task.model, "num_classes", None)
  if num_classes is not None and int(classes.max()) >= num_classes:
    raise ValueError(f"the real images of {judge} have classes up to {int(classes.max())} but the generator has "
                     f"num_classes={num_classes}.")
  batches = -(-n // batch_size)
  labels = frechet.pad_rows(np.asarray(classes, np.int32), batches * batch_size)
  with setup.context():
    compiled, compile_seconds = _compiled_sampler(setup, sample_images, batch_size, params, rng, labels[:batch_size])
    # Keys and labels on the device first: only the sampler calls are timed.
    inputs = [jax.block_until_ready((jax.random.fold_in(rng, i), jnp.asarray(labels[i:i + batch_size])))
              for i in range(0, batches * batch_size, batch_size)]
    out, seconds = [], 0.0
    for args in inputs:
      start = time.perf_counter()
      samples = jax.block_until_ready(compiled(params, *args))
      seconds += time.perf_counter() - start
      out.append(_to_numpy(samples))
      if len(out) == 1:
        check_image_shape(to_images(out[0]), expected_shape, judge)
  samples = jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *out)
  generated = np.asarray(to_images(samples))
  return GeneratedImages(images=generated, samples=samples, drawn=batches * batch_size,
                         compile_seconds=compile_seconds, sample_seconds=seconds)


def compare_with_real_images(context, *, extract: Callable[[np.ndarray], np.ndarray], key: str, num_images: int,
                             batch_size: int, seed: int, floor: bool, judge: str = "the run's real images",
                             split: str = "validation", fns: ImageFns = ImageFns()):
  """The body of an FID evaluator: (metrics, stand-in set, GeneratedImages).

  metrics: {key: d(reference, generated), key + "_floor": d(reference,
  stand-in) when `floor`, images_per_s, sample_seconds, compile_seconds,
  num_images}. The real features come first, so a bad extractor fails before
  the sampler runs. The sampling key is jax.random.key(seed), not the loop's:
  every evaluation of a run uses the same classes and keys.
  """
  reference, stand_in = real_sets(run_image_data(context.setup.config), num_images=num_images, seed=seed, split=split)
  reference_features = extract(reference["image"])
  metrics = {}
  if floor:
    metrics[key + "_floor"] = frechet.frechet_distance_of_features(reference_features, extract(stand_in["image"]))
  generated = generate_images(context.setup, context.params, jax.random.key(seed), stand_in["class"],
                              batch_size=batch_size, expected_shape=reference["image"].shape[1:], judge=judge,
                              fns=fns)
  metrics[key] = frechet.frechet_distance_of_features(reference_features, extract(generated.images))
  metrics.update(generated.rates(), num_images=float(num_images))
  return metrics, stand_in, generated
