r"""Encodes a video dataset once into video-tokenizer tokens, as ArrayRecord files.

  python -m experiments.encode_tokens \
      --config experiments/configs/video_tokenizer_digits.py:local \
      --workdir runs/video_tokenizer_local --output_dir runs/video_tokens_local

`--config` and `--workdir` name the trained tokenizer (the config it was
trained with; its data section says which videos to encode: moving digits,
UCF-101 or a video folder, read by `nbp.data.videos.video_source`). After
training with experiments/configs/video_tokenizer_pod.py:ucf101, on one host
(the output is written with local file APIs):

  python -m experiments.encode_tokens \
      --config experiments/configs/video_tokenizer_pod.py:ucf101 \
      --workdir gs://BUCKET/video_tokenizer_ucf101 --output_dir data/tokens_ucf101

The output directory then holds, per split, `<split>.array_record` with one
record per video, {"tokens": int32 [f, h, w], "label": int32 [D]}
(msgpack-serialised), in the dataset's order, and `metadata.json` (latent
shape, codebook size, FSQ levels, example counts, the tokenizer's workdir).
The library side is `nbp.data.tokens` (`encode_dataset`, `token_source`); NBP
reads the directory with `config.data.name = "tokens"`.
"""

from __future__ import annotations

import json
import os

import jax
from absl import app, flags

from experiments import common
from nbp import video_tokenizer as vt
from nbp.data import tokens as tokens_lib

OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the token ArrayRecords go.")
SPLITS = flags.DEFINE_list("splits", ["train", "test"], "Splits to encode.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Videos encoded per call.")

METADATA = tokens_lib.METADATA
encode_split = tokens_lib.encode_split
encode_dataset = tokens_lib.encode_dataset


def encoded_source(path: str, split: str) -> tokens_lib.TokenSource:
  """The tokens that `encode_dataset` wrote for `split` under directory `path` (no shape checks)."""
  return tokens_lib.token_source(path, split)


def main(argv):
  del argv
  common.initialize()
  if jax.process_count() > 1:
    raise ValueError("encode_tokens runs in one process.")
  config = common.CONFIG.value
  workdir = common.WORKDIR.value
  model, params = vt.load_tokenizer(config, workdir)
  metadata = encode_dataset(model, params, config.data, OUTPUT_DIR.value, splits=tuple(SPLITS.value),
                            batch_size=BATCH_SIZE.value,
                            extra_metadata={"tokenizer_workdir": workdir if "://" in workdir
                                            else os.path.abspath(workdir)})
  print(json.dumps(metadata, sort_keys=True))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir", "output_dir"])
  app.run(main)
