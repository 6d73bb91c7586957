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
clip, {"tokens": int32 [f, h, w], "label": int32 [D], "video_index",
"clip_start", "flip"} (msgpack-serialised), in the dataset's order, and
`metadata.json` (latent shape, codebook size, FSQ levels, record counts, the
clip policy of each split under "clips", the tokenizer's workdir, and under
"data" the data section encoded, so its validation carve is recorded).

By default every video gives one clip, the centred one, unflipped. The clip
flags encode K clips of each train video instead, so NBP reads K times more
distinct clips (the official loader draws a new random clip of each video at
every step; here the draws are made once, when encoding):

  python -m experiments.encode_tokens --workdir gs://BUCKET/video_tokenizer_ucf101 \
      --output_dir data/tokens_ucf101_k8 --clips_per_video=8 --clip_offsets=random --clip_flip

Starts are drawn uniformly among a video's valid starts (given its length,
data.num_frames and data.frame_stride), distinct while the video has enough;
a video too short for more than one start gets that start for all K clips.
With --clip_flip half the clips of each video (drawn at random) are mirrored
left to right. The draws depend only on --clip_seed and the video's index
(nbp.data.clips.ClipPolicy); encoding the train split takes K times as long.
Validation and test keep one centred, unflipped clip per video, so evaluation
stays deterministic and comparable. The policy is a property of the token
directory, recorded in its metadata, not a key of the data section, which says
what the tokenizer was trained on (one centred clip per video). Moving
digits are generated with exactly num_frames frames, so their clips have one
start and differ by the mirror only: --clips_per_video=2 --clip_flip at most
(more, or 2 without --clip_flip, is an error naming the flag); note that a
mirrored digit is no longer a digit of its label.

A directory encoded before validation splits existed gets one with

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
from nbp.data import clips
from nbp.data import splits
from nbp.tasks import video_tokenizer
from nbp.training import workdir as workdir_lib

CLIPS_PER_VIDEO = flags.DEFINE_integer("clips_per_video", 1, "Clips encoded per train video (K records per video).")
CLIP_OFFSETS = flags.DEFINE_enum("clip_offsets", "center", clips.OFFSETS,
                                 "Where train clips start: the centred start, or starts drawn at random.")
CLIP_FLIP = flags.DEFINE_bool("clip_flip", False, "Mirror half the clips of each train video (drawn at random).")
CLIP_SEED = flags.DEFINE_integer("clip_seed", 0, "Seed of the train clips' draws (with each video's index).")


def train_clips() -> clips.ClipPolicy:
  """The clip policy of the train split, from the clip flags."""
  return clips.ClipPolicy(per_video=CLIPS_PER_VIDEO.value, offsets=CLIP_OFFSETS.value, flip=CLIP_FLIP.value,
                          seed=CLIP_SEED.value)


def main(argv):
  del argv
  common.initialize()
  if jax.process_count() > 1:
    raise ValueError("encode_tokens runs in one process.")
  config = common.CONFIG.value  # optional: its data section replaces the tokenizer's own
  data_cfg = config.data if config is not None else workdir_lib.read_config(common.WORKDIR.value).data
  metadata = video_tokenizer.encode_tokens(
      common.WORKDIR.value, common.OUTPUT_DIR.value, data_cfg=data_cfg, splits=tuple(common.SPLITS.value),
      batch_size=common.ENCODE_BATCH_SIZE.value, extra_metadata={"data": data_cfg.to_dict()},
      train_clips=train_clips())
  print(json.dumps(metadata, sort_keys=True))


if __name__ == "__main__":
  flags.FLAGS.set_default("splits", list(splits.SPLITS))  # every split: NBP validates on validation
  flags.mark_flags_as_required(["workdir", "output_dir"])
  app.run(main)
