"""The one training loop shared by every model family.

Start order of a run:
  1. resume from the newest readable checkpoint in `workdir` (state and data
     iterator; a damaged step is skipped with a warning naming it), else
  2. take the parameters (and EMA) of `config.init_from`, with a fresh
     optimizer at step 0, else
  3. initialise from `config.seed`.

Evaluation (`config.evals`, nbp.evaluators) runs on schedule and at the end on
the EMA parameters when the run keeps them, else on the parameters; the
results say which ("eval/uses_ema"). Evaluators read the validation split;
`config.eval_test_at_end` adds one pass over the test split after the last
step, logged under "test/".

The state is built abstractly (`jax.eval_shape`), its shardings derived from the
logical axis names in the model and `config.axis_rules`, then materialised with
`jax.jit(init, out_shardings=...)`. The train step is jitted once with the state
donated, and compiled ahead of time on the first batch. Every step's RNG is the
base RNG folded with the step, so a resumed run repeats exactly what an
uninterrupted one would have done.

Every log line carries the step rate and the model FLOPs utilisation ("mfu"):
XLA's FLOP count of the compiled step times the steps per second, over the
matmul rate measured at start-up (nbp.roofline.peak_matmul_rate, per device;
on CPU the host's rate split among its devices, which share its cores).
The step rate counts training steps only: time spent in evaluators and
checkpoint saves is left out.
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

from nbp import evaluators
from nbp import roofline
from nbp import tasks as tasks_lib
from nbp.data import pipeline
from nbp.training import checkpoint as checkpoint_lib
from nbp.training import config as config_lib
from nbp.training import metrics as metrics_lib
from nbp.training import optim
from nbp.training import sharding
from nbp.training import workdir as workdir_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any  # None when config.optimizer.ema_decay == 0
  loss_state: Any = None  # what a stateful loss carries between steps (Task.init_loss_state); None for most


@dataclasses.dataclass(eq=False)  # hashed by identity: jitted functions are cached per Setup
class Setup:
  """Everything built from a config before the first compilation."""

  config: ml_collections.ConfigDict
  task: tasks_lib.Task
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
  config_lib.validate(config)
  tasks_lib.check_config(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in config.axis_rules)
  sharding.check_batch_size(config.batch_size, mesh, rules, grad_accum_steps=config.grad_accum_steps)
  task = tasks_lib.make_task(config)
  if task.init_loss_state is not None and config.grad_accum_steps != 1:
    raise ValueError(f"config.grad_accum_steps={config.grad_accum_steps}: family {config.family!r} carries state "
                     "from step to step in its loss (e.g. a replay buffer); accumulation is not supported, use 1.")
  tx, schedule = make_optimizer(config, task)
  init = _init_fn(task, tx, config.optimizer.ema_decay)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init, jax.random.key(0))
  state_sharding = sharding.logical_sharding(boxed, mesh, rules)
  abstract = checkpoint_lib.abstract_with_shardings(nn.meta.unbox(boxed), state_sharding)
  return Setup(config, task, mesh, rules, tx, schedule, abstract, state_sharding,
               sharding.batch_sharding(mesh, rules))


def make_optimizer(config: ml_collections.ConfigDict, task: tasks_lib.Task):
  """The optimizer of `config.optimizer`, or one per parameter group (optax.multi_transform).

  A task with `param_labels` (e.g. a GAN's "discriminator") gets one optimizer
  per group: the group "model" uses config.optimizer, any other group g
  config.optimizer with the keys of config.param_groups[g] replaced. Returns
  (tx, the schedule of the "model" group, for logging).
  """
  groups = dict(config.get("param_groups", {}))
  if task.param_labels is None:
    if groups:
      raise ValueError(f"config.param_groups={sorted(groups)} but family {config.family!r} has one "
                       "parameter group.")
    return optim.make_optimizer(config.optimizer, config.num_steps)
  txs, schedules = {}, {}
  for group in ("model", *sorted(set(groups) - {"model"})):
    cfg = config.optimizer.copy_and_resolve_references()
    for key, value in groups.get(group, {}).items():
      if key not in cfg:
        raise ValueError(f"Unknown config key 'config.param_groups.{group}.{key}'; "
                         f"known: {sorted(cfg.keys())}")
      cfg[key] = value
    txs[group], schedules[group] = optim.make_optimizer(cfg, config.num_steps)
  labels = lambda params: _unboxed_labels(task.param_labels, params)
  return optax.multi_transform(txs, labels), schedules["model"]


def _unboxed_labels(param_labels, params):
  """Group labels for `params`, boxed or not (the state is initialised with logical-axis boxes)."""
  labels = param_labels(nn.meta.unbox(params))
  return jax.tree.map(lambda p, label: label, params, labels,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def loss_and_grad(loss_fn: tasks_lib.LossFn, params, batch, rng, param_labels=None):
  """((loss, metrics), grads) of a task's loss.

  A loss that returns one objective per parameter group ({group: scalar},
  with the task's `param_labels`) is differentiated group by group: each
  group's gradient is that of its own objective only (one forward pass, one
  VJP per group), and the reported loss is the "model" objective.
  """
  out, pullback, metrics = jax.vjp(lambda p: loss_fn(p, batch, rng), params, has_aux=True)
  if not isinstance(out, dict):
    (grads,) = pullback(jnp.ones_like(out))
    return (out, metrics), grads
  if param_labels is None:
    raise ValueError(f"the loss returned one objective per group {sorted(out)} but the task has no param_labels")
  labels = param_labels(params)
  grads = None
  for group in out:
    (g,) = pullback({k: jnp.full_like(v, 1.0 if k == group else 0.0) for k, v in out.items()})
    g = jax.tree.map(lambda x, label: x if label == group else jnp.zeros_like(x), g, labels)
    grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
  metrics = dict(metrics, **{f"loss_{k}": v for k, v in out.items()})
  return (out["model"], metrics), grads


def _init_fn(task: tasks_lib.Task, tx, ema_decay: float):
  def init(rng):
    variables = task.model.init({"params": rng, "dropout": rng}, **task.init_inputs())
    params = variables["params"]
    loss_state = task.init_loss_state() if task.init_loss_state is not None else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params if ema_decay else None, loss_state=loss_state)
  return init


def init_state(s: Setup, seed: int) -> TrainState:
  init = _init_fn(s.task, s.tx, s.config.optimizer.ema_decay)
  with s.context():
    return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=s.state_sharding)(jax.random.key(seed))


def _paths(params) -> list[str]:
  return ["/".join(map(str, k)) for k in flax.traverse_util.flatten_dict(flax.core.unfreeze(params))]


def _overlay(fresh, loaded):
  """`fresh` parameters with every leaf `loaded` also has replaced by the loaded one (same tree type)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(fresh))
  flat.update(flax.traverse_util.flatten_dict(flax.core.unfreeze(loaded)))
  merged = flax.traverse_util.unflatten_dict(flat)
  return flax.core.freeze(merged) if isinstance(fresh, flax.core.FrozenDict) else merged


def _microbatches(batch, n: int):
  """[B, ...] -> [n, B/n, ...], micro-batch i holding rows i, i+n, ... (shard-local)."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


_LOSS_STATE = "__loss_state__"  # the metrics key a stateful loss's new state travels under inside train_step


def train_step(state: TrainState, batch, base_rng, *, task: tasks_lib.Task, tx, schedule,
               grad_accum_steps: int, ema_decay: float):
  """One optimizer step, gradients accumulated over `grad_accum_steps` micro-batches.

  A loss whose metrics hold "num_targets" (the number of loss terms its mean is
  over, e.g. weighted tokens) has its micro-batches weighted by that count: the
  loss, the gradients and every other metric are count-weighted means, so
  accumulating a per-target mean gives the full-batch step however unevenly the
  targets fall into micro-batches, and "num_targets" is reported summed.
  Without it, every micro-batch weighs the same.
  """
  rng = jax.random.fold_in(base_rng, state.step)
  loss_fn = task.loss
  if state.loss_state is not None:  # a stateful loss: its new state rides in the metrics until the step ends
    def loss_fn(params, batch, rng):
      loss, metrics, new_state = task.loss(params, batch, rng, state.loss_state)
      return loss, dict(metrics, **{_LOSS_STATE: new_state})
  grad_fn = functools.partial(loss_and_grad, loss_fn, param_labels=task.param_labels)
  if grad_accum_steps == 1:
    (loss, metrics), grads = grad_fn(state.params, batch, rng)
  else:
    def weighted(index, micro_batch):
      """The micro-batch's weight, and its (loss, metrics, grads) times that weight."""
      (loss, metrics), grads = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, index))
      metrics = dict(metrics)
      count = metrics.pop("num_targets", None)
      weight = jnp.ones((), jnp.float32) if count is None else jnp.asarray(count, jnp.float32)
      loss, metrics = jax.tree.map(lambda x: x * weight, (loss, metrics))
      grads = jax.tree.map(lambda g: (g * weight).astype(g.dtype), grads)
      if count is not None:
        metrics["num_targets"] = weight  # the weights add up to the step's count
      return weight, (loss, metrics, grads)

    def accumulate(total, xs):
      return jax.tree.map(jnp.add, total, weighted(*xs)), None

    micro = _microbatches(batch, grad_accum_steps)
    shapes = jax.eval_shape(weighted, 0, jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    (total, (loss, metrics, grads)), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(grad_accum_steps), micro))
    # No targets in the whole batch: every weighted sum is 0, and so is its mean.
    total = jnp.where(total > 0, total, 1.0)
    loss = loss / total
    grads = jax.tree.map(lambda g: (g / total).astype(g.dtype), grads)
    metrics = {k: v if k == "num_targets" else v / total for k, v in metrics.items()}
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    ema = optax.incremental_update(params, ema, step_size=1.0 - ema_decay)
  metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads), lr=schedule(state.step))
  loss_state = metrics.pop(_LOSS_STATE, None)
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                    loss_state=loss_state), metrics


def compile_train_step(s: Setup):
  step = functools.partial(train_step, task=s.task, tx=s.tx, schedule=s.schedule,
                           grad_accum_steps=s.config.grad_accum_steps,
                           ema_decay=s.config.optimizer.ema_decay)
  return jax.jit(step, in_shardings=(s.state_sharding, s.batch_sharding, sharding.replicated(s.mesh)),
                 out_shardings=(s.state_sharding, sharding.replicated(s.mesh)), donate_argnums=(0,))


def aot_compile(step_fn, state: TrainState, batch, rng):
  """(the compiled train step, its FLOPs as XLA counts them, or None where XLA gives no count)."""
  compiled = step_fn.lower(state, batch, rng).compile()
  try:
    return compiled, roofline.compiled_flops(compiled)
  except ValueError:
    return compiled, None


def compile_on_data(s: Setup, seed: int = 0):
  """The train step compiled on a real batch of the training data: (compiled, its FLOPs as XLA counts them or
  None, the initial state, the batch), for benchmarks and budgets."""
  state = init_state(s, seed)
  batch = sharding.global_batch(next(data_iterator(s, "train", seed)), s.batch_sharding)
  with s.context():
    compiled, flops = aot_compile(compile_train_step(s), state, batch, jax.random.key(0))
  return compiled, flops, state, batch


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
  ckpt = checkpoint_lib.Checkpoints(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                                      keep_steps=tuple(config.keep_checkpoint_steps))
  train_iter = data_iterator(s, "train", config.seed)

  # The newest step that restores: a damaged one is skipped with a warning
  # (and moved aside when this run saves that step again, see checkpoint.py).
  resumed = ckpt.restore_latest(s.abstract_state, train_iter)
  if resumed is not None:
    latest, state = resumed
    logging.warning("Resuming from %s at step %d.", ckpt.directory, latest)
  elif config.init_from:
    # Parameters only (and the EMA when both runs keep one): a fresh optimizer and step 0.
    names = ("params", "ema_params") if s.abstract_state.ema_params is not None else ("params",)
    step, loaded = checkpoint_lib.restore_params(config.init_from, s.abstract_state.params, names,
                                                 missing_ok=True)
    state = init_state(s, config.seed)
    new = sorted(set(_paths(state.params)) - set(_paths(loaded["params"])))
    logging.info("Starting from the parameters of %s (step %d)%s.", config.init_from, step,
                 f"; initialised afresh, as it has none: {new}" if new else "")
    ema = None
    if state.ema_params is not None:  # the EMA starts at the loaded average, or at the loaded parameters
      ema = loaded["ema_params"] if loaded.get("ema_params") is not None else loaded["params"]
      ema = _overlay(state.ema_params, ema)
    state = state.replace(params=_overlay(state.params, loaded["params"]), ema_params=ema)
  else:
    state = init_state(s, config.seed)

  writer = metrics_lib.MetricWriter(workdir)
  workdir_lib.write_config(workdir, config)
  scheduled = evaluators.build(config.evals)  # fails on a bad config.evals before the first step
  evaluators.check_predict_fns(scheduled, s.task)
  base_rng = jax.random.key(config.seed + 1)
  with s.context():
    step_fn = compile_train_step(s)
  step_flops = None  # set with the compiled step, on the first batch
  peak = roofline.peak_matmul_rate(config.model.get("dtype", "float32"))  # FLOP/s, per device
  if jax.default_backend() == "cpu":  # CPU devices (--num_cpu_devices) share one host's cores
    peak /= jax.local_device_count()
  compiled = False
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
      data_position = train_iter.get_state()  # before this batch: saved with the state if reading it fails
      try:
        local_batch = next(train_iter)
      except pipeline.DataCorruptionError as e:
        # Keep the steps since the last checkpoint: the state after `step` steps
        # with the data position before the failed batch, so the run resumed
        # after rebuilding the data reads that batch again, as an uninterrupted
        # run would have.
        if ckpt.has_step(step):
          note = f"Step {step} is already saved in {ckpt.directory}."
        elif jax.process_count() > 1:  # a save needs every process, and the others are mid-step
          note = f"Step {step} is not saved (several processes); the last checkpoint is kept."
        else:
          ckpt.save(step, state, data_state=data_position)
          ckpt.close()
          note = f"Saved step {step} in {ckpt.directory}."
        note += " Rerun after rebuilding the data to resume from it."
        logging.error("Stopping at step %d on damaged data: %s %s", step, e, note)
        e.add_note(note)
        raise
      batch = sharding.global_batch(local_batch, s.batch_sharding)
      if not compiled:
        step_fn, step_flops = aot_compile(step_fn, state, batch, base_rng)
        compiled = True
        tick = time.perf_counter()  # the compilation is not a step
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
          if "num_targets" in means:
            means["targets_per_sec"] = rate * means["num_targets"]
          postfix = dict(loss=f"{means['loss']:.4f}", steps_per_s=f"{rate:.2f}")
          if step_flops is not None:
            means["mfu"] = step_flops * rate / peak
            postfix["mfu"] = f"{means['mfu']:.2f}"
          writer.write(done, means)
          progress.set_postfix(**postfix)
          last = means
        tick, tick_step = now, done

      paused = False  # evaluations and saves are not training time
      if any(evaluators.due(every, done, is_last) for every, _ in scheduled.values()):
        run_evaluators(s, *eval_params(state), done, workdir, final=is_last, writer=writer)
        paused = True
      if is_last and config.eval_test_at_end:
        run_evaluators(s, *eval_params(state), done, workdir, final=True, writer=writer, split="test")
      if done % config.checkpoint_every == 0 or is_last or preempted:
        ckpt.save(done, state, train_iter)
        paused = True
      if paused:
        jax.block_until_ready(state)
        tick, tick_step = time.perf_counter(), done
      if preempted:
        logging.warning("SIGTERM: saved step %d, exiting.", done)
        status = "preempted"
        break
  progress.close()
  ckpt.close()
  writer.close()
  return dict(last, status=status, step=int(state.step))


def eval_params(state: TrainState) -> tuple[Any, str]:
  """The parameters evaluation and sampling use, and their name: the EMA when the run keeps one."""
  if state.ema_params is not None:
    return state.ema_params, "ema_params"
  return state.params, "params"


def run_evaluators(s: Setup, params, params_name: str, step: int, workdir: str, *, final: bool,
                   writer: metrics_lib.MetricWriter | None = None, only_due: bool = True,
                   split: str | None = None) -> dict[str, float]:
  """Runs `config.evals` (those due at `step`, or all) on `params`; writes and returns the results.

  split: None, each evaluator reads its own split (validation by default); "test" (or any split) makes
  every evaluator read that one, and its results are logged as "<split>/<name>/<key>".
  """
  context = evaluators.Context(setup=s, params=params, params_name=params_name, step=step, workdir=workdir,
                               rng=jax.random.key(s.config.seed + 2), split=split)
  out = evaluators.run(evaluators.build(s.config.evals), context, final=final, only_due=only_due)
  if split is not None:
    out = {f"{split}/{k}": v for k, v in out.items()}
  if writer is not None and out:
    writer.write(step, out)
  return out


def load_params(config: ml_collections.ConfigDict, workdir: str, step: int | None = None, *, raw: bool = False
                ) -> tuple[Setup, Any, str, int]:
  """(setup, params, params_name, step) of a workdir's newest readable checkpoint (or of `step`), without optimizer
  state.

  params_name is "ema_params" when the run kept an EMA (what evaluation and
  sampling use) and `raw` is not set, else "params". The parameters lie on
  the run's shardings.
  """
  s = setup(config)
  params, name, step = workdir_lib.load_params(workdir, s.task.model, s.task.init_inputs(), step=step, raw=raw)
  return s, jax.device_put(params, s.state_sharding.params), name, step
