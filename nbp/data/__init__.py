"""Datasets and the input pipeline, one `config.data` section per dataset.

Modules: moving_digits (generated tfds builders from sklearn's real digit
scans), pipeline (grain iterators, quantisation, text bytes), tokens (datasets
encoded once into tokenizer tokens), video_sources (one call over every video
dataset), tfds_sources (UCF-101 and ImageNet prepared by tfds, read without
TensorFlow), video_folder (Kinetics-style folders of video files), clips (which
clips of each video are taken: several per video, random starts, mirrors), images (digits and
ImageNet images), latents (image datasets encoded once into KL-VAE latents),
splits (train, validation and test, and how validation is carved from train);
Aaren's: ucr, forecasting, trajectories (scripted collection in gymnasium),
offline_rl_files (D4RL/Minari files), hawkes.

`config.data` holds the common keys and the keys of the one dataset it names:
`check_data_config` rejects a key that dataset does not read, so a section
never carries a union of every dataset's knobs.
"""

from __future__ import annotations

# dir: where tfds builds ArrayRecords; worker_count: grain workers; validation_fraction, validation_seed: how a
# dataset that ships no validation split carves one from its train split (nbp.data.splits).
COMMON_KEYS = ("name", "dir", "worker_count", "validation_fraction", "validation_seed")

# name -> the keys of its section (besides COMMON_KEYS).
DATASET_KEYS = {
    # generated from sklearn's digits (nbp.data.moving_digits); num_train/num_validation/num_test: videos per
    # split (validation scans carved from the train pool); levels: grey levels the frames are quantised to
    # for a classifier that judges quantised videos (0: the raw 256).
    "moving_digits": ("num_frames", "frame_size", "num_digits", "speed", "num_train", "num_validation", "num_test",
                      "levels"),
    # tfds-prepared UCF-101 under dir (nbp.data.tfds_sources)
    "ucf101": ("num_frames", "frame_size", "frame_stride"),
    # Kinetics-style dir/<split folder>/<class>/<video> (nbp.data.video_folder)
    "video_folder": ("num_frames", "frame_size", "frame_stride", "split_folders"),
    # a dataset encoded into tokenizer tokens (nbp.data.tokens, experiments.encode_tokens)
    "tokens": ("token_dir",),
    # bytes of CPython's documentation topics (nbp.data.pipeline.text_bytes_source); seq_len: observed bytes per
    # window for EBT (next-token models take their length from config.model.grid)
    "text": ("seq_len",),
    # sklearn's 8x8 digit scans resized to image_size (nbp.data.images)
    "digits": ("image_size",),
    # tfds-prepared ImageNet-2012 under dir, resized and centre cropped to image_size (nbp.data.images)
    "imagenet2012": ("image_size",),
    # images encoded once into KL-VAE latents, both flips (nbp.data.latents, experiments.encode_latents)
    "latents": ("latent_dir",),
    # Aaren's datasets. UCR/UEA classification sets by name (those shipped inside sktime, or under dir as
    # <dir>/<Name>/<Name>_TRAIN.ts and _TEST.ts) or a .ts train/test pair (nbp.data.ucr); max_len: longer
    # series are cut (0: the longest train series).
    "ucr": ("dataset", "train_path", "test_path", "max_len"),
    # a real series shipped with statsmodels or sktime, by name (nbp.data.forecasting)
    "series": ("dataset", "lookback", "horizon", "test_fraction"),
    # an ETT/Weather-style CSV file: a date column then one column per variable (nbp.data.forecasting);
    # split_rows: (train, validation, test) rows of a fixed split (ETT's 12/4/4 months), else test_fraction
    # and validation_fraction split chronologically.
    "csv_series": ("path", "columns", "lookback", "horizon", "test_fraction", "split_rows"),
    # trajectories of a gymnasium classic-control environment, collected once and cached under dir, or a
    # D4RL/Minari file given by path (nbp.data.trajectories, nbp.data.offline_rl_files); context_len: the
    # steps the policy sees (0: whole episodes, streamed at rollout)
    "trajectories": ("env", "path", "num_episodes", "context_len"),
    # marked event sequences of a Hawkes process simulated once (nbp.data.hawkes)
    "hawkes": ("num_marks", "num_train", "num_test", "seq_len"),
}


def check_data_config(data_cfg, accepted: tuple[str, ...]) -> None:
  """Raises ValueError naming `config.data.name` or the first key its dataset does not read."""
  name = data_cfg.get("name", "")
  if name not in accepted:
    raise ValueError(f"config.data.name={name!r}: this family reads one of {accepted}.")
  allowed = COMMON_KEYS + DATASET_KEYS[name]
  extra = sorted(set(data_cfg.keys()) - set(allowed))
  if extra:
    raise ValueError(f"Unknown config key 'config.data.{extra[0]}' for dataset {name!r}. "
                     f"Known keys: {sorted(allowed)}")
