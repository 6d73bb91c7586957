"""Prediction by optimisation against an energy: EBT's thinking, best-of-N, and cached text generation.

Dimension letters: B batch, L positions, V vocabulary (text) or F features
(frames), N best-of-N candidates.

A candidate starts as y_0 (noise, or a replayed final candidate) and takes
`num_steps` steps. At step k, with the step embedding k (the last one for
steps beyond the table):
    p   = softmax(y + Langevin noise)   (text; frames: y + noise, unnormalised)
    E   = energy(p, k)                   one energy per position [B, L]
    y  <- p - alpha * dE/dp              (the gradient of the summed energy)
Cross-entropy (text) or the smooth L1 loss (frames) is taken on y after each
step. Training differentiates through dE/dp (a second-order gradient);
`detach` restarts each step from a constant y (System 1: every step its own
second-order term), `truncate` keeps only the last step's dE/dp in the graph
(System 2). Inference needs first-order gradients only.

`energy` is any function (p, step) -> [B, L]: the whole model over observed
tokens and candidates (`model_energy`), or the candidates alone over a
decoding cache (`generate`). Both give the same numbers: the energy of
candidate i depends on the observed prefix and on p_i only.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from nbp import decoding
from nbp.models.ebt import EBT

Energy = Callable[[jax.Array, int], jax.Array]  # (p [B, L, V|F], step) -> energies [B, L]

MIN_ALPHA = 1e-4  # the step size is clamped to at least this


def step_size(model: EBT, params, alpha: float | None = None):
  """The model's step size: its learned parameter or its field (or `alpha` when given), at least MIN_ALPHA."""
  if alpha:
    value = jnp.asarray(alpha, jnp.float32)
  elif model.learn_alpha:
    value = jnp.asarray(params["alpha"], jnp.float32)
  else:
    value = jnp.asarray(model.alpha, jnp.float32)
  return jnp.maximum(value, MIN_ALPHA)


def check_alpha_group(model, config) -> None:
  """A learned step size trains in its own parameter group ("alpha"), and only then; else ValueError naming both keys."""
  groups = dict(config.get("param_groups", {}))
  if model.learn_alpha != ("alpha" in groups):
    raise ValueError(f"config.model.learn_alpha={model.learn_alpha} but config.param_groups "
                     f"{'lacks' if model.learn_alpha else 'has'} an 'alpha' group: the learned step size trains "
                     "in its own group (lr, weight_decay 0), and only then")


def randomized_alpha(rng, alpha, shape, scale: float):
  """alpha drawn per (batch, position) uniformly in [alpha / scale, alpha * scale] (scale 1: alpha itself)."""
  if scale == 1.0:
    return jnp.broadcast_to(alpha, shape)
  low, high = alpha / scale, alpha * scale
  return low + jax.random.uniform(rng, shape) * (high - low)


def model_energy(model: EBT, params, observed, labels=None) -> Energy:
  """The uncached energy: the whole two-stream pass over `observed` [B, L(, F)] and the candidates (labels int
  [B]: a class-conditioned model's classes)."""
  def energy(p, step):
    return model.apply({"params": params}, observed, p, step, labels=labels)
  return energy


def as_candidate(model: EBT, y):
  """What the energy reads: softmax over the vocabulary (text), y itself (frames)."""
  return y if model.continuous else jax.nn.softmax(y, axis=-1)


class Thought(NamedTuple):
  ys: list  # y after each step, [B, L, V|F] each
  energies: list  # the energy at each step's input p, [B, L] each


def think(model: EBT, energy: Energy, y0, *, num_steps: int, alpha, rng=None, langevin_sigma: float = 0.0,
          detach: bool = False, truncate: bool = False, accept_lower: bool = False) -> Thought:
  """`num_steps` optimisation steps from y0 (module docstring). alpha: scalar or [B, L, 1].

  accept_lower: keep a position's step only where it lowers that position's
  energy (one more energy evaluation per step, without noise); elsewhere y
  stays.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps={num_steps}: thinking takes at least one step")
  if langevin_sigma and rng is None:
    raise ValueError("Langevin noise needs an rng")
  y = y0
  ys, energies = [], []
  for k in range(num_steps):
    if detach:
      y = jax.lax.stop_gradient(y)
    noisy = y + langevin_sigma * jax.random.normal(jax.random.fold_in(rng, k), y.shape) if langevin_sigma else y
    p = as_candidate(model, noisy)
    grad, e = jax.grad(lambda p: (lambda e: (e.sum(), e))(energy(p, k)), has_aux=True)(p)
    if truncate and k < num_steps - 1:
      grad = jax.lax.stop_gradient(grad)
    new = p - alpha * grad
    if accept_lower:
      lower = energy(as_candidate(model, new), k) < e  # [B, L]
      new = jnp.where(lower[..., None], new, y)
    y = new
    ys.append(y)
    energies.append(e)
  return Thought(ys, energies)


def final_energy(model: EBT, energy: Energy, y, num_steps: int):
  """The energy of a finished candidate y, under the last step's embedding."""
  return energy(as_candidate(model, y), num_steps - 1)


def think_best_of(model: EBT, energy: Energy, rng, shape, *, best_of: int = 1, **think_kwargs):
  """The lowest-energy final candidate per (batch, position) of `best_of` runs from fresh N(0, 1) noise.

  shape: of one candidate set [B, L, V|F]. Returns (y [B, L, V|F], its final energy [B, L]).
  """
  num_steps = think_kwargs["num_steps"]

  def one(n):
    key = jax.random.fold_in(rng, n)
    y0 = jax.random.normal(jax.random.fold_in(key, 0), shape)
    y = think(model, energy, y0, rng=jax.random.fold_in(key, 1), **think_kwargs).ys[-1]
    return y, final_energy(model, energy, y, num_steps)

  def keep_lower(carry, n):
    best_y, best_e = carry
    y, e = one(n)
    lower = e < best_e
    return (jnp.where(lower[..., None], y, best_y), jnp.where(lower, e, best_e)), None

  first = one(0)
  if best_of == 1:
    return first
  (y, e), _ = jax.lax.scan(keep_lower, first, jnp.arange(1, best_of))
  return y, e


# ---------------------------------------------------------------------------
# Text generation with a KV cache per step embedding.


def choose(y, rng, temperature: float):
  """The token a finished candidate y [B, V] names: its argmax (temperature 0), or a draw from softmax(y / T)."""
  if temperature:
    return jax.random.categorical(rng, y / temperature)
  return jnp.argmax(y, axis=-1)


def generate(model: EBT, params, rng, prompt, num_new: int, *, num_steps: int, alpha: float | None = None,
             langevin_sigma: float = 0.0, best_of: int = 1, accept_lower: bool = False,
             temperature: float = 0.0):
  """Tokens int [B, P + num_new]: the prompt [B, P] continued one token at a time.

  Each new token is thought out (`think_best_of`) against the observed
  stream held in a KV cache, one cache per step embedding used (the observed
  stream sees its step token), then taken greedily (temperature 0) or drawn
  from softmax(y / temperature), and written into every cache. Jit it whole.
  """
  if model.continuous:
    raise ValueError("generate writes text tokens; this model's candidates are frames (vocab_size 0)")
  b, p = prompt.shape
  length = 1 + p + num_new
  if length > model.max_len:
    raise ValueError(f"the step token, {p} prompt and {num_new} new tokens need {length} cache slots, more "
                     f"than config.model.max_len={model.max_len}")
  embeddings = min(num_steps, model.num_step_embeddings)
  caches = []
  for k in range(embeddings):
    cache = decoding.init_cache(model, length, prompt, None, k, prefill=True)
    _, cache = decoding.apply_decoding(model, params, cache, prompt, None, k, prefill=True)
    caches.append(cache)
  a = step_size(model, params, alpha)
  tokens = jnp.concatenate([prompt, jnp.zeros((b, num_new), prompt.dtype)], axis=1)

  def step(t, carry):
    caches, tokens = carry
    key = jax.random.fold_in(rng, t)

    def energy(cand, k):
      e, _ = decoding.apply_decoding(model, params, caches[min(k, embeddings - 1)], None, cand, k)
      return e

    y, _ = think_best_of(model, energy, key, (b, 1, model.vocab_size), best_of=best_of, num_steps=num_steps,
                         alpha=a, langevin_sigma=langevin_sigma, accept_lower=accept_lower)
    token = choose(y[:, 0], jax.random.fold_in(key, best_of + 1), temperature).astype(tokens.dtype)
    caches = tuple(decoding.apply_decoding(model, params, c, token[:, None], None, k)[1]
                   for k, c in enumerate(caches))
    return caches, tokens.at[:, p + t].set(token)

  _, tokens = jax.lax.fori_loop(0, num_new, step, (tuple(caches), tokens))
  return tokens


def generate_uncached(model: EBT, params, rng, prompt, num_new: int, *, num_steps: int, alpha: float | None = None,
                      langevin_sigma: float = 0.0, best_of: int = 1, accept_lower: bool = False,
                      temperature: float = 0.0):
  """`generate` without a cache: every token re-runs the whole two-stream pass (the definition it must equal)."""
  b, p = prompt.shape
  a = step_size(model, params, alpha)
  tokens = prompt
  for t in range(num_new):
    key = jax.random.fold_in(rng, t)
    observed = tokens
    n = observed.shape[1]

    def energy(cand, k, observed=observed, n=n):
      others = jnp.full((b, n - 1, model.vocab_size), 1.0 / model.vocab_size)  # never read by the last candidate
      return model.apply({"params": params}, observed, jnp.concatenate([others, cand], axis=1), k)[:, -1:]

    y, _ = think_best_of(model, energy, key, (b, 1, model.vocab_size), best_of=best_of, num_steps=num_steps,
                         alpha=a, langevin_sigma=langevin_sigma, accept_lower=accept_lower)
    token = choose(y[:, 0], jax.random.fold_in(key, best_of + 1), temperature)
    tokens = jnp.concatenate([tokens, token[:, None].astype(tokens.dtype)], axis=1)
  return tokens



# ---------------------------------------------------------------------------
# Video: frames generated one after the other, each thought into being.


def generate_frames(model: EBT, params, rng, labels, num_frames: int, *, prompt=None, num_steps: int,
                    alpha: float | None = None, langevin_sigma: float = 0.0, best_of: int = 1,
                    accept_lower: bool = False):
  """Videos [B, num_frames, F] of a class-conditioned frame model (labels int [B]); jit it whole.

  Frame t is the last candidate of a two-stream pass over [class, frames 0..t-1]
  (uncached: the few frames are read again at each), thought from N(0, 1)
  noise with key fold_in(rng, t): `num_steps` steps, the lowest-energy of
  `best_of` runs. prompt [B, G, F]: the first G frames, given and returned
  unchanged. Frames are clipped to [-1, 1] as they are fed back.
  """
  if not model.num_classes:
    raise ValueError("generate_frames needs a class-conditioned model (config.model.num_classes > 0)")
  b = labels.shape[0]
  frames = [] if prompt is None else list(jnp.moveaxis(prompt, 1, 0))
  alpha = step_size(model, params, alpha)
  for t in range(len(frames), num_frames):
    observed = jnp.stack(frames, axis=1) if frames else jnp.zeros((b, 0, model.input_dim))
    energy = model_energy(model, params, observed, labels)
    y, _ = think_best_of(model, energy, jax.random.fold_in(rng, t), (b, t + 1, model.input_dim), best_of=best_of,
                         num_steps=num_steps, alpha=alpha, langevin_sigma=langevin_sigma, accept_lower=accept_lower)
    frames.append(jnp.clip(y[:, -1], -1.0, 1.0))
  return jnp.stack(frames, axis=1)
