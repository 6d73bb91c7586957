"""Kinetics-style video folders: root/<class name>/<video file>, decoded with PyAV.

Dimension letters: F frames (num_frames), S side (frame_size), C = 3 (RGB).
Classes are the sub-folders sorted by name; label k is the k-th. Each example
is a clip of F frames taken every `frame_stride` frames, from the start or
centred in the video; a video shorter than the clip repeats its last frame.
Frames are short-side resized to S and centre cropped.
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

  def __getitem__(self, index: SupportsIndex) -> dict[str, np.ndarray]:
    i = int(index)
    path, label = self.files[i]
    span = self.frame_stride * (self.num_frames - 1)
    try:
      decoded = _decode_rgb_frames(path, None if self.center_clip else span)
    except Exception as e:  # PyAV raises many error types for bad files
      raise ValueError(f"cannot decode video {path} (example {i}): {e}") from e
    if not decoded:
      raise ValueError(f"video {path} (example {i}) has no frames")
    start = (frames_lib.center_start(len(decoded), self.num_frames, self.frame_stride)
             if self.center_clip else 0)
    idx = frames_lib.clip_indices(len(decoded), self.num_frames, self.frame_stride, start)
    video = np.stack([frames_lib.resize_center_crop(decoded[j], self.frame_size)
                      for j in idx])
    frames_lib.check_array(video, (self.num_frames, self.frame_size, self.frame_size, 3),
                           np.uint8, index=i, what=f"video {path}")
    return {"video": video, "label": np.int32(label)}
