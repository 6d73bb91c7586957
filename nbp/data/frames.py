"""Frame helpers shared by the video and image loaders.

Dimension letters: F frames, H height, W width, C channels, S output side.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H,W,C] -> uint8 [S,S,C]: short side resized to S, then a centre crop."""
  h, w = image.shape[:2]
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  squeeze = image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  if (nh, nw) != (h, w):
    pil = pil.resize((nw, nh), Image.BILINEAR)
  top, left = (nh - size) // 2, (nw - size) // 2
  out = np.asarray(pil.crop((left, top, left + size, top + size)))
  return out[..., None] if squeeze else out


def clip_indices(num_available: int, num_frames: int, stride: int,
                 start: int = 0) -> np.ndarray:
  """Frame indices [F] start, start+stride, ...; past the end repeats the last frame."""
  idx = start + stride * np.arange(num_frames)
  return np.minimum(idx, num_available - 1)


def num_starts(num_available: int, num_frames: int, stride: int) -> int:
  """How many first frames a whole clip can have: 0 .. num_available - span (1 when the video is too short).

  span = stride * (num_frames - 1) + 1 frames of the video are covered by a clip.
  """
  span = stride * (num_frames - 1) + 1
  return max(1, num_available - span + 1)


def center_start(num_available: int, num_frames: int, stride: int) -> int:
  """First frame of the clip centred in the video (0 if the video is too short): the middle valid start."""
  return (num_starts(num_available, num_frames, stride) - 1) // 2


def flip_horizontal(video: np.ndarray) -> np.ndarray:
  """[..., H, W, C] -> the same frames mirrored left to right."""
  return np.ascontiguousarray(video[..., ::-1, :])


def check_array(array: np.ndarray, expected_shape: Sequence[int | None],
                expected_dtype, *, index: int, what: str) -> np.ndarray:
  """Raises ValueError naming the example if shape/dtype differ; None matches any size."""
  shape_ok = len(array.shape) == len(expected_shape) and all(
      e is None or e == a for e, a in zip(expected_shape, array.shape))
  if not shape_ok or array.dtype != np.dtype(expected_dtype):
    raise ValueError(
        f"{what} of example {index}: expected shape {tuple(expected_shape)} "
        f"dtype {np.dtype(expected_dtype)}, got shape {array.shape} dtype {array.dtype}")
  return array
