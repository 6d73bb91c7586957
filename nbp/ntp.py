"""Next-token prediction: a decoder-only transformer baseline.

NBP's next-token baseline (its 1x1x1 block) and EBT's Transformer++ baseline:
token embedding, a pre-norm decoder stack with RoPE and SwiGLU (or learned
positions and GELU), a final norm and a vocabulary head. Trained on moving
digits whose pixels are quantised to tokens, or on the bytes of CPython's
documentation topics.

Dimensions: B batch, N tokens per sequence, V vocabulary, E width.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from layers import attention as attention_lib
from layers import linear
from layers import position as position_lib
from layers import transformer as transformer_lib
from nbp import families
from nbp import sampling
from nbp import video as video_lib

# name: (layers, width, heads, kv heads). MLP width is 4E for GELU and 8E/3
# rounded up to a multiple of 64 for SwiGLU (same parameter count).
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


def mlp_dim(width: int, activation: str) -> int:
  if activation == "swiglu":
    return int(np.ceil(8 * width / 3 / 64) * 64)
  return 4 * width


class NextTokenTransformer(nn.Module):
  """tokens [B, N] -> logits [B, N, V], causal."""

  vocab_size: int  # V, including the begin-of-sequence token
  max_len: int  # N, the longest sequence (sizes the KV cache and learned positions)
  num_layers: int = 4
  width: int = 256  # E
  num_heads: int = 4
  num_kv_heads: int = 4  # fewer than num_heads: grouped-query attention
  activation: str = "swiglu"  # or "gelu"
  norm: str = "rmsnorm"  # or "layernorm"
  position: str = "rope"  # or "learned"
  rope_base: float = 10000.0
  tie_embeddings: bool = False  # share the token embedding with the head
  scan_layers: bool = False  # one stacked layer under nn.scan: faster compiles, slower CPU decoding
  remat_policy: str = "none"  # see layers.transformer.DecoderStack
  attention_impl: str = "xla"
  dtype: Any = jnp.float32  # computation dtype; parameters stay float32
  vocab_multiple: int = 128  # embedding and head rows padded to a multiple (splits over tensor devices)

  @property
  def padded_vocab(self) -> int:
    return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

  def setup(self):
    self.embed = nn.Embed(self.padded_vocab, self.width, dtype=self.dtype, param_dtype=jnp.float32,
                          embedding_init=nn.with_logical_partitioning(
                              nn.initializers.normal(0.02), ("vocab", "embed")))
    if self.position == "learned":
      self.positions = position_lib.LearnedPositionEmbedding(self.max_len, self.width)
    elif self.position != "rope":
      raise ValueError(f"config.model.position={self.position!r}: expected 'rope' or 'learned'.")
    head_dim = self.width // self.num_heads
    self.decoder = transformer_lib.DecoderStack(
        num_layers=self.num_layers,
        block=dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=head_dim,
                   mlp_dim=mlp_dim(self.width, self.activation), activation=self.activation,
                   norm=self.norm, mask=attention_lib.MaskSpec("causal"),
                   rope="1d" if self.position == "rope" else None, rope_base=self.rope_base,
                   impl=self.attention_impl, dtype=self.dtype, max_decode_len=self.max_len),
        scan_layers=self.scan_layers, remat_policy=self.remat_policy)
    self.final_norm = transformer_lib.make_norm(self.norm)
    if not self.tie_embeddings:
      self.head = linear.DenseGeneral(self.padded_vocab, kernel_axes=("embed", "vocab"), dtype=self.dtype,
                                      kernel_init=nn.initializers.normal(0.02))

  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None, decode: bool = False):
    x = self.embed(tokens)  # [B, N, E]
    if self.position == "learned":
      if positions is None:
        if decode:
          raise ValueError("learned positions need explicit `positions` when decoding")
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
      x = x + self.positions(positions)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = self.decoder(x, positions=positions if self.position == "rope" else None, decode=decode)
    x = self.final_norm(x)
    if self.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = self.head(x)
    logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    return logits[..., :self.vocab_size]  # the padding rows are never predicted


def next_token_inputs(tokens: jax.Array, bos: int) -> jax.Array:
  """[B, N] -> [B, N]: the begin-of-sequence token, then all tokens but the last."""
  start = jnp.full((tokens.shape[0], 1), bos, tokens.dtype)
  return jnp.concatenate([start, tokens[:, :-1]], axis=1)


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None):
  """Mean token cross-entropy (nats) and the number of weighted tokens."""
  losses = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
  weights = jnp.ones_like(losses) if weights is None else weights.astype(losses.dtype)
  count = jnp.sum(weights)
  return jnp.sum(losses * weights) / jnp.maximum(count, 1.0), count


def ntp_loss(model: NextTokenTransformer, params, batch, rng):
  del rng  # no dropout
  tokens = batch["tokens"]
  bos = model.vocab_size - 1
  logits = model.apply({"params": params}, next_token_inputs(tokens, bos))
  loss, count = cross_entropy(logits, tokens, batch.get("weights"))
  accuracy = jnp.mean((jnp.argmax(logits, -1) == tokens).astype(jnp.float32))
  return loss, {"bits_per_token": loss / jnp.log(2.0), "accuracy": accuracy, "num_tokens": count}


def init_cache(model: NextTokenTransformer, batch_size: int, length: int | None = None):
  """A zero KV cache of `length` slots (default max_len) for `batch_size` rows (no parameters computed)."""
  zeros = jnp.zeros((batch_size, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), zeros, positions=zeros, decode=True)["cache"])
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  return cache if length is None else attention_lib.resize_cache(cache, length)


def sample(model: NextTokenTransformer, params, rng, *, batch_size: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, prompt: jax.Array | None = None,
           cache_phases: int = 4) -> jax.Array:
  """Draws [B, N] tokens one at a time with the KV cache; jit the whole function.

  One prefill call reads the begin token and the `prompt` [B, P] (teacher-forced;
  returned unchanged) and yields token P; then one call per token, as
  `cache_phases` consecutive `lax.fori_loop`s, each over a cache grown to the
  slots written by its last step (nbp.sampling.phase_bounds). Token i is drawn
  with the key fold_in(rng, i), whatever the prompt length and phases.
  """
  n, b = model.max_len, batch_size
  bos = model.vocab_size - 1
  num_prompt = 0 if prompt is None else min(prompt.shape[1], n)
  tokens = jnp.zeros((b, n), jnp.int32)
  if num_prompt:
    tokens = tokens.at[:, :num_prompt].set(prompt[:, :num_prompt].astype(jnp.int32))
  if num_prompt == n:
    return tokens

  def draw(i, logits):
    return sampling.sample_tokens(jax.random.fold_in(rng, i), logits[:, -1, :bos], temperature=temperature,
                                  top_k=top_k, top_p=top_p)

  # Prefill: slot 0 holds the begin token, slot i + 1 prompt token i.
  first = jnp.concatenate([jnp.full((b, 1), bos, jnp.int32), tokens[:, :num_prompt]], axis=1)  # [B, P + 1]
  positions = jnp.broadcast_to(jnp.arange(num_prompt + 1, dtype=jnp.int32), first.shape)
  cache = init_cache(model, b, length=num_prompt + 1)
  logits, updated = model.apply({"params": params, "cache": cache}, first, positions=positions, decode=True,
                                mutable=["cache"])
  token = draw(num_prompt, logits)
  tokens = tokens.at[:, num_prompt].set(token)

  def step(i, state):  # feeds token i - 1 at slot i, draws token i
    tokens, last, cache = state
    positions = jnp.full((b, 1), i, jnp.int32)
    logits, updated = model.apply({"params": params, "cache": cache}, last, positions=positions, decode=True,
                                  mutable=["cache"])
    token = draw(i, logits)
    return tokens.at[:, i].set(token), token[:, None], updated["cache"]

  state = (tokens, token[:, None], updated["cache"])
  for i0, i1 in sampling.phase_bounds(num_prompt + 1, n, cache_phases):
    tokens, last, cache = state
    state = jax.lax.fori_loop(i0, i1, step, (tokens, last, attention_lib.resize_cache(cache, i1)))
  return state[0]


# ---------------------------------------------------------------------------
# The task: model, data, loss and sampler from a config.

MODEL_FIELDS = ("size", "num_layers", "width", "num_heads", "num_kv_heads", "activation", "norm",
                "position", "rope_base", "tie_embeddings", "scan_layers", "remat_policy",
                "attention_impl", "dtype", "temperature", "top_k", "top_p", "num_samples")
DATA_FIELDS = ("dir", "worker_count", "name", "num_frames", "frame_size", "num_digits", "speed",
               "num_train", "num_test", "levels", "seq_len")


def build_model(model_cfg, data_cfg) -> NextTokenTransformer:
  if model_cfg.size not in SIZES:
    raise ValueError(f"config.model.size={model_cfg.size!r}: choose one of {list(SIZES)}.")
  layers, width, heads, kv_heads = SIZES[model_cfg.size]
  overrides = {k: model_cfg.get(k) for k in ("num_layers", "width", "num_heads", "num_kv_heads")}
  if data_cfg.name == "moving_digits":
    vocab, length = data_cfg.levels + 1, data_cfg.num_frames * data_cfg.frame_size ** 2
  elif data_cfg.name == "text":
    vocab, length = 256 + 1, data_cfg.seq_len
  else:
    raise ValueError(f"config.data.name={data_cfg.name!r}: expected 'moving_digits' or 'text'.")
  return NextTokenTransformer(
      vocab_size=vocab, max_len=length,
      num_layers=overrides["num_layers"] or layers, width=overrides["width"] or width,
      num_heads=overrides["num_heads"] or heads, num_kv_heads=overrides["num_kv_heads"] or kv_heads,
      activation=model_cfg.activation, norm=model_cfg.norm, position=model_cfg.position,
      rope_base=model_cfg.rope_base, tie_embeddings=model_cfg.tie_embeddings,
      scan_layers=model_cfg.scan_layers, remat_policy=model_cfg.remat_policy,
      attention_impl=model_cfg.attention_impl, dtype=jnp.dtype(model_cfg.dtype))


def make_data(data_cfg, split: str, *, seed: int, process_index: int, process_count: int, batch_size: int):
  """A checkpointable grain iterator of {"tokens": int32 [b, N]} local batches."""
  from nbp.data import moving_digits, pipeline  # pylint: disable=g-import-not-at-top
  if data_cfg.name == "moving_digits":
    source = pipeline.load_source(moving_digits.builder_from_config(data_cfg), split, data_cfg.dir)
    transforms = (pipeline.QuantizeVideoToTokens(data_cfg.levels),)
  else:
    # Windows of seq_len bytes (the source adds one for shifted targets; the
    # begin token plays that part here).
    source = pipeline.text_bytes_source(split, data_cfg.seq_len - 1)
    transforms = ()
  return pipeline.make_iterator(
      source, global_batch_size=batch_size * process_count, seed=seed, shuffle=True,
      transforms=transforms, process_index=process_index, process_count=process_count,
      worker_count=data_cfg.worker_count)


def write_samples(data_cfg, tokens: np.ndarray, out_dir: str, step: int) -> dict[str, float]:
  """Moving digits: a GIF and a PNG frame grid; text: the decoded bytes."""
  from nbp.data import pipeline  # pylint: disable=g-import-not-at-top
  stem = os.path.join(out_dir, f"step_{step:07d}")
  if data_cfg.name == "moving_digits":
    shape = (data_cfg.num_frames, data_cfg.frame_size, data_cfg.frame_size, 1)
    videos = np.stack([pipeline.dequantize_tokens(t, data_cfg.levels, shape) for t in tokens])
    video_lib.save_gif(stem + ".gif", videos)
    video_lib.save_frame_grid(stem + ".png", videos, title=f"next-token samples, step {step}")
    return {}
  with open(stem + ".txt", "w") as f:
    for t in tokens:
      f.write(bytes(np.clip(t, 0, 255).astype(np.uint8)).decode("utf-8", errors="replace") + "\n---\n")
  return {}


def make_task(config) -> families.Task:
  model = build_model(config.model, config.data)
  m = config.model
  return families.Task(
      model=model,
      init_inputs=lambda: {"tokens": jnp.zeros((1, model.max_len), jnp.int32)},
      loss=functools.partial(ntp_loss, model),
      data=functools.partial(make_data, config.data),
      sample=functools.partial(sample, model, batch_size=m.num_samples, temperature=m.temperature,
                               top_k=m.top_k, top_p=m.top_p),
      write_samples=functools.partial(write_samples, config.data),
  )
