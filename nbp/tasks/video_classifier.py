"""The video classifier as a task: a multi-label loss, quantised data, features and logits to judge.

The network is nbp.models.video_classifier (`config.model` is its fields); its
features are the in-domain FVD's (nbp.evaluators.fvd_digits) and, trained on
digit images, the in-domain FID's (nbp.evaluators.fid_digits).

Data. `config.data.name` "moving_digits": videos [F, H, W, 1] with D digits;
"ucf101" or "video_folder" (nbp.data.video_sources): RGB videos [F, H, W, 3]
with one action label (D = 1, `config.model.num_classes` of them, 101 for
UCF-101). "digits" (nbp.data.images, at `image_size` S): each image a
one-frame video [1, S, S, 1], its label one digit (D = 1); the loss and
metrics are the same.

Head: multi-label. A video shows D digits; the target is the multi-hot vector
of the classes present (a class shown twice counts once), trained with a
sigmoid cross-entropy per class. The same head serves D = 1 and D > 1 and uses
every digit, where "the first digit" would leave the others unlabelled.
Metrics: `accuracy`, the share of videos whose predicted set (sigmoid > 0.5)
is exactly the true set; `class_accuracy`, the per-class binary accuracy.

Grey levels. Generators that model pixels quantised to L grey levels emit
videos at the bin centres. With `config.data.levels` > 0 the classifier is
trained on real videos quantised then dequantised the same way
(`requantize`), and its "features" and "logits" predict functions pass every
video, real or generated, through that map first; it leaves generated videos unchanged (they are already
at the bin centres), so real and generated videos are compared after the same
quantisation.

The judges load a trained classifier by its workdir (nbp.tasks.load_run) and
call its "features" and "logits".

Dimensions: B batch, F frames, H height, W width, D labels per video, K classes.
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import jax
import jax.numpy as jnp
import numpy as np

from nbp import tasks
from nbp.data import images
from nbp.data import video_sources
from nbp.data import pipeline
from nbp.models.video_classifier import VideoClassifier as Model

DATASETS = (*video_sources.NAMES, "digits")


def multi_hot(labels, num_classes: int):
  """int labels [..., D] -> float32 [..., K]: 1 where a class is shown at least once."""
  return jnp.max(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), axis=-2)


def loss(model: Model, params, batch, rng):
  """Sigmoid cross-entropy per class (summed over classes, mean over videos), and accuracies."""
  del rng  # no dropout
  logits = model.apply({"params": params}, batch["video"])
  targets = multi_hot(batch["label"], model.num_classes)
  per_class = jnp.logaddexp(0.0, logits) - logits * targets  # softplus(x) - x y
  value = jnp.mean(jnp.sum(per_class, axis=-1))
  predicted = (logits > 0).astype(jnp.float32)
  correct = predicted == targets
  return value, {"accuracy": jnp.mean(jnp.all(correct, axis=-1).astype(jnp.float32)),
                 "class_accuracy": jnp.mean(correct.astype(jnp.float32))}


requantize = pipeline.requantize  # (its home is the data pipeline; the judges call it from here)


@dataclasses.dataclass(frozen=True)
class Requantize(grain.transforms.Map):
  """The training-data side of `requantize`: video uint8 [F, H, W, 1] -> the same at `levels` grey levels."""
  levels: int

  def map(self, element):
    return dict(element, video=requantize(np.asarray(element["video"]), self.levels))


def select_video_and_label(element):
  """Keeps the fields the classifier reads: video uint8 [F, H, W, 1], label int32 [D]."""
  return {"video": element["video"], "label": element["label"]}


def image_as_video(element):
  """A digit image as the classifier reads it: video uint8 [1, S, S, 1] (one frame), label int32 [1]."""
  return {"video": np.asarray(element["image"])[None], "label": np.asarray(element["label"], np.int32).reshape(1)}


def video_shape(data_cfg) -> tuple[int, int, int, int]:
  """[F, H, W, C] of the classifier's input videos for `config.data`."""
  if data_cfg.name == "digits":
    return (1, data_cfg.image_size, data_cfg.image_size, 1)
  return (data_cfg.num_frames, data_cfg.frame_size, data_cfg.frame_size, video_sources.num_channels(data_cfg))


def make_data(data_cfg, split: str, *, seed: int, process_index: int, process_count: int, batch_size: int):
  """A checkpointable grain iterator of {"video": uint8 [b, F, H, W, C], "label": int32 [b, D]}."""
  if data_cfg.name == "digits":
    source, transforms = images.image_source(data_cfg, split), (image_as_video,)
  else:
    source = video_sources.video_source(data_cfg, split)
    levels = data_cfg.get("levels", 0)
    transforms = (select_video_and_label,) + ((Requantize(levels),) if levels else ())
  return pipeline.make_iterator(
      source, global_batch_size=batch_size * process_count, seed=seed, shuffle=True,
      transforms=transforms, process_index=process_index, process_count=process_count,
      worker_count=data_cfg.worker_count)


def make_task(config) -> tasks.Task:
  model = tasks.build_model(Model, config.model)
  shape = video_shape(config.data)
  value = functools.partial(loss, model)
  levels = config.data.get("levels", 0)  # inputs requantised as the training videos were

  def features(params, videos):
    """uint8 videos [N, F, H, W, C] -> the penultimate features [N, E] (what the in-domain FVD/FID compare)."""
    return model.apply({"params": params}, requantize(videos, levels), method=Model.features)

  def logits(params, videos):
    """uint8 videos [N, F, H, W, C] -> per-class logits [N, K]."""
    return model.apply({"params": params}, requantize(videos, levels))

  return tasks.Task(
      model=model,
      init_inputs=lambda: {"videos": jnp.zeros((1, *shape), jnp.uint8)},
      loss=value,
      data=functools.partial(make_data, config.data),
      predict_fns={"eval_loss": value, "features": features, "logits": logits},
  )
