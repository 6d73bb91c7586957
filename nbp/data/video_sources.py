"""One entry point to the video datasets: `video_source(data_cfg, split)`.

Dimension letters: F frames (data.num_frames), S side (data.frame_size), C
channels (1 for moving digits, 3 for RGB), D labels per video.

Every source is random access (`len`, `[i]`) and yields
{"video": uint8 [F, S, S, C], "label": int32 [D]}, so the video tokenizer and
`experiments/encode_tokens.py` read any of them the same way. Every dataset has
the splits train, validation and test; `data.name`:

  moving_digits  the generated tfds dataset (nbp.data.moving_digits), built in
                 data.dir on first use; label = the D digits shown (also yields
                 "digit_index"). Reads num_frames, frame_size, num_digits, speed,
                 num_train, num_validation, num_test and the validation carve
                 of the digit scans (validation_fraction, validation_seed).
  ucf101         tfds-prepared UCF-101 (ArrayRecord) under data.dir, read without
                 TensorFlow (nbp.data.tfds_sources); test is tfds's "test"
                 (split 1), train and validation are carved from tfds's "train"
                 (nbp.data.pipeline.carved_source); D = 1 (0..100).
  video_folder   Kinetics-style folders data.dir/<split folder>/<class>/<video>
                 (nbp.data.video_folder, PyAV); classes are the sorted
                 sub-folders; D = 1. Kinetics-600 must be laid out by class.
                 Validation reads its own folder when `split_folders` lists
                 one, else it is carved from the train folder.

Real videos take a clip of F frames every `data.frame_stride` frames, centred
in the video (the official NBP evaluation's "center" strategy; one clip per
video), frames short-side resized to S and centre cropped. `clip_source` takes
other clips instead, several per video at random starts and mirrored
(nbp.data.clips.ClipPolicy; experiments/encode_tokens.py encodes the train
split so). Two data keys beyond the moving-digits ones:

  frame_stride   take every k-th frame (UCF-101 at 25 fps, stride 3 ~ 8 fps)
  split_folders  video_folder only: ((split, sub-folder of data.dir), ...),
                 e.g. (("train", "train"), ("test", "val")); train or test
                 not listed is its own sub-folder, validation not listed is
                 carved from train.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, SupportsIndex

import ml_collections
import numpy as np

from nbp.data import clips
from nbp.data import moving_digits
from nbp.data import pipeline
from nbp.data import splits
from nbp.data import tfds_sources
from nbp.data import video_folder

NAMES = ("moving_digits", "ucf101", "video_folder")


def num_channels(data_cfg) -> int:
  """C of the videos of a data config: 1 for moving digits, 3 for RGB datasets."""
  _check_name(data_cfg)
  return 1 if data_cfg.name == "moving_digits" else 3


def num_classes(data_cfg) -> int:
  """The class conditions of a data config's videos: ordered digit tuples (10^D) for moving digits, UCF-101's
  101 actions; a video folder's classes are its label folders, set as `config.data.num_classes`."""
  _check_name(data_cfg)
  if data_cfg.name == "moving_digits":
    return 10 ** int(data_cfg.num_digits)
  if data_cfg.name == "ucf101":
    return 101
  if "num_classes" not in data_cfg:
    raise ValueError("config.data.num_classes: a video folder's class count is not read from its files; set it")
  return int(data_cfg.num_classes)


def _check_name(data_cfg) -> None:
  if data_cfg.name not in NAMES:
    raise ValueError(f"config.data.name={data_cfg.name!r}: expected one of {NAMES}.")


@dataclasses.dataclass(frozen=True)
class LabelVector:
  """Wraps a source whose "label" is a scalar so that it is int32 [1] (the [D] of every source)."""

  source: Any

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: SupportsIndex) -> dict[str, np.ndarray]:
    example = dict(self.source[index])
    example["label"] = np.asarray(example["label"], np.int32).reshape(-1)
    return example

  def __repr__(self) -> str:
    return f"LabelVector({self.source!r})"


def split_folders(data_cfg) -> dict[str, str]:
  """video_folder data: split -> its sub-folder of data.dir, as `config.data.split_folders` lists them."""
  folders = dict(data_cfg.get("split_folders", None) or ())
  for split in folders:
    splits.check(split, f"config.data.split_folders of {data_cfg.name!r}")
  return folders


def split_folder(data_cfg, split: str) -> str:
  """The directory of `split` for video_folder data: data.dir / (split_folders[split] or split).

  A validation split that `split_folders` does not list has no folder: it is
  carved from train (`video_source`).
  """
  splits.check(split, f"config.data.name={data_cfg.name!r}")
  return os.path.join(os.fspath(data_cfg.dir), split_folders(data_cfg).get(split, split))


def video_source(data_cfg, split: str):
  """A random-access source of {"video": uint8 [F, S, S, C], "label": int32 [D]} of `split`.

  Raises ValueError naming `config.data.name` for an unknown dataset or split,
  and naming the missing path when the files are not there.
  """
  _check_name(data_cfg)
  splits.check(split, f"config.data.name={data_cfg.name!r}")
  if data_cfg.name == "moving_digits":
    return pipeline.load_source(moving_digits.builder_from_config(data_cfg), split, data_cfg.dir)
  stride = int(data_cfg.get("frame_stride", 1))
  if data_cfg.name == "ucf101":
    def read(tfds_split):
      return tfds_sources.ucf101_source(tfds_split, data_cfg.dir, num_frames=data_cfg.num_frames,
                                        frame_size=data_cfg.frame_size, frame_stride=stride)
    carve = split != "test"  # tfds ucf101 ships train and test
  else:
    def read(folder_split):
      return video_folder.VideoFolderSource(split_folder(data_cfg, folder_split), num_frames=data_cfg.num_frames,
                                            frame_size=data_cfg.frame_size, frame_stride=stride,
                                            center_clip=True)
    carve = split != "test" and "validation" not in split_folders(data_cfg)
  if carve:
    source = pipeline.carved_source(read("train"), split, data_cfg, f"config.data.name={data_cfg.name!r}")
  else:
    source = read(split)
  return LabelVector(source)


def clip_source(data_cfg, split: str, policy: clips.ClipPolicy = clips.CENTRED):
  """`video_source`'s videos of `split` as the clips `policy` takes: K records per video, in the videos' order.

  Each record is {"video": uint8 [F, S, S, C], "label": int32 [D], "video_index",
  "clip_start", "flip"} (nbp.data.clips.ClipSource); a split carved from train
  keeps the videos' indices in the train split, so a video's clips depend on the
  seed and the video, not on the carve. Moving digits are exactly F frames long,
  so their clips can differ by a flip only: more clips per video than that is a
  ValueError naming the flag.
  """
  source = video_source(data_cfg, split).source  # LabelVector -> the split's videos
  if data_cfg.name == "moving_digits":
    policy.check_distinct(1, "(config.data.name='moving_digits': videos of exactly config.data.num_frames frames)")
  if isinstance(source, pipeline.SubsetSource):  # carved from train: the clips of train's videos
    return LabelVector(clips.ClipSource(source.source, policy, source.indices))
  return LabelVector(clips.ClipSource(source, policy))


def video_iterator(data_cfg, split: str, *, seed: int, process_index: int, process_count: int, batch_size: int):
  """A checkpointable grain iterator of {"video": float32 [b, F, H, W, C] in [-1, 1], "label"} batches of
  `video_source(data_cfg, split)`, shuffled; b = batch_size per process."""
  return pipeline.make_iterator(
      video_source(data_cfg, split), global_batch_size=batch_size * process_count, seed=seed, shuffle=True,
      transforms=(pipeline.NormalizeVideo(),), process_index=process_index, process_count=process_count,
      worker_count=data_cfg.worker_count)


@functools.cache
def first_videos(data_cfg_json: str, num: int, split: str = "validation") -> np.ndarray:
  """float32 [num, F, H, W, C] in [-1, 1]: the first `num` videos of a split (a config section as JSON, cached).

  Moving digits are generated directly (no dataset build for a few videos).
  """
  data_cfg = ml_collections.ConfigDict(json.loads(data_cfg_json))
  if data_cfg.name == "moving_digits":
    videos = moving_digits.videos_from_config(data_cfg, split, 0, num)["video"]
  else:
    source = video_source(data_cfg, split)
    videos = np.stack([source[i]["video"] for i in range(min(num, len(source)))])
  return videos.astype(np.float32) / 127.5 - 1.0
