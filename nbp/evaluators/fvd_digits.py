"""The in-domain FVD on moving digits: the Fréchet distance of a digit classifier's features, and its evaluator.

The classifier is trained in this codebase (nbp.tasks.video_classifier); its
penultimate features of real and generated videos replace I3D's. Its figures
are reported under the name "fvd_digits_classifier", never "fvd", and are not
comparable with published FVD: compare them only with each other (same
classifier, same N) and with the real-vs-real floor.

`config.evals.<name> = dict(type="fvd_digits", classifier_workdir=..., ...)`
(the fields of `Evaluator`) runs it in training or with experiments.evaluate;
experiments/benchmark_fvd.py runs it over several runs and seeds. The real
videos are the classifier's own data (its config.json): reference, stand-in
and generated sets as nbp.evaluators.frechet describes. Every video, real or
generated, is requantised to the classifier's `data.levels` first (its
"features" and "logits" do it), so pixel runs' videos at the bin centres meet real videos
after the same quantisation. Frame-prediction runs also get the figures of
`generation.frame_prediction_metrics`: how far each predicted frame's centre
of mass lies from the true frame's, and the pixel MSE, beside repeating the
last given frame and beside black frames.

Dimensions: N videos, F frames, H height, W width, D digits per video,
K classes (10), E feature width.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import numpy as np

from nbp.evaluators import frechet
from nbp.evaluators import generation
from nbp import tasks
from nbp.training import workdir as workdir_lib

FVD_KEY = "fvd_digits_classifier"  # the name of the in-domain FVD in every output
KNOBS = ("num_digits", "speed")  # moving-digits knobs the video shape does not show, checked apart


def digits_fvd(real, fake, judge: "Judge") -> dict[str, float]:
  """In-domain FVD of moving digits: {"fvd_digits_classifier": distance}.

  `real` and `fake` are uint8 videos [N, F, H, W, 1] at the classifier's
  training size; the classifier requantises both to its `data.levels`.
  """
  return {FVD_KEY: frechet.frechet_distance_of_features(judge.features(real), judge.features(fake))}


def class_match(logits: np.ndarray, labels: np.ndarray) -> float:
  """Share of videos whose k top-scoring classes are exactly the k distinct digits of `labels` int [N, D].

  logits [N, K]. For a class-conditional generator, `labels` are the digits it
  was asked for; for real videos, their own (the classifier's accuracy).
  """
  labels = np.asarray(labels)
  wanted = np.zeros(logits.shape, bool)  # [N, K]: the classes shown at least once
  np.put_along_axis(wanted, labels, True, axis=-1)
  ranks = np.argsort(np.argsort(-logits, axis=-1), axis=-1)  # 0 for the top class
  return float(np.mean(np.all((ranks < wanted.sum(-1, keepdims=True)) == wanted, axis=-1)))


@dataclasses.dataclass(eq=False)
class Judge:
  """A trained classifier and its two batched views of videos: features (the FVD's) and logits."""

  config: Any  # the classifier run's config: its data section is the real videos
  features: frechet.FeatureExtractor  # uint8 [N, F, H, W, 1] -> [N, E]
  logits: frechet.FeatureExtractor  # uint8 [N, F, H, W, 1] -> [N, K]


@functools.cache
def load_judge(workdir: str, batch_size: int) -> Judge:
  """The classifier trained in `workdir` (its "features" and "logits"), loaded and jitted once per process."""
  run = tasks.load_run(workdir)
  features, logits = (run.task.predict_fn(name, who="fvd_digits") for name in ("features", "logits"))
  return Judge(run.config, frechet.FeatureExtractor(features, run.params, batch_size),
               frechet.FeatureExtractor(logits, run.params, batch_size))


def check_generator(config, classifier_data, judge: str) -> None:
  """What the shape check cannot see: digits and speed of the run's videos, and pixel runs' grey levels."""
  data = generation.run_video_data(config)
  if data.name != "moving_digits":
    raise ValueError(f"the run models {data.name!r} videos; {judge} judges moving digits.")
  for knob in KNOBS:
    if data[knob] != classifier_data[knob]:
      raise ValueError(f"data.{knob}: generator {data[knob]!r} vs {judge} {classifier_data[knob]!r}; train the "
                       "classifier on the generator's videos (video_classifier_digits.py:local,4x12 for the local "
                       "pixel runs).")
  levels = classifier_data.get("levels", 0)
  if config.data.name == "moving_digits" and config.model.codebook_size != levels:
    raise ValueError(f"the generator draws {config.model.codebook_size} grey levels (config.model.codebook_size) "
                     f"but {judge} was trained at data.levels={levels}: real and generated videos would not go "
                     "through the same quantisation.")


@dataclasses.dataclass
class Evaluator:
  """fvd_digits_classifier of the run's sampler against real test videos; the schema of its config section."""

  classifier_workdir: str = ""  # a trained video_classifier run; its config.json gives the real videos
  num_videos: int = 256  # N: generated videos, and real videos per set (few videos bias the distance up)
  batch_size: int = 64  # videos per sampler call and per classifier call
  seed: int = 0  # the sampling key and the stand-in set: videos (seed+1)N..(seed+2)N-1 of the split
  floor: bool = True  # also d(reference, stand-in): the distance between two real sets of N videos
  split: str = "validation"  # the real videos' split: validation while choosing, test once

  def __post_init__(self):
    # Fails when the section is built (before the first training step), not at the first evaluation.
    if not self.classifier_workdir:
      raise ValueError("fvd_digits needs classifier_workdir: the workdir of a trained video_classifier run "
                       "(experiments/configs/video_classifier_digits.py).")
    if not os.path.exists(os.path.join(self.classifier_workdir, workdir_lib.CONFIG_FILE)):
      raise FileNotFoundError(f"fvd_digits: classifier_workdir={self.classifier_workdir!r} has no "
                              f"{workdir_lib.CONFIG_FILE}: train the classifier there first.")

  def run(self, context) -> dict[str, float]:
    return self.measure(context)[0]

  def measure(self, context) -> tuple[dict[str, float], dict[str, np.ndarray], generation.Generated]:
    """(metrics, stand-in set, Generated): `run`'s numbers and the videos behind them."""
    judge = load_judge(self.classifier_workdir, self.batch_size)
    name = f"the classifier in {self.classifier_workdir}"
    check_generator(context.setup.config, judge.config.data, name)
    metrics, stand_in, generated = generation.compare_with_real(
        context, real_data=judge.config.data, extract=judge.features, key=FVD_KEY, num_videos=self.num_videos,
        batch_size=self.batch_size, seed=self.seed, floor=self.floor, judge=name, split=context.split_of(self))
    if context.setup.task.model.condition == "class":
      metrics["class_match"] = class_match(judge.logits(generated.videos), stand_in["label"])
    if context.setup.task.model.condition == "frames":  # continuations of the stand-in's first frames
      metrics.update(generation.frame_prediction_metrics(
          stand_in["video"], generated.videos, generation.given_video_frames(context.setup.config)))
    if self.floor:
      metrics["class_match_real"] = class_match(judge.logits(stand_in["video"]), stand_in["label"])
    return metrics, stand_in, generated
