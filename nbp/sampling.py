"""Token sampling shared by the autoregressive samplers: temperature, top-k, top-p; decoding phases.

Everything is vectorised over the leading axes (batch, tokens of a block), so a
whole block of tokens is drawn in one call inside a jitted loop.

Top-p without a sort. The nucleus keeps the most likely tokens while the mass
strictly before a token (in descending order) is below top_p; equivalently it
keeps every logit above the largest threshold w whose tail mass
mass(logit > w) still reaches top_p. `top_p_filter` finds w per row by a
32-step binary search over the float32 bit patterns (an order-preserving map to
uint32), each step one masked sum over the vocabulary: the same tokens as
sorting (`top_p_filter_sorted`, kept as the reference), 15x faster on the CPU
for a block of 16 rows of 1024 logits (0.16 against 2.2 ms).

Decoding phases. A cached decode step attends over every slot of the KV cache
it is given. `phase_bounds` cuts the steps of a sampler into a few runs of
consecutive steps; each run is its own `lax.fori_loop` over a cache grown
(`layers.attention.resize_cache`) to the slots written by the run's end, so a
step attends over at most one phase's worth of unwritten slots.

Consensus (minimum Bayes risk) selection. Given K sequences drawn for one
condition, `consensus` keeps the one that agrees with the other K - 1 on the
most tokens: the draw with the least expected token error against a sample of
the model's own distribution, estimated by the other draws. Where one answer is
wanted (the continuation of given frames), it trades the diversity of a single
draw for a typical one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30  # a large finite negative: never -inf, so no NaN from arithmetic on it


def _order_keys(x: jax.Array) -> jax.Array:
  """float32 [...] -> uint32 [...] in the same order (-0.0 and +0.0 equal; no NaN expected)."""
  x = jnp.where(x == 0, 0.0, x).astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.where((bits >> 31) == 1, ~bits, bits | jnp.uint32(0x80000000))


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
  """Masks [..., V] float32 logits outside the top-p nucleus, by binary search (see the module docstring).

  A token is kept iff the mass of the tokens strictly more likely than it is
  below top_p (ties are kept together). top_p <= 0 keeps the most likely
  token(s).
  """
  probs = jax.nn.softmax(logits, axis=-1)
  keys = _order_keys(logits)

  def bit(i, w):  # w: the largest threshold found so far whose tail mass reaches top_p
    candidate = w | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
    tail = jnp.sum(jnp.where(keys > candidate[..., None], probs, 0.0), axis=-1)
    return jnp.where(tail >= top_p, candidate, w)

  # w = 0 holds at the start: every key is above 0, so its tail is the whole mass.
  threshold = jax.lax.fori_loop(0, 32, bit, jnp.zeros(logits.shape[:-1], jnp.uint32))
  top = keys == jnp.max(keys, axis=-1, keepdims=True)  # always kept (only top_p <= 0 would drop it)
  return jnp.where((keys > threshold[..., None]) | top, logits, _NEG)


def top_p_filter_sorted(logits: jax.Array, top_p: float) -> jax.Array:
  """`top_p_filter` by a full sort of the vocabulary: the reference."""
  sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  # Keep a token while the mass strictly before it is < top_p (the first always stays).
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_before < top_p
  threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < threshold, _NEG, logits)


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Masks all but the top-k logits and the smallest top-p nucleus (0 / 1.0: off)."""
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  if top_k and 0 < top_k < vocab:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, _NEG, logits)
  if top_p < 1.0:
    logits = top_p_filter(logits, top_p)
  return logits


def sample_tokens(rng: jax.Array, logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Draws one token per position of `logits` [..., V]; temperature 0 is greedy."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def consensus(candidates: jax.Array) -> jax.Array:
  """int [B, K, N] K drawn sequences per row -> [B, N], per row the one agreeing with the others on most tokens.

  Ties go to the lowest index. One sequence is compared with all K at a time
  (`lax.map`), so memory stays at B x K x N whatever K.
  """
  k = candidates.shape[1]
  if k == 1:
    return candidates[:, 0]

  def agree(i):  # [B, K]: candidate i against every candidate (itself: n, alike for all)
    one = jax.lax.dynamic_slice_in_dim(candidates, i, 1, axis=1)
    return jnp.sum(candidates == one, axis=-1, dtype=jnp.int32)

  agreement = jax.lax.map(agree, jnp.arange(k))  # [K, B, K]
  best = jnp.argmax(jnp.sum(agreement, axis=-1).T, axis=-1)  # [B]
  return jnp.take_along_axis(candidates, best[:, None, None], axis=1)[:, 0]


def phase_bounds(start: int, stop: int, phases: int) -> list[tuple[int, int]]:
  """Steps start..stop-1 cut into at most `phases` runs [(k0, k1), ...] of near-equal length."""
  if phases < 1:
    raise ValueError(f"cache_phases={phases}: need at least 1")
  steps = stop - start
  if steps <= 0:
    return []
  phases = min(phases, steps)
  cuts = [start + (steps * i) // phases for i in range(phases + 1)]
  return list(zip(cuts[:-1], cuts[1:]))
