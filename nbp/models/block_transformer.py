"""The block-causal decoder over a token grid: NBP's network, and next-token prediction as its 1x1x1 case.

A video is a grid of F x H x W tokens (a video tokenizer's latents, or pixels
quantised to grey levels; text is a 1 x 1 x N grid). The grid is cut into
blocks of t x h x w tokens and reordered block-major: blocks by (time,
row-block, col-block), tokens inside a block in (t, h, w) order, so every
block is a contiguous run of L = t*h*w tokens. The decoder reads that sequence
under the block-causal mask: bidirectional inside a block, causal across
blocks, a conditioning prefix visible to all. With 1x1x1 blocks the mask is the
causal mask and the model is a plain next-token transformer (the baseline is a
config of this module, not a second module).

The first block (`first_block`). "start_block": a *start block* of L begin
tokens sits before block 0 (the begin token's embedding, distinguished per
slot by the position of the token it predicts), so every block, the first
included, is predicted by one block step from the block before it; with 1x1x1
blocks the start block is the single begin-of-sequence token. "tokens" (the
NBP authors' UCF-101 model): block 0 is drawn token by token from one begin
token, then the blocks follow. Its L slots read [begin, x_0 .. x_{L-2}] under
a causal mask and predict x_0 .. x_{L-1}; the next L slots read [x_{L-1},
m_1 .. m_{L-1}], with m_j a placeholder token of its own per slot, and
predict block 1; from there on as before. The same targets, a mask of blocks
of sizes (P,) + (1,) * L + (L, L, ...), and L - 1 more token values.

Sequence layout (S slots = P prefix + N predicted):
  class:  [class tokens (P)]   [start block] [block 0] ... [block nb-2]
  frames: [first frames (P)]   [start block] [block 0] ... [block nb-2]
  none:                        [start block] [block 0] ... [block nb-2]
Logits at the last N slots predict blocks 0..nb-1 of the generated part.

Frame prediction's given frames (`given_frames`): "prefix" (above) makes them
a prefix every block sees, never predicted; "blocks" (the NBP authors'
Kinetics-600 training) makes them ordinary blocks of an unconditional
sequence, predicted and trained on like the rest (P = 0, N = all tokens); the
sampler then feeds them as its first blocks and draws the others.

Positions ("learned" | "rope" | "rope3d" | "rope3d_split"):
  learned: a learned table indexed by the slot (the NBP paper's code);
  rope:    1D RoPE of the slot index (the usual next-token transformer);
  rope3d:  3D RoPE of (t, h, w). A predicting slot carries the coordinates of
           the token it predicts (so the start block sits at block 0's
           coordinates, as slot i of a next-token model sits at position i);
           frame-prefix tokens carry their own coordinates; class token p of P
           sits before the video on the time axis, at (p - P, 0, 0).
           Its keys carry the same labels, so the offset between a key's label
           and the token it holds is one block step, which changes where a
           block wraps to the next frame: (0, 1, 0) between 1x1xW rows inside a
           frame, (1, 1 - H, 0) from a frame's last row to the next frame's
           first.
  rope3d_split: the same query labels, but each key at the coordinates of the
           token it holds (the start block's keys one block before block 0 in
           time, class tokens a further block back), so every query-key offset
           is the true offset between the predicted token and the seen one.
  absolute_positions (with either rope3d): RoPE tells attention only the
           offset between a query and a key, and nothing of where a token sits
           reaches the residual stream. This adds a learned embedding of the
           coordinates of the token each slot holds (one table per axis,
           summed) to its input, so a layer can read where things are: where a
           digit sits in each given frame, and from that how fast it moves.

Inside a block (`in_block`): "independent" (the NBP paper) predicts a
block's L tokens from the blocks before it only, so the sampler draws them
independently; where the next block is open (a digit that may be in several
places) each token mixes the possibilities and a drawn block can take pieces
of several. "causal" adds a small causal stack over each block's L slots
(`in_block_layers` layers of the trunk's width, learned in-block positions):
slot j reads the trunk's output at j plus the embedding of the block's token
j - 1 (a learned begin vector for j = 0), and predicts token j through the
shared final norm and head. The trunk still runs once per block; the sampler
then draws the block's tokens one by one with the small stack (L cheap calls),
so a block is drawn jointly. Training needs the targets (`block_tokens`),
teacher forced. New parameters only: a run can start from an "independent"
run's checkpoint (`config.init_from`).

Sizes come from `SIZES` by `variant`; any of num_layers, width, num_heads,
num_kv_heads set explicitly overrides the table.

Dimensions: B batch, F/H/W token grid, L tokens per block, P prefix slots,
N predicted tokens, S = P + N slots, V vocabulary (with the begin token), E width.
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
from nbp.models import sizes

# variant: (layers, width, heads, kv heads). The MLP is 4E wide for GELU and
# 8E/3 rounded up to a multiple of 64 for SwiGLU (the same parameter count).
# 700M / 1.2B / 3B are the NBP paper's sizes.
SIZES = {
    "tiny": (2, 64, 4, 2),
    "XS": (3, 128, 4, 4),
    "S": (4, 256, 4, 4),
    "M": (8, 512, 8, 8),
    "B": (12, 768, 12, 12),
    "L": (24, 1024, 16, 16),
    "700M": (24, 1536, 16, 16),
    "1.2B": (24, 2048, 32, 32),
    "3B": (32, 3072, 32, 32),
}
CONDITIONS = ("none", "class", "frames")
GIVEN_FRAMES = ("prefix", "blocks")
FIRST_BLOCKS = ("start_block", "tokens")
IN_BLOCK = ("independent", "causal")
POSITIONS = ("learned", "rope", "rope3d", "rope3d_split")


def mlp_dim(width: int, activation: str) -> int:
  if activation == "swiglu":
    return int(np.ceil(8 * width / 3 / 64) * 64)
  return 4 * width


# ---------------------------------------------------------------------------
# Block order and shifted targets.


def block_order(grid, block) -> np.ndarray:
  """int [F*H*W]: slot i of the block-major sequence holds grid token order[i] (row-major index)."""
  f, h, w = grid
  bt, bh, bw = block
  if f % bt or h % bh or w % bw:
    raise ValueError(f"block {tuple(block)} does not tile the token grid {tuple(grid)}")
  index = np.arange(f * h * w).reshape(f // bt, bt, h // bh, bh, w // bw, bw)
  return index.transpose(0, 2, 4, 1, 3, 5).reshape(-1)  # [blocks..., in-block...] flattened


def to_block_order(tokens, order: np.ndarray):
  """Grid-order tokens [..., F*H*W] (row-major) -> block-major [..., F*H*W]."""
  return tokens[..., order]


def to_grid_order(tokens, order: np.ndarray):
  """Block-major tokens [..., F*H*W] -> grid (row-major) order."""
  return tokens[..., np.argsort(order)]


def next_block_inputs(targets: jax.Array, block_len: int, bos: int, first_block: str = "start_block") -> jax.Array:
  """[B, N] block-major targets -> [B, N] inputs: a start block of begin tokens, then all blocks but the last.

  first_block "tokens": [begin, x_0 .. x_{L-2}], [x_{L-1}, placeholders bos+1 .. bos+L-1], then blocks 1..nb-2.
  """
  b = targets.shape[0]
  if first_block == "start_block":
    start = jnp.full((b, block_len), bos, targets.dtype)
    return jnp.concatenate([start, targets[:, :-block_len]], axis=1)
  placeholders = jnp.broadcast_to(bos + jnp.arange(1, block_len, dtype=targets.dtype), (b, block_len - 1))
  return jnp.concatenate([jnp.full((b, 1), bos, targets.dtype), targets[:, :block_len], placeholders,
                          targets[:, block_len:-block_len]], axis=1)


# ---------------------------------------------------------------------------
# The model.


class NextBlockTransformer(sizes.SizedByTable, nn.Module):
  """tokens [B, T] (slots of the sequence) -> logits [B, T(+P class), V] under the block-causal mask.

  Its fields are the `config.model` schema: the training loop builds it as
  `NextBlockTransformer(**config.model)`.
  """

  codebook_size: int  # token values (grey levels, a tokenizer's codes, 256 bytes); V = this + 1 begin token
  grid: tuple[int, int, int]  # (F, H, W) token grid of one example
  block: tuple[int, int, int] = (1, 1, 1)  # (t, h, w) tokens per block; (1, 1, 1) is next-token prediction
  condition: str = "none"  # "none", "class" (class tokens as a prefix) or "frames" (first frames given)
  num_classes: int = 0  # classes of the class condition; index num_classes is the null class (CFG)
  num_class_tokens: int = 1  # P for "class": prefix tokens per class
  prefix_frames: int = 0  # for "frames": the first frames, given
  given_frames: str = "prefix"  # for "frames": a prefix visible to all, or "blocks" trained on (module docstring)
  first_block: str = "start_block"  # or "tokens": block 0 token by token (module docstring)
  in_block: str = "independent"  # or "causal": a block's tokens drawn jointly (module docstring)
  in_block_layers: int = 1  # layers of the in-block causal stack ("causal")
  variant: str | None = None  # a key of SIZES; the four fields below override it when set
  num_layers: int | None = None
  width: int | None = None  # E
  num_heads: int | None = None
  num_kv_heads: int | None = None  # fewer than num_heads: grouped-query attention
  activation: str = "swiglu"  # or "gelu"
  norm: str = "rmsnorm"  # or "layernorm"
  position: str = "rope3d"  # "learned", "rope" (1D over slots), "rope3d" (t, h, w) or "rope3d_split"
  absolute_positions: bool = False  # rope3d*: also add learned (t, h, w) embeddings of what each slot holds
  rope_base: float = 10000.0
  dropout: float = 0.0  # on the embeddings and on each residual branch, in training only (the official 0.1)
  tie_embeddings: bool = False  # share the token embedding with the head
  scan_layers: bool = False  # stacked layers under nn.scan: faster compiles, slower CPU decoding
  remat_policy: str = "none"  # see layers.transformer.DecoderStack
  attention_impl: str = "xla"  # kernels.dispatch implementation ("auto" picks per backend)
  attention: str = "softmax"  # or "aaren": Aaren's prefix-scan attention (next-token models: 1x1x1 blocks)
  scan_impl: str = "auto"  # Aaren's scan implementation (kernels.scan_attention.IMPLS)
  dtype: Any = "float32"  # computation dtype (a name or a jnp dtype); parameters stay float32
  vocab_multiple: int = 128  # embedding and head rows padded to a multiple (splits over tensor devices)

  SIZES = SIZES  # depth, embed_dim, heads, kv_heads: nbp.models.sizes.SizedByTable

  # ------------------------------------------------------------------ sizes
  @property
  def vocab_size(self) -> int:
    """V: the token values, the begin token and (first_block "tokens") the L - 1 placeholders."""
    return self.codebook_size + (self.block_len if self.first_block == "tokens" else 1)

  @property
  def padded_vocab(self) -> int:
    return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

  @property
  def bos(self) -> int:
    return self.codebook_size

  @property
  def block_len(self) -> int:
    return math.prod(self.block)

  @property
  def num_tokens(self) -> int:
    return math.prod(self.grid)

  @property
  def given_len(self) -> int:
    """Grid tokens given to the sampler (frame prediction's first frames), else 0."""
    return self.prefix_frames * self.grid[1] * self.grid[2] if self.condition == "frames" else 0

  @property
  def frame_prefix_len(self) -> int:
    """Given grid tokens before the predicted part (frame prediction with a prefix), else 0."""
    return self.given_len if self.given_frames == "prefix" else 0

  @property
  def num_generated(self) -> int:
    """Tokens the sampler draws (the grid minus the given frames)."""
    return self.num_tokens - self.given_len

  @property
  def prefix_len(self) -> int:
    """P: slots visible to all (class tokens or given frames)."""
    if self.condition == "class":
      return self.num_class_tokens
    return self.frame_prefix_len

  @property
  def num_predicted(self) -> int:
    """N: tokens the model predicts (the grid minus the given frames)."""
    return self.num_tokens - self.frame_prefix_len

  @property
  def num_blocks(self) -> int:
    return self.num_predicted // self.block_len

  @property
  def max_len(self) -> int:
    """S = P + N slots."""
    return self.prefix_len + self.num_predicted

  @property
  def order(self) -> np.ndarray:
    return block_order(self.grid, self.block)

  def check(self) -> None:
    """Raises ValueError naming the first inconsistent field (config.model.<field>)."""
    if len(self.grid) != 3 or len(self.block) != 3:
      raise ValueError(f"config.model.grid={tuple(self.grid)} and config.model.block={tuple(self.block)} "
                       "must be (frames, height, width).")
    if self.codebook_size < 2:
      raise ValueError(f"config.model.codebook_size={self.codebook_size}: need at least 2 token values.")
    if self.condition not in CONDITIONS:
      raise ValueError(f"config.model.condition={self.condition!r}: expected one of {CONDITIONS}")
    if self.position not in POSITIONS:
      raise ValueError(f"config.model.position={self.position!r}: expected one of {POSITIONS}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"config.model.dropout={self.dropout} must be in [0, 1)")
    for value in (self.depth, self.embed_dim, self.heads, self.kv_heads):
      if value < 1:
        raise ValueError(f"config.model: layers, width and heads must be >= 1, got {value}")
    block_order(self.grid, self.block)
    if self.first_block not in FIRST_BLOCKS:
      raise ValueError(f"config.model.first_block={self.first_block!r}: expected one of {FIRST_BLOCKS}")
    if self.in_block not in IN_BLOCK:
      raise ValueError(f"config.model.in_block={self.in_block!r}: expected one of {IN_BLOCK}")
    if self.in_block == "causal" and (self.first_block == "tokens" or self.in_block_layers < 1):
      raise ValueError("config.model.in_block='causal' needs first_block='start_block' and in_block_layers >= 1; "
                       f"got {self.first_block!r} and {self.in_block_layers}")
    if self.absolute_positions and (not self.position.startswith("rope3d") or self.first_block == "tokens"):
      raise ValueError("config.model.absolute_positions embeds grid coordinates: it needs position 'rope3d' or "
                       f"'rope3d_split' and first_block 'start_block', got {self.position!r}, {self.first_block!r}")
    if self.first_block == "tokens" and self.position == "rope3d_split":
      raise ValueError("config.model.first_block='tokens' has no rope3d_split keys: use position 'rope3d'")
    if self.first_block == "tokens" and self.condition == "frames" and self.given_frames == "blocks":
      raise ValueError("config.model.first_block='tokens' needs given_frames='prefix': given frames as blocks "
                       "already start the sequence")
    if self.given_frames not in GIVEN_FRAMES:
      raise ValueError(f"config.model.given_frames={self.given_frames!r}: expected one of {GIVEN_FRAMES}")
    if self.condition == "frames":
      if not 0 < self.prefix_frames < self.grid[0] or self.prefix_frames % self.block[0]:
        raise ValueError(f"config.model.prefix_frames={self.prefix_frames} must be in 1..{self.grid[0] - 1} "
                         f"and a multiple of the block's {self.block[0]} frames")
    if self.condition == "class" and (self.num_classes < 1 or self.num_class_tokens < 1):
      raise ValueError("config.model.condition='class' needs num_classes >= 1 and num_class_tokens >= 1")
    if self.attention == "aaren" and (self.block_len != 1 or self.prefix_len > 1):
      raise ValueError(f"config.model.attention='aaren' is causal attention: it needs config.model.block=(1, 1, 1) "
                       f"and at most one prefix token; got block={tuple(self.block)}, {self.prefix_len} prefix slots")

  def mask_spec(self) -> attention_lib.MaskSpec:
    """The block-causal mask over the slots; with first_block "tokens" its first block is causal."""
    if self.first_block == "start_block":
      return attention_lib.MaskSpec("block_causal", block_len=self.block_len, prefix_len=self.prefix_len)
    sizes = ((self.prefix_len,) if self.prefix_len else ()) + (1,) * self.block_len
    return attention_lib.MaskSpec("block_causal", block_sizes=sizes + (self.block_len,) * (self.num_blocks - 1))

  def slot_positions(self, keys: bool = False, held: bool = False) -> np.ndarray:
    """int [S] (learned, rope) or [S, 3] (rope3d*): every slot's query position, or its key's (module docstring);
    held: the coordinates of the token each slot holds (rope3d_split's keys, whatever `position`)."""
    if not self.position.startswith("rope3d"):
      return np.arange(self.max_len, dtype=np.int32)
    # position_lib.grid_positions's coordinates, built in numpy (a trace-time constant), block-major.
    coords = np.indices(self.grid).reshape(3, -1).T[self.order]  # [F*H*W, 3]
    split = held or (keys and self.position == "rope3d_split")
    if split:
      # Each predicting slot holds the block before its target's: the start block one block back in time.
      given, step = self.frame_prefix_len, np.array([self.block[0], 0, 0])
      held = coords[given:][:-self.block_len]
      start = coords[given:given + self.block_len] - step
      coords = np.concatenate([coords[:given], start, held])
    if self.condition == "class":
      p = self.num_class_tokens
      back = p + (self.block[0] if split else 0)  # split: behind the start block's keys
      prefix = np.stack([np.arange(p) - back, np.zeros(p, int), np.zeros(p, int)], axis=1)
      return np.concatenate([prefix, coords]).astype(np.int32)
    # frames: prefix tokens at their own coordinates, then each slot at its target's (or its key's).
    return coords.astype(np.int32)

  # ------------------------------------------------------------------ layers
  def setup(self):
    self.check()
    dtype = jnp.dtype(self.dtype)
    width = self.embed_dim
    self.embed = nn.Embed(self.padded_vocab, width, dtype=dtype, param_dtype=jnp.float32,
                          embedding_init=nn.with_logical_partitioning(
                              nn.initializers.normal(0.02), ("vocab", "embed")))
    if self.position == "learned":
      self.positions = position_lib.LearnedPositionEmbedding(self.max_len, width)
    if self.absolute_positions:
      held = self.slot_positions(held=True)
      self.held_positions = held - held.min(axis=0)  # [S, 3], from 0 on every axis
      self.axis_positions = [position_lib.LearnedPositionEmbedding(int(n), width)  # t, h, w
                             for n in self.held_positions.max(axis=0) + 1]
    if self.condition == "class":
      # [classes + null, P, E]: P prefix tokens per class.
      self.class_embed = self.param(
          "class_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
          (self.num_classes + 1, self.num_class_tokens, width), jnp.float32)
    rope = {"learned": None, "rope": "1d", "rope3d": "3d", "rope3d_split": "3d"}[self.position]
    self.decoder = transformer_lib.DecoderStack(
        num_layers=self.depth,
        block=dict(num_heads=self.heads, num_kv_heads=self.kv_heads, head_dim=width // self.heads,
                   mlp_dim=mlp_dim(width, self.activation), activation=self.activation, norm=self.norm,
                   mask=self.mask_spec(),
                   rope=rope, rope_base=self.rope_base, impl=self.attention_impl, dtype=dtype,
                   max_decode_len=self.max_len, attention=self.attention, scan_impl=self.scan_impl,
                   dropout_rate=self.dropout),
        scan_layers=self.scan_layers, remat_policy=self.remat_policy)
    self.final_norm = transformer_lib.make_norm(self.norm)
    if self.in_block == "causal":
      self.in_block_embed = nn.Embed(self.padded_vocab, width, dtype=dtype, param_dtype=jnp.float32,
                                     embedding_init=nn.with_logical_partitioning(
                                         nn.initializers.normal(0.02), ("vocab", "embed")))
      self.in_block_positions = position_lib.LearnedPositionEmbedding(self.block_len, width)
      self.in_block_begin = self.param("in_block_begin", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ("embed",)), (width,), jnp.float32)
      self.in_block_stack = transformer_lib.DecoderStack(
          num_layers=self.in_block_layers,
          block=dict(num_heads=self.heads, num_kv_heads=self.kv_heads, head_dim=width // self.heads,
                     mlp_dim=mlp_dim(width, self.activation), activation=self.activation, norm=self.norm,
                     mask=attention_lib.MaskSpec("causal"), rope=None, impl="xla", dtype=dtype,
                     max_decode_len=self.block_len, dropout_rate=self.dropout))
    self.embed_dropout = nn.Dropout(self.dropout)
    if not self.tie_embeddings:
      self.head = linear.DenseGeneral(self.padded_vocab, kernel_axes=("embed", "vocab"), dtype=dtype,
                                      kernel_init=nn.initializers.normal(0.02))

  def __call__(self, tokens: jax.Array, *, slots: jax.Array | None = None, labels: jax.Array | None = None,
               decode: bool = False, last: int | None = None, deterministic: bool = True,
               block_tokens: jax.Array | None = None, hidden: bool = False):
    """tokens [B, T] at `slots` [B, T] (default: the first slots after any class prefix).

    labels int [B] (class condition): the class tokens are prepended at slots
    0..P-1 and their logits returned too ([B, P + T, V]). While decoding, pass
    labels only in the first (prefill) call and `slots` in every later one.
    last: return the logits of the last `last` slots only ([B, last, V]; a
    sampler's prefill needs just the final block's).
    deterministic=False applies `dropout` (training; the apply then needs a
    "dropout" rng).
    block_tokens [B, M] (M a multiple of L): the tokens the last M slots
    predict, read by the in-block stack (`in_block` "causal", which needs
    them; "independent" ignores them).
    hidden: return the trunk's output [B, T', E] instead of logits (the
    sampler's input to `in_block_logits`).
    """
    b, t = tokens.shape
    x = self.embed(tokens)  # [B, T, E]
    if labels is not None:
      if self.condition != "class":
        raise ValueError(f"labels given but condition is {self.condition!r}")
      p = self.num_class_tokens
      prefix = jnp.take(self.class_embed, labels, axis=0).astype(x.dtype)  # [B, P, E]
      x = jnp.concatenate([prefix, x], axis=1)  # [B, P + T, E]
      head_slots = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
      slots = jnp.broadcast_to(p + jnp.arange(t, dtype=jnp.int32), (b, t)) if slots is None else slots
      slots = jnp.concatenate([head_slots, slots], axis=1)
    elif slots is None:  # the first slots (training, or the prefill call of decoding)
      start = self.num_class_tokens if self.condition == "class" else 0
      slots = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    positions = jnp.take(jnp.asarray(self.slot_positions()), slots, axis=0)  # [B, T'] or [B, T', 3]
    if self.absolute_positions:
      held = jnp.take(jnp.asarray(self.held_positions), slots, axis=0)  # [B, T', 3]
      x = x + sum(table(held[..., a]) for a, table in enumerate(self.axis_positions)).astype(x.dtype)
    if self.position == "learned":
      x = x + self.positions(positions)
      positions = None
    elif self.position == "rope3d_split":  # (queries', keys') positions
      positions = (positions, jnp.take(jnp.asarray(self.slot_positions(keys=True)), slots, axis=0))
    x = self.embed_dropout(x, deterministic=deterministic or not self.dropout)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = self.decoder(x, positions=positions, decode=decode, deterministic=deterministic)
    if last is not None:
      x = x[:, -last:]
    if hidden:
      return x
    if self.in_block == "independent":
      return self._logits(x)
    if block_tokens is None:
      raise ValueError("config.model.in_block='causal' reads the tokens its slots predict: pass block_tokens")
    m = block_tokens.shape[1]
    in_block = self.in_block_logits(x[:, x.shape[1] - m:], block_tokens, deterministic=deterministic)
    return jnp.concatenate([self._logits(x[:, :x.shape[1] - m]), in_block], axis=1)

  def in_block_logits(self, x: jax.Array, block_tokens: jax.Array, deterministic: bool = True) -> jax.Array:
    """The trunk's output at whole blocks [B, M, E] and the tokens they predict [B, M] -> logits [B, M, V]:
    slot j of a block also sees the block's tokens before j (`in_block` "causal")."""
    b, m, width = x.shape
    l = self.block_len
    before = self.in_block_embed(block_tokens).reshape(b * m // l, l, width)[:, :-1]
    begin = jnp.broadcast_to(self.in_block_begin.astype(before.dtype), (b * m // l, 1, width))
    y = (x.reshape(b * m // l, l, width) + jnp.concatenate([begin, before], axis=1)
         + self.in_block_positions(jnp.arange(l, dtype=jnp.int32)[None]))
    y = self.in_block_stack(y, deterministic=deterministic)
    return self._logits(y.reshape(b, m, width))

  def _logits(self, x: jax.Array) -> jax.Array:
    x = self.final_norm(x)
    logits = self.embed.attend(x) if self.tie_embeddings else self.head(x)
    logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    return logits[..., :self.vocab_size]  # the padding rows are never predicted


Model = NextBlockTransformer  # the name the training loop builds: Model(**config.model)
