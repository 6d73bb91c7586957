"""Local weight files of pretrained networks (I3D, Inception-v3, VGG16/LPIPS): the check every loader shares.

A weight file is a flat mapping of names to arrays (.npz, or .msgpack); the
network's loader knows the names and shapes it needs. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def check_arrays(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], *, what: str,
                 path: str, allow_extra: bool = False) -> None:
  """Raises ValueError naming `path` and the first key (in `expected`'s order) that the file lacks or holds at
  another shape, then (unless `allow_extra`) the first key it has beyond `expected`."""
  for key, shape in expected.items():
    if key not in arrays:
      raise ValueError(f"{what} weight file {path!r} lacks the key {key!r} (shape {shape}); "
                       f"it has {len(arrays)} keys, {len(expected)} expected.")
    if tuple(arrays[key].shape) != tuple(shape):
      raise ValueError(f"{what} weight file {path!r}: key {key!r} has shape {tuple(arrays[key].shape)}, "
                       f"expected {tuple(shape)}.")
  extra = sorted(set(arrays) - set(expected))
  if extra and not allow_extra:
    raise ValueError(f"{what} weight file {path!r} has an unexpected key {extra[0]!r} "
                     f"({len(extra)} unexpected in all).")
