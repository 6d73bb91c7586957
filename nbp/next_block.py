"""Next-block prediction (NBP): semi-autoregressive generation over a 3D token grid.

A video is a grid of F x H x W tokens: a video tokenizer's latent grid
(`data.name = "tokens"`, written by experiments.encode_tokens), or moving-digits
pixels quantised to grey levels (`"moving_digits"`, no tokenizer needed).
The grid is cut into blocks of t x h x w tokens and reordered block-major:
blocks by (time, row-block, col-block), tokens inside a block in (t, h, w)
order, so every block is a contiguous run of L = t*h*w tokens. A decoder with
the block-causal mask (bidirectional inside a block, causal across blocks, a
conditioning prefix visible to all) reads the sequence; the targets are shifted
by one block: token j of block b predicts token j of block b+1. Sampling runs
one model call per block and draws all L tokens of the next block at once
(`sample`: a prefill call, then the block steps as a few jitted loops over a
KV cache grown per phase, so each step attends over about the written slots).

The first block. The official code generates the first block token by token
from a begin-of-video token and only then switches to whole blocks. Here a
*start block* of L begin tokens sits before block 0 instead: the begin token's
embedding, distinguished per slot by the position of the token it predicts. So
every block, the first included, is one block step (one sampler path, one
jitted loop, no token-level warm-up), and no parameters are added: with 1x1x1
blocks the start block is the single begin token and NBP is exactly begin-token
next-token prediction, `nbp.ntp.NextTokenTransformer` with the same parameter
tree (tested: same loss on the same weights).

Sequence layout (S slots = P prefix + N predicted):
  class:  [class tokens (P)]   [start block] [block 0] ... [block nb-2]
  frames: [first frames (P)]   [start block] [block 0] ... [block nb-2]
  none:                        [start block] [block 0] ... [block nb-2]
Logits at the last N slots predict blocks 0..nb-1 of the generated part.

Positions ("learned" | "rope" | "rope3d"):
  learned: a learned table indexed by the slot (the paper's code);
  rope:    1D RoPE of the slot index (NextTokenTransformer's, for the baseline);
  rope3d:  3D RoPE of (t, h, w). A predicting slot carries the coordinates of
           the token it predicts (so the start block sits at block 0's
           coordinates, as NTP's slot i sits at position i); frame-prefix tokens
           carry their own coordinates; class token p of P sits before the video
           on the time axis, at (p - P, 0, 0).

Classifier-free guidance: in training the class is replaced by the null class
(index num_classes) with probability `cond_dropout`; the sampler runs the
conditional and the null-class rows as one doubled batch and takes
uncond + scale * (cond - uncond) per block step.

Dimensions: B batch, F/H/W token grid, L tokens per block, P prefix slots,
N predicted tokens, S = P + N slots, V vocabulary (with the begin token), E width.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from layers import attention as attention_lib
from layers import linear
from layers import position as position_lib
from layers import transformer as transformer_lib
from nbp import families
from nbp import sampling
from nbp import video as video_lib
from nbp.ntp import SIZES, cross_entropy, mlp_dim

CONDITIONS = ("none", "class", "frames")
POSITIONS = ("learned", "rope", "rope3d")


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


def next_block_inputs(targets: jax.Array, block_len: int, bos: int) -> jax.Array:
  """[B, N] block-major targets -> [B, N] inputs: a start block of begin tokens, then all blocks but the last."""
  start = jnp.full((targets.shape[0], block_len), bos, targets.dtype)
  return jnp.concatenate([start, targets[:, :-block_len]], axis=1)


# ---------------------------------------------------------------------------
# The model.


class NextBlockTransformer(nn.Module):
  """tokens [B, T] (slots of the sequence) -> logits [B, T(+P class), V] under the block-causal mask.

  Submodule names equal NextTokenTransformer's (embed, positions, decoder,
  final_norm, head), so with 1x1x1 blocks and no conditioning the two share one
  parameter tree.
  """

  vocab_size: int  # V, including the begin token (the last index)
  grid: tuple[int, int, int]  # (F, H, W) token grid of one video
  block: tuple[int, int, int] = (1, 1, 1)  # (t, h, w) tokens per block; (1, 1, 1) is next-token prediction
  condition: str = "none"  # "none", "class" (class tokens as a prefix) or "frames" (first frames given)
  num_classes: int = 0  # classes of the class condition; index num_classes is the null class (CFG)
  num_class_tokens: int = 1  # P for "class": prefix tokens per class
  prefix_frames: int = 0  # for "frames": the first frames, given and visible to all
  num_layers: int = 4
  width: int = 256  # E
  num_heads: int = 4
  num_kv_heads: int = 4  # fewer than num_heads: grouped-query attention
  activation: str = "swiglu"  # or "gelu"
  norm: str = "rmsnorm"  # or "layernorm"
  position: str = "rope3d"  # "learned", "rope" (1D over slots) or "rope3d" (t, h, w)
  rope_base: float = 10000.0
  tie_embeddings: bool = False  # share the token embedding with the head
  scan_layers: bool = False  # stacked layers under nn.scan: faster compiles, slower CPU decoding
  remat_policy: str = "none"  # see layers.transformer.DecoderStack
  attention_impl: str = "xla"  # kernels.dispatch implementation ("auto" picks per backend)
  dtype: Any = jnp.float32  # computation dtype; parameters stay float32
  vocab_multiple: int = 128  # embedding and head rows padded to a multiple

  # ------------------------------------------------------------------ sizes
  @property
  def padded_vocab(self) -> int:
    return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

  @property
  def bos(self) -> int:
    return self.vocab_size - 1

  @property
  def block_len(self) -> int:
    return math.prod(self.block)

  @property
  def num_tokens(self) -> int:
    return math.prod(self.grid)

  @property
  def frame_prefix_len(self) -> int:
    """Given grid tokens before the predicted part (frame prediction), else 0."""
    return self.prefix_frames * self.grid[1] * self.grid[2] if self.condition == "frames" else 0

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
    if self.condition not in CONDITIONS:
      raise ValueError(f"condition={self.condition!r}: expected one of {CONDITIONS}")
    if self.position not in POSITIONS:
      raise ValueError(f"position={self.position!r}: expected one of {POSITIONS}")
    block_order(self.grid, self.block)
    if self.condition == "frames":
      if not 0 < self.prefix_frames < self.grid[0] or self.prefix_frames % self.block[0]:
        raise ValueError(f"prefix_frames={self.prefix_frames} must be in 1..{self.grid[0] - 1} and a "
                         f"multiple of the block's {self.block[0]} frames")
    if self.condition == "class" and (self.num_classes < 1 or self.num_class_tokens < 1):
      raise ValueError("condition 'class' needs num_classes >= 1 and num_class_tokens >= 1")

  def slot_positions(self) -> np.ndarray:
    """int [S] (learned, rope) or [S, 3] (rope3d): the position of every slot (module docstring)."""
    if self.position != "rope3d":
      return np.arange(self.max_len, dtype=np.int32)
    # position_lib.grid_positions's coordinates, built in numpy (a trace-time constant), block-major.
    coords = np.indices(self.grid).reshape(3, -1).T[self.order]  # [F*H*W, 3]
    if self.condition == "class":
      p = self.num_class_tokens
      prefix = np.stack([np.arange(p) - p, np.zeros(p, int), np.zeros(p, int)], axis=1)
      return np.concatenate([prefix, coords]).astype(np.int32)
    # frames: prefix tokens at their own coordinates, then each slot at its target's.
    return coords.astype(np.int32)

  # ------------------------------------------------------------------ layers
  def setup(self):
    self.check()
    self.embed = nn.Embed(self.padded_vocab, self.width, dtype=self.dtype, param_dtype=jnp.float32,
                          embedding_init=nn.with_logical_partitioning(
                              nn.initializers.normal(0.02), ("vocab", "embed")))
    if self.position == "learned":
      self.positions = position_lib.LearnedPositionEmbedding(self.max_len, self.width)
    if self.condition == "class":
      # [classes + null, P, E]: P prefix tokens per class.
      self.class_embed = self.param(
          "class_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
          (self.num_classes + 1, self.num_class_tokens, self.width), jnp.float32)
    head_dim = self.width // self.num_heads
    rope = {"learned": None, "rope": "1d", "rope3d": "3d"}[self.position]
    self.decoder = transformer_lib.DecoderStack(
        num_layers=self.num_layers,
        block=dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=head_dim,
                   mlp_dim=mlp_dim(self.width, self.activation), activation=self.activation,
                   norm=self.norm,
                   mask=attention_lib.MaskSpec("block_causal", block_len=self.block_len,
                                               prefix_len=self.prefix_len),
                   rope=rope, rope_base=self.rope_base, impl=self.attention_impl, dtype=self.dtype,
                   max_decode_len=self.max_len),
        scan_layers=self.scan_layers, remat_policy=self.remat_policy)
    self.final_norm = transformer_lib.make_norm(self.norm)
    if not self.tie_embeddings:
      self.head = linear.DenseGeneral(self.padded_vocab, kernel_axes=("embed", "vocab"), dtype=self.dtype,
                                      kernel_init=nn.initializers.normal(0.02))

  def __call__(self, tokens: jax.Array, *, slots: jax.Array | None = None, labels: jax.Array | None = None,
               decode: bool = False, last: int | None = None):
    """tokens [B, T] at `slots` [B, T] (default: the first slots after any class prefix).

    labels int [B] (class condition): the class tokens are prepended at slots
    0..P-1 and their logits returned too ([B, P + T, V]). While decoding, pass
    labels only in the first (prefill) call and `slots` in every later one.
    last: return the logits of the last `last` slots only ([B, last, V]; a
    sampler's prefill needs just the final block's).
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
    if self.position == "learned":
      x = x + self.positions(positions)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = self.decoder(x, positions=None if self.position == "learned" else positions, decode=decode)
    if last is not None:
      x = x[:, -last:]
    x = self.final_norm(x)
    logits = self.embed.attend(x) if self.tie_embeddings else self.head(x)
    logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    return logits[..., :self.vocab_size]  # the padding rows are never predicted


# ---------------------------------------------------------------------------
# Training loss.


def next_block_targets(model: NextBlockTransformer, tokens: jax.Array):
  """Grid-order tokens [B, F*H*W] -> (inputs [B, P_frames + N], targets [B, N]), block-major.

  Inputs are the given frames (frame prediction) followed by the start block
  and every block but the last; input block b+1 sits where target block b+1
  is predicted from block b.
  """
  seq = to_block_order(tokens, model.order)
  given = model.frame_prefix_len
  prefix, targets = seq[:, :given], seq[:, given:]
  inputs = jnp.concatenate([prefix, next_block_inputs(targets, model.block_len, model.bos)], axis=1)
  return inputs, targets


def drop_condition(rng, labels: jax.Array, probability: float, null_class: int) -> jax.Array:
  """Replaces each label by the null class with `probability` (CFG training)."""
  if probability <= 0.0:
    return labels
  drop = jax.random.bernoulli(rng, probability, labels.shape)
  return jnp.where(drop, null_class, labels)


def nbp_loss(model: NextBlockTransformer, params, batch, rng, *, cond_dropout: float = 0.0):
  """Cross-entropy over the predicted tokens (never the prefix); bits/token, accuracy, count."""
  inputs, targets = next_block_targets(model, batch["tokens"])
  labels = None
  if model.condition == "class":
    labels = drop_condition(rng, batch["class"], cond_dropout, model.num_classes)
  logits = model.apply({"params": params}, inputs, labels=labels)[:, -model.num_predicted:]  # [B, N, V]
  weights = batch.get("weights")
  if weights is not None:
    weights = to_block_order(weights, model.order)[:, model.frame_prefix_len:]
  loss, count = cross_entropy(logits, targets, weights)
  accuracy = jnp.mean((jnp.argmax(logits, -1) == targets).astype(jnp.float32))
  return loss, {"bits_per_token": loss / jnp.log(2.0), "accuracy": accuracy, "num_tokens": count}


# ---------------------------------------------------------------------------
# Sampling: one model call per block, the whole generation a few jitted lax.fori_loops.


def init_cache(model: NextBlockTransformer, batch_size: int, length: int | None = None):
  """A zero KV cache of `length` slots (default S = P + N) for `batch_size` rows (no parameters computed)."""
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((batch_size, 1), jnp.int32), decode=True)["cache"])
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  return cache if length is None else attention_lib.resize_cache(cache, length)


def guide(logits: jax.Array, scale: float) -> jax.Array:
  """Doubled-batch logits [2B, ...] (conditional rows first) -> uncond + scale * (cond - uncond)."""
  cond, uncond = jnp.split(logits, 2, axis=0)
  return uncond + scale * (cond - uncond)


def sample(model: NextBlockTransformer, params, rng, *, batch_size: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, labels: jax.Array | None = None,
           guidance_scale: float | None = None, prompt: jax.Array | None = None,
           cache_phases: int = 4) -> jax.Array:
  """Draws videos of tokens [B, F, H, W] (grid order) block by block with the KV cache.

  One prefill call reads the prefix and the start block (a cache of exactly
  P + L slots) and yields block 0; then one call per block feeds the block just
  drawn and yields all L tokens of the next. The block steps run as
  `cache_phases` consecutive `lax.fori_loop`s (nbp.sampling.phase_bounds), each
  over a cache grown to the slots written by its last step, so no step attends
  over more than a phase of empty slots; every phase adds one compiled copy of
  the decode step. The drawn tokens do not depend on the number of phases.
  Jit the whole function.

  labels: int [B] classes (condition "class"; default 0, 1, 2, ... mod classes).
  guidance_scale: None for no guidance; a number runs the conditional and
    null-class rows as one doubled batch and draws from
    uncond + scale * (cond - uncond) (1.0: conditional, 0.0: unconditional).
  prompt: int [B, prefix_frames, H, W] given frames (condition "frames"); they
    are returned unchanged in the output.
  """
  b, block_len, p = batch_size, model.block_len, model.prefix_len
  guided = guidance_scale is not None
  if guided and model.condition != "class":
    raise ValueError("classifier-free guidance needs condition 'class'")
  rows = 2 * b if guided else b
  order = model.order
  bos = model.bos

  first = jnp.full((rows, block_len), bos, jnp.int32)  # the start block
  prefill_labels, given = None, None
  if model.condition == "class":
    labels = jnp.arange(b, dtype=jnp.int32) % model.num_classes if labels is None else labels
    prefill_labels = jnp.concatenate([labels, jnp.full((b,), model.num_classes, jnp.int32)]) if guided else labels
  elif model.condition == "frames":
    if prompt is None:
      raise ValueError("frame prediction needs `prompt` frames [B, prefix_frames, H, W]")
    given = to_block_order(prompt.reshape(b, -1).astype(jnp.int32), order[:p])  # the prefix's own order
    first = jnp.concatenate([given, first], axis=1)  # [B, P + L]

  def draw(logits, key):
    logits = logits[..., :bos]  # the begin token is never drawn
    if guided:
      logits = guide(logits, guidance_scale)
    return sampling.sample_tokens(key, logits, temperature=temperature, top_k=top_k, top_p=top_p)

  cache = init_cache(model, rows, length=p + block_len)  # just the prefill's slots
  logits, updated = model.apply({"params": params, "cache": cache}, first, labels=prefill_labels,
                                decode=True, last=block_len, mutable=["cache"])
  block = draw(logits, jax.random.fold_in(rng, 0))  # [B, L], block 0
  drawn = jnp.zeros((b, model.num_predicted), jnp.int32).at[:, :block_len].set(block)

  def step(k, state):
    drawn, block, cache = state
    slots = jnp.broadcast_to(p + k * block_len + jnp.arange(block_len, dtype=jnp.int32), (rows, block_len))
    inputs = jnp.concatenate([block, block]) if guided else block  # [rows, L]: block k-1
    logits, updated = model.apply({"params": params, "cache": cache}, inputs, slots=slots, decode=True,
                                  mutable=["cache"])
    block = draw(logits, jax.random.fold_in(rng, k))  # [B, L], block k
    drawn = jax.lax.dynamic_update_slice(drawn, block, (0, k * block_len))
    return drawn, block, updated["cache"]

  state = (drawn, block, updated["cache"])
  for k0, k1 in sampling.phase_bounds(1, model.num_blocks, cache_phases):
    drawn, block, cache = state
    cache = attention_lib.resize_cache(cache, p + k1 * block_len)  # its last step, k1 - 1, fills slots up to p + k1 L
    state = jax.lax.fori_loop(k0, k1, step, (drawn, block, cache))
  drawn = state[0]
  seq = drawn if given is None else jnp.concatenate([given, drawn], axis=1)  # [B, F*H*W] block-major
  return to_grid_order(seq, order).reshape(b, *model.grid)


# ---------------------------------------------------------------------------
# The task: model, data, loss and sampler from a config.

MODEL_FIELDS = ("size", "num_layers", "width", "num_heads", "num_kv_heads", "activation", "norm",
                "position", "rope_base", "tie_embeddings", "scan_layers", "remat_policy",
                "attention_impl", "dtype", "block", "condition", "num_class_tokens", "prefix_frames",
                "cond_dropout", "guidance_scale", "temperature", "top_k", "top_p", "num_samples")
DATA_FIELDS = ("dir", "worker_count", "name",
               # moving digits, pixels quantised to `levels` grey levels:
               "num_frames", "frame_size", "num_digits", "speed", "num_train", "num_test", "levels",
               # video-tokenizer tokens (name "tokens"), written by experiments.encode_tokens:
               "token_dir", "token_grid", "codebook_size", "num_classes", "tokenizer", "tokenizer_workdir")
DATA_NAMES = ("moving_digits", "tokens")


def _check_data_name(data_cfg) -> None:
  if data_cfg.name not in DATA_NAMES:
    raise ValueError(f"config.data.name={data_cfg.name!r}: NBP reads one of {DATA_NAMES} (for real videos, "
                     "train a video tokenizer and encode them into 'tokens' first).")


def token_grid(data_cfg) -> tuple[int, int, int]:
  """(F, H, W): the tokenizer's latent grid (`data.token_grid`), or the moving-digits pixels."""
  _check_data_name(data_cfg)
  if data_cfg.name == "tokens":
    if len(data_cfg.token_grid) != 3:
      raise ValueError(f"config.data.token_grid={data_cfg.token_grid!r}: expected (frames, height, width) "
                       "of the tokenizer's latent grid.")
    return tuple(int(x) for x in data_cfg.token_grid)
  return (data_cfg.num_frames, data_cfg.frame_size, data_cfg.frame_size)


def codebook_size(data_cfg) -> int:
  """Token values (the begin token comes on top): the tokenizer's codebook, or the grey levels."""
  size = data_cfg.codebook_size if data_cfg.name == "tokens" else data_cfg.levels
  if size < 2:
    key = "codebook_size" if data_cfg.name == "tokens" else "levels"
    raise ValueError(f"config.data.{key}={size}: need at least 2 token values.")
  return int(size)


def num_classes(data_cfg) -> int:
  """`data.num_classes` for tokens; moving digits: one class per ordered tuple of digits (10 ** num_digits)."""
  if data_cfg.name == "tokens":
    return int(data_cfg.num_classes)
  return 10 ** data_cfg.num_digits


def build_model(model_cfg, data_cfg) -> NextBlockTransformer:
  if model_cfg.size not in SIZES:
    raise ValueError(f"config.model.size={model_cfg.size!r}: choose one of {list(SIZES)}.")
  if model_cfg.condition == "class" and num_classes(data_cfg) < 1:
    raise ValueError("config.model.condition='class' needs config.data.num_classes >= 1.")
  layers, width, heads, kv_heads = SIZES[model_cfg.size]
  model = NextBlockTransformer(
      vocab_size=codebook_size(data_cfg) + 1, grid=token_grid(data_cfg),
      block=tuple(int(x) for x in model_cfg.block),
      condition=model_cfg.condition, num_classes=num_classes(data_cfg),
      num_class_tokens=model_cfg.num_class_tokens, prefix_frames=model_cfg.prefix_frames,
      num_layers=model_cfg.num_layers or layers, width=model_cfg.width or width,
      num_heads=model_cfg.num_heads or heads, num_kv_heads=model_cfg.num_kv_heads or kv_heads,
      activation=model_cfg.activation, norm=model_cfg.norm, position=model_cfg.position,
      rope_base=model_cfg.rope_base, tie_embeddings=model_cfg.tie_embeddings,
      scan_layers=model_cfg.scan_layers, remat_policy=model_cfg.remat_policy,
      attention_impl=model_cfg.attention_impl, dtype=jnp.dtype(model_cfg.dtype))
  model.check()
  return model


def make_data(data_cfg, split: str, *, seed: int, process_index: int, process_count: int, batch_size: int):
  """A checkpointable grain iterator of {"tokens": int32 [b, F*H*W] (grid order), "class": int32 [b]}."""
  from nbp.data import moving_digits, pipeline, tokens  # pylint: disable=g-import-not-at-top
  if data_cfg.name == "tokens":
    source = tokens.token_source(data_cfg.token_dir, split, grid=token_grid(data_cfg),
                                 codebook_size=codebook_size(data_cfg))
    transforms = (tokens.TokensAndClass(),)
  else:
    source = pipeline.load_source(moving_digits.builder_from_config(data_cfg), split, data_cfg.dir)
    transforms = (pipeline.QuantizeVideoToTokens(data_cfg.levels), tokens.TokensAndClass())
  return pipeline.make_iterator(
      source, global_batch_size=batch_size * process_count, seed=seed, shuffle=True, transforms=transforms,
      process_index=process_index, process_count=process_count, worker_count=data_cfg.worker_count)


@functools.cache
def _test_prompt_tokens(data_cfg_json: str, batch_size: int, grid: tuple[int, int, int]) -> np.ndarray:
  """Grid tokens [B, F, H, W] of the first test videos (frame-prediction samples continue them)."""
  data_cfg = ml_collections.ConfigDict(json.loads(data_cfg_json))
  it = make_data(data_cfg, "test", seed=0, process_index=0, process_count=1, batch_size=batch_size)
  return np.asarray(next(it)["tokens"]).reshape(batch_size, *grid)


@functools.cache
def _tokenizer_decoder(tokenizer_cfg_json: str, workdir: str):
  """A jitted tokens [B, f, h, w] -> uint8 videos [B, F, H, W, C] of the tokenizer trained in `workdir`."""
  from nbp import video_tokenizer as vt  # pylint: disable=g-import-not-at-top
  tokenizer, params = vt.load_tokenizer(ml_collections.ConfigDict(json.loads(tokenizer_cfg_json)), workdir)
  decode = jax.jit(functools.partial(vt.decode_tokens, tokenizer))
  return lambda tokens: vt.to_uint8(decode(params, jnp.asarray(tokens)))


def tokens_to_video(data_cfg, tokens) -> np.ndarray:
  """Grid tokens [B, F, H, W] -> uint8 videos: the tokenizer's decoder, or the grey levels dequantised."""
  from nbp.data import pipeline  # pylint: disable=g-import-not-at-top
  tokens = np.asarray(tokens)
  if data_cfg.name == "tokens":
    if data_cfg.tokenizer is None or not data_cfg.tokenizer_workdir:
      raise ValueError("Decoding tokens to video needs config.data.tokenizer (the tokenizer's config) and "
                       "config.data.tokenizer_workdir (its checkpoints).")
    return _tokenizer_decoder(data_cfg.tokenizer.to_json(), data_cfg.tokenizer_workdir)(tokens)
  b, f, h, w = tokens.shape
  return pipeline.dequantize_tokens(tokens.reshape(b, -1), data_cfg.levels, (f, h, w, 1))


def write_samples(data_cfg, title: str, tokens: np.ndarray, out_dir: str, step: int) -> dict[str, float]:
  """Tokens [B, F, H, W] -> videos as a GIF and a PNG frame grid."""
  videos = tokens_to_video(data_cfg, tokens)
  stem = os.path.join(out_dir, f"step_{step:07d}")
  video_lib.save_gif(stem + ".gif", videos)
  video_lib.save_frame_grid(stem + ".png", videos, title=f"{title}, step {step}")
  return {}


def make_task(config) -> families.Task:
  model = build_model(config.model, config.data)
  m = config.model
  guidance = m.guidance_scale if (model.condition == "class" and m.guidance_scale != 1.0) else None

  def sample_fn(params, rng):
    prompt = None
    if model.condition == "frames":  # a trace-time constant: the first test videos' first frames
      videos = _test_prompt_tokens(config.data.to_json(), m.num_samples, model.grid)
      prompt = jnp.asarray(videos[:, :model.prefix_frames])
    return sample(model, params, rng, batch_size=m.num_samples, temperature=m.temperature, top_k=m.top_k,
                  top_p=m.top_p, guidance_scale=guidance, prompt=prompt)

  def init_inputs():
    length = model.frame_prefix_len + model.num_predicted
    inputs = {"tokens": jnp.zeros((1, length), jnp.int32)}
    if model.condition == "class":
      inputs["labels"] = jnp.zeros((1,), jnp.int32)
    return inputs

  title = f"NBP {'x'.join(map(str, model.block))} blocks, {model.condition}"
  return families.Task(
      model=model,
      init_inputs=init_inputs,
      loss=functools.partial(nbp_loss, model, cond_dropout=m.cond_dropout),
      evaluate=functools.partial(nbp_loss, model, cond_dropout=0.0),
      data=functools.partial(make_data, config.data),
      sample=sample_fn,
      write_samples=functools.partial(write_samples, config.data, title),
  )
