"""NBP's video tokenizer: a MAGVIT-v2-style 3D causal CNN with an FSQ quantiser.

The NBP paper tokenises video with a MAGVIT-v2-style tokenizer whose training
code was never released; this is a trainable one. A video of F = 1 + t*k
frames is encoded to f = 1 + k latent frames (the first frame alone, then
groups of t frames), each spatially s times smaller, every latent vector
quantised by finite scalar quantisation (FSQ, Mentzer et al. 2023) to one of
prod(levels) codes. Everything is causal in time: latent frame j depends on
input frames <= t*j only, and output frame i on latent frames <= ceil(i / t).

Dimensions: B batch, F frames, H height, W width, C channels (video);
f latent frames, h, w latent height and width, d latent dim (= len(levels)),
K channels of a hidden layer.

Loss: L1 + MSE reconstruction, an optional perceptual term on features from a
function the user supplies (nothing pretrained ships here), and an optional
hinge-loss 3D patch discriminator. The discriminator's parameters live in the
same parameter tree as the tokenizer and are trained by the same optimizer:
the loss is generator_loss + discriminator_loss, where the discriminator term
sees the reconstruction through `stop_gradient` and the generator's adversarial
term sees the discriminator's parameters through `stop_gradient`, so each part
only receives the gradient of its own objective (Adam is per-parameter, so this
is two optimizers sharing hyperparameters).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nbp import families
from nbp import video as video_lib

# ---------------------------------------------------------------------------
# FSQ: finite scalar quantisation.


def round_ste(x: jax.Array) -> jax.Array:
  """Rounds to the nearest integer with a straight-through (identity) gradient."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


@dataclasses.dataclass(frozen=True)
class FSQ:
  """Quantises each of d channels to `levels[i]` values; prod(levels) codes.

  Codes are the quantised values scaled to [-1, 1] (grid step 1 / (L // 2)),
  indices the mixed-radix number of the per-channel levels (first channel
  least significant).
  """

  levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5)  # the paper's 64,000 codes, d = 6
  eps: float = 1e-3  # keeps tanh's bound strictly inside the outermost levels

  @property
  def dim(self) -> int:
    return len(self.levels)

  @property
  def codebook_size(self) -> int:
    return int(np.prod(self.levels))

  def _levels(self):
    return jnp.asarray(self.levels, jnp.float32)

  def _half_width(self):
    return jnp.asarray([l // 2 for l in self.levels], jnp.float32)

  def bound(self, z: jax.Array) -> jax.Array:
    """[..., d] -> [..., d], channel i inside (-L/2, L/2) so that it rounds to L values.

    Odd L: tanh * (L-1)/2 rounds to -(L-1)/2..(L-1)/2. Even L: shifted by 0.5
    (and the tanh input by atanh(0.5 / half_l), so z = 0 maps near 0),
    rounding to -L/2..L/2-1.
    """
    levels = self._levels()
    half_l = (levels - 1) * (1 + self.eps) / 2
    offset = jnp.where(levels % 2 == 0, 0.5, 0.0)
    shift = jnp.arctanh(offset / half_l)
    return jnp.tanh(z.astype(jnp.float32) + shift) * half_l - offset

  def quantize(self, z: jax.Array) -> jax.Array:
    """[..., d] real -> [..., d] codes on the grid in [-1, 1], straight-through gradient."""
    return round_ste(self.bound(z)) / self._half_width()

  def codes_to_indices(self, codes: jax.Array) -> jax.Array:
    """[..., d] codes -> int32 [...] in 0..codebook_size-1."""
    half = self._half_width()
    digits = jnp.round(codes * half + half).astype(jnp.int32)  # [..., d] in 0..L-1
    basis = jnp.asarray(np.cumprod((1,) + tuple(self.levels[:-1])), jnp.int32)
    return jnp.sum(digits * basis, axis=-1).astype(jnp.int32)

  def indices_to_codes(self, indices: jax.Array) -> jax.Array:
    """int [...] -> [..., d] codes in [-1, 1]."""
    basis = jnp.asarray(np.cumprod((1,) + tuple(self.levels[:-1])), jnp.int32)
    digits = (indices[..., None] // basis) % jnp.asarray(self.levels, jnp.int32)  # [..., d]
    half = self._half_width()
    return (digits.astype(jnp.float32) - half) / half


# ---------------------------------------------------------------------------
# Causal 3D CNN pieces.


def _pad_time_causal(x: jax.Array, frames: int) -> jax.Array:
  """[B, F, ...] -> [B, frames + F, ...]: the first frame repeated before the video."""
  if frames == 0:
    return x
  return jnp.concatenate([jnp.repeat(x[:, :1], frames, axis=1), x], axis=1)


class CausalConv3D(nn.Module):
  """[B, F, H, W, Cin] -> [B, F, H, W, K]; padded in time on the past side only.

  A kernel of kt frames sees kt-1 frames before the current one (the first
  frame repeated before the video, as MAGVIT-v2), none after; space is padded
  symmetrically ("same"). On CPU the convolution runs as kt 2D convolutions,
  one per time tap, summed (3-4x faster there than XLA's 3D convolution);
  elsewhere as one 3D convolution. Both compute the same function.
  """

  features: int  # K
  kernel_size: tuple[int, int, int] = (3, 3, 3)  # (kt, kh, kw)
  impl: str = "auto"  # "conv3d", "taps" (2D per time tap) or "auto" (taps on CPU)
  dtype: Any = jnp.float32  # computation dtype; parameters stay float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kt, kh, kw = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (kt, kh, kw, x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    x = _pad_time_causal(x.astype(self.dtype), kt - 1)  # [B, kt-1+F, H, W, Cin]
    x = jnp.pad(x, ((0, 0), (0, 0), (kh // 2, (kh - 1) // 2), (kw // 2, (kw - 1) // 2), (0, 0)))
    kernel = kernel.astype(self.dtype)
    impl = self.impl if self.impl != "auto" else ("taps" if jax.default_backend() == "cpu" else "conv3d")
    if impl == "conv3d":
      y = jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), "VALID",
                                       dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    elif impl == "taps":
      b, padded, h, w, c = x.shape
      f = padded - (kt - 1)
      y = 0
      for t in range(kt):
        frames = x[:, t:t + f].reshape(b * f, h, w, c)  # [B*F, H+kh-1, W+kw-1, Cin]
        y = y + jax.lax.conv_general_dilated(frames, kernel[t], (1, 1), "VALID",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
      y = y.reshape((b, f) + y.shape[1:])
    else:
      raise ValueError(f"CausalConv3D impl={self.impl!r}: expected 'auto', 'conv3d' or 'taps'.")
    return y + bias.astype(self.dtype)


class FrameGroupNorm(nn.Module):
  """GroupNorm of each frame on its own (over H, W and a channel group, never over time)."""

  num_groups: int = 8  # reduced to gcd(num_groups, K) when K is not a multiple
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, f = x.shape[:2]
    groups = math.gcd(self.num_groups, x.shape[-1])
    y = nn.GroupNorm(num_groups=groups, dtype=self.dtype, param_dtype=jnp.float32)(
        x.reshape((b * f,) + x.shape[2:]))  # [B*F, H, W, K]
    return y.reshape(x.shape)


class ResBlock(nn.Module):
  """norm, swish, causal conv, twice, plus the input (projected when K changes)."""

  features: int  # K out
  norm_groups: int = 8  # GroupNorm groups
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.swish(FrameGroupNorm(self.norm_groups, self.dtype)(x))
    h = CausalConv3D(self.features, dtype=self.dtype)(h)
    h = nn.swish(FrameGroupNorm(self.norm_groups, self.dtype)(h))
    h = CausalConv3D(self.features, dtype=self.dtype)(h)
    if x.shape[-1] != self.features:
      x = nn.Dense(self.features, dtype=self.dtype, param_dtype=jnp.float32)(x)
    return x + h


def space_time_to_depth(x: jax.Array, time: int, space: int) -> jax.Array:
  """[B, 1 + time*k, H, W, K] -> [B, 1 + k, H/space, W/space, time*space*space*K].

  Causal: time-1 copies of the first frame go before the video, so latent
  frame 0 holds frame 0 alone and latent frame j frames time*(j-1)+1..time*j.
  """
  x = _pad_time_causal(x, time - 1)
  b, f, h, w, k = x.shape
  x = x.reshape(b, f // time, time, h // space, space, w // space, space, k)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, f // time, h // space, w // space, time * space * space * k)


def depth_to_space_time(x: jax.Array, time: int, space: int) -> jax.Array:
  """Inverse of `space_time_to_depth`: [B, 1 + k, h, w, time*space*space*K] -> [B, 1 + time*k, ...]."""
  b, f, h, w, c = x.shape
  k = c // (time * space * space)
  x = x.reshape(b, f, h, w, time, space, space, k)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, f * time, h * space, w * space, k)
  return x[:, time - 1:]  # drop the frames that stood for the causal padding


def downsample_schedule(num_stages: int, time_factor: int, space_factor: int) -> tuple[tuple[int, int], ...]:
  """(time, space) factor of each stage between levels: space halves first, time on the last stages."""
  for name, factor in (("time_factor", time_factor), ("space_factor", space_factor)):
    if factor < 1 or factor & (factor - 1):
      raise ValueError(f"config.model.{name}={factor} must be a power of two (1, 2, 4, 8...).")
  n_time, n_space = int(math.log2(time_factor)), int(math.log2(space_factor))
  if max(n_time, n_space) > num_stages:
    raise ValueError(
        f"{len(range(num_stages)) + 1} levels (config.model.channel_multipliers) allow {num_stages} "
        f"2x stages, too few for time_factor={time_factor} and space_factor={space_factor}.")
  return tuple((2 if i >= num_stages - n_time else 1, 2 if i < n_space else 1) for i in range(num_stages))


class Encoder(nn.Module):
  """video [B, F, H, W, C] -> latents [B, f, h, w, d] (before quantisation)."""

  latent_dim: int  # d
  channels: int = 64  # K of the first level
  channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)  # K of level i = channels * this[i]
  num_res_blocks: int = 2  # per level, and in the middle
  time_factor: int = 4  # F = 1 + time_factor * (f - 1)
  space_factor: int = 8  # H = space_factor * h
  norm_groups: int = 8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, video: jax.Array) -> jax.Array:
    mults = self.channel_multipliers
    stages = downsample_schedule(len(mults) - 1, self.time_factor, self.space_factor)
    x = nn.with_logical_constraint(video.astype(self.dtype), ("batch", None, None, None, None))
    x = CausalConv3D(self.channels * mults[0], dtype=self.dtype)(x)
    for i, mult in enumerate(mults):
      for _ in range(self.num_res_blocks):
        x = ResBlock(self.channels * mult, self.norm_groups, self.dtype)(x)
      if i < len(stages):
        x = space_time_to_depth(x, *stages[i])  # a strided (2x2 or 2x2x2) conv once projected
        x = nn.Dense(self.channels * mults[i + 1], dtype=self.dtype, param_dtype=jnp.float32)(x)
    for _ in range(self.num_res_blocks):
      x = ResBlock(self.channels * mults[-1], self.norm_groups, self.dtype)(x)
    x = nn.swish(FrameGroupNorm(self.norm_groups, self.dtype)(x))
    return nn.Dense(self.latent_dim, param_dtype=jnp.float32)(x.astype(jnp.float32))


class Decoder(nn.Module):
  """codes [B, f, h, w, d] -> video [B, F, H, W, C]; mirrors the Encoder."""

  out_channels: int  # C
  channels: int = 64
  channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
  num_res_blocks: int = 2
  time_factor: int = 4
  space_factor: int = 8
  norm_groups: int = 8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, codes: jax.Array) -> jax.Array:
    mults = self.channel_multipliers
    stages = downsample_schedule(len(mults) - 1, self.time_factor, self.space_factor)
    x = CausalConv3D(self.channels * mults[-1], dtype=self.dtype)(codes.astype(self.dtype))
    for _ in range(self.num_res_blocks):
      x = ResBlock(self.channels * mults[-1], self.norm_groups, self.dtype)(x)
    for i in reversed(range(len(mults))):
      for _ in range(self.num_res_blocks):
        x = ResBlock(self.channels * mults[i], self.norm_groups, self.dtype)(x)
      if i > 0:
        time, space = stages[i - 1]
        x = nn.Dense(time * space * space * self.channels * mults[i - 1], dtype=self.dtype,
                     param_dtype=jnp.float32)(x)
        x = depth_to_space_time(x, time, space)  # [B, 1 + time*k, space*h, space*w, K]
    x = nn.swish(FrameGroupNorm(self.norm_groups, self.dtype)(x))
    return CausalConv3D(self.out_channels, dtype=self.dtype)(x).astype(jnp.float32)


class PatchDiscriminator(nn.Module):
  """video [B, F, H, W, C] -> real/fake logits [B, F, H/2^n, W/2^n] per space-time patch."""

  channels: int = 64  # K of the first layer, doubled per layer
  num_layers: int = 3  # strided (1, 2, 2) convolutions
  norm_groups: int = 8

  @nn.compact
  def __call__(self, video: jax.Array) -> jax.Array:
    x = video
    for i in range(self.num_layers):
      x = nn.Conv(self.channels * 2 ** i, (3, 4, 4), strides=(1, 2, 2), padding="SAME")(x)
      if i:
        x = FrameGroupNorm(self.norm_groups)(x)
      x = nn.leaky_relu(x, 0.2)
    return nn.Conv(1, (3, 3, 3), padding="SAME")(x)[..., 0]


class VideoTokenizer(nn.Module):
  """video [B, F, H, W, C] in [-1, 1] <-> codes [B, f, h, w, d] / indices int32 [B, f, h, w]."""

  levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5)  # FSQ levels; d = len(levels), prod = codebook size
  out_channels: int = 1  # C of the videos (1 for moving digits, 3 for RGB)
  channels: int = 64  # K of the first level
  channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)  # one level per entry; 2x stages between them
  num_res_blocks: int = 2  # residual blocks per level
  time_factor: int = 4  # 1 + 4k frames -> 1 + k latent frames (1, 2, 4, ...)
  space_factor: int = 8  # H -> H / 8 (2, 4, 8, ...)
  norm_groups: int = 8  # GroupNorm groups (per frame)
  discriminator_channels: int = 0  # > 0: a PatchDiscriminator of this width lives in the params
  dtype: Any = jnp.float32  # computation dtype; parameters stay float32

  @property
  def fsq(self) -> FSQ:
    return FSQ(tuple(self.levels))

  @property
  def codebook_size(self) -> int:
    return self.fsq.codebook_size

  def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(f, h, w) of a (F, H, W) video; raises ValueError if F != 1 + t*k or H, W do not divide."""
    if (num_frames - 1) % self.time_factor:
      raise ValueError(f"{num_frames} frames: the tokenizer needs 1 + {self.time_factor}*k frames.")
    if height % self.space_factor or width % self.space_factor:
      raise ValueError(f"{height}x{width} frames do not divide by space_factor={self.space_factor}.")
    return 1 + (num_frames - 1) // self.time_factor, height // self.space_factor, width // self.space_factor

  def setup(self):
    common = dict(channels=self.channels, channel_multipliers=tuple(self.channel_multipliers),
                  num_res_blocks=self.num_res_blocks, time_factor=self.time_factor,
                  space_factor=self.space_factor, norm_groups=self.norm_groups, dtype=self.dtype)
    self.encoder = Encoder(latent_dim=len(self.levels), **common)
    self.decoder = Decoder(out_channels=self.out_channels, **common)
    if self.discriminator_channels:
      self.discriminator = PatchDiscriminator(self.discriminator_channels, norm_groups=self.norm_groups)

  def encode(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
    """video [B, F, H, W, C] -> (codes [B, f, h, w, d], indices int32 [B, f, h, w])."""
    self.latent_shape(*video.shape[1:4])
    codes = self.fsq.quantize(self.encoder(video))
    return codes, self.fsq.codes_to_indices(codes)

  def decode(self, codes: jax.Array) -> jax.Array:
    """codes [B, f, h, w, d] -> video [B, 1 + t(f-1), s h, s w, C] (not clipped)."""
    return self.decoder(codes)

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    """indices int [B, f, h, w] -> video [B, F, H, W, C]."""
    return self.decode(self.fsq.indices_to_codes(indices))

  def discriminate(self, video: jax.Array) -> jax.Array:
    return self.discriminator(video)

  def __call__(self, video: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """video -> (reconstruction [B, F, H, W, C], {"codes", "indices"})."""
    codes, indices = self.encode(video)
    reconstruction = self.decode(codes)
    if self.discriminator_channels and self.is_initializing():
      self.discriminator(video)  # creates its parameters
    return reconstruction, {"codes": codes, "indices": indices}


# ---------------------------------------------------------------------------
# Loss and metrics.


@dataclasses.dataclass(frozen=True)
class LossWeights:
  l1: float = 1.0  # mean absolute error, [-1, 1] scale
  mse: float = 1.0  # mean squared error, [-1, 1] scale
  perceptual: float = 0.0  # > 0 needs a feature function (config.model.perceptual_features)
  adversarial: float = 0.0  # > 0 needs config.model.discriminator_channels > 0


def psnr(video: jax.Array, reconstruction: jax.Array) -> jax.Array:
  """Mean over videos of the PSNR (dB) on the [0, 1] scale; both inputs in [-1, 1]."""
  x = (video.astype(jnp.float32) + 1) / 2
  y = jnp.clip((reconstruction.astype(jnp.float32) + 1) / 2, 0.0, 1.0)
  mse = jnp.mean(jnp.square(x - y), axis=tuple(range(1, x.ndim)))  # [B]
  return jnp.mean(10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10)))


def codebook_usage(indices: jax.Array, codebook_size: int) -> jax.Array:
  """Fraction of the codebook's entries used at least once in `indices`."""
  counts = jnp.zeros((codebook_size,), jnp.int32).at[indices.reshape(-1)].add(1)
  return jnp.mean((counts > 0).astype(jnp.float32))


def perceptual_loss(features: Callable, video: jax.Array, reconstruction: jax.Array) -> jax.Array:
  """LPIPS-style distance: frames through `features`, unit-normalised channels, mean squared difference.

  `features(frames [N, H, W, C] in [-1, 1])` returns one array or a list of
  arrays [N, ..., K]; the distances of the arrays are summed.
  """
  frames = lambda v: v.reshape((-1,) + v.shape[2:])  # [B*F, H, W, C]
  real, fake = features(frames(video)), features(frames(reconstruction))
  real = real if isinstance(real, (list, tuple)) else [real]
  fake = fake if isinstance(fake, (list, tuple)) else [fake]
  unit = lambda a: a / (jnp.linalg.norm(a, axis=-1, keepdims=True) + 1e-8)
  return sum(jnp.mean(jnp.sum(jnp.square(unit(r) - unit(g)), axis=-1)) for r, g in zip(real, fake))


def load_feature_function(spec: str) -> Callable:
  """"package.module:function" -> that function (e.g. one that loads VGG/LPIPS weights from a local file)."""
  module, _, name = spec.partition(":")
  if not module or not name:
    raise ValueError(f"config.model.perceptual_features={spec!r}: expected 'package.module:function'.")
  return getattr(importlib.import_module(module), name)


def tokenizer_loss(model: VideoTokenizer, params, batch, rng, *, weights: LossWeights = LossWeights(),
                   perceptual_features: Callable | None = None):
  """(loss, metrics) of one batch {"video": [B, F, H, W, C] in [-1, 1]}."""
  del rng  # deterministic
  video = batch["video"]
  reconstruction, aux = model.apply({"params": params}, video)
  error = reconstruction - video
  l1, mse = jnp.mean(jnp.abs(error)), jnp.mean(jnp.square(error))
  recon = weights.l1 * l1 + weights.mse * mse
  loss = recon
  metrics = {"recon": recon, "l1": l1, "mse": mse, "psnr": psnr(video, reconstruction),
             "codebook_usage": codebook_usage(aux["indices"], model.codebook_size)}
  if weights.perceptual > 0:
    if perceptual_features is None:
      raise ValueError("perceptual weight > 0 without a feature function: set config.model.perceptual_features.")
    metrics["perceptual"] = perceptual_loss(perceptual_features, video, reconstruction)
    loss = loss + weights.perceptual * metrics["perceptual"]
  if weights.adversarial > 0:
    if not model.discriminator_channels:
      raise ValueError("adversarial weight > 0 needs config.model.discriminator_channels > 0.")
    discriminate = lambda p, v: model.apply({"params": p}, v, method=VideoTokenizer.discriminate)
    # Discriminator: hinge loss; the reconstruction is a constant to it.
    real = discriminate(params, video)
    fake = discriminate(params, jax.lax.stop_gradient(reconstruction))
    d_loss = jnp.mean(nn.relu(1.0 - real)) + jnp.mean(nn.relu(1.0 + fake))
    # Generator: raise the frozen discriminator's logits on its reconstruction.
    g_adv = -jnp.mean(discriminate(jax.lax.stop_gradient(params), reconstruction))
    loss = loss + weights.adversarial * g_adv + d_loss
    metrics.update(discriminator_loss=d_loss, generator_adversarial=g_adv,
                   real_accuracy=jnp.mean((real > 0).astype(jnp.float32)),
                   fake_accuracy=jnp.mean((fake < 0).astype(jnp.float32)))
  return loss, metrics


def evaluate(model: VideoTokenizer, params, batch, rng, *, weights: LossWeights = LossWeights()):
  """Held-out reconstruction: {"psnr" (dB, [0, 1] scale), "recon", "l1", "mse", "codebook_usage"}."""
  _, metrics = tokenizer_loss(model, params, batch, rng, weights=dataclasses.replace(
      weights, perceptual=0.0, adversarial=0.0))
  return metrics


# ---------------------------------------------------------------------------
# The task.

MODEL_FIELDS = ("levels", "channels", "channel_multipliers", "num_res_blocks", "time_factor",
                "space_factor", "norm_groups", "dtype", "l1_weight", "mse_weight", "perceptual_weight",
                "perceptual_features", "adversarial_weight", "discriminator_channels", "num_samples")
DATA_FIELDS = ("dir", "worker_count", "name", "num_frames", "frame_size",
               # moving digits (nbp.data.moving_digits):
               "num_digits", "speed", "num_train", "num_test",
               # real videos, "ucf101" or "video_folder" (nbp.data.videos):
               "frame_stride", "split_folders")


def build_model(model_cfg, out_channels: int = 1) -> VideoTokenizer:
  return VideoTokenizer(
      levels=tuple(model_cfg.levels), out_channels=out_channels, channels=model_cfg.channels,
      channel_multipliers=tuple(model_cfg.channel_multipliers), num_res_blocks=model_cfg.num_res_blocks,
      time_factor=model_cfg.time_factor, space_factor=model_cfg.space_factor,
      norm_groups=model_cfg.norm_groups,
      discriminator_channels=model_cfg.discriminator_channels if model_cfg.adversarial_weight > 0 else 0,
      dtype=jnp.dtype(model_cfg.dtype))


def moving_digits_builder(data_cfg):
  """The prepared moving digits tfds builder of a data config."""
  from nbp.data import moving_digits  # pylint: disable=g-import-not-at-top
  if data_cfg.name != "moving_digits":
    raise ValueError(f"config.data.name={data_cfg.name!r}: only moving digits has a tfds builder here.")
  return moving_digits.builder_from_config(data_cfg)


def make_data(data_cfg, split: str, *, seed: int, process_index: int, process_count: int, batch_size: int):
  """A checkpointable grain iterator of {"video": float32 [b, F, H, W, C] in [-1, 1], "label"} batches.

  Any dataset of `nbp.data.videos.video_source` (moving digits, UCF-101, a video folder).
  """
  from nbp.data import pipeline, videos  # pylint: disable=g-import-not-at-top
  source = videos.video_source(data_cfg, split)
  return pipeline.make_iterator(
      source, global_batch_size=batch_size * process_count, seed=seed, shuffle=True,
      transforms=(pipeline.NormalizeVideo(),), process_index=process_index, process_count=process_count,
      worker_count=data_cfg.worker_count)


@functools.cache
def _fixed_test_videos(num: int, num_frames: int, frame_size: int, num_digits: int, speed: float) -> np.ndarray:
  """float32 [num, F, H, W, 1] in [-1, 1]: the first `num` videos of the test split (dataset seed 0)."""
  from nbp.data import moving_digits  # pylint: disable=g-import-not-at-top
  videos = moving_digits.make_moving_digits(num, seed=0, split="test", num_frames=num_frames,
                                            frame_size=frame_size, num_digits=num_digits, speed=speed)["video"]
  return videos.astype(np.float32) / 127.5 - 1.0


@functools.cache
def _first_test_videos(data_cfg_json: str, num: int) -> np.ndarray:
  """float32 [num, F, H, W, C] in [-1, 1]: the first `num` videos of the test split of any video dataset."""
  import json  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from nbp.data import videos  # pylint: disable=g-import-not-at-top
  source = videos.video_source(ml_collections.ConfigDict(json.loads(data_cfg_json)), "test")
  return np.stack([source[i]["video"] for i in range(min(num, len(source)))]).astype(np.float32) / 127.5 - 1.0


def reconstruct_fixed_videos(model: VideoTokenizer, data_cfg, num: int, params, rng):
  """The sampler: {"video", "reconstruction"} of the first `num` test videos (the same at every call)."""
  del rng
  if data_cfg.name == "moving_digits":
    video = _fixed_test_videos(num, data_cfg.num_frames, data_cfg.frame_size, data_cfg.num_digits,
                               float(data_cfg.speed))
  else:
    video = _first_test_videos(data_cfg.to_json(), num)
  video = jnp.asarray(video)
  reconstruction, _ = model.apply({"params": params}, video)
  return {"video": video, "reconstruction": reconstruction}


def to_uint8(video) -> np.ndarray:
  return np.clip(np.round((np.asarray(video, np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)


def write_samples(samples, out_dir: str, step: int) -> dict[str, float]:
  """A GIF and a PNG grid with each test video above its reconstruction; returns their PSNR."""
  video, reconstruction = to_uint8(samples["video"]), to_uint8(samples["reconstruction"])
  pairs = np.stack([video, reconstruction], axis=1).reshape((-1,) + video.shape[1:])  # [2N, F, H, W, C]
  stem = os.path.join(out_dir, f"step_{step:07d}")
  video_lib.save_gif(stem + ".gif", pairs)
  video_lib.save_frame_grid(stem + ".png", pairs, max_videos=len(pairs),
                            title=f"tokenizer: input / reconstruction, step {step}")
  return {"psnr": float(psnr(jnp.asarray(samples["video"]), jnp.asarray(samples["reconstruction"])))}


def make_task(config) -> families.Task:
  from nbp.data import videos  # pylint: disable=g-import-not-at-top
  m, d = config.model, config.data
  channels = videos.num_channels(d)  # C: 1 (moving digits) or 3 (RGB)
  model = build_model(m, out_channels=channels)
  model.latent_shape(d.num_frames, d.frame_size, d.frame_size)  # fails early on bad shapes
  weights = LossWeights(l1=m.l1_weight, mse=m.mse_weight, perceptual=m.perceptual_weight,
                        adversarial=m.adversarial_weight)
  features = None
  if weights.perceptual > 0:
    if not m.perceptual_features:
      raise ValueError(
          "config.model.perceptual_weight > 0 but config.model.perceptual_features is empty: no pretrained "
          "network ships with this codebase; name a 'package.module:function' that maps frames "
          "[N, H, W, C] in [-1, 1] to features (e.g. a VGG loaded from a local weights file).")
    features = load_feature_function(m.perceptual_features)
  if weights.adversarial > 0 and not m.discriminator_channels:
    raise ValueError("config.model.adversarial_weight > 0 needs config.model.discriminator_channels > 0.")
  return families.Task(
      model=model,
      init_inputs=lambda: {"video": jnp.zeros((1, d.num_frames, d.frame_size, d.frame_size, channels),
                                              jnp.float32)},
      loss=functools.partial(tokenizer_loss, model, weights=weights, perceptual_features=features),
      data=functools.partial(make_data, d),
      evaluate=functools.partial(evaluate, model, weights=weights),
      sample=(functools.partial(reconstruct_fixed_videos, model, d, m.num_samples) if m.num_samples else None),
      write_samples=write_samples,
  )


# ---------------------------------------------------------------------------
# Encode / decode API for other code (the NBP transformer, notebooks).


def load_tokenizer(config, workdir: str) -> tuple[VideoTokenizer, Any]:
  """(model, params) of the latest checkpoint in `workdir`, trained with `config`.

  The EMA parameters are returned when the run kept them.
  """
  from nbp import train  # pylint: disable=g-import-not-at-top
  s, state = train.load_state(config, workdir)
  params = state.ema_params if state.ema_params is not None else state.params
  return s.task.model, params


def encode_video(model: VideoTokenizer, params, video: jax.Array) -> jax.Array:
  """video [B, F, H, W, C] in [-1, 1] -> token indices int32 [B, f, h, w]."""
  return model.apply({"params": params}, video, method=VideoTokenizer.encode)[1]


def decode_tokens(model: VideoTokenizer, params, indices: jax.Array) -> jax.Array:
  """token indices [B, f, h, w] -> video [B, F, H, W, C] clipped to [-1, 1]."""
  return jnp.clip(model.apply({"params": params}, indices, method=VideoTokenizer.decode_indices), -1.0, 1.0)
