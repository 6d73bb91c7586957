"""Which clips of each video are taken: a clip policy, and a source of K clips per video.

Dimension letters: F frames per clip, S side, C channels, K clips per video.

A video longer than its clip (F frames every `stride` frames) has several
valid starts, 0 .. num_frames_in_video - span (`nbp.data.frames.num_starts`).
`ClipPolicy` says which clips of a video are taken:

  per_video  K, the clips taken of each video (K records per video)
  offsets    "center": the middle valid start (the single deterministic clip
             evaluation reads); "random": starts drawn uniformly among the
             valid ones, without repeating one until every start has been
             drawn (so K clips of a long video start at K different frames)
  flip       mirror clips left to right: of the clips with distinct starts
             (the first min(K, starts)), half are mirrored, which ones drawn
             at random (for an odd count one more with probability 1/2); a
             start drawn again is mirrored the other way than the last time.
             So every clip is mirrored with probability 1/2, and up to twice
             as many clips as starts are all distinct (K = 2 on a video with
             one start: the clip and its mirror)
  seed       the draws of video i come from default_rng([seed, i]): the same
             seed and video index give the same clips

A video too short for more than one start gets that start for all its K clips
(with flips, its clips differ by the mirror only). The centred, unflipped single
clip is `CENTRED`, what every split had before clip policies existed, and what
validation and test keep so that evaluation stays deterministic.

`ClipSource` turns a source of whole videos into K records per video. A source
that can cut clips has `num_starts(i)` and `clip(i, start)` (video_folder's and
UCF-101's readers); any other source is taken to hold videos of exactly the clip
length (generated moving digits), with a single start, 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any, SupportsIndex

import numpy as np

from nbp.data import frames as frames_lib

OFFSETS = ("center", "random")  # the values of ClipPolicy.offsets
RECORD_KEYS = ("video_index", "clip_start", "flip")  # what a clip record says of where it comes from


@dataclasses.dataclass(frozen=True)
class ClipPolicy:
  """Which clips of each video are taken (the module docstring says how each field draws)."""

  per_video: int = 1  # K clips per video
  offsets: str = "center"  # "center" or "random" (OFFSETS)
  flip: bool = False  # mirror half the clips of each video, drawn at random
  seed: int = 0  # seed of the draws (with the video index)

  def __post_init__(self):
    if int(self.per_video) != self.per_video or self.per_video < 1:
      raise ValueError(f"clips per video (--clips_per_video) must be a positive integer, got {self.per_video!r}.")
    if self.offsets not in OFFSETS:
      raise ValueError(f"clip offsets (--clip_offsets) must be one of {OFFSETS}, got {self.offsets!r}.")
    if self.offsets == "center":
      self.check_distinct(1, "with centred offsets (--clip_offsets=center; 'random' draws other starts)")

  @property
  def random(self) -> bool:
    """Whether any draw is random (offsets or flips); the seed matters only then."""
    return self.offsets == "random" or self.flip

  def check_distinct(self, num_starts: int, what: str) -> None:
    """Raises ValueError when videos with `num_starts` valid starts cannot give K different clips.

    `what` says why the videos have so few starts; the message names the flags to change.
    """
    distinct = num_starts * (2 if self.flip else 1)
    if self.per_video > distinct:
      mirrored = " (each start also mirrored)" if self.flip else ""
      fewer = " or fewer" if distinct > 1 else ""
      flip = "" if self.flip else f", or --clip_flip to mirror clips too (then up to {2 * num_starts})"
      raise ValueError(f"--clips_per_video={self.per_video}: each video has {num_starts} clip start(s) {what}, so at "
                       f"most {distinct} distinct clip(s){mirrored}; use --clips_per_video={distinct}{fewer}{flip}.")

  def draw(self, video_index: int, num_starts: int) -> list[tuple[int, bool]]:
    """The K (start, flipped) clips of video `video_index`, which has `num_starts` valid starts."""
    k = self.per_video
    rng = np.random.default_rng([self.seed, int(video_index)])
    if self.offsets == "center":
      starts = np.full(k, (num_starts - 1) // 2)
    else:  # permutations of every start, one after another: distinct starts while there are enough
      starts = np.concatenate([rng.permutation(num_starts) for _ in range(-(-k // num_starts))])[:k]
    flipped = np.zeros(k, bool)
    if self.flip:  # half the clips of distinct starts, then each start drawn again mirrored the other way
      first = min(k, num_starts if self.offsets == "random" else 1)
      flipped[:first] = rng.permutation(first) < first // 2 + (first % 2) * int(rng.random() < 0.5)
      last = dict(zip(starts[:first].tolist(), flipped[:first].tolist()))
      for i in range(first, k):
        flipped[i] = last[int(starts[i])] = not last[int(starts[i])]
    return [(int(s), bool(f)) for s, f in zip(starts, flipped)]

  def flags(self) -> str:
    """The flags of experiments.encode_tokens that encode the train split with this policy ("" for CENTRED)."""
    if self == CENTRED:
      return ""
    flip = " --clip_flip" if self.flip else ""
    seed = f" --clip_seed={self.seed}" if self.random else ""
    return f"--clips_per_video={self.per_video} --clip_offsets={self.offsets}{flip}{seed}"

  def to_metadata(self) -> dict[str, Any]:
    """The policy as a token directory's metadata records it (the seed only where something is drawn)."""
    entry = {"per_video": self.per_video, "offsets": self.offsets, "flip": self.flip}
    if self.random:
      entry["seed"] = self.seed
    return entry

  @classmethod
  def from_metadata(cls, entry: dict[str, Any] | None) -> ClipPolicy:
    """The policy of a metadata entry; None (a directory written before policies were recorded) is CENTRED."""
    if entry is None:
      return CENTRED
    return cls(per_video=int(entry["per_video"]), offsets=entry["offsets"], flip=bool(entry["flip"]),
               seed=int(entry.get("seed", 0)))


CENTRED = ClipPolicy()  # one clip per video, the centred one, unflipped


@dataclasses.dataclass(frozen=True, eq=False)
class ClipSource:
  """K clips of each video of a source: record r is clip r % K of video videos[r // K].

  Each record is the source's example with its "video" (uint8 [F, S, S, C])
  replaced by the clip, plus "video_index" (the video's index in `source`),
  "clip_start" (its first frame) and "flip" (1 if mirrored), all int32.
  """

  source: Any  # whole videos: `num_starts(i)` and `clip(i, start)`, or examples of exactly F frames (`[i]`)
  policy: ClipPolicy = CENTRED  # which clips of each video
  videos: np.ndarray | None = None  # int [V]: the videos of `source` taken, in order (a carved split); None: all

  def __len__(self) -> int:
    num_videos = len(self.source) if self.videos is None else len(self.videos)
    return self.policy.per_video * num_videos

  def video_index(self, index: SupportsIndex) -> int:
    """The index in `source` of the video record `index` is cut from."""
    v = int(index) // self.policy.per_video
    return v if self.videos is None else int(self.videos[v])

  def __getitem__(self, index: SupportsIndex) -> dict[str, np.ndarray]:
    r = int(index)
    if not 0 <= r < len(self):
      raise IndexError(f"clip {r} out of range [0, {len(self)}) of {self!r}")
    v = self.video_index(r)
    cuts = hasattr(self.source, "clip")
    start, flip = self.policy.draw(v, self.source.num_starts(v) if cuts else 1)[r % self.policy.per_video]
    example = dict(self.source.clip(v, start) if cuts else self.source[v])
    if flip:
      example["video"] = frames_lib.flip_horizontal(np.asarray(example["video"]))
    example.update(video_index=np.int32(v), clip_start=np.int32(start), flip=np.int32(flip))
    return example

  def __repr__(self) -> str:
    return f"ClipSource({self.policy}, {len(self)} clips of {self.source!r})"
