"""Video-tokenizer tokens on disk: a dataset encoded once, read back for training NBP.

`encode_dataset` (the library side of `python -m experiments.encode_tokens`)
runs an encode function (a trained tokenizer's) over every clip of a dataset.
A token directory holds, per split (train, validation, test),
`<split>.array_record` with one record per clip, {"tokens": int32 [f, h, w],
"label": int32 [D]} and, where the source says so, where the clip comes from:
"video_index", "clip_start", "flip" (msgpack-serialised), in the dataset's
order, and `metadata.json` (latent shape, codebook size, FSQ levels, record
counts per split under "num_examples", the clip policy per split under
"clips", the tokenizer's workdir, the data section encoded). The clip policy
(nbp.data.clips.ClipPolicy) says how many clips of each video were encoded and
which: {"per_video": K, "offsets": "center" | "random", "flip": bool, "seed"
(when something is drawn)}; a directory written before it was recorded holds
one centred, unflipped clip per video, and `clip_policy` reads it so. Encoding
some splits into a directory that holds others of the same tokenizer and data
adds them (the counts and clip policies are merged). `token_source` opens one
split as a random-access source (`len`, `[i]`) that grain takes as it is; a
missing split (a directory encoded before validation splits existed has none)
raises FileNotFoundError naming the path and the command that writes it; a
damaged record raises `nbp.data.pipeline.DataCorruptionError` naming the file,
the record and how to encode the tokens again.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, SupportsIndex

import grain
import jax
import numpy as np
from array_record.python import array_record_module
from flax import serialization

from nbp.data import clips as clips_lib
from nbp.data import pipeline
from nbp.data import splits

METADATA = "metadata.json"
COUNTS = "num_examples"  # the metadata entry: split -> records (clips) encoded
CLIPS = "clips"  # the metadata entry: split -> its clip policy (ClipPolicy.to_metadata)
PER_SPLIT = (COUNTS, CLIPS)  # the entries that describe each split; the rest describes the tokens


def record_path(directory: str, split: str) -> str:
  return os.path.join(directory, f"{split}.array_record")


def encode_command(directory: str, metadata: dict[str, Any] | None, split_names=splits.SPLITS) -> str:
  """The command line that encodes `split_names` into `directory` (the tokenizer and train clips the metadata names)."""
  workdir = (metadata or {}).get("tokenizer_workdir") or "<the tokenizer's workdir>"
  flags = clip_policy(metadata or {}, "train").flags() if "train" in split_names else ""
  return (f"python -m experiments.encode_tokens --workdir {workdir} --output_dir {directory} "
          f"--splits {','.join(split_names)}" + (f" {flags}" if flags else ""))


def read_metadata(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, METADATA)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No {METADATA} in {directory}: encode the dataset first "
                            "(python -m experiments.encode_tokens).")
  with open(path) as f:
    return json.load(f)


def clip_policy(metadata: dict[str, Any], split: str) -> clips_lib.ClipPolicy:
  """The clip policy `split` was encoded with; CENTRED (one centred clip per video) where none is recorded."""
  return clips_lib.ClipPolicy.from_metadata(metadata.get(CLIPS, {}).get(split))


def encode_split(encode, source, path: str, *, batch_size: int = 32) -> int:
  """Encodes every example of `source` (dicts with "video" uint8 [F, H, W, C]) in order; returns the count.

  `encode` maps float videos [b, F, H, W, C] in [-1, 1] to tokens [b, f, h, w]
  (e.g. a jitted tokenizer encoder). The last batch is padded with copies of
  its first video so one compiled function serves every batch; the padding is
  not written. An example's "video_index", "clip_start" and "flip" (a
  nbp.data.clips.ClipSource's) are written beside its tokens.
  """
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")  # random access per record
  count = len(source)
  for start in range(0, count, batch_size):
    examples = [source[i] for i in range(start, min(start + batch_size, count))]
    videos = np.stack([np.asarray(e["video"], np.float32) / 127.5 - 1.0 for e in examples])  # [b, F, H, W, C]
    n = len(videos)
    if n < batch_size:
      videos = np.concatenate([videos, np.repeat(videos[:1], batch_size - n, axis=0)])
    tokens = np.asarray(jax.device_get(encode(videos)))[:n]  # [b, f, h, w]
    for e, t in zip(examples, tokens):
      label = np.asarray(e.get("label", np.zeros((0,))), np.int32).reshape(-1)  # [D]
      record = {"tokens": t.astype(np.int32), "label": label}
      record.update({k: int(e[k]) for k in clips_lib.RECORD_KEYS if k in e})
      writer.write(serialization.msgpack_serialize(record))
  writer.close()
  return count


def _previous_splits(output_dir: str, metadata: dict[str, Any], encoding: set[str]) -> dict[str, dict]:
  """The per-split entries (counts, clip policies) of splits already in `output_dir` that this call keeps.

  They are kept when the directory's metadata describes the same tokens
  (everything but the per-split entries equal); raises ValueError naming the
  directory and the stale split files otherwise. A kept split encoded before
  clip policies were recorded gets CENTRED's entry, what it holds.
  """
  path = os.path.join(output_dir, METADATA)
  if not os.path.exists(path):
    return {entry: {} for entry in PER_SPLIT}
  with open(path) as f:
    previous = json.load(f)
  kept = {s: n for s, n in previous.get(COUNTS, {}).items() if s not in encoding}
  kept = {s: n for s, n in kept.items() if os.path.exists(record_path(output_dir, s))}
  same = (json.loads(json.dumps({k: v for k, v in metadata.items() if k not in PER_SPLIT}))
          == {k: v for k, v in previous.items() if k not in PER_SPLIT})
  if kept and not same:
    raise ValueError(f"{output_dir} holds the split(s) {sorted(kept)} of other tokens ({path} differs): encode "
                     f"every split together ({encode_command(output_dir, metadata)}) or use another --output_dir.")
  return {COUNTS: kept, CLIPS: {s: clip_policy(previous, s).to_metadata() for s in kept}}


def encode_dataset(encode, sources: dict[str, Any], output_dir: str, *, metadata: dict[str, Any],
                   clips: dict[str, clips_lib.ClipPolicy] | None = None, batch_size: int = 32) -> dict:
  """Encodes each split's source (split -> source) under `output_dir`; writes and returns the metadata.

  `metadata` describes the tokens (latent_shape, codebook_size, ...: the
  encoder's caller knows them); the record counts are added under
  "num_examples" and each split's clip policy under "clips" (`clips`: split ->
  the ClipPolicy its source takes, CENTRED for a split not named), with those
  of the splits the directory already holds for the same metadata (see
  `_previous_splits`).
  """
  for split in sources:
    splits.check(split, f"the token directory {output_dir}")
  clips = clips or {}
  unknown = sorted(set(clips) - set(sources))
  if unknown:
    raise ValueError(f"clip policies given for split(s) {unknown} that are not encoded ({sorted(sources)}).")
  os.makedirs(output_dir, exist_ok=True)
  per_split = _previous_splits(output_dir, metadata, set(sources))
  for split, source in sources.items():
    per_split[COUNTS][split] = encode_split(encode, source, record_path(output_dir, split), batch_size=batch_size)
    per_split[CLIPS][split] = clips.get(split, clips_lib.CENTRED).to_metadata()
  metadata = {**metadata, **per_split}
  with open(os.path.join(output_dir, METADATA), "w") as f:
    json.dump(metadata, f, indent=2, sort_keys=True)
  return metadata


class TokenSource:
  """Random-access tokens of one split: [i] -> {"tokens": int32 [f, h, w], "label": int32 [D]}.

  Records written from clips also hold "video_index", "clip_start" and "flip"
  (int32 scalars); `clips` is the split's clip policy.
  """

  def __init__(self, path: str, metadata: dict[str, Any]):
    self.path = path
    self.metadata = metadata
    self._records = grain.sources.ArrayRecordDataSource([path])

  @property
  def split(self) -> str:
    return os.path.basename(self.path).removesuffix(".array_record")

  @property
  def clips(self) -> clips_lib.ClipPolicy:
    """How the split's records were cut from its videos (CENTRED for directories that do not say)."""
    return clip_policy(self.metadata, self.split)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: SupportsIndex) -> dict[str, np.ndarray]:
    i = int(index)
    if not 0 <= i < len(self):  # not damage: a plain IndexError
      raise IndexError(f"record {i} out of range [0, {len(self)}) of {self.path}")
    try:
      record = serialization.msgpack_restore(self._records[i])
      return {k: np.asarray(v, np.int32) for k, v in record.items()}
    except Exception as e:  # pylint: disable=broad-except  # riegeli: RuntimeError; msgpack: any type
      raise pipeline.DataCorruptionError(
          f"Damaged token file {self.path}: record {i} could not be read: {type(e).__name__}: {e}. "
          f"{self._rebuild_hint()}", self.path, i, i) from e

  def _rebuild_hint(self) -> str:
    directory = os.path.dirname(self.path)
    workdir = self.metadata.get("tokenizer_workdir")
    source = f" of the tokenizer in {workdir}" if workdir else ""
    command = encode_command(directory, self.metadata, (self.split,))
    return f"The tokens are derived data{source}: encode them again with {command} (it rewrites the file)."

  def __repr__(self) -> str:
    return f"TokenSource({self.path!r}, {len(self)} examples)"


def token_source(directory: str, split: str, *, grid: tuple[int, ...] | None = None,
                 codebook_size: int | None = None) -> TokenSource:
  """The tokens written for `split` under `directory`, checked against the expected grid and codebook.

  A mismatch names the config key to fix: a model built for one tokenizer must
  not silently read another's tokens.
  """
  splits.check(split, f"the token directory {directory} (config.data.token_dir)")
  path = record_path(directory, split)
  if not os.path.exists(path):
    metadata_path = os.path.join(directory, METADATA)
    metadata = read_metadata(directory) if os.path.exists(metadata_path) else None
    older = (" (token directories encoded before the validation split existed lack it)"
             if split == "validation" and metadata is not None else "")
    raise FileNotFoundError(f"No encoded split {split!r} at {path} (config.data.token_dir={directory!r}){older}. "
                            f"Encode it with: {encode_command(directory, metadata, (split,))}")
  metadata = read_metadata(directory)
  if grid is not None and tuple(metadata["latent_shape"]) != tuple(grid):
    raise ValueError(f"config.model.grid={tuple(grid)} but the tokens in {directory} have latent shape "
                     f"{tuple(metadata['latent_shape'])} ({METADATA}).")
  if codebook_size is not None and metadata["codebook_size"] != codebook_size:
    raise ValueError(f"config.model.codebook_size={codebook_size} but the tokens in {directory} come from a "
                     f"codebook of {metadata['codebook_size']} ({METADATA}).")
  return TokenSource(path, metadata)


@dataclasses.dataclass(frozen=True)
class TokensAndClass(grain.transforms.Map):
  """{"tokens" int [f, h, w] or [F*H*W], "label" int [D]} -> {"tokens": int32 [f*h*w], "class": int32}.

  class = sum_i label[i] * 10**i: a moving-digits video's ordered digit tuple
  (10**D classes); a single label (UCF-101, Kinetics) is its own class.
  """

  def map(self, element):
    return {"tokens": np.asarray(element["tokens"], np.int32).reshape(-1),
            "class": pipeline.label_class(np.reshape(element["label"], -1))}


def tokenizer_workdir(token_dir: str) -> str:
  """The workdir of the tokenizer that wrote the tokens in `token_dir` (their metadata names it)."""
  workdir = read_metadata(token_dir).get("tokenizer_workdir")
  if not workdir:
    raise ValueError(f"The tokens in config.data.token_dir={token_dir!r} do not name the tokenizer that wrote "
                     f"them ({METADATA} has no tokenizer_workdir): re-encode them with experiments.encode_tokens.")
  return workdir
