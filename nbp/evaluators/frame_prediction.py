"""Frame prediction held out as a user would check it: do the predicted frames move where the digits go?

For a run conditioned on its first frames (`config.model.condition`
"frames"), the sampler continues the first frames of N videos of a split (the
run's own videos, or for token runs its tokenizer's, through the tokenizer),
and the predicted frames are compared with the true ones
(`generation.frame_prediction_metrics`): the distance in pixels between their
centres of mass, and the pixel MSE, beside the same figures for repeating the
last given frame (what a model that learned no motion would do) and, for the
MSE, black frames. No classifier is needed; the in-domain FVD evaluator
(`fvd_digits`) reports the same figures beside its distance.

The given frames may leave the future open (a digit that may have bounced), so
for one moving digit the evaluator also reports what ideal predictors score
(`moving_digits.motion_floors`): a draw of the true conditional distribution
(com_error_px_exact_sampler), the floor of any sampler that draws, and the best
single answer per condition (com_error_px_best_point), the floor of any.

Dimensions: N videos, F frames, H height, W width, C channels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from nbp.data import moving_digits
from nbp.evaluators import generation


@dataclasses.dataclass
class Evaluator:
  """The predicted frames of N videos of a split against the true ones; the schema of its config section."""

  num_videos: int = 64  # N: videos 0..N-1 of the split, continued from their first frames
  batch_size: int = 16  # videos per sampler call
  seed: int = 0  # the sampling key: jax.random.key(seed)
  split: str = "validation"  # validation while choosing, test once

  def run(self, context) -> dict[str, float]:
    s = context.setup
    if s.task.model.condition != "frames":
      raise ValueError(f"frame_prediction: config.model.condition is {s.task.model.condition!r}; it evaluates runs "
                       "that continue given frames (condition 'frames').")
    split = context.split_of(self)
    real = generation.real_videos(generation.run_video_data(s.config), 0, self.num_videos, split)
    generated = generation.generate_videos(s, context.params, jax.random.key(self.seed), real,
                                           batch_size=self.batch_size, expected_shape=real["video"].shape[1:],
                                           judge=f"the run's {split} videos")
    given = generation.given_video_frames(s.config)
    metrics = generation.frame_prediction_metrics(real["video"], generated.videos, given)
    metrics.update(_floors(generation.run_video_data(s.config), given))
    return dict(metrics, frames_per_s=generated.rates()["frames_per_s"], num_videos=float(self.num_videos))


def _floors(data_cfg, given: int) -> dict[str, float]:
  """For one moving digit, the centre-of-mass errors of ideal predictors (`moving_digits.motion_floors`):
  com_error_px_exact_sampler (a draw of the true conditional distribution) and com_error_px_best_point (the best
  single answer per condition). Other data: none."""
  if data_cfg.name != "moving_digits" or data_cfg.num_digits != 1:
    return {}
  floors = _motion_floors(data_cfg.num_frames, data_cfg.frame_size, float(data_cfg.speed), given)
  return {"com_error_px_exact_sampler": floors["exact_sampler"], "com_error_px_best_point": floors["best_point"]}


@functools.cache
def _motion_floors(num_frames: int, frame_size: int, speed: float, given: int) -> dict[str, float]:
  return moving_digits.motion_floors(num_frames=num_frames, frame_size=frame_size, speed=speed, given=given)
