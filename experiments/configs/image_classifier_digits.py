r"""Digit classifier on the "digits" images: the feature network of the in-domain FID.

Trains `nbp.models.video_classifier.VideoClassifier` (family "video_classifier")
on sklearn's real digit scans resized to S x S (config.data.name "digits"),
each image a one-frame video [1, S, S, 1] with one label. Its penultimate
features give nbp.evaluators.fid_digits ("fid_digits_classifier"); train it at
the image size of the generators it will judge.

Argument: the image side S, "" for 16 (e.g. `image_classifier_digits.py:8`).

Launch (CPU, 2 cores):
  python -m experiments.train --config experiments/configs/image_classifier_digits.py \
      --workdir runs/image_classifier_digits_16
Expected (S = 16, this config as it is): 2m00s wall on 2 shared cores, test
eval/accuracy 0.986; the rest of its figures are in docs/xar.md.
"""

from nbp.training import config as config_lib

DEFAULT_IMAGE_SIZE = 16  # S when the argument is empty


def get_config(arg: str = ""):
  try:
    image_size = int(arg) if arg else DEFAULT_IMAGE_SIZE
  except ValueError as e:
    raise ValueError(f"image_classifier_digits.py takes the image side (an integer), got {arg!r}") from e
  c = config_lib.base_config()
  c.family = "video_classifier"
  c.seed = 0

  c.model.widths = (16, 32, 64)  # channels per stage; each halves H and W (16 -> 2)
  c.model.feature_dim = 64  # E: the FID features (fewer dimensions, less bias at a few hundred images)
  c.model.dtype = "float32"

  c.data.name = "digits"
  c.data.image_size = image_size  # S: the 8x8 scans resized bilinearly (8: as they are)

  c.batch_size = 32
  c.num_steps = 1500  # about 37 epochs of the 1,293 train images (the 1,437 of the train pool less validation)
  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 50
  c.optimizer.weight_decay = 0.01
  c.log_every = 50
  c.checkpoint_every = 500
  c.evals.eval.every = 500
  c.evals.eval.steps = 4  # 128 of the 144 validation images (--config.evals.eval.steps=11: 352 of 360 test)
  del c.evals["sample"]  # the classifier has no sampler
  c.lock()
  return c
