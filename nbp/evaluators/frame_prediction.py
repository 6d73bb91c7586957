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

A single draw is a sample, not a forecast: with `draws` K > 1 the sampler
continues each video K times, the single-draw figures average over the K, and
the pixel mean of the K predicted frames, the Monte-Carlo estimate of the
conditional mean (the least-MSE prediction), is scored as one more predictor
(`*_mean_of_draws`). Its floor is com_error_px_exact_mean: the mean of many
draws of the true conditional distribution.

Where a miss comes from, the model or its sampler: with `belief` (pixel runs
on one moving digit), the model scores every shift of the last given frame as
the first predicted frame (the true one is among them: the digit moves
whole), which gives its belief over where the digit goes. Reported for that
first predicted frame: what a draw of the belief misses by
(com_error_px_first_belief), what the sampler's draws miss by
(com_error_px_first), and the exact sampler's floor
(com_error_px_first_exact_sampler). A sampler that misses by more than the
belief loses what the model knows; a belief that misses by more than the
floor is the model's own. Where frames follow it, the evaluator also draws
that first frame from the belief (a whole digit where the model believes it
goes) and lets the sampler continue from it (com_error_px_after_belief, and
its `*_mean_of_draws`): what the run would score with a sampler that drew the
first frame as the model believes, whatever the block shape. And it lets the
sampler continue the true first predicted frame (com_error_px_after_truth,
scored on the frames after it), beside the belief over the next frame given
the true ones (com_error_px_after_truth_belief) and that frame's floor
(com_error_px_after_truth_exact_sampler): the model's skill one frame on,
with more frames given. Last, every predicted frame is drawn whole from the
belief, each given the frames drawn before it (`whole_frame_draws`;
com_error_px_belief_chain and its `*_mean_of_draws`): what the model's own
likelihood forecasts when its frames are restricted to whole shifts of the
digit, which the data guarantees and the row sampler does not know.

Dimensions: N videos, F frames, H height, W width, C channels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from nbp.data import moving_digits
from nbp.evaluators import frechet
from nbp.evaluators import generation


@dataclasses.dataclass
class Evaluator:
  """The predicted frames of N videos of a split against the true ones; the schema of its config section."""

  num_videos: int = 64  # N: videos 0..N-1 of the split, continued from their first frames
  draws: int = 1  # K continuations per video; K > 1 also scores their pixel mean (*_mean_of_draws)
  belief: bool = False  # also the model's belief over the first predicted frame's shift (pixels, one digit)
  batch_size: int = 16  # videos per sampler call
  seed: int = 0  # the sampling key: jax.random.key(seed)
  split: str = "validation"  # validation while choosing, test once

  def run(self, context) -> dict[str, float]:
    s = context.setup
    if s.task.model.condition != "frames":
      raise ValueError(f"frame_prediction: config.model.condition is {s.task.model.condition!r}; it evaluates runs "
                       "that continue given frames (condition 'frames').")
    if self.draws < 1:
      raise ValueError(f"frame_prediction: draws={self.draws}; it needs at least one continuation per video.")
    split = context.split_of(self)
    real = generation.real_videos(generation.run_video_data(s.config), 0, self.num_videos, split)
    repeated = {k: np.repeat(v, self.draws, axis=0) for k, v in real.items()}  # each video's K draws side by side
    generated = generation.generate_videos(s, context.params, jax.random.key(self.seed), repeated,
                                           batch_size=self.batch_size, expected_shape=real["video"].shape[1:],
                                           judge=f"the run's {split} videos")
    given = generation.given_video_frames(s.config)
    metrics = generation.frame_prediction_metrics(repeated["video"], generated.videos, given)
    if self.draws > 1:
      draws = generated.videos.reshape(self.num_videos, self.draws, *generated.videos.shape[1:])
      mean = generation.frame_prediction_metrics(real["video"], draws.astype(np.float64).mean(1), given)
      metrics.update({f"{k}_mean_of_draws": mean[k] for k in ("com_error_px", "empty_frames", "mse")})
    metrics.update(motion_floor_metrics(generation.run_video_data(s.config), given))
    if self.belief:
      first = generation.frame_prediction_metrics(repeated["video"][:, :given + 1],
                                                  generated.videos[:, :given + 1], given)
      metrics.update(_belief(s, context.params, real["video"], given, self.draws, self.batch_size,
                             jax.random.key(self.seed)), com_error_px_first=first["com_error_px"])
    return dict(metrics, frames_per_s=generated.rates()["frames_per_s"], num_videos=float(self.num_videos),
                draws=float(self.draws))


def motion_floor_metrics(data_cfg, given: int) -> dict[str, float]:
  """For one moving digit, the centre-of-mass errors of ideal predictors (`moving_digits.motion_floors`):
  com_error_px_exact_sampler (a draw of the true conditional distribution), com_error_px_exact_mean (the mean of
  many such draws) and com_error_px_best_point (the best single answer per condition). Other data: none."""
  if data_cfg.name != "moving_digits" or data_cfg.num_digits != 1:
    return {}
  floors = _motion_floors(data_cfg.num_frames, frame_size=data_cfg.frame_size, speed=float(data_cfg.speed),
                          given=given)
  return {"com_error_px_exact_sampler": floors["exact_sampler"], "com_error_px_exact_mean": floors["exact_mean"],
          "com_error_px_best_point": floors["best_point"]}


def _belief(s, params, videos, given: int, draws: int, batch_size: int, rng) -> dict[str, float]:
  """The first predicted frame: what a draw of the model's belief over shifts misses by, and the floor. With
  frames after it: the sampler continuing `draws` draws of that belief per video (`after_belief`), continuing
  the true first predicted frame instead (`after_truth`), and the belief over the frame after that one given
  the true frames before it (`after_truth_belief`, with its floor)."""
  data_cfg = s.config.data
  if data_cfg.name != "moving_digits" or data_cfg.num_digits != 1:
    raise ValueError(f"frame_prediction: belief=True scores shifts of one digit in pixels; config.data is "
                     f"{data_cfg.name!r} with {data_cfg.get('num_digits')} digits.")
  tokens = np.asarray(s.task.predict_fn("from_videos")(videos))  # [N, F, H, W]
  picks = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel())
  miss, firsts = _shift_belief(s, params, videos, tokens, given, draws, picks)
  floor = functools.partial(_motion_floors, frame_size=data_cfg.frame_size, speed=float(data_cfg.speed))
  metrics = {"com_error_px_first_belief": miss,
             "com_error_px_first_exact_sampler": floor(given + 1, given=given)["exact_sampler"]}
  if given + 1 < videos.shape[1]:
    continued = functools.partial(_continued, s, params, rng, videos=videos, batch_size=batch_size,
                                  sampler=jax.jit(s.task.predict_fn("sample_conditioned", who="frame_prediction")))
    metrics.update(continued(firsts, scored_from=given, name="after_belief"))
    metrics.update(continued(np.repeat(tokens[:, :given + 1], draws, axis=0), scored_from=given + 1,
                             name="after_truth"))
    metrics.update(com_error_px_after_truth_belief=_shift_belief(s, params, videos, tokens, given + 1, 1, picks)[0],
                   com_error_px_after_truth_exact_sampler=floor(given + 2, given=given + 1)["exact_sampler"])
    chained = s.task.predict_fn("to_videos")(whole_frame_draws(s, params, firsts, picks,
                                                               background=_background(s, videos),
                                                               batch_size=batch_size))
    metrics.update(_scored(videos, chained, given, "belief_chain"))
  return metrics


def whole_frame_draws(s, params, prompts: np.ndarray, picks, *, background, batch_size: int) -> np.ndarray:
  """Prompts [M, G, H, W] (tokens) continued to every frame, each next frame drawn whole from the model's belief
  over the shifts of the frame before it (one moving digit; `background` the token of no ink): [M, F, H, W].
  Draws of one prompt share the scoring; the candidates are scored `batch_size` at a time."""
  model = s.task.model
  score = s.task.predict_fn("frame_log_likelihood", who="frame_prediction's whole-frame draws")
  grids = np.full((len(prompts), *model.grid), background, dtype=np.asarray(prompts).dtype)
  grids[:, :prompts.shape[1]] = prompts
  for frame in range(prompts.shape[1], model.grid[0]):
    seen, which = np.unique(grids[:, :frame].reshape(len(grids), -1), axis=0, return_inverse=True)
    seen = seen.reshape(len(seen), frame, *model.grid[1:])
    moves = [position_shifts(grid[-1] != background) for grid in seen]
    candidates = np.concatenate([np.repeat(grids[:1], len(m), axis=0) for m in moves])
    row = 0
    for grid, options in zip(seen, moves):
      for move in options:
        candidates[row, :frame] = grid
        candidates[row, frame] = np.roll(grid[-1], move, axis=(0, 1))
        row += 1
    padded = frechet.pad_rows(candidates, -(-len(candidates) // batch_size) * batch_size)
    log_p = np.concatenate([np.asarray(score(params, padded[i:i + batch_size], frame=frame))
                            for i in range(0, len(padded), batch_size)])[:len(candidates)]
    starts = np.cumsum([0] + [len(m) for m in moves])
    for m, k in enumerate(np.ravel(which)):
      belief = np.exp(log_p[starts[k]:starts[k + 1]] - log_p[starts[k]:starts[k + 1]].max())
      move = moves[k][picks.choice(len(moves[k]), p=belief / belief.sum())]
      grids[m, frame] = np.roll(grids[m, frame - 1], move, axis=(0, 1))
  return grids


def _scored(videos, generated, scored_from: int, name: str) -> dict[str, float]:
  """com_error_px_<name> of the draws [N K, F, H, W, C] (K per video [N, ...]) and, K > 1, of their pixel mean."""
  draws = len(generated) // len(videos)
  one = generation.frame_prediction_metrics(np.repeat(videos, draws, axis=0), generated, scored_from)
  metrics = {f"com_error_px_{name}": one["com_error_px"]}
  if draws > 1:
    mean = generated.reshape(len(videos), draws, *generated.shape[1:]).astype(np.float64).mean(1)
    metrics[f"com_error_px_{name}_mean_of_draws"] = generation.frame_prediction_metrics(
        videos, mean, scored_from)["com_error_px"]
  return metrics


def _shift_belief(s, params, videos, tokens, given: int, draws: int, picks) -> tuple[float, np.ndarray]:
  """(the mean over videos of what a draw of the belief over frame `given` misses by, `draws` draws of it per
  video as token prompts [N draws, given + 1, H, W]): the belief scores every shift of frame given - 1."""
  background = _background(s, videos)
  score = s.task.predict_fn("frame_log_likelihood", who="frame_prediction's belief")
  centres = generation.centres_of_mass(videos)[0]  # [N, F, 2]
  shifts = [position_shifts(frame != background) for frame in tokens[:, given - 1]]
  most = max(map(len, shifts))
  misses, drawn = [], []
  for video, last, centre, moves in zip(tokens, tokens[:, given - 1], centres, shifts):
    candidates = np.repeat(video[None], most, axis=0)  # padded with copies of the first shift, dropped below
    for k, move in enumerate(moves + moves[:1] * (most - len(moves))):
      candidates[k, given] = np.roll(last, move, axis=(0, 1))
    log_p = np.asarray(score(params, candidates, frame=given))[:len(moves)]
    belief = np.exp(log_p - log_p.max())
    apart = np.linalg.norm(centre[given - 1] + np.asarray(moves, float) - centre[given], axis=-1)
    misses.append(np.sum(belief * apart) / belief.sum())
    drawn.append(candidates[picks.choice(len(moves), size=draws, p=belief / belief.sum()), :given + 1])
  return float(np.mean(misses)), np.concatenate(drawn)


def _continued(s, params, rng, prompts, *, videos, scored_from: int, batch_size: int, name: str,
               sampler) -> dict[str, float]:
  """The run's jitted `sampler` continuing prompts [N K, G, H, W] (K per video), scored on the frames from
  `scored_from` on: com_error_px_<name> for one draw and (K > 1) com_error_px_<name>_mean_of_draws for the mean
  of the K."""
  labels = np.zeros((batch_size,), np.int32)  # unused: frame-conditioned
  padded = frechet.pad_rows(prompts, -(-len(prompts) // batch_size) * batch_size)
  with s.context():
    tokens = np.concatenate([np.asarray(sampler(params, jax.random.fold_in(rng, i), labels,
                                                padded[i:i + batch_size]))
                             for i in range(0, len(padded), batch_size)])[:len(prompts)]
  return _scored(videos, s.task.predict_fn("to_videos")(tokens), scored_from, name)


def _background(s, videos) -> int:
  """The token of a pixel without ink (a black pixel through the run's own tokenization)."""
  return np.asarray(s.task.predict_fn("from_videos")(np.zeros_like(videos[:1])))[0, 0, 0, 0]


def position_shifts(ink: np.ndarray) -> list[tuple[int, int]]:
  """Every (dy, dx) that moves the inked pixels of a frame [H, W] without losing any (none inked: no move)."""
  if not ink.any():
    return [(0, 0)]
  rows, cols = np.nonzero(ink)
  return [(dy, dx) for dy in range(-rows.min(), ink.shape[0] - rows.max())
          for dx in range(-cols.min(), ink.shape[1] - cols.max())]


@functools.cache
def _motion_floors(num_frames: int, *, frame_size: int, speed: float, given: int) -> dict[str, float]:
  return moving_digits.motion_floors(num_frames=num_frames, frame_size=frame_size, speed=speed, given=given)
