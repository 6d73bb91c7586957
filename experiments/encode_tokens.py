r"""Encodes a moving-digits dataset once into video-tokenizer tokens, as ArrayRecord files.

  python -m experiments.encode_tokens \
      --config experiments/configs/video_tokenizer_digits.py:local \
      --workdir runs/video_tokenizer_local --output_dir runs/video_tokens_local

`--config` and `--workdir` name the trained tokenizer (the config it was
trained with; the data section says which videos to encode). The output
directory then holds, per split, `<split>.array_record` with one record per
video, {"tokens": int32 [f, h, w], "label": int32 [D]} (msgpack-serialised),
in the dataset's order, and `metadata.json` (latent shape, codebook size,
FSQ levels, example counts, the tokenizer's workdir and step).

Read them back with `encoded_source(output_dir, split)`: a random-access source
(`len`, `[i]`) that `nbp.data.pipeline.make_iterator` takes as it is.
"""

from __future__ import annotations

import json
import os
from typing import Any, SupportsIndex

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import serialization

from experiments import common
from nbp import video_tokenizer as vt

OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the token ArrayRecords go.")
SPLITS = flags.DEFINE_list("splits", ["train", "test"], "Splits to encode.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Videos encoded per call.")

METADATA = "metadata.json"


def _record_path(directory: str, split: str) -> str:
  return os.path.join(directory, f"{split}.array_record")


def encode_split(model: vt.VideoTokenizer, params, source, path: str, *, batch_size: int = 32) -> int:
  """Encodes every example of `source` (dicts with "video" uint8 [F, H, W, C]) in order; returns the count.

  The last batch is padded with copies of its first video so one compiled
  function serves every batch; the padding is not written.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  encode = jax.jit(lambda p, v: vt.encode_video(model, p, v))
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")  # random access per record
  count = len(source)
  for start in range(0, count, batch_size):
    examples = [source[i] for i in range(start, min(start + batch_size, count))]
    videos = np.stack([np.asarray(e["video"], np.float32) / 127.5 - 1.0 for e in examples])  # [b, F, H, W, C]
    n = len(videos)
    if n < batch_size:
      videos = np.concatenate([videos, np.repeat(videos[:1], batch_size - n, axis=0)])
    tokens = np.asarray(jax.device_get(encode(params, jnp.asarray(videos))))[:n]  # [b, f, h, w]
    for e, t in zip(examples, tokens):
      record = {"tokens": t.astype(np.int32), "label": np.asarray(e.get("label", np.zeros((0,))), np.int32)}
      writer.write(serialization.msgpack_serialize(record))
  writer.close()
  return count


def encode_dataset(model: vt.VideoTokenizer, params, data_cfg, output_dir: str, *,
                   splits=("train", "test"), batch_size: int = 32, extra_metadata: dict | None = None) -> dict:
  """Encodes the moving-digits splits of `data_cfg` under `output_dir`; returns the metadata written."""
  from nbp.data import pipeline  # pylint: disable=g-import-not-at-top
  os.makedirs(output_dir, exist_ok=True)
  builder = vt.moving_digits_builder(data_cfg)
  counts = {}
  for split in splits:
    source = pipeline.load_source(builder, split, data_cfg.dir)
    counts[split] = encode_split(model, params, source, _record_path(output_dir, split), batch_size=batch_size)
  metadata = {
      "latent_shape": list(model.latent_shape(data_cfg.num_frames, data_cfg.frame_size, data_cfg.frame_size)),
      "codebook_size": model.codebook_size,
      "levels": list(model.levels),
      "num_examples": counts,
      "video_shape": [data_cfg.num_frames, data_cfg.frame_size, data_cfg.frame_size, model.out_channels],
      **(extra_metadata or {}),
  }
  with open(os.path.join(output_dir, METADATA), "w") as f:
    json.dump(metadata, f, indent=2, sort_keys=True)
  return metadata


class EncodedSource:
  """Random-access tokens of one split: [i] -> {"tokens": int32 [f, h, w], "label": int32 [D]}."""

  def __init__(self, path: str, metadata: dict[str, Any]):
    import grain  # pylint: disable=g-import-not-at-top
    self.path = path
    self.metadata = metadata
    self._records = grain.sources.ArrayRecordDataSource([path])

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: SupportsIndex) -> dict[str, np.ndarray]:
    record = serialization.msgpack_restore(self._records[int(index)])
    return {k: np.asarray(v, np.int32) for k, v in record.items()}

  def __repr__(self) -> str:
    return f"EncodedSource({self.path!r}, {len(self)} examples)"


def encoded_source(path: str, split: str) -> EncodedSource:
  """The tokens that `encode_dataset` wrote for `split` under directory `path`."""
  record_path = _record_path(path, split)
  if not os.path.exists(record_path):
    raise FileNotFoundError(f"No encoded split {split!r} at {record_path}: run experiments.encode_tokens first.")
  with open(os.path.join(path, METADATA)) as f:
    metadata = json.load(f)
  return EncodedSource(record_path, metadata)


def main(argv):
  del argv
  common.initialize()
  if jax.process_count() > 1:
    raise ValueError("encode_tokens runs in one process.")
  config = common.CONFIG.value
  model, params = vt.load_tokenizer(config, common.WORKDIR.value)
  metadata = encode_dataset(model, params, config.data, OUTPUT_DIR.value, splits=tuple(SPLITS.value),
                            batch_size=BATCH_SIZE.value,
                            extra_metadata={"tokenizer_workdir": os.path.abspath(common.WORKDIR.value)})
  print(json.dumps(metadata, sort_keys=True))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir", "output_dir"])
  app.run(main)
