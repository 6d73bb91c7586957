"""Readers of the tfds-prepared UCF-101 and ImageNet-2012 (ArrayRecord), without TensorFlow.

Dimension letters: F frames, S output side, H/W stored frame size, C = 3.

ImageNet goes through tfds itself: `tfds.builder("imagenet2012", data_dir)
.as_data_source(split)` reads the ArrayRecord shards and decodes the JPEG with
PIL, no TensorFlow involved.

UCF-101 cannot: tfds's `Video` feature calls TensorFlow in its constructor
(checked with tfds 4.9.10), so neither the `ucf101` builder nor a builder
rebuilt from the prepared folder can be created here. Its on-disk format is
plain though: each ArrayRecord record is a serialized `tf.train.Example` with
"video" (bytes list, one JPEG per frame) and "label" (int64). `Ucf101Source`
opens the shards `data_dir/ucf101/<config>/<version>/ucf101-<split>.array_record-*`
with array_record, parses the record with the proto bundled in tfds and
decodes only the frames of the clip with PIL.

Both readers take tfds's split names (UCF-101: train, test; ImageNet: train,
validation). Neither ships a validation split of ours: nbp.data.video_sources
and nbp.data.images carve it from tfds's "train", and ImageNet's official
"validation" serves as the test split.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import os
from typing import SupportsIndex

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_data_source
from PIL import Image
from tensorflow_datasets.proto import tf_example_pb2

from nbp.data import frames as frames_lib

# Stored frame shape (H, W, C) of each tfds ucf101 config; None = any size.
UCF101_FRAME_SHAPES = {
    "ucf101_1_256": (256, 256, 3),
    "ucf101_1": (None, None, 3),
    "ucf101_2": (None, None, 3),
    "ucf101_3": (None, None, 3),
}
UCF101_VERSION = "2.0.0"  # version of tfds's ucf101 builder
UCF101_SPLITS = ("train", "test")  # the splits tfds's ucf101 ships


def _decode_jpeg(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im)


@dataclasses.dataclass
class Ucf101Source:
  """Random access over tfds ucf101: {"video": uint8 [F,S,S,3], "label": int32}.

  The clip starts at the video's centre clip, or, with `random_clip`, at a start
  drawn once per example from `default_rng([seed, index])`. `clip(i, start)`
  cuts the clip at another start and `num_starts(i)` says how many an example
  has (nbp.data.clips takes several clips of each video with them).
  """
  split: str  # tfds's split: "train" or "test"
  data_dir: str  # tfds data_dir holding ucf101/<config>/<version>/
  num_frames: int  # F frames per clip
  frame_size: int  # S output side (short-side resize + centre crop)
  frame_stride: int = 1  # take every k-th frame
  config: str = "ucf101_1_256"  # tfds config; sets the expected stored frame shape
  version: str = UCF101_VERSION  # tfds dataset version folder
  random_clip: bool = False  # fixed random start per example instead of the centre
  seed: int = 0  # seed of the random clip starts

  def __post_init__(self):
    if self.split not in UCF101_SPLITS:
      raise ValueError(f"split {self.split!r}: tfds ucf101 ships the splits {UCF101_SPLITS} (the validation "
                       "split is carved from train by nbp.data.video_sources.video_source)")
    folder = os.path.join(os.fspath(self.data_dir), "ucf101", self.config, self.version)
    pattern = os.path.join(folder, f"ucf101-{self.split}.array_record-*")
    self.paths = sorted(glob.glob(pattern))
    if not self.paths:
      raise ValueError(f"no ucf101 ArrayRecord shards match {pattern}")
    self.frame_shape = UCF101_FRAME_SHAPES.get(self.config, (None, None, 3))
    self._records = array_record_data_source.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._records)

  def _example(self, i: int):
    """(the JPEG bytes of every frame, the label) of example i."""
    example = tf_example_pb2.Example.FromString(self._records[i])
    feature = example.features.feature
    if "video" not in feature or "label" not in feature:
      raise ValueError(f"ucf101 example {i} lacks video/label, has {sorted(feature)}")
    encoded = feature["video"].bytes_list.value  # one JPEG per frame
    if not encoded:
      raise ValueError(f"ucf101 example {i} has no frames")
    return encoded, feature["label"].int64_list.value[0]

  def num_starts(self, index: SupportsIndex) -> int:
    """How many first frames a whole clip of example `index` can have (1 when it is shorter than a clip)."""
    return frames_lib.num_starts(len(self._example(int(index))[0]), self.num_frames, self.frame_stride)

  def clip(self, index: SupportsIndex, start: int) -> dict[str, np.ndarray]:
    """The clip of example `index` whose first frame is `start` (only its frames are decoded)."""
    i = int(index)
    return self._clip(i, *self._example(i), start)

  def _clip(self, i: int, encoded, label: int, start: int) -> dict[str, np.ndarray]:
    clip = []
    for j in frames_lib.clip_indices(len(encoded), self.num_frames, self.frame_stride, start):
      frame = _decode_jpeg(encoded[j])
      frames_lib.check_array(frame, self.frame_shape, np.uint8, index=i,
                             what=f"ucf101/{self.config} frame {j}")
      clip.append(frames_lib.resize_center_crop(frame, self.frame_size))
    return {"video": np.stack(clip), "label": np.int32(label)}

  def __getitem__(self, index: SupportsIndex) -> dict[str, np.ndarray]:
    i = int(index)
    encoded, label = self._example(i)
    num_starts = frames_lib.num_starts(len(encoded), self.num_frames, self.frame_stride)
    if self.random_clip:
      start = int(np.random.default_rng([self.seed, i]).integers(0, num_starts))
    else:
      start = (num_starts - 1) // 2  # the centred clip (frames.center_start)
    return self._clip(i, encoded, label, start)


def ucf101_source(split: str, data_dir: str, *, num_frames: int, frame_size: int,
                  **kwargs) -> Ucf101Source:
  """tfds ucf101 clips {"video": uint8 [F,S,S,3], "label": int32}; see `Ucf101Source`."""
  return Ucf101Source(split, data_dir, num_frames, frame_size, **kwargs)


@dataclasses.dataclass
class ImagenetSource:
  """Random access over tfds imagenet2012: {"image": uint8 [S,S,3], "label": int32}.

  Images are short-side resized to S and centre cropped (the evaluation crop).
  """
  split: str  # tfds's split: "train" or "validation" (or any tfds split string)
  data_dir: str  # tfds data_dir holding imagenet2012/<version>/
  image_size: int  # S output side

  def __post_init__(self):
    self.builder = tfds.builder("imagenet2012", data_dir=os.fspath(self.data_dir))
    self._source = self.builder.as_data_source(self.split)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: SupportsIndex) -> dict[str, np.ndarray]:
    i = int(index)
    example = self._source[i]
    image = np.asarray(example["image"])
    frames_lib.check_array(image, (None, None, 3), np.uint8, index=i,
                           what="imagenet2012 image")
    return {"image": frames_lib.resize_center_crop(image, self.image_size),
            "label": np.int32(example["label"])}


def imagenet_source(split: str, data_dir: str, *, image_size: int) -> ImagenetSource:
  """tfds imagenet2012 {"image": uint8 [S,S,3], "label": int32}; see `ImagenetSource`."""
  return ImagenetSource(split, data_dir, image_size)
