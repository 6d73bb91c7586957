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

Dimensions: N videos, F frames, H height, W width, C channels.
"""

from __future__ import annotations

import dataclasses

import jax

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
    metrics = generation.frame_prediction_metrics(real["video"], generated.videos,
                                                  generation.given_video_frames(s.config))
    return dict(metrics, frames_per_s=generated.rates()["frames_per_s"], num_videos=float(self.num_videos))
