"""KV-cache decoding machinery shared by every autoregressive sampler.

A sampler over a model built from `layers.attention.MultiHeadAttention`
(decode=True) runs in three parts, each written once here:

  1. `init_cache`: a zero cache of just the slots the first call writes (its
     shapes come from `jax.eval_shape`, so no parameters are computed);
  2. `apply_decoding`, the prefill: one call over the given part of the sequence (a prefix, a start
     block, observed entities), writing its keys and values in place;
  3. `decode_in_phases`: the remaining steps as a few consecutive
     `lax.fori_loop`s, each over a cache grown (`layers.attention.resize_cache`)
     to the slots written by its last step, so early steps do not attend over
     empty slots. Every phase adds one compiled copy of the step; the result
     does not depend on the number of phases.

The step is the caller's: NBP feeds a block and draws the next; an entity
model (xAR) feeds a finished entity; an energy model (EBT) its observed stream.
`guide` is the classifier-free guidance rule over a doubled batch, and
`drop_condition` the condition dropout that trains a model for it.

Dimension letters: B batch, S cache slots.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers import attention as attention_lib
from nbp import sampling


def init_cache(model: nn.Module, length: int, *init_args, **init_kwargs):
  """A zero KV cache of `length` slots for `model`, shaped by `model.init(*init_args, decode=True)`.

  `init_args` are example inputs whose batch size the cache takes (their values
  do not matter: only shapes are traced).
  """
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), *init_args, decode=True, **init_kwargs)["cache"])
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  return attention_lib.resize_cache(cache, length)


def apply_decoding(model: nn.Module, params, cache, *args, **kwargs):
  """One decoding call (the prefill or a step) writing its slots into `cache`: (outputs, updated cache)."""
  out, updated = model.apply({"params": params, "cache": cache}, *args, decode=True, mutable=["cache"], **kwargs)
  return out, updated["cache"]


def decode_in_phases(step: Callable[[Any, Any, Any], tuple[Any, Any]], cache, carry, start: int, stop: int, *,
                     cache_len: Callable[[int], int], phases: int = 4):
  """Runs `cache, carry = step(k, cache, carry)` for k in start..stop-1 in `phases` loops.

  Before the phase ending at step k1 the cache is resized to `cache_len(k1)`
  slots: the slots written once step k1 - 1 has run. Returns (cache, carry).
  """
  for k0, k1 in sampling.phase_bounds(start, stop, phases):
    cache = attention_lib.resize_cache(cache, cache_len(k1))
    cache, carry = jax.lax.fori_loop(k0, k1, lambda k, state: step(k, *state), (cache, carry))
  return cache, carry


def guide(logits: jax.Array, scale: float) -> jax.Array:
  """Doubled-batch outputs [2B, ...] (conditional rows first) -> uncond + scale * (cond - uncond).

  Scale 1 is the conditional output and 0 the unconditional one; the rule is
  the same for logits (NBP) and velocities (xAR).
  """
  cond, uncond = jnp.split(logits, 2, axis=0)
  return uncond + scale * (cond - uncond)


def drop_condition(rng, labels: jax.Array, probability: float, null_class: int) -> jax.Array:
  """Replaces each label by the null class with `probability` (CFG training)."""
  if probability <= 0.0:
    return labels
  drop = jax.random.bernoulli(rng, probability, labels.shape)
  return jnp.where(drop, null_class, labels)
