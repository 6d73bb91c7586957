"""Grain input pipelines: sources, per-host sharding, transforms, checkpointable iterators.

Dimension letters: B per-host batch, F frames, H height, W width, C channels,
L tokens per example (F*H*W), T text window (seq_len + 1).

A pipeline is `MapDataset.source(source)` -> this host's shard -> shuffle ->
repeat -> transforms -> batch -> `IterDataset`. Sharding comes first: each
host owns a fixed, disjoint slice of the examples (all slices equally long, so
hosts run the same number of steps) and shuffles it anew every epoch. Sharding
after `shuffle().repeat()` would also be disjoint per step, but slicing a
shuffled dataset before repeat would replay one order every epoch. The iterator's position is a small dict (`get_state()`), and
`iterator_checkpoint_args` wraps the iterator for orbax so it is saved with the
model:

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=iterator_checkpoint_args(it, save=True)))
    mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=iterator_checkpoint_args(fresh_it, save=False)))  # restores in place

Damaged files. `load_source` (and `make_iterator`, for a bare tfds source)
wraps a tfds ArrayRecord source in `CheckedSource`: a record that cannot be
read or decoded raises `DataCorruptionError` naming the file, the record in it
and how to rebuild the dataset (built datasets are derived data: delete the
named directory and rerun). `nbp.data.tokens.TokenSource` does the same for
token files. The training loop saves its progress and stops on this error.

Splits. `carved_source` gives the train or validation part of a dataset that
ships no validation split (nbp.data.splits.carve with the config's
`validation_fraction` and `validation_seed`, read by `validation_keys`), as a
`SubsetSource` of its train split.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any, SupportsIndex

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from pydoc_data.topics import topics
from tensorflow_datasets.core.data_sources import array_record

from nbp.data import splits
from nbp.data.generated import GeneratedBuilder

Transform = grain.transforms.Map | grain.transforms.RandomMap | Callable[[Any], Any]


# ------------------------------------------------------------- damaged records


class DataCorruptionError(ValueError):
  """A record of a dataset file could not be read or decoded.

  The message names the file, the record in it, the example index of the
  source, and how to rebuild the file; the attributes carry the same.
  """

  def __init__(self, message: str, path: str | None = None, record: int | None = None,
               index: int | None = None):
    super().__init__(message)
    self.path = path  # the damaged file
    self.record = record  # the record's position in that file
    self.index = index  # the example index asked of the source

  def __reduce__(self):  # keeps the fields when grain's worker processes send it back
    return type(self), (str(self), self.path, self.record, self.index)


@dataclasses.dataclass(frozen=True)
class CheckedSource:
  """A random-access source over record files whose failed reads raise `DataCorruptionError`.

  Riegeli (under array_record) detects a damaged chunk by its hash and raises
  an error that names neither the file nor the record; a garbled record that
  passes the hash fails to decode instead. Either way this wrapper re-raises
  naming the file and the record the example comes from, with `rebuild` (how
  to regenerate the file) appended.
  """

  source: Any  # random access (`len`, `[i]`)
  files: tuple[tuple[str, int, int], ...]  # (path, first record read, records read), in the source's order
  what: str  # the dataset and split, for messages
  rebuild: str  # what to do about a damaged file

  def __len__(self) -> int:
    return len(self.source)

  def locate(self, index: int) -> tuple[str, int]:
    """(file, record in the file) of example `index`."""
    for path, first, count in self.files:
      if index < count:
        return path, first + index
      index -= count
    raise IndexError(f"example {index} beyond the files of {self.what}")

  def __getitem__(self, index: SupportsIndex):
    i = int(index)
    if not 0 <= i < len(self):  # not damage: let the caller see a plain IndexError
      raise IndexError(f"example {i} out of range [0, {len(self)}) of {self.what}")
    try:
      return self.source[i]
    except Exception as e:  # pylint: disable=broad-except  # riegeli: RuntimeError; decoding: any type
      path, record = self.locate(i)
      raise DataCorruptionError(
          f"Damaged dataset file {path}: record {record} (example {i} of {self.what}) could not be read: "
          f"{type(e).__name__}: {e}. {self.rebuild}", path, record, i) from e

  def __repr__(self) -> str:
    return f"CheckedSource({self.what}, {len(self.files)} file(s), {len(self)} examples)"


def _rebuild_hint(info, generated: bool) -> str:
  directory = os.fspath(info.data_dir)
  if generated:
    return (f"This dataset is generated locally (derived data): delete {directory} and rerun; the builder "
            "regenerates it on first use (nbp.data.moving_digits.build).")
  return (f"Delete {directory} and prepare the dataset again (tfds `builder.download_and_prepare()`, "
          "e.g. nbp.data.moving_digits.build).")


def checked_tfds_source(data_source, *, generated: bool = False) -> CheckedSource:
  """Wraps a tfds ArrayRecord data source (`builder.as_data_source(split)`) in a `CheckedSource`.

  The shard files and how many records of each the split reads come from the
  split's file instructions in the dataset info.
  """
  info, split = data_source.dataset_info, data_source.split
  files = []
  for fi in info.splits[split].file_instructions:
    take = fi.take if fi.take >= 0 else fi.examples_in_shard - fi.skip  # take -1: to the shard's end
    files.append((os.fspath(fi.filename), int(fi.skip), int(take)))
  return CheckedSource(data_source, tuple(files), f"split {str(split)!r} of {info.full_name}",
                       _rebuild_hint(info, generated))


def load_source(builder_or_name: str | tfds.core.DatasetBuilder, split: str,
                data_dir: str | None = None) -> CheckedSource:
  """A random-access source (`len`, `[i]`) over a prepared ArrayRecord tfds dataset.

  A damaged record raises `DataCorruptionError` naming its file and record
  (`CheckedSource`).
  """
  if isinstance(builder_or_name, str):
    builder = tfds.builder(builder_or_name, data_dir=data_dir)
  else:
    builder = builder_or_name
  return checked_tfds_source(builder.as_data_source(split), generated=isinstance(builder, GeneratedBuilder))


def _checked(source):
  """`source`, with a bare tfds ArrayRecord source wrapped so that damage names the file."""
  if isinstance(source, array_record.ArrayRecordDataSource):
    return checked_tfds_source(source)
  return source


def _process_defaults(process_index: int | None, process_count: int | None):
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return process_index, process_count


def shard_dataset(ds: grain.MapDataset, process_index: int,
                  process_count: int) -> grain.MapDataset:
  """This host's slice `[i::n]` of the first len - len % n examples (equal shards)."""
  usable = len(ds) - len(ds) % process_count
  if usable == 0:
    raise ValueError(f"{len(ds)} examples cannot be shared by {process_count} processes")
  return ds[:usable][process_index::process_count]


def make_dataset(
    source,
    *,
    global_batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    transforms: Sequence[Transform] = (),
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
) -> grain.MapDataset:
  """The MapDataset behind `make_iterator` (batches of B = global // processes)."""
  process_index, process_count = _process_defaults(process_index, process_count)
  source = _checked(source)
  if global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size {global_batch_size} is not divisible by "
        f"process_count {process_count}")
  # One global order, the same on every host, then each host takes every
  # process_count-th example of it: the union of the hosts' batches at step s is
  # the single-process batch at step s, so a run is the same on any number of hosts.
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)  # followed by repeat: a new order every epoch
  ds = ds.repeat(num_epochs)
  ds = shard_dataset(ds, process_index, process_count)
  for i, t in enumerate(transforms):
    if isinstance(t, grain.transforms.RandomMap):
      ds = ds.random_map(t, seed=seed + 1 + i)
    else:
      ds = ds.map(t)
  return ds.batch(global_batch_size // process_count, drop_remainder=drop_remainder)


def make_iterator(
    source,
    *,
    global_batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    transforms: Sequence[Transform] = (),
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
    worker_count: int = 0,
    read_threads: int = 4,
) -> grain.DatasetIterator:
  """A checkpointable iterator of this host's batches (leading dim B).

  Args:
    source: random-access source (`__len__`, `__getitem__`) of example dicts.
    global_batch_size: batch over all hosts; each host yields B = this // hosts.
    seed: shuffle seed (and the seed of random transforms).
    shuffle: reshuffle every epoch.
    num_epochs: passes over the data; None repeats forever.
    transforms: grain Map / RandomMap transforms or plain functions, in order.
    process_index, process_count: this host and the host count; default jax's.
    drop_remainder: drop a last partial batch (finite epochs only).
    worker_count: >0 decodes in that many worker processes (`mp_prefetch`).
    read_threads: threads prefetching examples in this process.
  """
  ds = make_dataset(
      source, global_batch_size=global_batch_size, seed=seed, shuffle=shuffle,
      num_epochs=num_epochs, transforms=transforms, process_index=process_index,
      process_count=process_count, drop_remainder=drop_remainder)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=read_threads, prefetch_buffer_size=max(read_threads, 1) * 2))
  if worker_count > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (pytest, Colab)
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(it_ds)


def iterator_checkpoint_args(iterator: grain.DatasetIterator, save: bool):
  """Orbax args for the iterator: `grain.checkpoint.CheckpointSave/Restore`.

  Put it under a key of `ocp.args.Composite` (the trainer uses "data"); restore
  writes the saved position into `iterator` in place.
  """
  if save:
    return grain.checkpoint.CheckpointSave(iterator)
  return grain.checkpoint.CheckpointRestore(iterator)


# -------------------------------------------------------------------- transforms


@dataclasses.dataclass(frozen=True)
class QuantizeVideoToTokens(grain.transforms.Map):
  """Replaces video uint8 [F,H,W,1] by tokens int32 [L=F*H*W] in 0..levels-1."""
  levels: int = 16  # number of grey levels (the vocabulary)
  key: str = "video"  # the field to quantize

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    element = dict(element)
    video = np.asarray(element.pop(self.key))
    if video.dtype != np.uint8:
      raise ValueError(f"{self.key} must be uint8, got {video.dtype}")
    element["tokens"] = quantize_video(video, self.levels).reshape(-1)
    return element


def quantize_video(video: np.ndarray, levels: int) -> np.ndarray:
  """uint8 [...] -> int32 [...] in 0..levels-1 (uniform bins over 0..255)."""
  return (video.astype(np.int32) * levels) // 256


def label_class(label) -> np.ndarray:
  """Ordered digit tuples int [..., D] -> int32 classes [...]: sum_i label[i] * 10**i (10**D classes); a
  single label (UCF-101, Kinetics) is its own class."""
  label = np.asarray(label, np.int64)
  return np.sum(label * 10 ** np.arange(label.shape[-1]), axis=-1).astype(np.int32)


def requantize(videos, levels: int):
  """uint8 videos -> uint8 at the centres of `levels` uniform grey bins (0: unchanged).

  numpy or jax arrays; equals `dequantize_tokens(quantize_video(v, levels))`
  and is idempotent, so videos decoded from tokens pass through unchanged.
  """
  if not levels:
    return videos
  xp = jax.numpy if isinstance(videos, jax.Array) else np
  bins = (videos.astype(xp.int32) * levels) // 256  # [...] in 0..levels-1
  return xp.clip(xp.floor((bins + 0.5) * (256.0 / levels)), 0, 255).astype(xp.uint8)


def dequantize_tokens(tokens, levels: int, shape: Sequence[int]) -> np.ndarray:
  """int tokens [..., L] -> uint8 frames [..., *shape] at the bin centres.

  `shape` is one example's frame shape (F, H, W, 1); leading batch dims are kept.
  Inverts `quantize_video` exactly on tokens: quantize(dequantize(t)) == t.
  """
  tokens = np.asarray(tokens)
  values = (tokens.astype(np.float64) + 0.5) * (256.0 / levels)
  frames = np.clip(np.floor(values), 0, 255).astype(np.uint8)
  return frames.reshape(tokens.shape[:-1] + tuple(shape))


@dataclasses.dataclass(frozen=True)
class NormalizeVideo(grain.transforms.Map):
  """video uint8 [...] in 0..255 -> float32 in [-1, 1]."""
  key: str = "video"  # the field to normalize

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    element = dict(element)
    element[self.key] = np.asarray(element[self.key], np.float32) / 127.5 - 1.0
    return element


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """Random access over a dict of arrays [N, ...]: example i is {name: array[i]} (a grain source of a split held in memory)."""

  arrays: dict  # name -> np.ndarray [N, ...], every one of the same N

  def __len__(self) -> int:
    return len(next(iter(self.arrays.values())))

  def __getitem__(self, index: SupportsIndex) -> dict[str, np.ndarray]:
    i = int(index)
    if not 0 <= i < len(self):
      raise IndexError(f"example {i} out of range [0, {len(self)})")
    return {k: np.asarray(v[i]) for k, v in self.arrays.items()}


# ------------------------------------------------------------------- splits


@dataclasses.dataclass(frozen=True, eq=False)
class SubsetSource:
  """Random access over some examples of a source: example i is source[indices[i]]."""

  source: Any  # random access (`len`, `[i]`)
  indices: np.ndarray  # int64 [N]: the examples of `source` taken, in this order
  what: str  # the dataset and split, for messages

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: SupportsIndex):
    i = int(index)
    if not 0 <= i < len(self):
      raise IndexError(f"example {i} out of range [0, {len(self)}) of {self.what}")
    return self.source[int(self.indices[i])]

  def __repr__(self) -> str:
    return f"SubsetSource({self.what}, {len(self)} of {self.source!r})"


def validation_keys(data_cfg) -> tuple[float, int]:
  """(validation_fraction, validation_seed) of `config.data`; nbp.data.splits' defaults where a key is absent."""
  return (float(data_cfg.get("validation_fraction", splits.VALIDATION_FRACTION)),
          int(data_cfg.get("validation_seed", splits.VALIDATION_SEED)))


def carved_source(train_source, split: str, data_cfg, what: str) -> SubsetSource:
  """The train or validation part of a dataset's train split, carved by `config.data` (nbp.data.splits.carve).

  `what` names the dataset in errors. The carve is a fixed permutation of the
  train examples seeded by `config.data.validation_seed`, its first
  round(N * validation_fraction) held out as validation.
  """
  splits.check(split, what)
  fraction, seed = validation_keys(data_cfg)
  if split == "validation" and fraction == 0.0:
    raise ValueError(f"config.data.validation_fraction=0: {what} holds out no validation examples; use a "
                     "fraction in (0, 1).")
  indices = splits.select(splits.carve(len(train_source), fraction, seed), split, what)
  return SubsetSource(train_source, indices, f"the {split} part of the train split of {what}")


# ------------------------------------------------------------------------- text


@dataclasses.dataclass(frozen=True)
class TextBytesSource:
  """Random-access windows of T = seq_len + 1 UTF-8 bytes as int32 tokens (vocab 256).

  Window i starts at byte i * seq_len, so consecutive windows overlap by one
  byte and the last target of one is the first input of the next.
  """
  data: np.ndarray  # uint8 [total bytes] of the split's concatenated text
  seq_len: int  # model input length; windows hold seq_len + 1 tokens
  topics: tuple[str, ...]  # the documents (pydoc topics) in this split

  def __len__(self) -> int:
    return max(0, (len(self.data) - 1) // self.seq_len)

  def __getitem__(self, index: SupportsIndex) -> dict[str, np.ndarray]:
    i = int(index)
    if not 0 <= i < len(self):
      raise IndexError(f"window {i} out of range [0, {len(self)})")
    start = i * self.seq_len
    return {"tokens": self.data[start:start + self.seq_len + 1].astype(np.int32)}


TEXT_TEST_EVERY = 10  # every 10th topic (sorted by name) is held out for test
TEXT_NAME = "the text dataset (pydoc topics)"  # how errors name it


def text_topics(split: str, validation_fraction: float = splits.VALIDATION_FRACTION,
                validation_seed: int = splits.VALIDATION_SEED) -> tuple[str, ...]:
  """The pydoc topic names (sorted) of a split: whole documents, never shared between splits.

  Topics are sorted by name; topic k is test when k % 10 == 0. The others
  are the train pool, from which `nbp.data.splits.carve(len(pool),
  validation_fraction, validation_seed)` holds out the validation topics.
  """
  splits.check(split, TEXT_NAME)
  names = sorted(topics)
  if split == "test":
    return tuple(names[::TEXT_TEST_EVERY])
  if split == "validation" and validation_fraction == 0.0:
    raise ValueError(f"config.data.validation_fraction=0: {TEXT_NAME} holds out no validation topics; use a "
                     "fraction in (0, 1).")
  pool = [n for k, n in enumerate(names) if k % TEXT_TEST_EVERY]
  carved = splits.carve(len(pool), validation_fraction, validation_seed)
  return tuple(pool[i] for i in carved[split])


def text_bytes_source(split: str, seq_len: int, *, validation_fraction: float = splits.VALIDATION_FRACTION,
                      validation_seed: int = splits.VALIDATION_SEED) -> TextBytesSource:
  """CPython's documentation topics (`pydoc_data.topics`) of a split as byte windows.

  The topics of the split (`text_topics`: train, validation or test, whole
  documents) are joined with a blank line. Returns a source of {"tokens":
  int32 [seq_len + 1]}. Pass `config.data.validation_fraction` and
  `validation_seed` (see `validation_keys`).
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  chosen = text_topics(split, validation_fraction, validation_seed)
  text = "\n\n".join(topics[n] for n in chosen).encode("utf-8")
  return TextBytesSource(np.frombuffer(text, np.uint8), seq_len, chosen)
