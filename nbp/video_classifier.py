"""A small (2+1)D CNN that names the digits in a moving-digits video, and the FVD built on it.

The standard FVD's I3D was trained on Kinetics; its features say little about
grey moving digits. This classifier, trained here on moving digits, gives an
in-domain substitute: the Fréchet distance between its penultimate features
of real and generated videos. Its figures are reported under the name
"fvd_digits_classifier", never "fvd", and are not comparable with published FVD.

Head: multi-label. A video shows D digits; the target is the multi-hot vector
of the classes present (a class shown twice counts once), trained with a
sigmoid cross-entropy per class. The same head serves D = 1 and D > 1 and uses
every digit, where "the first digit" would leave the others unlabelled.
Metrics: `accuracy`, the share of videos whose predicted set (sigmoid > 0.5)
is exactly the true set; `class_accuracy`, the per-class binary accuracy.

Grey levels. Generators that model pixels quantised to `levels` grey levels
(nbp_digits.py, ntp_digits.py) emit videos at the bin centres. With
`data.levels` > 0 the classifier is trained on real videos quantised then
dequantised the same way (`requantize`), and `feature_extractor(...,
levels=...)` passes every video, real or generated, through that map first; it
leaves generated videos unchanged (they are already at the bin centres), so
real and generated videos are compared after the same quantisation.

Dimensions: B batch, F frames, H height, W width (H = W), C channels (1),
K classes (10), E feature width.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from nbp import families
from nbp import fvd as fvd_lib

NUM_CLASSES = 10  # the digits 0..9
FVD_KEY = "fvd_digits_classifier"  # the name of the in-domain FVD in every output


class Conv2Plus1D(nn.Module):
  """A 3x3x3 conv factorised as R(2+1)D does: a per-frame 3x3 conv, then a 3-tap conv in time.

  [B, F, H, W, C] -> [B, F, H / stride, W / stride, features]. On CPU, XLA's 2D and
  1D convolutions are over 10x faster than its 3D one (measured here: a 3-stage
  3D CNN's gradient at B=32, 16x32x32 took 4.5 s, the factorised one 0.26 s).
  """

  features: int
  spatial_stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, f, h, w, c = x.shape
    x = nn.Conv(self.features, (3, 3), strides=self.spatial_stride, padding="SAME", dtype=self.dtype,
                name="spatial")(x.reshape(b * f, h, w, c))  # [B*F, H', W', E]
    x = nn.gelu(x)
    _, h, w, e = x.shape
    x = x.reshape(b, f, h, w, e).transpose(0, 2, 3, 1, 4).reshape(b * h * w, f, e)  # [B*H'*W', F, E]
    x = nn.Conv(self.features, (3,), padding="SAME", dtype=self.dtype, name="temporal")(x)
    return x.reshape(b, h, w, f, e).transpose(0, 3, 1, 2, 4)  # [B, F, H', W', E]


class VideoClassifier(nn.Module):
  """videos uint8 [B, F, H, W, C] (0..255) -> logits [B, K]; `features` gives [B, E]."""

  widths: Sequence[int] = (16, 32, 64)  # channels of the stages; each stage halves H and W
  feature_dim: int = 128  # E: the penultimate layer, the FVD features
  num_classes: int = NUM_CLASSES  # K
  dtype: Any = jnp.float32

  def setup(self):
    # A stem at full resolution (8x8 digit sprites lose their strokes if the first conv strides),
    # then stage i: a (2+1)D conv at stride 1, then one at stride 2 in space (time is kept).
    self.stem = Conv2Plus1D(self.widths[0], 1, self.dtype, name="stem")
    self.downs = [Conv2Plus1D(w, 2, self.dtype, name=f"stage{i}_down") for i, w in enumerate(self.widths)]
    self.convs = [Conv2Plus1D(w, 1, self.dtype, name=f"stage{i}_conv") for i, w in enumerate(self.widths)]
    self.norms = [nn.LayerNorm(dtype=self.dtype, name=f"stage{i}_norm") for i in range(len(self.widths))]
    self.embed = nn.Dense(self.feature_dim, dtype=self.dtype, name="embed")
    self.head = nn.Dense(self.num_classes, dtype=self.dtype, name="head")

  def features(self, videos: jax.Array) -> jax.Array:
    """The penultimate layer [B, E]: what `digits_fvd` compares."""
    x = jnp.asarray(videos, self.dtype) / 127.5 - 1.0  # [B, F, H, W, C] in [-1, 1]
    x = nn.gelu(self.stem(x))
    for down, conv, norm in zip(self.downs, self.convs, self.norms):
      x = nn.gelu(conv(x))
      x = nn.gelu(norm(down(x)))  # [B, F, H / 2^(i+1), W / 2^(i+1), widths[i]]
    x = jnp.concatenate([x.mean(axis=(1, 2, 3)), x.max(axis=(1, 2, 3))], axis=-1)  # [B, 2 * widths[-1]]
    return nn.gelu(self.embed(x)).astype(jnp.float32)  # [B, E]

  def __call__(self, videos: jax.Array) -> jax.Array:
    return self.head(self.features(videos)).astype(jnp.float32)  # [B, K]


def multi_hot(labels, num_classes: int = NUM_CLASSES):
  """int labels [..., D] -> float32 [..., K]: 1 where a class is shown at least once."""
  return jnp.max(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), axis=-2)


def classifier_loss(model: VideoClassifier, params, batch, rng):
  """Sigmoid cross-entropy per class (summed over classes, mean over videos), and accuracies."""
  del rng  # no dropout
  logits = model.apply({"params": params}, batch["video"])
  targets = multi_hot(batch["label"], model.num_classes)
  per_class = jnp.logaddexp(0.0, logits) - logits * targets  # softplus(x) - x y
  loss = jnp.mean(jnp.sum(per_class, axis=-1))
  predicted = (logits > 0).astype(jnp.float32)
  correct = predicted == targets
  return loss, {"accuracy": jnp.mean(jnp.all(correct, axis=-1).astype(jnp.float32)),
                "class_accuracy": jnp.mean(correct.astype(jnp.float32))}


def requantize(videos, levels: int):
  """uint8 videos -> uint8 at the centres of `levels` uniform grey bins (0: unchanged).

  numpy or jax arrays; equals `pipeline.dequantize_tokens(pipeline.quantize_video(v, levels))`
  and is idempotent, so videos decoded from tokens pass through unchanged.
  """
  if not levels:
    return videos
  xp = jnp if isinstance(videos, jax.Array) else np
  bins = (videos.astype(xp.int32) * levels) // 256  # [...] in 0..levels-1
  return xp.clip(xp.floor((bins + 0.5) * (256.0 / levels)), 0, 255).astype(xp.uint8)


@dataclasses.dataclass(frozen=True)
class Requantize(grain.transforms.Map):
  """The training-data side of `requantize`: video uint8 [F, H, W, 1] -> the same at `levels` grey levels."""
  levels: int

  def map(self, element):
    return dict(element, video=requantize(np.asarray(element["video"]), self.levels))


# ---------------------------------------------------------------------------
# The in-domain FVD.

def feature_extractor(model: VideoClassifier, params, *, batch_size: int = 64,
                      levels: int = 0) -> fvd_lib.FeatureExtractor:
  """Penultimate features [N, E] of uint8 videos, requantised to `levels` grey levels first, in jitted batches."""
  def apply(p, videos):
    return model.apply({"params": p}, requantize(videos, levels), method=VideoClassifier.features)
  return fvd_lib.FeatureExtractor(apply, params, batch_size)


def digits_fvd(real, fake, *, classifier_params, model: VideoClassifier,
               batch_size: int = 64, levels: int = 0) -> dict[str, float]:
  """In-domain FVD of moving digits: {"fvd_digits_classifier": distance}.

  `real` and `fake` are uint8 videos [N, F, H, W, 1] at the classifier's
  training size; the Fréchet distance of their penultimate features. Not the
  I3D FVD: compare it only with itself (same classifier, same N). `levels`:
  the classifier's `data.levels` (both sets are requantised to it).
  """
  extract = feature_extractor(model, classifier_params, batch_size=batch_size, levels=levels)
  return {FVD_KEY: fvd_lib.frechet_distance_of_features(extract(real), extract(fake))}


def load_classifier(config, workdir: str):
  """(model, params) of a trained classifier's latest checkpoint in `workdir`."""
  from nbp import train  # pylint: disable=g-import-not-at-top
  s, state = train.load_state(config, workdir)
  params = state.ema_params if state.ema_params is not None else state.params
  return s.task.model, params


# ---------------------------------------------------------------------------
# The task: model, data and evaluator from a config.

MODEL_FIELDS = ("widths", "feature_dim", "dtype")
DATA_FIELDS = ("dir", "worker_count", "name", "num_frames", "frame_size", "num_digits", "speed",
               "num_train", "num_test", "levels")


def build_model(model_cfg) -> VideoClassifier:
  return VideoClassifier(widths=tuple(model_cfg.widths), feature_dim=model_cfg.feature_dim,
                         dtype=jnp.dtype(model_cfg.dtype))


def select_video_and_label(element):
  """Keeps the fields the classifier reads: video uint8 [F, H, W, 1], label int32 [D]."""
  return {"video": element["video"], "label": element["label"]}


def make_data(data_cfg, split: str, *, seed: int, process_index: int, process_count: int, batch_size: int):
  """A checkpointable grain iterator of {"video": uint8 [b, F, H, W, 1], "label": int32 [b, D]}."""
  from nbp.data import moving_digits, pipeline  # pylint: disable=g-import-not-at-top
  if data_cfg.name != "moving_digits":
    raise ValueError(f"config.data.name={data_cfg.name!r}: the video classifier reads 'moving_digits'.")
  source = pipeline.load_source(moving_digits.builder_from_config(data_cfg), split, data_cfg.dir)
  transforms = (select_video_and_label,) + ((Requantize(data_cfg.levels),) if data_cfg.levels else ())
  return pipeline.make_iterator(
      source, global_batch_size=batch_size * process_count, seed=seed, shuffle=True,
      transforms=transforms, process_index=process_index, process_count=process_count,
      worker_count=data_cfg.worker_count)


def make_task(config) -> families.Task:
  model = build_model(config.model)
  d = config.data
  loss = functools.partial(classifier_loss, model)
  return families.Task(
      model=model,
      init_inputs=lambda: {"videos": jnp.zeros((1, d.num_frames, d.frame_size, d.frame_size, 1), jnp.uint8)},
      loss=loss,
      data=functools.partial(make_data, config.data),
      evaluate=loss,  # test-split loss, accuracy and class_accuracy
  )
