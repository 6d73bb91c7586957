"""The standard Fréchet Inception Distance: Inception-v3 pool3 features of preprocessed images, and its evaluator.

FID is the Fréchet distance between two Gaussians fitted to the 2048-d pool3
features of Inception-v3 (nbp.models.inception, the FID variant of the
network) of real and of generated images; the images are resized to 299x299
(bilinear) and scaled to [-1, 1] first, grey images repeated to 3 channels.
The weights load from a local file the user names (`inception_path`); nothing
is downloaded.

`config.evals.<name> = dict(type="fid", inception_path=..., ...)` (the fields
of `Evaluator`) compares the run's class-conditional sampler (Task.sample_images)
with real images of the run's image dataset: reference, stand-in and generated
sets as nbp.evaluators.image_generation describes. Published ImageNet figures
use 50k generated images against statistics of the whole train split; N
images against N test images, as here, read higher (few images bias FID up),
so compare figures at the same N and with the floor.

Dimension letters: N images, H height, W width, C channels, R the side the
Inception sees, D feature width (2048).
"""

from __future__ import annotations

import dataclasses
import functools
import os

from nbp.evaluators import frechet
from nbp.evaluators import image_generation
from nbp.models import inception

FID_KEY = "fid"  # the standard FID; only this evaluator reports under that name


def inception_extractor(variables, *, batch_size: int = 50,
                        resolution: int = inception.RESOLUTION) -> frechet.FeatureExtractor:
  """uint8 images [N, H, W, C] -> pool3 features [N, 2048], in jitted batches (e.g. of `load_params(path)`)."""
  apply = functools.partial(inception.pool3_features, resolution=resolution)
  return frechet.FeatureExtractor(apply, variables, batch_size)


def fid(real_images, fake_images, *, extractor: frechet.FeatureExtractor) -> float:
  """Fréchet Inception Distance between two sets of images [N, H, W, C] (uint8)."""
  return frechet.frechet_distance_of_features(extractor(real_images), extractor(fake_images))


@functools.cache
def _extractor(path: str, batch_size: int, resolution: int) -> frechet.FeatureExtractor:
  """The Inception extractor of a weight file, loaded and jitted once per process."""
  return inception_extractor(inception.load_params(path), batch_size=batch_size, resolution=resolution)


@dataclasses.dataclass
class Evaluator:
  """The Inception FID of the run's sampler against real images; the schema of its config section."""

  inception_path: str = ""  # a local .npz of the FID Inception-v3 (nbp.models.inception's format)
  num_images: int = 1000  # N per set; published figures use 50k (few images bias FID up)
  batch_size: int = 64  # images per sampler call
  inception_batch_size: int = 50  # images per Inception call
  seed: int = 0  # the sampling key and the stand-in set: train images seed*N..(seed+1)*N-1
  resolution: int = inception.RESOLUTION  # side the images are resized to; not 299: not the standard FID
  floor: bool = True  # also d(reference, stand-in): the FID between two real sets of N images
  split: str = "validation"  # the reference set's split: validation while choosing, test once
  pred: str = "sample_images"  # the run's class-conditional image sampler (a predict function)
  to_images: str = "to_images"  # the run's samples -> uint8 images (a predict function)

  def __post_init__(self):
    # Fails when the section is built (before the first training step), not at the first evaluation.
    if not self.inception_path or not os.path.exists(self.inception_path):
      # evaluators.build prefixes "config.evals.<name>: ".
      raise FileNotFoundError(f"fid: inception_path={self.inception_path!r} is not a file. Nothing is downloaded: "
                              "convert the FID Inception-v3 weights once into a local .npz (format: "
                              "nbp/models/inception.py).")

  def run(self, context) -> dict[str, float]:
    return self.measure(context)[0]

  def measure(self, context):
    """(metrics, stand-in set, GeneratedImages): `run`'s numbers and the images behind them."""
    extract = _extractor(self.inception_path, self.inception_batch_size, self.resolution)
    return image_generation.compare_with_real_images(
        context, extract=extract, key=FID_KEY, num_images=self.num_images, batch_size=self.batch_size,
        seed=self.seed, floor=self.floor, split=context.split_of(self),
        fns=image_generation.ImageFns(self.pred, self.to_images))
