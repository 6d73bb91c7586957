"""A small (2+1)D CNN that names the digits in a moving-digits video: the judge of the in-domain FVD.

The standard FVD's I3D was trained on Kinetics; its features say little about
grey moving digits. This classifier, trained here on moving digits
(nbp.tasks.video_classifier), gives an in-domain substitute: the Fréchet
distance between its penultimate features of real and generated videos
(nbp.evaluators.fvd_digits).

Dimensions: B batch, F frames, H height, W width (H = W), C channels (1),
K classes (10), E feature width.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

NUM_CLASSES = 10  # the digits 0..9


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
  dtype: Any = "float32"  # computation dtype (a name or a jnp dtype)

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


Model = VideoClassifier  # the name the training loop builds: Model(**config.model)
