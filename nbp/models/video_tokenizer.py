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

Two switches compare this codebase's cheaper choices with the official NBP
tokenizer's (RenShuhuai-Andy/NBP, nbp/magvit2.py); the defaults are the cheaper
ones, so older checkpoints restore unchanged:
- `activation`: "swish" (x * sigmoid(x)) or "swish_beta" (x * sigmoid(beta x)
  with a learned beta per channel, initialised at 1: the official's).
- `resample`: "space_to_depth" (space-to-depth then a Dense layer down,
  a Dense layer then depth-to-space up) or "conv" (the official's:
  overlapping strided causal 3x3x3 convolutions down, stride (1, 2, 2) or
  (2, 2, 2); a causal 3x3x3 convolution then depth-to-space up). In "conv"
  the resampling keeps a level's width K and the next level's first residual
  block changes it, as the official code does.

The optional 3D patch discriminator (`discriminator_channels` > 0) lives in
the parameter tree under "discriminator"; nbp.tasks.video_tokenizer trains it
as its own parameter group with its own optimizer.

Its fields are the `config.model` schema (`VideoTokenizer(**config.model)`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
  """[B, F, H, W, Cin] -> [B, 1 + (F-1)/st, H/sh, W/sw, K]; padded in time on the past side only.

  A kernel of kt frames sees kt-1 frames before the current one (the first
  frame repeated before the video, as MAGVIT-v2), none after; space is padded
  symmetrically ("same"). With a time stride st, output frame j sees input
  frames st*j-kt+1..st*j: frame 0 alone first, then overlapping windows, never
  a later frame. On CPU the convolution runs as kt 2D convolutions, one per
  time tap, summed (3-4x faster there than XLA's 3D convolution); elsewhere as
  one 3D convolution. Both compute the same function.
  """

  features: int  # K
  kernel_size: tuple[int, int, int] = (3, 3, 3)  # (kt, kh, kw)
  strides: tuple[int, int, int] = (1, 1, 1)  # (st, sh, sw); > 1 downsamples
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
    st, sh, sw = self.strides
    impl = self.impl if self.impl != "auto" else ("taps" if jax.default_backend() == "cpu" else "conv3d")
    if impl == "conv3d":
      y = jax.lax.conv_general_dilated(x, kernel, (st, sh, sw), "VALID",
                                       dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    elif impl == "taps":
      b, padded, h, w, c = x.shape
      f = (padded - kt) // st + 1  # output frames
      y = 0
      for t in range(kt):
        frames = x[:, t:t + st * (f - 1) + 1:st].reshape(b * f, h, w, c)  # [B*f, H+kh-1, W+kw-1, Cin]
        y = y + jax.lax.conv_general_dilated(frames, kernel[t], (sh, sw), "VALID",
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


ACTIVATIONS = ("swish", "swish_beta")
RESAMPLES = ("space_to_depth", "conv")


class Swish(nn.Module):
  """x * sigmoid(beta * x) with a learned beta per channel K, initialised at 1 (the official NBP tokenizer's)."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    beta = self.param("beta", nn.initializers.ones, (x.shape[-1],), jnp.float32)  # [K]
    return x * jax.nn.sigmoid(beta.astype(x.dtype) * x)


def activate(x: jax.Array, activation: str, dtype: Any) -> jax.Array:
  """The network's nonlinearity; "swish_beta" adds a Swish module (its beta) to the calling module."""
  if activation == "swish":
    return nn.swish(x)
  if activation == "swish_beta":
    return Swish(dtype)(x)
  raise ValueError(f"config.model.activation={activation!r}: expected one of {ACTIVATIONS}.")


class ResBlock(nn.Module):
  """norm, swish, causal conv, twice, plus the input (projected when K changes)."""

  features: int  # K out
  norm_groups: int = 8  # GroupNorm groups
  dtype: Any = jnp.float32
  activation: str = "swish"  # "swish" or "swish_beta" (learned beta per channel)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = activate(FrameGroupNorm(self.norm_groups, self.dtype)(x), self.activation, self.dtype)
    h = CausalConv3D(self.features, dtype=self.dtype)(h)
    h = activate(FrameGroupNorm(self.norm_groups, self.dtype)(h), self.activation, self.dtype)
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


class _Levels(nn.Module):
  """The fields the encoder and its mirror, the decoder, share."""

  channels: int = 64  # K of the first level
  channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)  # K of level i = channels * this[i]
  num_res_blocks: int = 2  # per level, and in the middle
  time_factor: int = 4  # F = 1 + time_factor * (f - 1)
  space_factor: int = 8  # H = space_factor * h
  norm_groups: int = 8
  dtype: Any = jnp.float32
  activation: str = "swish"  # "swish" or "swish_beta"
  resample: str = "space_to_depth"  # "space_to_depth" or "conv"

  def _check(self):
    if self.resample not in RESAMPLES:
      raise ValueError(f"config.model.resample={self.resample!r}: expected one of {RESAMPLES}.")

  def _res_block(self, features: int) -> ResBlock:
    return ResBlock(features, self.norm_groups, self.dtype, self.activation)


class Encoder(_Levels):
  """video [B, F, H, W, C] -> latents [B, f, h, w, d] (before quantisation)."""

  latent_dim: int = 6  # d

  @nn.compact
  def __call__(self, video: jax.Array) -> jax.Array:
    self._check()
    mults = self.channel_multipliers
    stages = downsample_schedule(len(mults) - 1, self.time_factor, self.space_factor)
    x = nn.with_logical_constraint(video.astype(self.dtype), ("batch", None, None, None, None))
    x = CausalConv3D(self.channels * mults[0], dtype=self.dtype)(x)
    for i, mult in enumerate(mults):
      for _ in range(self.num_res_blocks):
        x = self._res_block(self.channels * mult)(x)
      if i < len(stages):
        time, space = stages[i]
        if self.resample == "conv":  # overlapping windows; keeps K (the next level's first block changes it)
          x = CausalConv3D(x.shape[-1], strides=(time, space, space), dtype=self.dtype,
                           name=f"downsample_{i}")(x)  # [B, 1 + (F'-1)/time, H'/space, W'/space, K]
        else:
          x = space_time_to_depth(x, time, space)  # a strided (2x2 or 2x2x2) conv once projected
          x = nn.Dense(self.channels * mults[i + 1], dtype=self.dtype, param_dtype=jnp.float32)(x)
    for _ in range(self.num_res_blocks):
      x = self._res_block(self.channels * mults[-1])(x)
    x = activate(FrameGroupNorm(self.norm_groups, self.dtype)(x), self.activation, self.dtype)
    return nn.Dense(self.latent_dim, param_dtype=jnp.float32)(x.astype(jnp.float32))


class Decoder(_Levels):
  """codes [B, f, h, w, d] -> video [B, F, H, W, C]; mirrors the Encoder."""

  out_channels: int = 1  # C

  @nn.compact
  def __call__(self, codes: jax.Array) -> jax.Array:
    self._check()
    mults = self.channel_multipliers
    stages = downsample_schedule(len(mults) - 1, self.time_factor, self.space_factor)
    x = CausalConv3D(self.channels * mults[-1], dtype=self.dtype)(codes.astype(self.dtype))
    for _ in range(self.num_res_blocks):
      x = self._res_block(self.channels * mults[-1])(x)
    for i in reversed(range(len(mults))):
      for _ in range(self.num_res_blocks):
        x = self._res_block(self.channels * mults[i])(x)
      if i > 0:
        time, space = stages[i - 1]
        if self.resample == "conv":  # keeps K (the next level's first block changes it)
          x = CausalConv3D(time * space * space * x.shape[-1], dtype=self.dtype, name=f"upsample_{i - 1}")(x)
        else:
          x = nn.Dense(time * space * space * self.channels * mults[i - 1], dtype=self.dtype,
                       param_dtype=jnp.float32)(x)
        x = depth_to_space_time(x, time, space)  # [B, 1 + time*k, space*h, space*w, K]
    x = activate(FrameGroupNorm(self.norm_groups, self.dtype)(x), self.activation, self.dtype)
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
  dtype: Any = "float32"  # computation dtype (a name or a jnp dtype); parameters stay float32
  # "swish" (x * sigmoid(x)) or "swish_beta" (x * sigmoid(beta x), beta learned per channel: the official's).
  activation: str = "swish"
  # "space_to_depth" (+ Dense down, Dense + depth-to-space up) or "conv" (strided causal 3x3x3 convs down,
  # a causal 3x3x3 conv + depth-to-space up: the official's; keeps K at each stage, see the module docstring).
  resample: str = "space_to_depth"

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
                  space_factor=self.space_factor, norm_groups=self.norm_groups, dtype=jnp.dtype(self.dtype),
                  activation=self.activation, resample=self.resample)
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


Model = VideoTokenizer  # the name the training loop builds: Model(**config.model)
