"""Bidirectional patch transformers for image denoising: the bidirectional EBT and a flow transformer.

Dimension letters: B batch, S image side, C channels, p patch side, T
patches (tokens, (S / p)^2), P values per patch (p * p * C), E width, N
layers.

Both networks are one DiT-style backbone (`PatchTransformer`) of the same
size: each patch [B, T, P] is linearly embedded to the width and a learned
position embedding added; N pre-norm blocks of the shared stack with full
(bidirectional) attention, weightless RMSNorm modulated by one condition
vector per image (adaLN, gates zero at init, so each block starts as the
identity), SwiGLU; a final weightless norm modulated by the same condition,
then a linear head per patch. The two differ only in the condition and the
head:

  BidirectionalEBT  (kind "ebt") the condition is a learned constant vector
                    (the official model's learned adaLN condition); the head
                    maps each patch to one scalar: energies [B, T]. The
                    energy of a whole candidate image is their mean (the task
                    takes it), so a candidate is the image alone: no context,
                    no time. Prediction is optimisation of the image against
                    that energy (nbp/samplers/ebt.py); the step size alpha is
                    the model's, a field or a learned parameter "alpha", as in
                    nbp/models/ebt.py.
  FlowTransformer   (kind "flow") the condition is the embedding of the flow
                    time t [B] (nbp.models.xar's sinusoidal features through a
                    two-layer MLP); the head maps each patch to its velocity
                    [B, T, P], zero-initialised (DiT).

The two classes share every field (`DenoisingTransformer`, the config schema
`config.model`, with `kind` choosing the class); alpha and learn_alpha are
the EBT's and must keep their defaults for the flow. Attention is plain XLA
softmax attention, twice differentiable (the EBT trains through dE/dx).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kernels.masks import MaskSpec
from layers import linear
from layers import position
from layers import transformer as transformer_lib
from nbp.models import ebt
from nbp.models import sizes
from nbp.models import xar

SIZES = ebt.SIZES  # variant: (layers, width, heads): the autoregressive EBT's table (official sizes, then tiny/S/M)
KINDS = ("ebt", "flow")


class PatchTransformer(nn.Module):
  """patches [B, T, P], condition [B, E] -> [B, T, out_dim]: the shared backbone (module docstring)."""

  num_layers: int  # N
  width: int  # E
  num_heads: int  # H (head dim E / H)
  mlp_dim: int  # SwiGLU hidden width
  out_dim: int  # outputs per patch: 1 (energy) or P (velocity)
  head_init: str = "normal"  # the head's kernel: "normal" (std 0.02) or "zeros"
  dtype: Any = jnp.float32  # computation dtype

  @nn.compact
  def __call__(self, patches, condition):
    b, t, _ = patches.shape
    width = self.width
    h = linear.DenseGeneral(width, kernel_axes=(None, "embed"), use_bias=True, dtype=self.dtype,
                            name="patch_embed")(jnp.asarray(patches, self.dtype))  # [B, T, E]
    slots = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
    h = h + position.LearnedPositionEmbedding(t, width, dtype=self.dtype, name="position")(slots)
    h = transformer_lib.constrain(h)
    h = transformer_lib.DecoderStack(
        num_layers=self.num_layers,
        block=dict(num_heads=self.num_heads, head_dim=width // self.num_heads, mlp_dim=self.mlp_dim,
                   activation="swiglu", norm="rmsnorm", mask=MaskSpec("full"), impl="xla", adaln=True,
                   dtype=self.dtype),
        name="decoder")(h, condition)
    shift, scale = transformer_lib.AdaLNModulation(width, num_chunks=2, dtype=self.dtype,
                                                   name="final_adaln")(condition)  # [B, 1, E] each
    h = transformer_lib.make_norm("rmsnorm", use_scale=False, name="final_norm")(h)
    h = transformer_lib.modulate(h.astype(jnp.float32), shift.astype(jnp.float32), scale.astype(jnp.float32))
    init = nn.initializers.zeros if self.head_init == "zeros" else nn.initializers.normal(0.02)
    return linear.DenseGeneral(self.out_dim, kernel_axes=("embed", None), use_bias=True, dtype=jnp.float32,
                               kernel_init=init, name="head")(h)  # [B, T, out_dim]


class DenoisingTransformer(sizes.SizedByTable, nn.Module):
  """The fields both denoisers share: `config.model` (module docstring). Build `MODELS[kind]`."""

  kind: str = "ebt"  # "ebt": BidirectionalEBT; "flow": FlowTransformer
  image_size: int = 0  # S (the task fills it from config.data.image_size when 0)
  channels: int = 1  # C
  patch_size: int = 2  # p
  variant: str | None = "tiny"  # a key of SIZES; the three fields below override it when set
  num_layers: int | None = None  # N
  width: int | None = None  # E
  num_heads: int | None = None  # H
  mlp_dim: int | None = None  # SwiGLU hidden width; None: 8E/3 rounded up to 64 (a 4E GELU MLP's parameters)
  alpha: float = 3000.0  # EBT: the optimisation step size (its initial value when learned); the official value
  learn_alpha: bool = False  # EBT: alpha a trained parameter ("alpha")
  dtype: Any = "float32"  # computation dtype; parameters stay float32

  SIZES = SIZES

  @property
  def continuous(self) -> bool:
    """Candidates are real-valued images (nbp/samplers/ebt.py reads them as they are)."""
    return True

  @property
  def grid(self) -> int:
    """Patches per side, S / p."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    """T."""
    return self.grid ** 2

  @property
  def patch_dim(self) -> int:
    """P."""
    return self.patch_size ** 2 * self.channels

  def patchify(self, images):
    """images [B, S, S, C] -> patches [B, T, P]: row-major patches, each row-major with channels last."""
    b, g, p = images.shape[0], self.grid, self.patch_size
    x = images.reshape(b, g, p, g, p, self.channels).transpose(0, 1, 3, 2, 4, 5)  # [B, S/p, S/p, p, p, C]
    return x.reshape(b, self.num_patches, self.patch_dim)

  def unpatchify(self, patches):
    """patches [B, T, P] -> images [B, S, S, C]: the inverse of `patchify`."""
    b, g, p = patches.shape[0], self.grid, self.patch_size
    x = patches.reshape(b, g, g, p, p, self.channels).transpose(0, 1, 3, 2, 4, 5)  # [B, S/p, p, S/p, p, C]
    return x.reshape(b, self.image_size, self.image_size, self.channels)

  def check(self) -> None:
    """Raises ValueError naming the first bad field (config.model.<field>)."""
    if self.kind not in KINDS:
      raise ValueError(f"config.model.kind={self.kind!r}: choose one of {KINDS}")
    if self.patch_size < 1 or self.image_size < self.patch_size or self.image_size % self.patch_size:
      raise ValueError(f"config.model.patch_size={self.patch_size} must divide the image side "
                       f"image_size={self.image_size}")
    if self.channels < 1:
      raise ValueError(f"config.model.channels={self.channels} must be >= 1")
    if self.embed_dim % self.heads or (self.embed_dim // self.heads) % 2:
      raise ValueError(f"config.model.width={self.embed_dim} must split into num_heads={self.heads} heads of "
                       "an even size")
    if self.alpha < 1e-4:
      raise ValueError(f"config.model.alpha={self.alpha}: the step size is clamped to at least 1e-4")
    if self.kind == "flow" and self.learn_alpha:
      raise ValueError("config.model.learn_alpha=True: the step size is the EBT's; the flow has none")

  def backbone(self, out_dim: int, head_init: str) -> PatchTransformer:
    return PatchTransformer(num_layers=self.depth, width=self.embed_dim, num_heads=self.heads,
                            mlp_dim=self.mlp_dim or xar.mlp_dim(self.embed_dim), out_dim=out_dim,
                            head_init=head_init, dtype=jnp.dtype(self.dtype), name="backbone")


class BidirectionalEBT(DenoisingTransformer):
  """patches [B, T, P] -> energies float32 [B, T], one per patch (their mean is the image's energy)."""

  @nn.compact
  def __call__(self, patches):
    self.check()
    if self.learn_alpha:
      self.param("alpha", nn.initializers.constant(self.alpha), (), jnp.float32)
    condition = self.param("condition", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed",)),
                           (self.embed_dim,), jnp.float32)
    condition = jnp.broadcast_to(condition, (patches.shape[0], self.embed_dim))
    return self.backbone(1, "normal")(patches, condition)[..., 0]


class FlowTransformer(DenoisingTransformer):
  """patches x_t [B, T, P], times t [B] -> velocity float32 [B, T, P] (d x_t / dt)."""

  @nn.compact
  def __call__(self, patches, t):
    self.check()
    condition = xar.TimestepEmbedder(self.embed_dim, dtype=jnp.dtype(self.dtype), name="time_embed")(t)  # [B, E]
    return self.backbone(self.patch_dim, "zeros")(patches, condition)


MODELS = {"ebt": BidirectionalEBT, "flow": FlowTransformer}
Model = DenoisingTransformer
