"""NBP as a task: next-block targets and loss, the block sampler, data and samples.

The network is nbp.models.block_transformer (`config.model` is its fields).
Next-token prediction is the same task with 1x1x1 blocks (experiments/configs/
ntp_*.py): one model, one loss, one sampler.

Targets are shifted by one block: token j of block b predicts token j of
block b+1 (the start block predicts block 0). Classifier-free guidance: in
training the class is replaced by the null class (index num_classes) with
probability `config.loss.cond_dropout`; the sampler runs the conditional and
the null-class rows as one doubled batch and takes uncond + scale * (cond -
uncond) per block step (`config.sampler.guidance_scale`).

Data (`config.data.name`): "moving_digits" (pixels quantised to
`model.codebook_size` grey levels; grid = frames x size x size), "tokens" (a
video tokenizer's tokens, written by experiments.encode_tokens; samples are
decoded by the tokenizer whose workdir the tokens' metadata names) or "text"
(bytes; grid 1 x 1 x N).

Dimensions: B batch, F/H/W token grid, L tokens per block, P prefix slots,
N predicted tokens, V vocabulary (with the begin token).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from layers import attention as attention_lib
from nbp import decoding
from nbp import reconstruction
from nbp import sampling
from nbp import tasks
from nbp import visualization
from nbp.data import moving_digits
from nbp.data import pipeline
from nbp.data import tokens as tokens_lib
from nbp.models.block_transformer import NextBlockTransformer as Model
from nbp.models.block_transformer import next_block_inputs, to_block_order, to_grid_order

DATASETS = ("moving_digits", "tokens", "text")


# ---------------------------------------------------------------------------
# Targets and loss.


def next_block_targets(model: Model, tokens: jax.Array):
  """Grid-order tokens [B, F*H*W] -> (inputs [B, P_frames + N], targets [B, N]), block-major.

  Inputs are the given frames (frame prediction) followed by the start block
  and every block but the last; input block b+1 sits where target block b+1
  is predicted from block b.
  """
  seq = to_block_order(tokens, model.order)
  given = model.frame_prefix_len
  prefix, targets = seq[:, :given], seq[:, given:]
  inputs = jnp.concatenate([prefix, next_block_inputs(targets, model.block_len, model.bos, model.first_block)], axis=1)
  return inputs, targets


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None):
  """Mean token cross-entropy (nats) and the number of weighted tokens."""
  losses = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
  weights = jnp.ones_like(losses) if weights is None else weights.astype(losses.dtype)
  count = jnp.sum(weights)
  return jnp.sum(losses * weights) / jnp.maximum(count, 1.0), count


def token_log_probs(model: Model, params, grids: jax.Array, labels: jax.Array | None = None) -> jax.Array:
  """log p of each predicted token of grids [B, F, H, W] given the blocks before it: [B, N] in target order.

  Teacher forced (one forward pass), untempered and unfiltered; given frames
  are not predicted. labels: int [B] classes (condition "class").
  """
  if model.condition == "class" and labels is None:
    raise ValueError("scoring grids of a class-conditioned run needs their labels")
  inputs, targets = next_block_targets(model, grids.reshape(grids.shape[0], -1))
  logits = model.apply({"params": params}, inputs, labels=labels, block_tokens=targets)[:, -model.num_predicted:]
  return jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), -1), targets[..., None], -1)[..., 0]


def log_likelihood(model: Model, params, grids: jax.Array, labels: jax.Array | None = None) -> jax.Array:
  """log p(predicted tokens | condition) of grids [B, F, H, W]: [B] (`token_log_probs` summed)."""
  return jnp.sum(token_log_probs(model, params, grids, labels), axis=-1)


def frame_log_likelihood(model: Model, params, grids: jax.Array, frame: int) -> jax.Array:
  """log p(frame `frame` | everything before it) of unconditioned or frame-conditioned grids [B, F, H, W]: [B].

  Teacher forced: one forward pass, the log-probabilities of that frame's
  tokens summed (they must be predicted, not given). The frame's tokens see
  only blocks before their own, so what follows the frame does not matter.
  """
  if model.condition == "class":
    raise ValueError("frame_log_likelihood scores unconditioned or frame-conditioned runs; this one is "
                     "class-conditioned.")
  if not model.frame_prefix_len <= frame * model.grid[1] * model.grid[2] < model.num_tokens:
    raise ValueError(f"frame {frame} of {model.grid[0]} is not predicted by the model (given frames: "
                     f"{model.frame_prefix_len // (model.grid[1] * model.grid[2])})")
  log_p = token_log_probs(model, params, grids)
  in_frame = np.zeros(model.grid, bool)
  in_frame[frame] = True
  in_frame = to_block_order(in_frame.reshape(-1), model.order)[model.frame_prefix_len:]  # [N], target order
  return jnp.sum(log_p * in_frame, axis=-1)


def drawn_context(model: Model, params, inputs: jax.Array, targets: jax.Array, rng, rate: float,
                  labels: jax.Array | None = None) -> jax.Array:
  """Inputs [B, P + N] whose predicted tokens' copies are, each with probability `rate`, the model's own draw.

  One teacher-forced pass without gradient draws every predicted token from
  the model (temperature 1, the begin token excluded), as the sampler would
  given the true blocks before it; each token of `targets` [B, N] is then
  replaced by its draw with probability `rate` before the targets are
  shifted into the inputs. The given frames and the start block stay as
  they are, and the targets stay the true tokens: the model learns to
  predict the truth from a context holding its own mistakes (parallel
  scheduled sampling; xAR's noisy context, for tokens).
  """
  draw_key, keep_key = jax.random.split(rng)
  logits = model.apply({"params": jax.lax.stop_gradient(params)}, inputs, labels=labels,
                       block_tokens=targets)[:, -model.num_predicted:]
  drawn = sampling.sample_tokens(draw_key, logits[..., :model.bos].astype(jnp.float32))  # [B, N]
  mixed = jnp.where(jax.random.bernoulli(keep_key, rate, targets.shape), drawn, targets)
  prefix = inputs[:, :model.frame_prefix_len]
  return jnp.concatenate([prefix, next_block_inputs(mixed, model.block_len, model.bos, model.first_block)], axis=1)


def loss(model: Model, params, batch, rng, *, cond_dropout: float = 0.0, context_draws: float = 0.0,
         train: bool = True):
  """Cross-entropy over the predicted tokens (never the prefix); bits/token, accuracy, num_targets.

  cond_dropout: probability of the null class in place of the label (class condition; CFG).
  context_draws: in training, the probability that a token is read as the model's own draw of it rather
    than the true one (`drawn_context`); the targets stay the true tokens. 0: the paper's teacher forcing.
  train: the model's own `dropout` and `context_draws`, when set, are on (False: held-out data).
  """
  if not 0.0 <= context_draws <= 1.0:
    raise ValueError(f"config.loss.context_draws={context_draws}: a probability in [0, 1]")
  inputs, targets = next_block_targets(model, batch["tokens"])
  labels = None
  if model.condition == "class":
    labels = decoding.drop_condition(rng, batch["class"], cond_dropout, model.num_classes)
  if train and context_draws:
    inputs = drawn_context(model, params, inputs, targets, jax.random.fold_in(rng, 2), context_draws, labels)
  dropout = {"deterministic": False, "rngs": {"dropout": jax.random.fold_in(rng, 1)}} if train and model.dropout else {}
  logits = model.apply({"params": params}, inputs, labels=labels, block_tokens=targets,
                       **dropout)[:, -model.num_predicted:]  # [B, N, V]
  weights = batch.get("weights")
  if weights is not None:
    weights = to_block_order(weights, model.order)[:, model.frame_prefix_len:]
  value, count = cross_entropy(logits, targets, weights)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  if weights is not None:
    correct = correct * weights
  accuracy = jnp.sum(correct) / jnp.maximum(count, 1.0)
  return value, {"bits_per_token": value / jnp.log(2.0), "accuracy": accuracy, "num_targets": count}


# ---------------------------------------------------------------------------
# Sampling: one model call per block, the whole generation a few jitted loops.


def sample(model: Model, params, rng, *, num_samples: int = 8, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, labels: jax.Array | None = None, guidance_scale: float | None = None,
           prompt: jax.Array | None = None, cache_phases: int = 4, candidates: int = 1,
           selection: str = "consensus") -> jax.Array:
  """Draws `num_samples` grids of tokens [B, F, H, W] block by block with the KV cache; jit it whole.

  One prefill call reads the prefix and the start block (a cache of exactly
  P + L slots) and yields block 0; then one call per block feeds the block just
  drawn and yields all L tokens of the next, in `cache_phases` loops over a
  cache grown per phase (nbp.decoding). Block k is drawn with the key
  fold_in(rng, k), whatever the number of phases; with 1x1x1 blocks this is
  token-by-token next-token sampling. With `in_block` "causal" each block
  step yields the trunk's output, and the block's tokens are drawn one by one
  by the in-block stack, token j with fold_in(fold_in(rng, k), j).

  labels: int [B] classes (condition "class"; default 0, 1, 2, ... mod classes).
  guidance_scale: None (or 1 from a config) for plain conditional sampling; a
    number runs the conditional and null-class rows as one doubled batch and
    draws from uncond + scale * (cond - uncond) (0.0: unconditional).
  prompt: int [B, G, H, W] given frames, returned unchanged in the output.
    Condition "frames": its first prefix_frames are the condition; as a
    prefix they are read in the prefill before the start block, as blocks
    (`given_frames="blocks"`) after it, so the prefill's last block predicts
    the first generated one. Frames past those (G > prefix_frames, filling
    whole blocks) are read as blocks too: a partly predicted video is
    continued as if the model had drawn those frames itself. Under
    condition "class" or "none", a prompt [B, G, H, W] of any G < F frames
    that fill whole blocks is continued the same way, as blocks after the
    start block (the model was trained on such videos whole): next-frame
    prediction by a generator, under its class or none.
  candidates: K > 1 draws K grids per condition in one batch of B K rows and
    returns one per condition, at K times the cost, chosen by `selection`:
    "consensus" keeps the one agreeing with the other K - 1 on most tokens
    (`sampling.consensus`, minimum Bayes risk): a typical answer;
    "likelihood" keeps the one the model finds most likely (`log_likelihood`,
    one more forward pass over the B K grids): the draw nearest the mode.
  """
  if selection not in ("consensus", "likelihood"):
    raise ValueError(f"config.sampler.selection={selection!r}: 'consensus' or 'likelihood'")
  if candidates > 1:
    if model.condition == "class" and labels is None:
      labels = jnp.arange(num_samples, dtype=jnp.int32) % model.num_classes
    repeat = lambda x: None if x is None else jnp.repeat(x, candidates, axis=0)  # rows c0 .. cK-1 per condition
    grids = sample(model, params, rng, num_samples=num_samples * candidates, temperature=temperature, top_k=top_k,
                   top_p=top_p, labels=repeat(labels), guidance_scale=guidance_scale, prompt=repeat(prompt),
                   cache_phases=cache_phases)
    if selection == "consensus":
      return sampling.consensus(grids.reshape(num_samples, candidates, -1)).reshape(num_samples, *model.grid)
    score = log_likelihood(model, params, grids, labels=repeat(labels)).reshape(num_samples, candidates)
    best = jnp.argmax(score, axis=-1)  # [B]; ties to the lowest index
    return grids.reshape(num_samples, candidates, *model.grid)[jnp.arange(num_samples), best]
  if candidates != 1:
    raise ValueError(f"config.sampler.candidates={candidates}: draws per condition, at least 1")
  b, block_len, p = num_samples, model.block_len, model.prefix_len
  guided = guidance_scale is not None
  if guided and model.condition != "class":
    raise ValueError("classifier-free guidance (config.sampler.guidance_scale) needs condition 'class'")
  rows = 2 * b if guided else b
  order, bos = model.order, model.bos

  first = jnp.full((rows, block_len), bos, jnp.int32)  # the start block
  prefill_labels, given, fed = None, None, 0  # fed: given tokens read as blocks after the start block
  if model.condition == "class":
    labels = jnp.arange(b, dtype=jnp.int32) % model.num_classes if labels is None else labels
    prefill_labels = jnp.concatenate([labels, jnp.full((b,), model.num_classes, jnp.int32)]) if guided else labels
  if model.condition == "frames":
    if prompt is None:
      raise ValueError("frame prediction needs `prompt` frames [B, prefix_frames, H, W]")
    if prompt.shape[1] < model.prefix_frames:
      raise ValueError(f"prompt of {prompt.shape[1]} frames: config.model.prefix_frames={model.prefix_frames} "
                       "are the condition")
    condition = prompt[:, :model.prefix_frames].reshape(b, -1).astype(jnp.int32)
    given = to_block_order(condition, order[:model.given_len])  # its own order
    if model.given_frames == "prefix":
      first = jnp.concatenate([given, first], axis=1)  # [B, P + L]
    else:
      fed = model.given_len
      first = jnp.concatenate([first, given], axis=1)  # [B, L + G]
    if prompt.shape[1] > model.prefix_frames:  # frames past the condition: blocks read after it
      more = _prompt_blocks(model, prompt, read=model.given_len)[:, model.given_len:]
      fed += more.shape[1]
      first = jnp.concatenate([first, more], axis=1)
      given = jnp.concatenate([given, more], axis=1)
  elif prompt is not None:  # a generator continuing given frames: blocks after the start block
    given = _prompt_blocks(model, prompt)  # [B, G]
    fed = given.shape[1]
    first = jnp.concatenate([first, jnp.concatenate([given, given]) if guided else given], axis=1)

  def draw(logits, key):
    logits = logits[..., :bos]  # the begin token is never drawn
    if guided:
      logits = decoding.guide(logits, guidance_scale)
    return sampling.sample_tokens(key, logits, temperature=temperature, top_k=top_k, top_p=top_p)

  joint = model.in_block == "causal"

  def draw_block(out, key):
    """A block [B, L] from the block step's logits [rows, L, V], or (in_block "causal") from the trunk's output
    [rows, L, E], token j by the in-block stack given tokens 0..j-1, with the key fold_in(key, j)."""
    if not joint:
      return draw(out, key)

    def token(j, block):
      seen = jnp.concatenate([block, block]) if guided else block
      logits = model.apply({"params": params}, out, seen, method=Model.in_block_logits)  # [rows, L, V]
      return block.at[:, j].set(draw(logits[:, j], jax.random.fold_in(key, j)))
    return jax.lax.fori_loop(0, block_len, token, jnp.zeros((b, block_len), jnp.int32))

  start = p + fed  # slots before the start block's position in the drawn blocks' numbering
  num_drawn = model.num_tokens - (0 if given is None else given.shape[1])  # tokens to draw
  tokens_first = model.first_block == "tokens"
  if tokens_first and fed:  # (given frames as blocks rule out 'tokens' in Model.check)
    raise ValueError("a prompt continued past the model's condition needs config.model.first_block="
                     "'start_block': with 'tokens' the first block after the start is drawn token by token, not read.")
  if tokens_first:  # block 0 token by token (token j with fold_in(fold_in(rng, 0), j)), then blocks
    first = first[:, :first.shape[1] - block_len + 1]  # [given prefix, one begin token]
    block, cache = _first_block_by_tokens(model, params, first, prefill_labels, draw, start, rows,
                                          jax.random.fold_in(rng, 0))
  else:
    cache = decoding.init_cache(model, start + block_len, jnp.zeros((rows, 1), jnp.int32), hidden=True)  # prefill slots
    out, cache = decoding.apply_decoding(model, params, cache, first, labels=prefill_labels, last=block_len,
                                         hidden=joint)
    block = draw_block(out, jax.random.fold_in(rng, 0))  # [B, L], drawn block 0
  drawn = jnp.zeros((b, num_drawn), jnp.int32).at[:, :block_len].set(block)

  def step(k, cache, carry):  # feeds drawn block k - 1, draws block k
    drawn, block = carry
    slots = jnp.broadcast_to(start + k * block_len + jnp.arange(block_len, dtype=jnp.int32), (rows, block_len))
    if tokens_first:  # block 1 is read from [x_{L-1}, placeholders bos+1 .. bos+L-1]
      placeholders = jnp.broadcast_to(bos + jnp.arange(1, block_len, dtype=jnp.int32), (b, block_len - 1))
      block = jnp.where(k == 1, jnp.concatenate([block[:, -1:], placeholders], axis=1), block)
    inputs = jnp.concatenate([block, block]) if guided else block  # [rows, L]
    out, cache = decoding.apply_decoding(model, params, cache, inputs, slots=slots, hidden=joint)
    block = draw_block(out, jax.random.fold_in(rng, k))  # [B, L]
    return cache, (jax.lax.dynamic_update_slice(drawn, block, (0, k * block_len)), block)

  # The phase ending at step k1 writes slots up to start + k1 L.
  _, (drawn, _) = decoding.decode_in_phases(step, cache, (drawn, block), 1, num_drawn // block_len,
                                            cache_len=lambda k1: start + k1 * block_len, phases=cache_phases)
  seq = drawn if given is None else jnp.concatenate([given, drawn], axis=1)  # [B, F*H*W] block-major
  return to_grid_order(seq, order).reshape(b, *model.grid)


def _prompt_blocks(model: Model, prompt: jax.Array, read: int = 0) -> jax.Array:
  """Given frames [B, G, H, W] -> their tokens in block order [B, G*H*W]: the first G*H*W of the video's block
  order, which must be exactly these frames' tokens, and past the first `read` (a frame-conditioned model's
  given frames) fill whole blocks."""
  f, h, w = model.grid
  if prompt.ndim != 4 or tuple(prompt.shape[2:]) != (h, w) or not 0 < prompt.shape[1] < f:
    raise ValueError(f"prompt of shape {tuple(prompt.shape)}: expected given frames [B, G, {h}, {w}] with "
                     f"0 < G < {f} (config.model.grid={tuple(model.grid)}).")
  g = prompt.shape[1] * h * w
  if (g - read) % model.block_len or set(model.order[:g].tolist()) != set(range(g)):
    raise ValueError(f"a prompt of {prompt.shape[1]} frames does not fill whole blocks of "
                     f"config.model.block={tuple(model.block)}: the first {g} tokens in block order are not "
                     "those frames' tokens.")
  return to_block_order(prompt.reshape(prompt.shape[0], -1).astype(jnp.int32), model.order[:g])


class _FirstBlock(NamedTuple):
  tokens: jax.Array  # [B, L], block 0
  cache: Any  # the KV cache after reading [prefix, begin, x_0 .. x_{L-2}]


def _first_block_by_tokens(model: Model, params, first, labels, draw, start: int, rows: int, rng) -> _FirstBlock:
  """Block 0 token by token (first_block "tokens"): the prefill reads `first` ([given prefix, begin token]; the
  class tokens come from `labels`) and draws x_0; step j reads x_{j-1} at slot start + j and draws x_j, with the
  key fold_in(rng, j). `start` is the begin token's slot."""
  block_len = model.block_len
  cache = decoding.init_cache(model, start + 1, jnp.zeros((rows, 1), jnp.int32))
  logits, cache = decoding.apply_decoding(model, params, cache, first, labels=labels, last=1)
  tokens = draw(logits, jax.random.fold_in(rng, 0))  # [B, 1], x_0
  b = tokens.shape[0]
  guided = rows != b
  tokens = jnp.zeros((b, block_len), jnp.int32).at[:, :1].set(tokens)
  cache = attention_lib.resize_cache(cache, start + block_len)

  def token_step(j, state):
    cache, tokens = state
    previous = jax.lax.dynamic_slice_in_dim(tokens, j - 1, 1, axis=1)  # [B, 1]
    inputs = jnp.concatenate([previous, previous]) if guided else previous
    slots = jnp.full((rows, 1), start + j, jnp.int32)
    logits, cache = decoding.apply_decoding(model, params, cache, inputs, slots=slots)
    token = draw(logits, jax.random.fold_in(rng, j))  # [B, 1]
    return cache, jax.lax.dynamic_update_slice(tokens, token, (0, j))

  cache, tokens = jax.lax.fori_loop(1, block_len, token_step, (cache, tokens))
  return _FirstBlock(tokens, cache)


# ---------------------------------------------------------------------------
# Data.


def check_data(model: Model, data_cfg) -> None:
  """The data section against the model's grid and codebook, naming the key to fix."""
  f, h, w = model.grid
  if data_cfg.name == "moving_digits":
    if (data_cfg.num_frames, data_cfg.frame_size, data_cfg.frame_size) != (f, h, w):
      raise ValueError(f"config.model.grid={tuple(model.grid)} but config.data has {data_cfg.num_frames} frames "
                       f"of {data_cfg.frame_size}x{data_cfg.frame_size}: the grid is the pixels.")
    if model.condition == "class" and model.num_classes != 10 ** data_cfg.num_digits:
      raise ValueError(f"config.model.num_classes={model.num_classes}: moving digits with "
                       f"num_digits={data_cfg.num_digits} have {10 ** data_cfg.num_digits} classes.")
  elif data_cfg.name == "text":
    if data_cfg.get("seq_len") and data_cfg.seq_len != model.num_tokens - 1:
      raise ValueError(f"config.data.seq_len={data_cfg.seq_len}: a next-token model reads windows of its grid, "
                       f"{model.num_tokens - 1} tokens; leave seq_len unset")
    if model.codebook_size != 256 or f * h != 1:
      raise ValueError(f"text is bytes on a 1 x 1 x N grid: config.model.codebook_size={model.codebook_size} "
                       f"(want 256), config.model.grid={tuple(model.grid)} (want (1, 1, N)).")


def make_data(model: Model, data_cfg, split: str, *, seed: int, process_index: int, process_count: int,
              batch_size: int):
  """A checkpointable grain iterator of {"tokens": int32 [b, F*H*W] (grid order), "class": int32 [b]}."""
  if data_cfg.name == "tokens":
    source = tokens_lib.token_source(data_cfg.token_dir, split, grid=model.grid, codebook_size=model.codebook_size)
    transforms = (tokens_lib.TokensAndClass(),)
  elif data_cfg.name == "text":
    # Windows of N + 1 bytes; the begin token replaces the first as input, so keep the last N as targets.
    fraction, validation_seed = pipeline.validation_keys(data_cfg)
    source = pipeline.text_bytes_source(split, model.num_tokens - 1, validation_fraction=fraction,
                                        validation_seed=validation_seed)
    transforms = ()
  else:
    source = pipeline.load_source(moving_digits.builder_from_config(data_cfg), split, data_cfg.dir)
    transforms = (pipeline.QuantizeVideoToTokens(model.codebook_size), tokens_lib.TokensAndClass())
  return pipeline.make_iterator(
      source, global_batch_size=batch_size * process_count, seed=seed, shuffle=True, transforms=transforms,
      process_index=process_index, process_count=process_count, worker_count=data_cfg.worker_count)


@functools.cache
def _tokenizer(workdir: str):
  """(jitted decode, jitted encode of uint8 videos, params) of the tokenizer run in `workdir`."""
  run = tasks.load_run(workdir)
  decode = jax.jit(run.task.predict_fn("decode", who="NBP's token videos"))
  encode_fn = run.task.predict_fn("encode", who="NBP's token videos")
  encode = jax.jit(lambda p, v: encode_fn(p, v.astype(jnp.float32) / 127.5 - 1.0))
  return decode, encode, run.params


def tokens_to_videos(model: Model, data_cfg, tokens) -> np.ndarray:
  """Grid tokens [B, F, H, W] -> uint8 videos: the tokenizer's decoder, or the grey levels dequantised."""
  tokens = np.asarray(tokens)
  if data_cfg.name == "tokens":
    decode, _, params = _tokenizer(tokens_lib.tokenizer_workdir(data_cfg.token_dir))
    return reconstruction.to_uint8(decode(params, jnp.asarray(tokens)))
  if data_cfg.name == "text":
    raise ValueError("text samples are bytes, not videos")
  b, f, h, w = tokens.shape
  return pipeline.dequantize_tokens(tokens.reshape(b, -1), model.codebook_size, (f, h, w, 1))


def videos_to_tokens(model: Model, data_cfg, videos, *, batch_size: int = 32) -> np.ndarray:
  """uint8 videos [N, F, H, W, C] -> grid tokens [N, f, h, w]: the inverse of `tokens_to_videos`.

  Token runs encode with their tokenizer, in batches of `batch_size` (the last
  one padded: one compiled shape); pixel runs quantise to the grey levels.
  """
  videos = np.asarray(videos)
  if data_cfg.name != "tokens":
    return pipeline.quantize_video(videos, model.codebook_size)[..., 0]  # grey levels are the tokens
  _, encode, params = _tokenizer(tokens_lib.tokenizer_workdir(data_cfg.token_dir))
  out = []
  for start in range(0, len(videos), batch_size):
    chunk = videos[start:start + batch_size]
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
    out.append(np.asarray(encode(params, jnp.asarray(padded)))[:len(chunk)])
  return np.concatenate(out)


def write_samples(model: Model, data_cfg, tokens: np.ndarray, out_dir: str, step: int) -> dict[str, float]:
  """Videos as a GIF and a PNG frame grid; text as its decoded bytes."""
  stem = os.path.join(out_dir, f"step_{step:07d}")
  if data_cfg.name == "text":
    with open(stem + ".txt", "w") as f:
      for t in np.asarray(tokens).reshape(len(tokens), -1):
        f.write(bytes(np.clip(t, 0, 255).astype(np.uint8)).decode("utf-8", errors="replace") + "\n---\n")
    return {}
  videos = tokens_to_videos(model, data_cfg, tokens)
  title = f"{'x'.join(map(str, model.block))} blocks, {model.condition}, step {step}"
  visualization.save_gif(stem + ".gif", videos)
  visualization.save_frame_grid(stem + ".png", videos, title=title)
  return {}


@functools.cache
def _validation_prompt_tokens(data_json: str, model: Model, batch_size: int) -> np.ndarray:
  """Grid tokens [B, F, H, W] of validation examples (frame-prediction samples continue them)."""
  data_cfg = ml_collections.ConfigDict(json.loads(data_json))
  it = make_data(model, data_cfg, "validation", seed=0, process_index=0, process_count=1, batch_size=batch_size)
  return np.asarray(next(it)["tokens"]).reshape(batch_size, *model.grid)


def sampler_kwargs(model: Model, sampler_cfg) -> dict:
  """`sample`'s keywords from `config.sampler`; guidance scale 1 (or no class condition) means no guidance.

  Scale 1 is the conditional model itself: sampling it without the doubled
  batch draws the same tokens at half the cost.
  """
  kwargs = dict(sampler_cfg)
  known = set(inspect.signature(sample).parameters) - {"model", "params", "rng", "labels", "prompt"}
  if set(kwargs) - known:
    raise ValueError(f"config.sampler has {sorted(set(kwargs) - known)}, which the block sampler does not take; "
                     f"its keys: {sorted(known)}")
  if kwargs.get("guidance_scale") == 1.0 or model.condition != "class":
    kwargs["guidance_scale"] = None
  return kwargs


def make_task(config) -> tasks.Task:
  model = tasks.build_model(Model, config.model)
  model.check()
  check_data(model, config.data)
  sampler = sampler_kwargs(model, config.get("sampler", {}))
  num_samples = sampler.get("num_samples", 8)

  def sample_fn(params, rng):
    prompt = None
    if model.condition == "frames":  # a trace-time constant: validation examples' first frames
      grids = _validation_prompt_tokens(config.data.to_json(), model, num_samples)
      prompt = jnp.asarray(grids[:, :model.prefix_frames])
    return sample(model, params, rng, prompt=prompt, **sampler)

  conditioned = {k: v for k, v in sampler.items() if k != "num_samples"}

  def sample_conditioned(params, rng, labels, prompt):
    """B samples with the given conditions (labels int [B], prompt [B, prefix_frames, h, w]); those the
    model has no such condition for are ignored."""
    return sample(model, params, rng, num_samples=labels.shape[0],
                  labels=labels if model.condition == "class" else None,
                  prompt=prompt if model.condition == "frames" else None, **conditioned)

  def init_inputs():
    inputs = {"tokens": jnp.zeros((1, model.frame_prefix_len + model.num_predicted), jnp.int32),
              "block_tokens": jnp.zeros((1, model.num_predicted), jnp.int32)}
    if model.condition == "class":
      inputs["labels"] = jnp.zeros((1,), jnp.int32)
    return inputs

  predict_fns = {
      "eval_loss": functools.partial(loss, model, train=False),  # no dropout of either kind on held-out data
      "sample": sample_fn,
      "sample_conditioned": sample_conditioned,
      "write_samples": functools.partial(write_samples, model, config.data),
  }
  if config.data.name != "text":
    predict_fns["to_videos"] = functools.partial(tokens_to_videos, model, config.data)
    predict_fns["from_videos"] = functools.partial(videos_to_tokens, model, config.data)
    predict_fns["frame_log_likelihood"] = jax.jit(functools.partial(frame_log_likelihood, model),
                                                  static_argnames="frame")
  return tasks.Task(
      model=model,
      init_inputs=init_inputs,
      loss=functools.partial(loss, model, **config.get("loss", {})),
      data=functools.partial(make_data, model, config.data),
      predict_fns=predict_fns,
  )
