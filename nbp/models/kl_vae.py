"""xAR's latent space: a convolutional KL VAE, an image autoencoder whose latents are a diagonal Gaussian.

The encoder maps an image in [-1, 1] to the mean and log-variance of a
Gaussian posterior over a latent grid f = `downsample` times smaller per side;
the decoder maps a latent grid back to an image. Training (nbp.tasks.kl_vae)
adds the KL divergence of that posterior against N(0, I) with a small weight,
so the latents stay close to a smooth, bounded space a generator can model,
and reconstructs from a reparameterised sample.

Encoder: a 3x3 conv, then one level per entry of `channel_mult`, each
`num_res_blocks` residual blocks (GroupNorm, swish, 3x3 conv, twice) followed,
on every level but the last, by a stride-2 3x3 conv (one level per factor 2,
so len(channel_mult) = log2(downsample) + 1); a middle of two residual blocks
around an optional single-head self-attention block; GroupNorm, swish and a
3x3 conv to 2c channels (mean, logvar). The decoder mirrors it with
num_res_blocks + 1 blocks per level and nearest-neighbour 2x upsampling
followed by a 3x3 conv.

Sizes (`SIZES`; a config copies one entry into `config.model`):

  name  image      f   c   width  channel_mult     res blocks  mid attention  parameters
  kl16  256x256x3  16  16  128    (1, 1, 2, 2, 4)  2           yes            64.4M (26.2M encoder, 38.2M decoder)
  tiny  16x16x1    4   4   16     (1, 2, 2)        1           no             0.23M

kl16 is the usual KL-16 VAE shape of latent-diffusion and autoregressive
image models (256x256 RGB -> 16x16x16 latents); tiny is the CPU setting of
experiments/configs/kl_vae_digits.py.

The optional 2D patch discriminator (`discriminator_channels` > 0) lives in
the parameter tree under "discriminator"; nbp.tasks.kl_vae trains it as its
own parameter group with its own optimizer (64 channels, 3 layers: 0.66M
parameters).

Dimensions: B batch, S image side, C image channels, f downsample factor,
h, w latent height and width (S / f), c latent channels, K channels of a
hidden layer, N positions of a latent grid (h * w).

Its fields are the `config.model` schema (`KLVAE(**config.model)`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # the posterior's log-variance is clipped here: std in [3e-7, 2.2e4]

SIZES = {
    "kl16": dict(latent_channels=16, downsample=16, width=128, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                 mid_attention=True),
    "tiny": dict(latent_channels=4, downsample=4, width=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                 mid_attention=False),
}


def _conv(features: int, dtype, kernel: int = 3, stride: int = 1, name: str | None = None) -> nn.Conv:
  """A kxk conv, padded so that a stride-s conv maps S to S / s; parameters float32."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 dtype=dtype, param_dtype=jnp.float32, name=name)


def _norm(num_groups: int, features: int, dtype) -> nn.GroupNorm:
  """GroupNorm with gcd(num_groups, K) groups (so any width works)."""
  return nn.GroupNorm(num_groups=math.gcd(num_groups, features), dtype=dtype, param_dtype=jnp.float32)


class ResBlock(nn.Module):
  """[B, H, W, Kin] -> [B, H, W, K]: norm, swish, 3x3 conv, twice, plus the input (1x1-projected when K changes)."""

  features: int  # K out
  norm_groups: int = 32  # GroupNorm groups (gcd with K)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.swish(_norm(self.norm_groups, x.shape[-1], self.dtype)(x))
    h = _conv(self.features, self.dtype)(h)
    h = nn.swish(_norm(self.norm_groups, self.features, self.dtype)(h))
    h = _conv(self.features, self.dtype)(h)
    if x.shape[-1] != self.features:
      x = _conv(self.features, self.dtype, kernel=1)(x)
    return x + h


class AttentionBlock(nn.Module):
  """[B, H, W, K] -> [B, H, W, K]: single-head self-attention over the N = H*W positions, plus the input."""

  norm_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, k = x.shape
    y = _norm(self.norm_groups, k, self.dtype)(x).reshape(b, h * w, k)  # [B, N, K]
    dense = lambda name: nn.Dense(k, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    q, key, v = dense("query")(y), dense("key")(y), dense("value")(y)
    logits = jnp.einsum("bnk,bmk->bnm", q, key).astype(jnp.float32) / math.sqrt(k)  # [B, N, N]
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = dense("out")(jnp.einsum("bnm,bmk->bnk", weights, v))
    return x + out.reshape(b, h, w, k)


class _Levels(nn.Module):
  """The fields the encoder and its mirror, the decoder, share."""

  width: int = 128  # K of the first level
  channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # K of level i = width * this[i]; 2x between levels
  num_res_blocks: int = 2  # per level (the decoder has one more)
  mid_attention: bool = True  # self-attention between the two middle residual blocks
  norm_groups: int = 32
  dtype: Any = jnp.float32

  def middle(self, x: jax.Array) -> jax.Array:
    k = self.width * self.channel_mult[-1]
    x = ResBlock(k, self.norm_groups, self.dtype)(x)
    if self.mid_attention:
      x = AttentionBlock(self.norm_groups, self.dtype)(x)
    return ResBlock(k, self.norm_groups, self.dtype)(x)


class Encoder(_Levels):
  """images [B, S, S, C] -> (mean, logvar) [B, h, w, c], float32."""

  latent_channels: int = 16  # c

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    mults = self.channel_mult
    x = nn.with_logical_constraint(images.astype(self.dtype), ("batch", None, None, None))
    x = _conv(self.width * mults[0], self.dtype)(x)
    for i, mult in enumerate(mults):
      for _ in range(self.num_res_blocks):
        x = ResBlock(self.width * mult, self.norm_groups, self.dtype)(x)
      if i < len(mults) - 1:
        x = _conv(x.shape[-1], self.dtype, stride=2)(x)  # S -> S / 2
    x = self.middle(x)
    x = nn.swish(_norm(self.norm_groups, x.shape[-1], self.dtype)(x))
    moments = _conv(2 * self.latent_channels, jnp.float32, name="conv_out")(x.astype(jnp.float32))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)


class Decoder(_Levels):
  """latents [B, h, w, c] -> images [B, S, S, C] (float32, not clipped); mirrors the Encoder."""

  channels: int = 3  # C

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    mults = self.channel_mult
    x = _conv(self.width * mults[-1], self.dtype)(z.astype(self.dtype))
    x = self.middle(x)
    for i in reversed(range(len(mults))):
      for _ in range(self.num_res_blocks + 1):
        x = ResBlock(self.width * mults[i], self.norm_groups, self.dtype)(x)
      if i > 0:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour 2x
        x = _conv(x.shape[-1], self.dtype)(x)
    x = nn.swish(_norm(self.norm_groups, x.shape[-1], self.dtype)(x))
    return _conv(self.channels, self.dtype, name="conv_out")(x).astype(jnp.float32)


class PatchDiscriminator(nn.Module):
  """images [B, S, S, C] -> real/fake logits [B, S/2^n, S/2^n], one per patch."""

  channels: int = 64  # K of the first layer, doubled per layer
  num_layers: int = 3  # n strided 4x4 convolutions
  norm_groups: int = 32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = images.astype(jnp.float32)
    for i in range(self.num_layers):
      k = self.channels * 2 ** i
      x = nn.Conv(k, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)))(x)
      if i:
        x = _norm(self.norm_groups, k, jnp.float32)(x)
      x = nn.leaky_relu(x, 0.2)
    return nn.Conv(1, (3, 3), padding="SAME")(x)[..., 0]


class KLVAE(nn.Module):
  """images [B, S, S, C] in [-1, 1] <-> latents [B, S/f, S/f, c]; the posterior is N(mean, exp(logvar))."""

  channels: int = 3  # C of the images (1 for digits, 3 for RGB)
  latent_channels: int = 16  # c
  downsample: int = 16  # f, a power of 2: one level per factor 2
  width: int = 128  # K of the first level
  channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # one entry per level: log2(downsample) + 1 entries
  num_res_blocks: int = 2  # residual blocks per encoder level (decoder: one more)
  mid_attention: bool = True  # self-attention in the middle of encoder and decoder (at the latent resolution)
  norm_groups: int = 32  # GroupNorm groups (gcd with each width)
  discriminator_channels: int = 0  # > 0: a PatchDiscriminator of this width lives in the params
  discriminator_layers: int = 3  # its strided convolutions: patches of the image side / 2^this
  dtype: Any = "float32"  # computation dtype (a name or a jnp dtype); parameters stay float32

  def check(self) -> None:
    """Raises ValueError naming config.model.downsample / channel_mult when they do not fit each other."""
    f = self.downsample
    if f < 1 or f & (f - 1):
      raise ValueError(f"config.model.downsample={f} must be a power of two (1, 2, 4, 8, 16...).")
    levels = int(math.log2(f)) + 1
    if len(self.channel_mult) != levels:
      raise ValueError(f"config.model.channel_mult={tuple(self.channel_mult)} has {len(self.channel_mult)} "
                       f"levels; downsample={f} needs log2({f}) + 1 = {levels} (one 2x stage between levels).")

  def latent_shape(self, image_size: int) -> tuple[int, int, int]:
    """(h, w, c) of an image of side S; raises ValueError when S does not divide by `downsample`."""
    self.check()
    if image_size % self.downsample:
      raise ValueError(f"config.data.image_size={image_size} does not divide by "
                       f"config.model.downsample={self.downsample}.")
    side = image_size // self.downsample
    return side, side, self.latent_channels

  def setup(self):
    self.check()
    common = dict(width=self.width, channel_mult=tuple(self.channel_mult), num_res_blocks=self.num_res_blocks,
                  mid_attention=self.mid_attention, norm_groups=self.norm_groups, dtype=jnp.dtype(self.dtype))
    self.encoder = Encoder(latent_channels=self.latent_channels, **common)
    self.decoder = Decoder(channels=self.channels, **common)
    if self.discriminator_channels:
      self.discriminator = PatchDiscriminator(self.discriminator_channels, self.discriminator_layers,
                                              self.norm_groups)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images float [B, S, S, C] in [-1, 1] -> (mean, logvar) float32 [B, h, w, c], logvar clipped."""
    self.latent_shape(images.shape[1])
    return self.encoder(images)

  def decode(self, z: jax.Array) -> jax.Array:
    """latents [B, h, w, c] -> images float32 [B, f h, f w, C] (not clipped)."""
    return self.decoder(z)

  def discriminate(self, images: jax.Array) -> jax.Array:
    return self.discriminator(images)

  def __call__(self, images: jax.Array, rng: jax.Array | None = None):
    """images -> (reconstruction [B, S, S, C], mean, logvar [B, h, w, c]).

    The reconstruction decodes the reparameterised sample mean + exp(logvar / 2) * eps,
    eps ~ N(0, I) drawn from `rng`; with rng None, the mean itself.
    """
    mean, logvar = self.encode(images)
    z = mean
    if rng is not None:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, jnp.float32)
    reconstruction = self.decode(z)
    if self.discriminator_channels and self.is_initializing():
      self.discriminator(images)  # creates its parameters
    return reconstruction, mean, logvar


Model = KLVAE  # the name the training loop builds: Model(**config.model)
