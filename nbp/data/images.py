"""Image datasets for the image families (xAR, its KL VAE, the digit image classifier).

Dimension letters: S image side, C channels (1 for digits, 3 for ImageNet).

`image_source(data_cfg, split)` is the one entry point: a random-access source
of {"image": uint8 [S, S, C], "label": int32} of split train, validation or
test, for

  digits        sklearn's 1,797 real 8x8 scans (nbp.data.moving_digits.Digits,
                the same train/validation/test scan pools as moving digits:
                validation carved from the 80% train pool by
                `config.data.validation_fraction` and `validation_seed`),
                resized to `image_size` with bilinear interpolation (8: the
                scans as they are);
  imagenet2012  tfds imagenet2012 prepared under `dir`, short side resized to
                `image_size` and centre cropped (nbp.data.tfds_sources). Its
                official validation set serves as the test split; our
                validation split is carved from tfds's "train" (nbp.data.splits).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import SupportsIndex

import ml_collections
import numpy as np
from PIL import Image

from nbp.data import moving_digits
from nbp.data import pipeline
from nbp.data import splits
from nbp.data import tfds_sources

IMAGE_DATASETS = ("digits", "imagenet2012")
IMAGENET_TEST_SPLIT = "validation"  # the tfds split of ImageNet that serves as our test split


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, C] -> uint8 [size, size, C] by bilinear interpolation (unchanged at its own size)."""
  if image.shape[0] == image.shape[1] == size:
    return image
  channels = image.shape[-1]
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  out = np.asarray(pil.resize((size, size), Image.BILINEAR))
  return out[..., None] if channels == 1 else out


@dataclasses.dataclass
class ResizedImages:
  """A source of {"image", "label"} examples with every image resized to `image_size`."""

  source: object  # random access over {"image": uint8 [H, W, C], "label": int32, ...}
  image_size: int  # S

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: SupportsIndex) -> dict[str, np.ndarray]:
    example = self.source[int(index)]
    return {"image": resize_image(np.asarray(example["image"]), self.image_size),
            "label": np.int32(example["label"])}


def image_source(data_cfg, split: str):
  """{"image": uint8 [S, S, C], "label": int32} of a split (train, validation, test) of `config.data`.

  `config.data.name` is digits or imagenet2012; an unknown split raises
  ValueError naming the dataset.
  """
  name = data_cfg.name
  if name not in IMAGE_DATASETS:
    raise ValueError(f"config.data.name={name!r} is not an image dataset; choose one of {IMAGE_DATASETS}.")
  splits.check(split, f"config.data.name={name!r}")
  if data_cfg.image_size < 1:
    raise ValueError(f"config.data.image_size={data_cfg.image_size} must be >= 1")
  if name == "digits":
    builder = moving_digits.digits_builder(data_cfg)
    return ResizedImages(pipeline.load_source(builder, split), data_cfg.image_size)
  if split == "test":
    return tfds_sources.imagenet_source(IMAGENET_TEST_SPLIT, data_cfg.dir, image_size=data_cfg.image_size)
  train = tfds_sources.imagenet_source("train", data_cfg.dir, image_size=data_cfg.image_size)
  return pipeline.carved_source(train, split, data_cfg, "imagenet2012")


def num_classes(data_cfg) -> int:
  """Classes of an image dataset: 10 digits, 1000 ImageNet classes."""
  return {"digits": 10, "imagenet2012": 1000}[data_cfg.name]


def read_images(data_cfg, split: str, start: int, count: int) -> dict[str, np.ndarray]:
  """Examples start..start+count-1 of a split: {"image": uint8 [N, S, S, C], "class": int32 [N]}.

  Raises ValueError naming the dataset and split when it holds fewer examples.
  """
  source = image_source(data_cfg, split)
  if start + count > len(source):
    raise ValueError(f"config.data ({data_cfg.name}) {split} split holds {len(source)} images; "
                     f"{start + count} were asked for (start {start}, count {count}).")
  examples = [source[i] for i in range(start, start + count)]
  return {"image": np.stack([e["image"] for e in examples]),
          "class": np.array([e["label"] for e in examples], np.int32)}


def image_data_config(data_cfg):
  """The image-dataset section behind `config.data`: itself, or for "latents" the one the latents were encoded from.

  A latent directory's metadata.json keeps the image section it was encoded
  from under "data" (nbp.data.latents); the FID evaluators read their real
  images through it.
  """
  if data_cfg.name != "latents":
    return data_cfg
  path = os.path.join(data_cfg.latent_dir, "metadata.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.data.latent_dir={data_cfg.latent_dir!r} has no metadata.json: encode the "
                            "latents with experiments.encode_latents first.")
  with open(path) as f:
    section = json.load(f).get("data")
  if not section:
    raise ValueError(f"{path} names no image dataset (no 'data' entry): encode the latents again.")
  return ml_collections.ConfigDict(section)
