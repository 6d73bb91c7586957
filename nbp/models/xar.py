"""xAR: next-X prediction. A transformer that predicts each entity's flow velocity, causal across entities.

The image is a token grid (VAE latents or pixel patches; nbp.tasks.xar makes
it) cut into entities (nbp.models.entities: tokens, cells, subsamples,
scales or the whole image). The network reads the sequence of noisy tokens
x_t [B, S, C] under the block-causal mask with one block per entity:
bidirectional inside an entity, causal across entities. There is no shift:
the outputs at entity i are the velocity of entity i itself, from the noisy
entity i and the entities before it.

Conditioning (adaLN, DiT-style): every token's condition is the class
embedding plus the timestep embedding of its own entity's t, so in one pass
every entity can sit at its own noise level (Noisy Context Learning). Class
index `num_classes` is the null class of classifier-free guidance. Each block
is a pre-norm block with weightless RMSNorm modulated by the condition,
SwiGLU, and 2D RoPE of the token's (row, column) on the finest grid; learned
position embeddings indexed by the sequence slot are added to the input. The
final layer is a modulated norm and a zero-initialised linear velocity head.

Differences from the official network (OliverRensu/xAR, models/xar.py). Five
are fields, each defaulting to this codebase's choice; the ImageNet configs
set the official values (`OFFICIAL`):
  qkv_bias        biases on the attention's q, k, v and output projections
                  (official: on; here off, as in the other models);
  input_norm      a learned-scale RMSNorm of the projected input plus its
                  position embedding, before the first block (official: on);
  dropout         on each block's attention output and MLP output in training
                  (official: 0.1 there and 0.1 on the attention probabilities,
                  which the fused attention kernels do not offer);
  adaln_init      the adaLN modulation's kernel at init: "zeros" (DiT: every
                  block starts as the identity) or "xavier" (official: xavier
                  uniform, as every linear layer of that network, so the gates
                  start nonzero);
  time_embedding  "continuous" (t * 1000 as a real number) or "integer"
                  (official: floor(t * 1000), 1,000 distinct times).
Not switched: the official network is an encoder stack and a decoder stack
(8+8 blocks for B) with a learned-scale RMSNorm, a linear projection and a
second position embedding between them and a plain learned-scale RMSNorm
before an xavier-initialised head; here one stack with a modulated final norm
and a zero-initialised head.

Teacher forcing (the paper's ablation, `teacher_forcing=True`): the sequence is
the S tokens clean (t = 0), then the same S tokens noisy; the noisy copy of
entity i sees the clean entities before it and itself (kernels.masks,
"teacher_forcing"), and the noisy copy's outputs are the velocities. A decoder
of either model runs the same way: the cache holds the finished entities, the
current one attends over them and itself.

Sizes (`SIZES`, by `variant`): the paper's B, L and H count their encoder and
decoder blocks together here (8+8 = 16 blocks for B), every block adaLN
conditioned; tiny and S are local settings.

Dimensions: B batch, S slots, C token channels, E width, K entities.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from layers import attention as attention_lib
from layers import linear
from layers import position as position_lib
from layers import transformer as transformer_lib
from nbp.models import entities as entities_lib
from nbp.models import sizes

# variant: (layers, width, heads). B / L / H are the paper's 172M / 608M / 1.1B.
SIZES = {
    "tiny": (2, 64, 4),
    "S": (4, 128, 4),
    "M": (6, 256, 4),
    "B": (16, 768, 12),
    "L": (32, 1024, 16),
    "H": (40, 1280, 16),
}
TIME_SCALE = 1000.0  # t in [0, 1] is embedded as t * TIME_SCALE (the frequencies of DiT's 1000 steps)
TIME_EMBEDDINGS = ("continuous", "integer")
ADALN_INITS = {"zeros": nn.initializers.zeros,
               "xavier": nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))}  # kernel [C, 6, E]
# The official network's values of the switches (module docstring).
OFFICIAL = dict(qkv_bias=True, input_norm=True, dropout=0.1, adaln_init="xavier", time_embedding="integer")


def mlp_dim(width: int) -> int:
  """SwiGLU hidden width: 8E/3 rounded up to a multiple of 64 (the parameters of a 4E GELU MLP)."""
  return int(np.ceil(8 * width / 3 / 64) * 64)


def timestep_embedding(t, dim: int, max_period: float = 10000.0, integer: bool = False):
  """Sinusoidal features [..., dim] of times t [...] scaled by TIME_SCALE (integer: floored): cos then sin."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  steps = jnp.asarray(t, jnp.float32) * TIME_SCALE
  if integer:
    steps = jnp.floor(steps)
  args = steps[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nn.Module):
  """t [...] -> [..., E]: sinusoidal features through a two-layer SiLU MLP."""

  features: int  # E
  frequency_dim: int = 256  # sinusoidal features before the MLP
  integer: bool = False  # embed floor(t * TIME_SCALE) (the official integer times) instead of t * TIME_SCALE
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t):
    x = timestep_embedding(t, self.frequency_dim, integer=self.integer).astype(self.dtype)
    init = nn.initializers.normal(0.02)
    x = linear.DenseGeneral(self.features, kernel_axes=(None, "embed"), use_bias=True, dtype=self.dtype,
                            kernel_init=init, name="fc1")(x)
    return linear.DenseGeneral(self.features, kernel_axes=("mlp", "embed"), use_bias=True, dtype=self.dtype,
                               kernel_init=init, name="fc2")(nn.silu(x))


class XAR(sizes.SizedByTable, nn.Module):
  """x_t [B, T, C], per-token t [B, T], labels [B] -> velocity [B, T, C]; the fields are `config.model`."""

  token_dim: int  # C: channels of a token (latent channels, or p*p*channels of a pixel patch)
  grid: tuple[int, int]  # (h, w) tokens of an image
  num_classes: int  # classes; index num_classes is the null class (guidance)
  entity: str = "cell"  # token, cell, subsample, scale or image (nbp.models.entities)
  cell: int = 8  # side of a cell (entity "cell")
  stride: int = 2  # subsampling stride (entity "subsample")
  scales: tuple[int, ...] = ()  # pooling factors coarse to fine (entity "scale"); (): powers of 2 down to 1
  teacher_forcing: bool = False  # trained on clean context (the ablation) instead of noisy context
  variant: str | None = None  # a key of SIZES; the three fields below override it when set
  num_layers: int | None = None
  width: int | None = None  # E
  num_heads: int | None = None
  rope_base: float = 10000.0  # 2D RoPE frequency base
  learned_positions: bool = True  # a learned embedding per slot, added to the input (besides RoPE)
  scan_layers: bool = False  # stacked layers under nn.scan (faster compiles, slower CPU decoding)
  remat_policy: str = "none"  # see layers.transformer.DecoderStack
  attention_impl: str = "auto"  # kernels.dispatch implementation
  dtype: Any = "float32"  # computation dtype; parameters stay float32
  # Switches of the differences from the official network (module docstring; official values in OFFICIAL).
  qkv_bias: bool = False  # biases on the q, k, v and output projections (official True)
  input_norm: bool = False  # learned-scale RMSNorm of the input embedding before the first block (official True)
  dropout: float = 0.0  # dropout rate on each block's attention and MLP outputs in training (official 0.1)
  adaln_init: str = "zeros"  # adaLN modulation kernel init: "zeros" (DiT) or "xavier" (official)
  time_embedding: str = "continuous"  # "continuous" t * 1000, or "integer" floor(t * 1000) (official)

  SIZES = SIZES  # depth, embed_dim, heads: nbp.models.sizes.SizedByTable

  @property
  def entities(self) -> entities_lib.Entities:
    return entities_lib.Entities(self.entity, tuple(self.grid), cell=self.cell, stride=self.stride,
                                 scales=tuple(self.scales))

  @property
  def seq_len(self) -> int:
    """S: slots of one copy of the sequence."""
    return self.entities.seq_len

  def mask(self) -> attention_lib.MaskSpec:
    ents = self.entities
    if self.teacher_forcing:
      return attention_lib.MaskSpec("teacher_forcing", block_sizes=ents.sizes)
    if ents.uniform:
      return attention_lib.MaskSpec("block_causal", block_len=ents.sizes[0])
    return attention_lib.MaskSpec("block_causal", block_sizes=ents.sizes)

  def check(self) -> None:
    """Raises ValueError naming the first inconsistent field (config.model.<field>)."""
    if len(self.grid) != 2:
      raise ValueError(f"config.model.grid={tuple(self.grid)} must be (rows, columns) of tokens")
    if self.token_dim < 1 or self.num_classes < 1:
      raise ValueError(f"config.model.token_dim={self.token_dim} and num_classes={self.num_classes} must be >= 1")
    if self.embed_dim % self.heads or (self.embed_dim // self.heads) % 4:
      raise ValueError(f"config.model: width {self.embed_dim} over {self.heads} heads must give a head dim "
                       "divisible by 4 (2D RoPE rotates pairs on two axes)")
    self.entities  # checks entity, cell, stride, scales
    if self.time_embedding not in TIME_EMBEDDINGS:
      raise ValueError(f"config.model.time_embedding={self.time_embedding!r}: choose one of {TIME_EMBEDDINGS}")
    if self.adaln_init not in ADALN_INITS:
      raise ValueError(f"config.model.adaln_init={self.adaln_init!r}: choose one of {sorted(ADALN_INITS)}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"config.model.dropout={self.dropout} must be in [0, 1)")

  def setup(self):
    self.check()
    dtype = jnp.dtype(self.dtype)
    width = self.embed_dim
    self.input_proj = linear.DenseGeneral(width, kernel_axes=(None, "embed"), use_bias=True, dtype=dtype)
    if self.learned_positions:
      self.positions = position_lib.LearnedPositionEmbedding(self.seq_len, width)
    self.class_embed = nn.Embed(self.num_classes + 1, width, dtype=dtype, embedding_init=nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, "embed")))
    self.time_embed = TimestepEmbedder(width, integer=self.time_embedding == "integer", dtype=dtype)
    if self.input_norm:
      self.input_norm_layer = transformer_lib.make_norm("rmsnorm", use_scale=True)
    self.decoder = transformer_lib.DecoderStack(
        num_layers=self.depth,
        block=dict(num_heads=self.heads, head_dim=width // self.heads, mlp_dim=mlp_dim(width), activation="swiglu",
                   norm="rmsnorm", mask=self.mask(), rope="2d", rope_base=self.rope_base, impl=self.attention_impl,
                   dtype=dtype, max_decode_len=self.seq_len, adaln=True, attention_bias=self.qkv_bias,
                   dropout_rate=self.dropout, adaln_init=ADALN_INITS[self.adaln_init]),
        scan_layers=self.scan_layers, remat_policy=self.remat_policy)
    self.final_norm = transformer_lib.make_norm("rmsnorm", use_scale=False)
    self.final_modulation = transformer_lib.AdaLNModulation(width, num_chunks=2, dtype=dtype)
    self.head = linear.DenseGeneral(self.token_dim, kernel_axes=("embed", None), use_bias=True, dtype=dtype,
                                    kernel_init=nn.initializers.zeros)

  def __call__(self, x_t: jax.Array, t: jax.Array, labels: jax.Array, *, slots: jax.Array | None = None,
               decode: bool = False, deterministic: bool = True):
    """Velocities [B, T, C] of tokens x_t [B, T, C] with times t [B, T] at sequence `slots` [B, T].

    slots default to 0..T-1 (a whole sequence; with teacher forcing T = 2S
    and the second copy at the same slots). While decoding, pass the slots of
    the tokens given. deterministic=False applies `dropout` (training; the
    apply then needs a "dropout" rng).
    """
    b, length, _ = x_t.shape
    if slots is None:
      slots = jnp.arange(length, dtype=jnp.int32) % self.seq_len
      slots = jnp.broadcast_to(slots, (b, length))
    x = self.input_proj(x_t.astype(jnp.dtype(self.dtype)))  # [B, T, E]
    if self.learned_positions:
      x = x + self.positions(slots)
    if self.input_norm:
      x = self.input_norm_layer(x)
    cond = self.class_embed(labels)[:, None, :] + self.time_embed(t)  # [B, T, E]
    positions = jnp.take(jnp.asarray(self.entities.positions()), slots, axis=0)  # [B, T, 2]
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = self.decoder(x, cond, positions=positions, decode=decode, deterministic=deterministic)
    shift, scale = self.final_modulation(cond)
    x = transformer_lib.modulate(self.final_norm(x), shift, scale)
    return self.head(x).astype(jnp.float32)  # [B, T, C]


Model = XAR  # the name the training loop builds: Model(**config.model)
