"""The one training loop shared by every model family.

Start order of a run:
  1. resume from the latest complete checkpoint in `workdir` (state and data
     iterator), else
  2. take the parameters of `config.init_from`, else
  3. initialise from `config.seed`.

The state is built abstractly (`jax.eval_shape`), its shardings derived from the
logical axis names in the model and `config.axis_rules`, then materialised with
`jax.jit(init, out_shardings=...)`. The train step is jitted once with the state
donated. Every step's RNG is the base RNG folded with the step, so a resumed run
repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from nbp import checkpoint as checkpoint_lib
from nbp import config as config_lib
from nbp import families
from nbp import metrics as metrics_lib
from nbp import optim
from nbp import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any  # None when config.optimizer.ema_decay == 0


@dataclasses.dataclass(eq=False)  # hashed by identity: jitted functions are cached per Setup
class Setup:
  """Everything built from a config before the first compilation."""

  config: ml_collections.ConfigDict
  task: families.Task
  mesh: jax.sharding.Mesh
  rules: tuple
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
  state_sharding: Any
  batch_sharding: jax.sharding.NamedSharding

  @contextlib.contextmanager
  def context(self):
    """The mesh and the axis rules, for tracing model code."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield


def setup(config: ml_collections.ConfigDict, devices=None) -> Setup:
  """Checks the config against the devices and builds the abstract state."""
  module = families.family_module(config.family)
  config_lib.validate(config, module.MODEL_FIELDS, module.DATA_FIELDS)
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in config.axis_rules)
  sharding.check_batch_size(config.batch_size, mesh, rules, grad_accum_steps=config.grad_accum_steps)
  task = module.make_task(config)
  tx, schedule = optim.make_optimizer(config.optimizer, config.num_steps)
  init = _init_fn(task, tx, config.optimizer.ema_decay)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init, jax.random.key(0))
  state_sharding = sharding.logical_sharding(boxed, mesh, rules)
  abstract = checkpoint_lib.abstract_with_shardings(nn.meta.unbox(boxed), state_sharding)
  return Setup(config, task, mesh, rules, tx, schedule, abstract, state_sharding,
               sharding.batch_sharding(mesh, rules))


def _init_fn(task: families.Task, tx, ema_decay: float):
  def init(rng):
    variables = task.model.init({"params": rng, "dropout": rng}, **task.init_inputs())
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), ema_params=params if ema_decay else None)
  return init


def init_state(s: Setup, seed: int) -> TrainState:
  init = _init_fn(s.task, s.tx, s.config.optimizer.ema_decay)
  with s.context():
    return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=s.state_sharding)(jax.random.key(seed))


def _microbatches(batch, n: int):
  """[B, ...] -> [n, B/n, ...], micro-batch i holding rows i, i+n, ... (shard-local)."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


def train_step(state: TrainState, batch, base_rng, *, task: families.Task, tx, schedule,
               grad_accum_steps: int, ema_decay: float):
  """One optimizer step, gradients accumulated over `grad_accum_steps` micro-batches."""
  rng = jax.random.fold_in(base_rng, state.step)
  grad_fn = jax.value_and_grad(task.loss, has_aux=True)
  if grad_accum_steps == 1:
    (loss, metrics), grads = grad_fn(state.params, batch, rng)
  else:
    micro = _microbatches(batch, grad_accum_steps)
    def accumulate(total, xs):
      index, micro_batch = xs
      out = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, index))
      return jax.tree.map(jnp.add, total, out), None
    shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro), rng)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro))
    (loss, metrics), grads = jax.tree.map(lambda x: x / grad_accum_steps, total)
    if "num_tokens" in metrics:  # a count: summed over micro-batches, not averaged
      metrics = dict(metrics, num_tokens=metrics["num_tokens"] * grad_accum_steps)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    ema = optax.incremental_update(params, ema, step_size=1.0 - ema_decay)
  metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads), lr=schedule(state.step))
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics


def compile_train_step(s: Setup):
  step = functools.partial(train_step, task=s.task, tx=s.tx, schedule=s.schedule,
                           grad_accum_steps=s.config.grad_accum_steps,
                           ema_decay=s.config.optimizer.ema_decay)
  return jax.jit(step, in_shardings=(s.state_sharding, s.batch_sharding, sharding.replicated(s.mesh)),
                 out_shardings=(s.state_sharding, sharding.replicated(s.mesh)), donate_argnums=(0,))


@functools.cache
def compile_eval_step(s: Setup):
  evaluate = s.task.evaluate or s.task.loss
  def step(params, batch, rng):
    out = evaluate(params, batch, rng)
    return dict(out[1], loss=out[0]) if isinstance(out, tuple) else out
  return jax.jit(step, in_shardings=(s.state_sharding.params, s.batch_sharding, sharding.replicated(s.mesh)),
                 out_shardings=sharding.replicated(s.mesh))


@functools.cache
def compile_sampler(s: Setup):
  """The family's sampler jitted whole; samples come back replicated on every host."""
  return jax.jit(s.task.sample, out_shardings=sharding.replicated(s.mesh))


def data_iterator(s: Setup, split: str, seed: int):
  local = s.config.batch_size // jax.process_count()
  return s.task.data(split, seed=seed, process_index=jax.process_index(),
                     process_count=jax.process_count(), batch_size=local)


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps (all hosts agree)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, no preemption saves
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming if it holds a checkpoint.

  Returns the last logged metrics plus "status": "done" or "preempted".
  """
  s = setup(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint_lib.Checkpoints(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
  train_iter = data_iterator(s, "train", config.seed)

  latest = ckpt.latest_step()
  if latest is not None:
    logging.warning("Resuming from %s at step %d.", ckpt.directory, latest)
    state = ckpt.restore(latest, s.abstract_state, train_iter)
  elif config.init_from:
    step, loaded = checkpoint_lib.restore_params(config.init_from, s.abstract_state)
    logging.info("Starting from the parameters of %s (step %d).", config.init_from, step)
    state = init_state(s, config.seed).replace(params=loaded.params, ema_params=loaded.ema_params)
  else:
    state = init_state(s, config.seed)

  writer = metrics_lib.MetricWriter(workdir)
  base_rng = jax.random.key(config.seed + 1)
  with s.context():
    step_fn = compile_train_step(s)
  start = int(state.step)
  pending: list[tuple[int, dict]] = []  # per-step metrics not yet fetched
  last: dict[str, Any] = {}
  status = "done"
  tick, tick_step = time.perf_counter(), start
  profile_first, profile_count = (tuple(config.profile_steps) or (-1, 0))
  tracing = False

  def flush_metrics() -> dict[str, float]:
    """Fetches pending metrics, stops on NaN/Inf, returns their means."""
    nonlocal pending
    fetched = [(i, jax.device_get(m)) for i, m in pending]
    pending = []
    bad = metrics_lib.first_nonfinite(fetched)
    if bad is not None:
      raise FloatingPointError(f"Non-finite {bad[1]} at step {bad[0]}; stopping (the last checkpoint is kept).")
    if not fetched:
      return {}
    return {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}

  progress = tqdm(total=config.num_steps, initial=start, disable=jax.process_index() != 0,
                  desc=f"train {config.family}", unit="step", dynamic_ncols=True)
  with _Preemption() as preemption, s.context():
    for step in range(start, config.num_steps):
      if step == profile_first:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
        tracing = True
      batch = sharding.global_batch(next(train_iter), s.batch_sharding)
      state, metrics = step_fn(state, batch, base_rng)
      pending.append((step + 1, metrics))
      done = step + 1
      progress.update(1)
      if tracing and done >= profile_first + profile_count:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        tracing = False

      is_last = done == config.num_steps
      preempted = preemption.agreed()
      if done % config.log_every == 0 or is_last or preempted or done % config.checkpoint_every == 0:
        means = flush_metrics()
        now = time.perf_counter()
        steps = done - tick_step
        if means and steps:
          rate = steps / (now - tick)
          means["steps_per_sec"] = rate
          means["examples_per_sec"] = rate * config.batch_size
          if "num_tokens" in means:
            means["tokens_per_sec"] = rate * means["num_tokens"]
          writer.write(done, means)
          progress.set_postfix(loss=f"{means['loss']:.4f}", steps_per_s=f"{rate:.2f}")
          last = means
        tick, tick_step = now, done

      if (config.eval_every and done % config.eval_every == 0) or is_last:
        evaluate(s, state, done, writer)
      if (config.sample_every and done % config.sample_every == 0) or is_last:
        write_samples(s, state, done, os.path.join(workdir, "samples"), writer)
      if done % config.checkpoint_every == 0 or is_last or preempted:
        ckpt.save(done, state, train_iter)
      if preempted:
        logging.warning("SIGTERM: saved step %d, exiting.", done)
        status = "preempted"
        break
  progress.close()
  ckpt.close()
  writer.close()
  return dict(last, status=status, step=int(state.step))


def evaluate(s: Setup, state: TrainState, step: int, writer: metrics_lib.MetricWriter | None = None,
             params=None) -> dict[str, float]:
  """Averages the family's evaluation over `config.eval_steps` test batches."""
  eval_step = compile_eval_step(s)
  params = state.params if params is None else params
  it = data_iterator(s, "test", s.config.seed)
  rng = jax.random.key(s.config.seed + 2)
  totals: list[dict] = []
  for i in range(s.config.eval_steps):
    batch = sharding.global_batch(next(it), s.batch_sharding)
    totals.append(jax.device_get(eval_step(params, batch, jax.random.fold_in(rng, i))))
  means = {f"eval/{k}": float(np.mean([t[k] for t in totals])) for k in totals[0]}
  if writer is not None:
    writer.write(step, means)
  return means


def write_samples(s: Setup, state: TrainState, step: int, out_dir: str,
                  writer: metrics_lib.MetricWriter | None = None) -> dict[str, float]:
  if s.task.sample is None:
    return {}
  params = state.ema_params if state.ema_params is not None else state.params
  samples = jax.device_get(compile_sampler(s)(params, jax.random.fold_in(jax.random.key(s.config.seed + 3), step)))
  out = {}
  if s.task.write_samples is not None and jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    out = {f"sample/{k}": v for k, v in s.task.write_samples(samples, out_dir, step).items()}
    if writer is not None and out:
      writer.write(step, out)
  return out


def load_state(config: ml_collections.ConfigDict, workdir: str) -> tuple[Setup, TrainState]:
  """The setup and latest state of a workdir (for sampling and evaluation)."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory) or checkpoint_lib.Checkpoints(directory, keep=1).latest_step() is None:
    raise FileNotFoundError(f"No checkpoint in workdir {workdir!r}: train first (experiments.train).")
  s = setup(config)
  _, state = checkpoint_lib.restore_params(directory, s.abstract_state)
  return s, state
