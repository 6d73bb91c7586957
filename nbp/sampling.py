"""Token sampling shared by the autoregressive samplers: temperature, top-k, top-p.

Everything is vectorised over the leading axes (batch, tokens of a block), so a
whole block of tokens is drawn in one call inside a jitted loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30  # a large finite negative: never -inf, so no NaN from arithmetic on it


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Masks all but the top-k logits and the smallest top-p nucleus (0 / 1.0: off)."""
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  if top_k and 0 < top_k < vocab:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, _NEG, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token while the mass strictly before it is < top_p (the first always stays).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, _NEG, logits)
  return logits


def sample_tokens(rng: jax.Array, logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Draws one token per position of `logits` [..., V]; temperature 0 is greedy."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
