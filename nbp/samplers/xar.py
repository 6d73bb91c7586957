"""xAR's sampler: entity by entity, each integrated from noise to t = 0 over a KV cache of the finished ones.

`sample(model, params, rng, *, <config.sampler keys>)`, jitted whole. Entity
by entity: the entity starts as noise at t = 1 and is integrated to t = 0 by
Euler (ODE) or Euler-Maruyama (SDE) steps, at the times of `solver_times`
(uniform from 1 to t_end, then one step without noise to 0), each step one
model call on that entity over the KV cache of the finished ones. Guidance runs
the conditional and null-class rows as one doubled batch; its scale grows
linearly across the AR steps (`guidance_scale_at`).

What the cache holds as context (`context`). Once an entity is finished, the
keys and values the later entities attend to are those of one of

  "clean"  the finished entity x at t = 0 (the official sampler): one more
           model call per entity;
  "t_end"  the input of its last solver call, at t = t_end with that t's
           embedding: already in the cache, no extra call;
  "fixed"  the finished entity noised again to a fixed level `context_t`,
           (1 - context_t) x + context_t eps with noise of its own: one more call.

None of them is the context a noisy-context model saw in training, where each
entity's t is logit-normal(0, 1): P(t <= 0.04) = Phi(logit 0.04) is about
0.07%, P(t <= 0.1) about 1.4%, and t = 0 never occurs. Which works best is a
measurement (experiments/benchmark_xar.py --xar_parts context, on the same
checkpoints); the config that uses a choice says its figure. A teacher-forced
model was trained on clean context, so "clean" is its context as trained.

`use_cache=False` runs the same sampler by full forward passes over the whole
sequence (the context written at its slots with its times, later slots zeros
that, the mask being causal across entities, change nothing): the reference
the cached sampler is tested against, for every context mode.

Random numbers: entity k starts from the noise normal(fold_in(rng, k)); its
solver step j draws fold_in(fold_in(rng, k), j + 1) and the "fixed" context
noise fold_in(fold_in(rng, k), num_steps).

Dimensions: B batch, S slots, C token channels, K entities, L tokens of one
entity, N solver steps.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np

from layers import attention as attention_lib
from nbp import decoding

SOLVERS = ("sde", "ode")
CONTEXTS = ("clean", "t_end", "fixed")
SCHEDULES = ("linear", "constant")


def solver_times(num_steps: int, t_end: float) -> np.ndarray:
  """float32 [N + 1]: N times uniform from 1 down to t_end, then 0 (the final deterministic step's end)."""
  if num_steps < 1 or not 0.0 < t_end < 1.0:
    raise ValueError(f"config.sampler.num_steps={num_steps} must be >= 1 and t_end={t_end} in (0, 1)")
  return np.append(np.linspace(1.0, t_end, num_steps), 0.0).astype(np.float32)


def guidance_scale_at(k, num_entities: int, guidance_scale: float, schedule: str):
  """The guidance scale of AR step k of K.

  "linear": 1 + (scale - 1) k / (K - 1), from no guidance on the first entity
  to the full scale on the last (the official schedule; one entity: the
  scale); "constant": the scale throughout.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"config.sampler.guidance_schedule={schedule!r}: choose one of {SCHEDULES}")
  if schedule == "constant" or num_entities == 1:
    return guidance_scale
  return 1.0 + (guidance_scale - 1.0) * k / (num_entities - 1)


def solver_step(x, v, t, t_next, noise, *, solver: str, noise_scale: float = 1.0):
  """One step from t to t_next < t given the velocity v at (x, t); noise None: no noise (the final step).

  ODE (Euler): x + (t_next - t) v. SDE (Euler-Maruyama) of the reverse-time
  SDE with the flow's marginals and diffusion w(t) = 2t: with the score
  -(x + (1 - t) v) / t, the drift v - (w/2) score is (2 - t) v + x, and the
  noise sqrt(w (t - t_next)) * noise_scale * noise. The final step from
  t_end to 0 is the same drift without noise (as the official sampler does).
  """
  dt = t_next - t  # negative
  if solver == "ode":
    return x + dt * v
  drift = (2.0 - t) * v + x
  x = x + dt * drift
  if noise is None:
    return x
  return x + jnp.sqrt(2.0 * t * -dt) * noise_scale * noise


def check(*, num_steps: int, t_end: float, solver: str, context: str, context_t: float,
          guidance_schedule: str) -> None:
  """Raises ValueError naming the first bad config.sampler key."""
  if solver not in SOLVERS:
    raise ValueError(f"config.sampler.solver={solver!r}: choose one of {SOLVERS}")
  if context not in CONTEXTS:
    raise ValueError(f"config.sampler.context={context!r}: choose one of {CONTEXTS}")
  if context == "fixed" and not 0.0 < context_t < 1.0:
    raise ValueError(f"config.sampler.context_t={context_t} must be in (0, 1) for context 'fixed'")
  if guidance_schedule not in SCHEDULES:
    raise ValueError(f"config.sampler.guidance_schedule={guidance_schedule!r}: choose one of {SCHEDULES}")
  solver_times(num_steps, t_end)


def check_kwargs(kwargs) -> None:
  """Checks `sample`'s keywords (config.sampler; the rest at their defaults) before anything is traced."""
  parameters = inspect.signature(sample).parameters
  check(**{k: kwargs.get(k, parameters[k].default) for k in inspect.signature(check).parameters})


def sample(model, params, rng, *, num_samples: int = 8, labels: jax.Array | None = None, num_steps: int = 40,
           solver: str = "sde", t_end: float = 0.04, noise_scale: float = 1.0, guidance_scale: float | None = None,
           guidance_schedule: str = "linear", context: str = "clean", context_t: float = 0.1,
           use_cache: bool = True, cache_phases: int = 2, prompt: jax.Array | None = None,
           given_entities: int = 0) -> jax.Array:
  """Draws `num_samples` token grids [B, h, w, C] entity by entity (module docstring); jit it whole.

  model: an nbp.models.xar.XAR (or anything with its `entities`, `seq_len`,
    `token_dim`, `num_classes`, `teacher_forcing` and `apply`).
  labels: int [B] classes (default 0, 1, 2, ... mod num_classes).
  num_steps: solver steps (model calls) per entity; t_end: where the last
    stochastic step ends before the final deterministic one.
  solver: "sde" (Euler-Maruyama) or "ode" (Euler); noise_scale scales the SDE's noise.
  guidance_scale: None for the conditional model alone; a number runs the doubled
    batch with the scale growing linearly over the entities (guidance_schedule
    "linear"; "constant" keeps it).
  context: what the cache keeps of a finished entity: "clean", "t_end" or
    "fixed" (at the level context_t).
  use_cache: False runs full forward passes instead of the KV cache (the reference).
  prompt, given_entities: a token grid [B, h, w, C] whose first `given_entities`
    entities are given (entities of one size): they are returned unchanged, and
    one call writes them into the cache as the `context` mode keeps a finished
    entity ("t_end": noised to t_end, as the last solver call would see it;
    their noise is fold_in(rng, K)); the AR loop then starts at the next entity.
    Video frames as entities make this next-frame prediction.
  """
  check(num_steps=num_steps, t_end=t_end, solver=solver, context=context, context_t=context_t,
        guidance_schedule=guidance_schedule)
  ents = model.entities
  b, c, s = num_samples, model.token_dim, model.seq_len
  guided = guidance_scale is not None
  rows = 2 * b if guided else b
  labels = jnp.arange(b, dtype=jnp.int32) % model.num_classes if labels is None else labels
  row_labels = jnp.concatenate([labels, jnp.full((b,), model.num_classes, jnp.int32)]) if guided else labels
  times_np = solver_times(num_steps, t_end)
  times = jnp.asarray(times_np)
  last_t = float(times_np[-2])  # the last solver call's time (t_end)

  def velocity(state, x, t, start):
    """v [rows, L, C] of the current entity x [B, L, C] at slots start..; the state with its keys written."""
    length = x.shape[1]
    inputs = jnp.concatenate([x, x]) if guided else x  # [rows, L, C]
    t_tokens = jnp.full((rows, length), t, jnp.float32)
    if use_cache:
      cache = attention_lib.set_cache_index(state, start)
      slots = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (rows, length))
      v, state = decoding.apply_decoding(model, params, cache, inputs, t_tokens, row_labels, slots=slots)
    else:  # the whole sequence: the context so far, this entity at its slots, zeros after
      seq_x, seq_t = state
      seq_x = jax.lax.dynamic_update_slice(seq_x, inputs, (0, start, 0))
      seq_t = jax.lax.dynamic_update_slice(seq_t, t_tokens, (0, start))
      v = jax.lax.dynamic_slice_in_dim(model.apply({"params": params}, seq_x, seq_t, row_labels), start, length, 1)
    return v, state

  def entity_step(k, start, length, state, out):
    """Integrates entity k (slots start..start+L-1) from noise to t = 0; writes its context and `out`."""
    key = jax.random.fold_in(rng, k)
    scale = guidance_scale_at(k, ents.num_entities, guidance_scale, guidance_schedule) if guided else None

    def guided_velocity(state, x, t):
      v, state = velocity(state, x, t, start)
      return (decoding.guide(v, scale) if guided else v), state

    def step(j, carry):
      x, state = carry
      v, state = guided_velocity(state, x, times[j])
      noise = jax.random.normal(jax.random.fold_in(key, j + 1), x.shape)
      return solver_step(x, v, times[j], times[j + 1], noise, solver=solver, noise_scale=noise_scale), state

    x = jax.random.normal(key, (b, length, c))
    x, state = jax.lax.fori_loop(0, num_steps - 1, step, (x, state))
    last_input = x  # what the last call sees: the "t_end" context, already in the cache
    v, state = guided_velocity(state, x, times[num_steps - 1])
    x = solver_step(x, v, times[num_steps - 1], 0.0, None, solver=solver)  # the final deterministic step
    if context == "t_end":
      context_x, time = last_input, last_t
    elif context == "clean":
      context_x, time = x, 0.0
    else:  # "fixed": the finished entity noised again, with noise of its own
      noise = jax.random.normal(jax.random.fold_in(key, num_steps), x.shape)
      context_x, time = (1.0 - context_t) * x + context_t * noise, context_t
    if use_cache and context != "t_end":  # one more call writes the context's keys and values
      _, state = velocity(state, context_x, time, start)
    elif not use_cache:
      seq_x, seq_t = state
      written = jnp.concatenate([context_x, context_x]) if guided else context_x
      state = (jax.lax.dynamic_update_slice(seq_x, written, (0, start, 0)),
               jax.lax.dynamic_update_slice(seq_t, jnp.full((rows, length), time, jnp.float32), (0, start)))
    return state, jax.lax.dynamic_update_slice(out, x, (0, start, 0))

  out = jnp.zeros((b, s, c), jnp.float32)
  if use_cache:
    state = decoding.init_cache(model, ents.sizes[0], jnp.zeros((rows, 1, c)), jnp.zeros((rows, 1)), row_labels)
  else:
    state = (jnp.zeros((rows, s, c), jnp.float32), jnp.zeros((rows, s), jnp.float32))
  k0 = 0
  if prompt is not None:
    if not ents.uniform or not 0 < given_entities < ents.num_entities:
      raise ValueError(f"a prompt needs entities of one size and 0 < given_entities < {ents.num_entities}; got "
                       f"given_entities={given_entities} ({ents.kind} entities)")
    k0 = given_entities
    given_len = k0 * ents.sizes[0]
    given = ents.decompose(prompt.astype(jnp.float32))[:, :given_len]  # [B, G, C]
    out = out.at[:, :given_len].set(given)
    noise = jax.random.normal(jax.random.fold_in(rng, ents.num_entities), given.shape)
    level = {"clean": 0.0, "t_end": last_t, "fixed": context_t}[context]
    context_x = (1.0 - level) * given + level * noise
    if use_cache:
      state = attention_lib.resize_cache(state, given_len)
      _, state = velocity(state, context_x, level, 0)
    else:
      seq_x, seq_t = state
      written = jnp.concatenate([context_x, context_x]) if guided else context_x
      state = (seq_x.at[:, :given_len].set(written), seq_t.at[:, :given_len].set(level))
  if ents.uniform:
    length = ents.sizes[0]

    def ar_step(k, state, out):
      return entity_step(k, k * length, length, state, out)

    if use_cache:
      state, out = decoding.decode_in_phases(ar_step, state, out, k0, ents.num_entities,
                                             cache_len=lambda k1: k1 * length, phases=cache_phases)
    else:
      state, out = jax.lax.fori_loop(k0, ents.num_entities, lambda k, so: ar_step(k, *so), (state, out))
  else:  # entities of several sizes (scales): one traced step per entity, the cache grown to each one's end
    for k, (start, length) in enumerate(zip(ents.starts.tolist(), ents.sizes)):
      if use_cache:
        state = attention_lib.resize_cache(state, start + length)
      state, out = entity_step(k, start, length, state, out)
  return ents.reconstruct(out)


def sampler_kwargs(sampler_cfg) -> dict:
  """`sample`'s keywords from `config.sampler`; guidance scale 1 means no guidance (the same velocities)."""
  kwargs = dict(sampler_cfg)
  if kwargs.get("guidance_scale") == 1.0:
    kwargs["guidance_scale"] = None
  return kwargs
