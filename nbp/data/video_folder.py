"""Kinetics-style video folders: root/<class name>/<video file>, decoded with PyAV.

Dimension letters: F frames (num_frames), S side (frame_size), C = 3 (RGB).
Classes are the sub-folders sorted by name; label k is the k-th. Each example
is a clip of F frames taken every `frame_stride` frames, from the start or
centred in the video; a video shorter than the clip repeats its last frame.
Frames are short-side resized to S and centre cropped. `clip(i, start)` cuts
the clip at another start and `num_starts(i)` says how many a video has
(nbp.data.clips takes several clips of each video with them).
"""

from __future__ import annotations

import dataclasses
import os
from typing import SupportsIndex

import av
import numpy as np

from nbp.data import frames as frames_lib

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv")


def _decode_rgb_frames(path: str, last_needed: int | None) -> list[np.ndarray]:
  """uint8 [H,W,3] frames 0..last_needed (all of them when None)."""
  out = []
  with av.open(path) as container:
    if not container.streams.video:
      raise ValueError("no video stream")
    for frame in container.decode(video=0):
      out.append(frame.to_ndarray(format="rgb24"))
      if last_needed is not None and len(out) > last_needed:
        break
  return out


@dataclasses.dataclass
class VideoFolderSource:
  """Random-access source of {"video": uint8 [F,S,S,3], "label": int32}."""
  root: str  # folder holding one sub-folder per class
  num_frames: int  # F frames per clip
  frame_size: int  # S, output side in pixels
  frame_stride: int = 1  # take every k-th frame
  center_clip: bool = False  # centre the clip in the video instead of starting at 0
  extensions: tuple[str, ...] = VIDEO_EXTENSIONS  # file endings counted as videos
  _whole: tuple[int, list[np.ndarray]] | None = dataclasses.field(  # (index, every frame) of the last whole video
      default=None, init=False, repr=False, compare=False)

  def __post_init__(self):
    root = os.fspath(self.root)
    if not os.path.isdir(root):
      raise ValueError(f"video folder root {root} does not exist")
    self.classes = sorted(d for d in os.listdir(root)
                          if os.path.isdir(os.path.join(root, d)))
    self.files: list[tuple[str, int]] = []  # (path, label), sorted
    for label, name in enumerate(self.classes):
      folder = os.path.join(root, name)
      for f in sorted(os.listdir(folder)):
        if f.lower().endswith(tuple(e.lower() for e in self.extensions)):
          self.files.append((os.path.join(folder, f), label))
    if not self.files:
      raise ValueError(
          f"no videos with extensions {self.extensions} in class folders of {root}")

  def __len__(self) -> int:
    return len(self.files)

  def __getstate__(self):  # the kept frames stay behind when the source is sent to worker processes
    return {**self.__dict__, "_whole": None}

  def _frames(self, i: int, last_needed: int | None) -> list[np.ndarray]:
    """uint8 [H,W,3] frames 0..last_needed (all when None) of video i; a video decoded whole is kept until
    another is read, so the clips and the length of one video cost one decode."""
    if self._whole is not None and self._whole[0] == i:
      return self._whole[1]
    path = self.files[i][0]
    try:
      decoded = _decode_rgb_frames(path, last_needed)
    except Exception as e:  # PyAV raises many error types for bad files
      raise ValueError(f"cannot decode video {path} (example {i}): {e}") from e
    if not decoded:
      raise ValueError(f"video {path} (example {i}) has no frames")
    if last_needed is None:
      self._whole = (i, decoded)
    return decoded

  def num_starts(self, index: SupportsIndex) -> int:
    """How many first frames a whole clip of video `index` can have (1 when it is shorter than a clip)."""
    return frames_lib.num_starts(len(self._frames(int(index), None)), self.num_frames, self.frame_stride)

  def clip(self, index: SupportsIndex, start: int) -> dict[str, np.ndarray]:
    """The clip of video `index` whose first frame is `start`: {"video": uint8 [F,S,S,3], "label": int32}."""
    i = int(index)
    path, label = self.files[i]
    decoded = self._frames(i, start + self.frame_stride * (self.num_frames - 1))
    idx = frames_lib.clip_indices(len(decoded), self.num_frames, self.frame_stride, start)
    video = np.stack([frames_lib.resize_center_crop(decoded[j], self.frame_size)
                      for j in idx])
    frames_lib.check_array(video, (self.num_frames, self.frame_size, self.frame_size, 3),
                           np.uint8, index=i, what=f"video {path}")
    return {"video": video, "label": np.int32(label)}

  def __getitem__(self, index: SupportsIndex) -> dict[str, np.ndarray]:
    i = int(index)
    start = 0
    if self.center_clip:
      start = frames_lib.center_start(len(self._frames(i, None)), self.num_frames, self.frame_stride)
    return self.clip(i, start)
