"""The in-domain FID on digit images: the Fréchet distance of a digit classifier's features, and its evaluator.

The classifier is the moving-digits one (nbp.models.video_classifier) trained
here on the "digits" image dataset, each image a one-frame video [1, H, W, 1]
(experiments/configs/image_classifier_digits.py); its penultimate features of
real and generated images replace Inception's. Its figures are reported under
the name "fid_digits_classifier", never "fid", and are not comparable with
published FID: compare them only with each other (same classifier, same N) and
with the real-vs-real floor.

`config.evals.<name> = dict(type="fid_digits", classifier_workdir=..., ...)`
(the fields of `Evaluator`) runs it in training or with experiments.evaluate.
Reference, stand-in and generated sets as nbp.evaluators.image_generation
describes; the classifier must have been trained on digits at the run's image
size. Besides the distance it reports `class_match`, the share of generated
images whose top class is the one asked for, and `class_match_real`, the same
share for the stand-in (the classifier's accuracy on real images).

Dimensions: N images, H height, W width, K classes (10), E feature width.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import numpy as np

from nbp.evaluators import frechet
from nbp.evaluators import image_generation
from nbp import tasks
from nbp.training import workdir as workdir_lib

FID_KEY = "fid_digits_classifier"  # the name of the in-domain FID in every output


def as_videos(images):
  """uint8 images [N, H, W, 1] -> one-frame videos [N, 1, H, W, 1], the classifier's input."""
  return images[:, None]


def class_match(logits: np.ndarray, classes: np.ndarray) -> float:
  """Share of images whose top-scoring class (logits [N, K]) is the one in `classes` int [N]."""
  return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(classes)))


@dataclasses.dataclass(eq=False)
class Judge:
  """A trained digit classifier and its two batched views of images: features (the FID's) and logits."""

  config: Any  # the classifier run's config: its data section says which images it was trained on
  features: frechet.FeatureExtractor  # uint8 [N, H, W, 1] -> [N, E]
  logits: frechet.FeatureExtractor  # uint8 [N, H, W, 1] -> [N, K]


@functools.cache
def load_judge(workdir: str, batch_size: int) -> Judge:
  """The classifier trained in `workdir` (its "features" and "logits"), loaded and jitted once per process."""
  run = tasks.load_run(workdir)
  features, logits = (run.task.predict_fn(name, who="fid_digits") for name in ("features", "logits"))
  return Judge(run.config, frechet.FeatureExtractor(lambda p, x: features(p, as_videos(x)), run.params, batch_size),
               frechet.FeatureExtractor(lambda p, x: logits(p, as_videos(x)), run.params, batch_size))


def check_judge(run_data, classifier_data, judge: str) -> None:
  """The run's images must be digits at the image size the classifier was trained on: a ValueError names both."""
  if classifier_data.name != "digits":
    raise ValueError(f"{judge} was trained on {classifier_data.name!r}, not the 'digits' images: train it with "
                     "experiments/configs/image_classifier_digits.py.")
  if run_data.name != "digits":
    raise ValueError(f"the run models {run_data.name!r} images; {judge} judges 'digits' images.")
  if run_data.image_size != classifier_data.image_size:
    raise ValueError(f"data.image_size: the run's images are {run_data.image_size} but {judge} was trained at "
                     f"{classifier_data.image_size}: train one at the run's size (image_classifier_digits.py:"
                     f"{run_data.image_size}).")


@dataclasses.dataclass
class Evaluator:
  """fid_digits_classifier of the run's sampler against real digit images; the schema of its config section."""

  classifier_workdir: str = ""  # a video_classifier run trained on "digits" images at the run's image size
  num_images: int = 256  # N per set; the digits test split holds 360 (few images bias the distance up)
  batch_size: int = 64  # images per sampler call and per classifier call
  seed: int = 0  # the sampling key and the stand-in set: train images seed*N..(seed+1)*N-1
  floor: bool = True  # also d(reference, stand-in): the distance between two real sets of N images
  split: str = "validation"  # the reference set's split: validation while choosing, test once
  pred: str = "sample_images"  # the run's class-conditional image sampler (a predict function)
  to_images: str = "to_images"  # the run's samples -> uint8 images (a predict function)

  def __post_init__(self):
    # Fails when the section is built (before the first training step), not at the first evaluation.
    if not self.classifier_workdir:
      raise ValueError("fid_digits needs classifier_workdir: the workdir of a video_classifier run on digit "
                       "images (experiments/configs/image_classifier_digits.py).")
    if not os.path.exists(os.path.join(self.classifier_workdir, workdir_lib.CONFIG_FILE)):
      raise FileNotFoundError(f"fid_digits: classifier_workdir={self.classifier_workdir!r} has no "
                              f"{workdir_lib.CONFIG_FILE}: train the classifier there first.")

  def run(self, context) -> dict[str, float]:
    return self.measure(context)[0]

  def measure(self, context):
    """(metrics, stand-in set, GeneratedImages): `run`'s numbers and the images behind them."""
    judge = load_judge(self.classifier_workdir, self.batch_size)
    name = f"the classifier in {self.classifier_workdir}"
    check_judge(image_generation.run_image_data(context.setup.config), judge.config.data, name)
    metrics, stand_in, generated = image_generation.compare_with_real_images(
        context, extract=judge.features, key=FID_KEY, num_images=self.num_images, batch_size=self.batch_size,
        seed=self.seed, floor=self.floor, judge=name, split=context.split_of(self),
        fns=image_generation.ImageFns(self.pred, self.to_images))
    metrics["class_match"] = class_match(judge.logits(generated.images), stand_in["class"])
    if self.floor:
      metrics["class_match_real"] = class_match(judge.logits(stand_in["image"]), stand_in["class"])
    return metrics, stand_in, generated
