r"""Encodes a video dataset once into video-tokenizer tokens, as ArrayRecord files.

  python -m experiments.encode_tokens \
      --workdir runs/video_tokenizer_local --output_dir runs/video_tokens_local

`--workdir` names the trained tokenizer (its config.json says which videos it
was trained on, and those are encoded: moving digits, UCF-101 or a video
folder, read by `nbp.data.video_sources.video_source`); a `--config` replaces
that data section by its own. After
training with experiments/configs/video_tokenizer_pod.py:ucf101, on one host
(the output is written with local file APIs):

  python -m experiments.encode_tokens \
      --workdir gs://BUCKET/video_tokenizer_ucf101 --output_dir data/tokens_ucf101

The output directory then holds, per split (train, validation and test by
default; `--splits` picks some), `<split>.array_record` with one record per
video, {"tokens": int32 [f, h, w], "label": int32 [D]} (msgpack-serialised),
in the dataset's order, and `metadata.json` (latent shape, codebook size, FSQ
levels, example counts, the tokenizer's workdir, and under "data" the data
section encoded, so its validation carve is recorded). A directory encoded
before validation splits existed gets one with

  python -m experiments.encode_tokens \
      --workdir runs/video_tokenizer_local --output_dir runs/video_tokens_local --splits validation

(the other splits' files and counts are kept when the tokenizer and data are
the same).

The library side is `nbp.tasks.video_tokenizer.encode_tokens` over
`nbp.data.tokens` (`encode_dataset`, `token_source`); NBP
reads the directory with `config.data.name = "tokens"`.
"""

from __future__ import annotations

import json

import jax
from absl import app, flags

from experiments import common
from nbp.data import splits
from nbp.tasks import video_tokenizer
from nbp.training import workdir as workdir_lib


def main(argv):
  del argv
  common.initialize()
  if jax.process_count() > 1:
    raise ValueError("encode_tokens runs in one process.")
  config = common.CONFIG.value  # optional: its data section replaces the tokenizer's own
  data_cfg = config.data if config is not None else workdir_lib.read_config(common.WORKDIR.value).data
  metadata = video_tokenizer.encode_tokens(
      common.WORKDIR.value, common.OUTPUT_DIR.value, data_cfg=data_cfg, splits=tuple(common.SPLITS.value),
      batch_size=common.ENCODE_BATCH_SIZE.value, extra_metadata={"data": data_cfg.to_dict()})
  print(json.dumps(metadata, sort_keys=True))


if __name__ == "__main__":
  flags.FLAGS.set_default("splits", list(splits.SPLITS))  # every split: NBP validates on validation
  flags.mark_flags_as_required(["workdir", "output_dir"])
  app.run(main)
