"""The shared training loop: config errors, one end-to-end step, resume, preemption, sharding."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import flax.linen as nn
import imageio.v3 as imageio
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nbp.training import checkpoint as checkpoint_lib
from nbp.training import loop as train
from nbp.training import metrics as metrics_lib
from nbp.training import optim
from tests.conftest import REPO, config_flags_for, run_module, tiny_ntp_config


# ---------------------------------------------------------------------------
# Config errors, raised before any compilation.

def test_unknown_config_key_is_named(data_dir):
  config = tiny_ntp_config(data_dir)
  config.unlock()
  config.model.widht = 3
  with pytest.raises(ValueError, match=r"config\.model\.widht"):
    train.setup(config)
  config = tiny_ntp_config(data_dir)
  config.unlock()
  config.lr = 3
  with pytest.raises(ValueError, match=r"config\.lr"):
    train.setup(config)


def test_unknown_key_on_the_command_line_fails(tmp_path):
  result = run_module(["-m", "experiments.train", "--config", "experiments/configs/ntp_digits.py:tiny,local",
                       "--workdir", str(tmp_path), "--config.model.widht=3"], timeout=120)
  assert result.returncode != 0
  assert "widht" in result.stderr


def test_mesh_that_does_not_match_the_devices(data_dir):
  config = tiny_ntp_config(data_dir, mesh=(("data", 4), ("fsdp", 1), ("tensor", 1)))
  with pytest.raises(ValueError, match=r"config\.mesh .* needs 4 devices, but there are 1"):
    train.setup(config)


def test_batch_that_does_not_divide(data_dir):
  config = tiny_ntp_config(data_dir, batch_size=6, grad_accum_steps=4)
  with pytest.raises(ValueError, match=r"config\.batch_size=6 is not divisible by config\.grad_accum_steps=4"):
    train.setup(config)
  # A 4-way data axis (the arithmetic only needs the mesh's shape).
  four_way = type("FourWayMesh", (), {"shape": {"data": 4}})()
  with pytest.raises(ValueError, match=r"config\.batch_size=6 .* must be a multiple of 4"):
    train.sharding.check_batch_size(6, four_way, (("batch", "data"),))


def test_sampling_from_a_workdir_without_checkpoint(tmp_path, data_dir):
  with pytest.raises(FileNotFoundError, match="No checkpoint in workdir"):
    train.load_params(tiny_ntp_config(data_dir), str(tmp_path))


def test_unknown_family_and_size(data_dir):
  config = tiny_ntp_config(data_dir, family="nope")
  with pytest.raises(ValueError, match="config.family='nope'"):
    train.setup(config)
  config = tiny_ntp_config(data_dir)
  config.model.variant = "XXL"
  with pytest.raises(ValueError, match="config.model.variant='XXL'"):
    train.setup(config)


# ---------------------------------------------------------------------------
# The optimizer.

def test_weight_decay_only_on_matrices():
  params = {"dense": {"kernel": np.ones((2, 2)), "bias": np.ones(2)}, "norm": {"scale": np.ones(2)},
            "embed": {"embedding": np.ones((3, 2))}}
  mask = optim.weight_decay_mask(params)
  assert mask == {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False},
                  "embed": {"embedding": True}}
  boxed = {"dense": {"kernel": nn.LogicallyPartitioned(np.ones((2, 2)), ("embed", "mlp")),
                     "bias": nn.LogicallyPartitioned(np.ones(2), ("mlp",))}}
  assert jax.tree.leaves(optim.weight_decay_mask(boxed)) == [False, True]  # bias, kernel


# ---------------------------------------------------------------------------
# End to end in-process.

@pytest.mark.slow
def test_one_step_end_to_end(tmp_path, data_dir):
  config = tiny_ntp_config(data_dir, num_steps=1, checkpoint_every=1)
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["status"] == "done" and result["step"] == 1
  assert np.isfinite(result["loss"])
  rows = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert any("eval/loss" in r for r in rows)
  assert os.path.exists(os.path.join(tmp_path, "samples", "step_0000001.gif"))
  assert os.listdir(os.path.join(tmp_path, "tb"))
  s, params, name, step = train.load_params(config, str(tmp_path))
  assert step == 1 and name == "params"
  with open(os.path.join(tmp_path, "config.json")) as f:
    assert json.load(f)["model"]["variant"] == "tiny"  # the workdir says how it was trained


def _softmax_regression(params, batch, rng, *, report_count=True):
  """A per-target mean loss: weighted cross-entropy of a linear classifier, [B, D] -> [B, C]."""
  del rng
  logits = batch["x"] @ params["kernel"]
  losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], axis=-1)[:, 0]
  count = jnp.sum(batch["weights"])
  correct = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
  metrics = {"accuracy": jnp.sum(correct * batch["weights"]) / jnp.maximum(count, 1.0)}
  if report_count:
    metrics["num_targets"] = count
  return jnp.sum(losses * batch["weights"]) / jnp.maximum(count, 1.0), metrics


def _toy_step(loss, batch, grad_accum_steps):
  """One train_step of plain SGD at rate 1 on a linear classifier: params - grads."""
  params = {"kernel": jax.random.normal(jax.random.key(0), (3, 4))}
  task = train.tasks_lib.Task(model=None, init_inputs=None, loss=loss, data=None)
  tx = optax.sgd(1.0)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                           ema_params=None)
  step = jax.jit(lambda st, b: train.train_step(st, b, jax.random.key(1), task=task, tx=tx,
                                                schedule=optax.constant_schedule(1.0),
                                                grad_accum_steps=grad_accum_steps, ema_decay=0.0))
  state, metrics = step(state, batch)
  return jax.device_get(state.params), jax.device_get(metrics)


def _toy_batch(weights):
  x = jax.random.normal(jax.random.key(2), (len(weights), 3))
  y = jax.random.randint(jax.random.key(3), (len(weights),), 0, 4)
  return {"x": x, "y": y, "weights": jnp.asarray(weights, jnp.float32)}


def test_accumulation_weights_micro_batches_by_num_targets():
  """1 target in one micro-batch, 100 in the other: the accumulated step is the full-batch step."""
  weights = np.zeros(200, np.float32)
  weights[0] = 1.0  # micro-batch 0 holds the even rows: one target
  weights[1::2] = 1.0  # micro-batch 1 holds the odd rows: 100 targets
  batch = _toy_batch(weights)
  full_params, full = _toy_step(_softmax_regression, batch, 1)
  accum_params, accum = _toy_step(_softmax_regression, batch, 2)
  assert float(full["num_targets"]) == float(accum["num_targets"]) == 101.0  # summed, not averaged
  for key in ("loss", "accuracy", "grad_norm"):
    np.testing.assert_allclose(accum[key], full[key], rtol=1e-6, err_msg=key)
  # SGD at rate 1: equal parameters are equal gradients.
  np.testing.assert_allclose(accum_params["kernel"], full_params["kernel"], rtol=1e-6, atol=1e-7)


def test_accumulation_without_num_targets_weighs_micro_batches_equally():
  weights = np.zeros(200, np.float32)
  weights[0] = 1.0
  weights[1::2] = 1.0
  batch = _toy_batch(weights)
  loss = lambda *a: _softmax_regression(*a, report_count=False)
  micro = [jax.tree.map(lambda x, i=i: x[i::2], batch) for i in range(2)]
  singles = [_toy_step(loss, m, 1) for m in micro]
  accum_params, accum = _toy_step(loss, batch, 2)
  assert "num_targets" not in accum
  np.testing.assert_allclose(accum["loss"], np.mean([m["loss"] for _, m in singles]), rtol=1e-6)
  np.testing.assert_allclose(accum["accuracy"], np.mean([m["accuracy"] for _, m in singles]), rtol=1e-6)
  np.testing.assert_allclose(accum_params["kernel"], np.mean([p["kernel"] for p, _ in singles], axis=0),
                             rtol=1e-6, atol=1e-7)


def test_accumulation_of_a_batch_without_targets_is_zero_not_nan():
  batch = _toy_batch(np.zeros(8, np.float32))
  params, metrics = _toy_step(_softmax_regression, batch, 2)
  assert float(metrics["num_targets"]) == 0.0 and float(metrics["loss"]) == 0.0
  assert float(metrics["grad_norm"]) == 0.0 and np.isfinite(params["kernel"]).all()


def test_every_log_line_carries_the_model_flops_utilisation(tmp_path, data_dir, monkeypatch):
  """mfu = XLA's FLOPs of the compiled step x steps/s / the start-up matmul rate, on every log line."""
  monkeypatch.setattr(train.roofline, "peak_matmul_rate", lambda dtype: 1e9)  # a known denominator
  config = tiny_ntp_config(data_dir, num_steps=3, checkpoint_every=3)
  train.train_and_evaluate(config, str(tmp_path))
  rows = [r for r in metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl")) if "loss" in r]
  assert len(rows) == 3
  s = train.setup(config)
  state = train.init_state(s, config.seed)
  batch = train.sharding.global_batch(next(train.data_iterator(s, "train", config.seed)), s.batch_sharding)
  with s.context():
    _, flops = train.aot_compile(train.compile_train_step(s), state, batch, jax.random.key(0))
  assert flops > 0
  for r in rows:
    np.testing.assert_allclose(r["mfu"], flops * r["steps_per_sec"] / 1e9, rtol=1e-6)


def _two_steps(data_dir, batch, grad_accum_steps):
  """Params, loss and metrics after two optimizer steps on `batch`, lr constant from step 0."""
  config = tiny_ntp_config(data_dir, grad_accum_steps=grad_accum_steps)
  config.optimizer.warmup_steps = 0  # step 0 already moves the parameters
  # Updates (~lr per step) far above the tolerance; not larger, since Adam
  # scales the float error of a gradient near eps by up to lr / eps.
  config.optimizer.lr = 1e-3
  s = train.setup(config)
  state = train.init_state(s, 0)
  with s.context():
    step = train.compile_train_step(s)
    metrics = []
    for _ in range(2):  # Adam's first update is ~lr * sign(g); the second depends on the magnitudes too
      state, m = step(state, train.sharding.global_batch(batch, s.batch_sharding), jax.random.key(1))
      metrics.append(jax.device_get(m))
  return jax.device_get(state.params), metrics


@pytest.mark.slow
def test_gradient_accumulation_weights_micro_batches_by_their_targets(data_dir):
  """Micro-batches of 1 and 100 weighted tokens: accumulating 2 equals the full-batch step.

  With equal weights per micro-batch the single token would weigh as much as
  the other 100 together (the loss is a per-token mean in each micro-batch).
  """
  s = train.setup(tiny_ntp_config(data_dir))
  batch = dict(next(train.data_iterator(s, "train", 0)))
  weights = np.zeros(batch["tokens"].shape, np.float32)  # [8, 128]
  weights[0, 5] = 1.0  # micro-batch 0 holds rows 0, 2, 4, 6: one token
  weights[1::2, :25] = 1.0  # micro-batch 1 holds rows 1, 3, 5, 7: 100 tokens
  batch["weights"] = weights
  full_params, full = _two_steps(data_dir, batch, 1)
  accum_params, accum = _two_steps(data_dir, batch, 2)
  for f, a in zip(full, accum):
    assert float(f["num_targets"]) == float(a["num_targets"]) == 101.0
    assert float(f["lr"]) > 0
    for key in ("loss", "grad_norm", "accuracy", "bits_per_token"):
      np.testing.assert_allclose(a[key], f[key], rtol=1e-5, atol=1e-7, err_msg=key)
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(full_params),
                                                           jax.tree.leaves(jax.device_get(train.init_state(s, 0).params))))
  assert moved > 5e-4  # the comparison below is not of two unchanged states
  # 5e-5: 2.5% of the two updates (~2e-3). Adam magnifies the float error of a gradient near zero: on the
  # train split without its validation scans, one element of 4096 in one kernel differs by 1.8e-5. A wrong
  # weighting of the micro-batches changes the gradient itself, which grad_norm above checks at rtol 1e-5.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-5), accum_params, full_params)


@pytest.mark.slow
def test_nan_stops_with_the_step_number(tmp_path, data_dir):
  config = tiny_ntp_config(data_dir, num_steps=3)
  config.optimizer.lr = float("nan")
  with pytest.raises(FloatingPointError, match=r"Non-finite .* at step 1"):
    train.train_and_evaluate(config, str(tmp_path))


def test_experiment_entry_points_import_together():
  """Every experiments/*.py module's absl flags coexist in one process (as in a pytest worker)."""
  names = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "experiments"))
                 if f.endswith(".py") and f != "__init__.py")
  result = run_module(["-c", "import importlib, sys\nfor n in sys.argv[1:]: importlib.import_module('experiments.' + n)",
                       *names], timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_demo_code_path_on_two_devices_and_resumed(tmp_path, data_dir, classifier_workdir):
  """The demo's three stages in a tiny setting, each batch split over 2 CPU devices as `make demo` runs: every
  stage runs there, the tokenizer's decoder and the judge (runs loaded by their workdirs) included, inside the
  training loop's mesh and outside it. A second call resumes every stage instead of redoing it, and judges the
  samples with the classifier it is given."""
  result = run_module(["tests/demo_on_two_devices.py", data_dir, str(tmp_path), classifier_workdir], timeout=600)
  assert result.returncode == 0, result.stderr[-5000:]
  runs = json.loads(result.stdout.strip().splitlines()[-1])
  summary, again = runs["first"], runs["again"]
  for name in ("samples.gif", "samples.png", "reconstructions.gif", "loss.png", "metrics.json"):
    assert os.path.getsize(os.path.join(tmp_path, name)) > 0, name
  assert imageio.imread(os.path.join(tmp_path, "loss.png")).shape[1] == 2 * 500  # one 500-pixel panel per stage
  assert summary["tokenizer"]["steps"] == 2 and summary["tokenizer"]["token_grid"] == [2, 2, 2]
  assert summary["nbp"]["steps"] == 3 and np.isfinite(summary["nbp"]["eval_loss"])
  assert np.isfinite(summary["tokenizer"]["eval_psnr_db"])
  assert set(summary["stage_seconds_this_invocation"]) == {"tokenizer", "tokens", "nbp"}
  assert summary["samples_judged"] is None  # no classifier given
  assert again["nbp"]["steps"] == 3
  assert runs["tokens_written"][1] == runs["tokens_written"][0]  # the tokens were not encoded again
  judged = again["samples_judged"]
  assert judged["classifier"] == classifier_workdir and judged["step"] == 3 and judged["num_videos"] == 4
  assert 0.0 <= judged["class_match"] <= 1.0 and np.isfinite(judged["fvd_digits_classifier"])
  with open(os.path.join(tmp_path, "metrics.json")) as f:
    assert json.load(f)["samples_judged"] == judged


@pytest.mark.slow
def test_loss_falls_in_a_short_run(tmp_path, data_dir):
  config = tiny_ntp_config(data_dir, num_steps=60, log_every=10, checkpoint_every=60)
  config.model.num_layers = 2  # the tiny variant's depth: a test of learning
  config.optimizer.lr = 3e-3
  config.optimizer.warmup_steps = 5
  train.train_and_evaluate(config, str(tmp_path))
  rows = [r for r in metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl")) if "loss" in r]
  assert rows[-1]["loss"] < 0.7 * rows[0]["loss"], rows


# ---------------------------------------------------------------------------
# Kill and resume, preemption (subprocesses running experiments.train).

def _train_cmd(config, workdir, *extra):
  return ["-m", "experiments.train", "--config", "experiments/configs/ntp_digits.py:tiny,local",
          "--workdir", str(workdir), *config_flags_for(config), *extra]


def _final_params(config, workdir):
  _, params, _, step = train.load_params(config, str(workdir))
  return jax.device_get(params), step


def _wait_for_step(workdir, step, proc, timeout=300):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"run ended early: {proc.communicate()}")
    if os.path.exists(path):
      rows = metrics_lib.read_jsonl(path)
      if rows and max(r["step"] for r in rows) >= step:
        return
    time.sleep(0.02)
  raise AssertionError(f"step {step} not reached")


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, data_dir):
  config = tiny_ntp_config(data_dir, num_steps=24, checkpoint_every=4)
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  train.train_and_evaluate(config, str(straight))  # the uninterrupted reference, in-process

  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, *_train_cmd(config, killed)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_step(str(killed), 10, proc)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  saved = sorted(int(d) for d in os.listdir(killed / "checkpoints") if d.isdigit())
  assert saved and saved[-1] < 24, saved  # it really died mid-way, after a save

  result = run_module(_train_cmd(config, killed))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resuming from" in result.stderr
  a, step_a = _final_params(config, straight)
  b, step_b = _final_params(config, killed)
  assert step_a == step_b == 24
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_sigterm_saves_before_exit(tmp_path, data_dir):
  config = tiny_ntp_config(data_dir, num_steps=100000, checkpoint_every=100000, batch_size=32)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, *_train_cmd(config, tmp_path)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_step(str(tmp_path), 5, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  result = json.loads(out.strip().splitlines()[-1])
  assert result["status"] == "preempted"
  saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert saved == [result["step"]] and 5 <= saved[0] < 100000


# ---------------------------------------------------------------------------
# Sharding: 8 fake CPU devices, and two processes.

@pytest.mark.slow
def test_meshes_on_eight_devices_match_one_device(data_dir):
  result = run_module(["tests/sharded_steps.py", data_dir])
  assert result.returncode == 0, result.stderr[-5000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  reference = report.pop("one_device")
  for mesh, losses in report.items():
    np.testing.assert_allclose(losses["losses"], reference["losses"], rtol=2e-5, err_msg=mesh)
    assert losses["max_param_diff"] < 1e-5, (mesh, losses)
    assert losses["sharded_params"] or mesh == "data8", mesh


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path, data_dir):
  config = tiny_ntp_config(data_dir, num_steps=3, checkpoint_every=3)
  train.train_and_evaluate(config, str(tmp_path / "single"))  # the reference, in-process
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, *_train_cmd(config, tmp_path / "multi"),
                             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                             f"--process_id={i}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  single = [r["loss"] for r in metrics_lib.read_jsonl(tmp_path / "single" / "metrics.jsonl") if "loss" in r]
  multi = [r["loss"] for r in metrics_lib.read_jsonl(tmp_path / "multi" / "metrics.jsonl") if "loss" in r]
  assert len(single) == len(multi) == 3
  np.testing.assert_allclose(multi, single, rtol=1e-5)


def _checkpointed_state(s, workdir, step: int):
  """The full TrainState saved at `step` in `workdir` (params, EMA and optimizer state), on the host."""
  ckpt = checkpoint_lib.Checkpoints(os.path.join(workdir, "checkpoints"), keep=100, async_save=False)
  try:
    return jax.device_get(ckpt.restore(step, s.abstract_state))
  finally:
    ckpt.close()


def _max_abs_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
def test_ema_and_profile_trace(tmp_path, data_dir):
  """ema_k = d * ema_(k-1) + (1 - d) * params_k after every step k, from ema_0 = params_0; a trace is written."""
  decay = 0.75  # not 0.5: decay and 1 - decay swapped would pass
  config = tiny_ntp_config(data_dir, num_steps=3, checkpoint_every=1, keep_checkpoints=5, profile_steps=(1, 1))
  config.optimizer.ema_decay = decay
  config.optimizer.warmup_steps = 0  # every step moves the parameters
  train.train_and_evaluate(config, str(tmp_path))
  s = train.setup(config)
  states = [jax.device_get(train.init_state(s, config.seed))]  # what the run started from
  states += [_checkpointed_state(s, str(tmp_path), k) for k in (1, 2, 3)]
  assert _max_abs_diff(states[0].ema_params, states[0].params) == 0
  for k in (1, 2, 3):
    assert int(states[k].step) == k
    assert _max_abs_diff(states[k].params, states[k - 1].params) > 1e-4  # the step moved them
    want = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, states[k - 1].ema_params, states[k].params)
    jax.tree.map(lambda got, w: np.testing.assert_allclose(got, w, rtol=0, atol=1e-6, err_msg=f"step {k}"),
                 states[k].ema_params, want)
  assert _max_abs_diff(states[3].ema_params, states[3].params) > 1e-4  # the average lags the parameters
  traces = [os.path.join(root, f) for root, _, files in os.walk(tmp_path / "profile") for f in files
            if f.endswith(".xplane.pb")]
  assert traces and all(os.path.getsize(t) > 0 for t in traces), traces


@pytest.mark.slow
def test_init_from_takes_parameters_and_ema_but_not_the_optimizer(tmp_path, data_dir, monkeypatch):
  """Run B with init_from = run A's checkpoints starts at step 0 from A's final params and EMA, fresh Adam."""
  config_a = tiny_ntp_config(data_dir, num_steps=2, checkpoint_every=2)
  config_a.optimizer.ema_decay = 0.5
  config_a.optimizer.warmup_steps = 0
  train.train_and_evaluate(config_a, str(tmp_path / "a"))
  s = train.setup(config_a)
  final_a = _checkpointed_state(s, str(tmp_path / "a"), 2)
  fresh_opt_state = jax.device_get(train.init_state(s, config_a.seed).opt_state)
  assert _max_abs_diff(final_a.opt_state, fresh_opt_state) > 0  # A's optimizer state is not a fresh one

  # Record the state the first train step of run B receives (before it is donated).
  started = []
  aot_compile = train.aot_compile

  def recording_compile(step_fn, *args):
    compiled, flops = aot_compile(step_fn, *args)
    def step(state, *args):
      if not started:
        started.append(jax.device_get(state))
      return compiled(state, *args)
    return step, flops

  monkeypatch.setattr(train, "aot_compile", recording_compile)
  config_b = tiny_ntp_config(data_dir, num_steps=1, checkpoint_every=1)
  config_b.optimizer.ema_decay = 0.5
  config_b.init_from = str(tmp_path / "a" / "checkpoints")
  result = train.train_and_evaluate(config_b, str(tmp_path / "b"))
  assert result["step"] == 1 and len(started) == 1
  start = started[0]
  assert int(start.step) == 0
  jax.tree.map(np.testing.assert_array_equal, start.params, final_a.params)
  jax.tree.map(np.testing.assert_array_equal, start.ema_params, final_a.ema_params)
  jax.tree.map(np.testing.assert_array_equal, start.opt_state, fresh_opt_state)
  # B's own checkpoint counts B's steps.
  assert int(_checkpointed_state(s, str(tmp_path / "b"), 1).step) == 1


@pytest.mark.slow
def test_init_from_a_run_without_a_new_module_loads_the_rest(tmp_path, data_dir, monkeypatch):
  """A model with a module its init_from run lacks (NBP's in-block stack) starts from that run's parameters for
  everything else, and from its own initialisation for the new module. With config.optimizer.trainable naming
  the new module, only it trains: the rest is checkpointed unchanged."""
  config_a = tiny_ntp_config(data_dir, num_steps=1, checkpoint_every=1)
  train.train_and_evaluate(config_a, str(tmp_path / "a"))
  final_a = _checkpointed_state(train.setup(config_a), str(tmp_path / "a"), 1)
  started = []
  aot_compile = train.aot_compile

  def recording_compile(step_fn, *args):
    compiled, flops = aot_compile(step_fn, *args)
    return (lambda state, *rest: started.append(jax.device_get(state.params)) or compiled(state, *rest)), flops

  monkeypatch.setattr(train, "aot_compile", recording_compile)
  config_b = tiny_ntp_config(data_dir, num_steps=1, checkpoint_every=1)
  with config_b.unlocked():  # the next-token configs leave the field at its default
    config_b.model.in_block = "causal"
  config_b.init_from = str(tmp_path / "a" / "checkpoints")
  config_b.optimizer.trainable = "^in_block"
  config_b.optimizer.warmup_steps = 0
  train.train_and_evaluate(config_b, str(tmp_path / "b"))
  start = dict(started[0])
  s_b = train.setup(config_b)
  fresh = train.init_state(s_b, config_b.seed).params
  new = {k: start.pop(k) for k in list(start) if k.startswith("in_block")}
  assert sorted(new) == ["in_block_begin", "in_block_embed", "in_block_positions", "in_block_stack"]
  jax.tree.map(np.testing.assert_array_equal, start, dict(final_a.params))
  jax.tree.map(np.testing.assert_array_equal, new, {k: fresh[k] for k in new})
  trained = dict(_checkpointed_state(s_b, str(tmp_path / "b"), 1).params)
  assert _max_abs_diff({k: trained.pop(k) for k in new}, new) > 0
  jax.tree.map(np.testing.assert_array_equal, trained, dict(final_a.params))
  with pytest.raises(checkpoint_lib.CheckpointRestoreError, match="holds none of this model.s parameters"):
    checkpoint_lib.restore_params(str(tmp_path / "a" / "checkpoints"),
                                  {"other": {"kernel": jax.ShapeDtypeStruct((2, 2), np.float32)}}, missing_ok=True)
  config_b.optimizer.trainable = "^no_such_module"
  with pytest.raises(ValueError, match="trainable='\\^no_such_module' matches no parameter"):
    train.setup(config_b)


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_bad_init_from_names_the_path(tmp_path, data_dir, kind):
  path = tmp_path / f"{kind}_checkpoints"
  if kind == "empty":
    path.mkdir()
  config = tiny_ntp_config(data_dir, num_steps=1)
  config.init_from = str(path)
  with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
    train.train_and_evaluate(config, str(tmp_path / "work"))


@pytest.mark.slow
def test_evaluation_and_sampling_use_the_ema_parameters_and_say_so(tmp_path, data_dir):
  """With an EMA kept, load_params, the eval evaluator and the sampler all read ema_params, not params (the raw
  parameters only when asked for)."""
  config = tiny_ntp_config(data_dir, num_steps=3, checkpoint_every=3)
  config.optimizer.ema_decay = 0.5
  config.optimizer.warmup_steps = 0
  result = train.train_and_evaluate(config, str(tmp_path))
  rows = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert [r["eval/uses_ema"] for r in rows if "eval/uses_ema" in r] == [1.0]
  s, params, name, step = train.load_params(config, str(tmp_path))
  state = _checkpointed_state(s, str(tmp_path), 3)
  assert name == "ema_params" and step == 3 == result["step"]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), state.ema_params)
  assert _max_abs_diff(state.ema_params, state.params) > 1e-4
  _, raw, raw_name, _ = train.load_params(config, str(tmp_path), raw=True)  # experiments.evaluate --raw_params
  assert raw_name == "params"
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(raw), state.params)
  # The held-out loss the run logged is that of the EMA parameters, not of the raw ones.
  on = {which: train.run_evaluators(s, p, which, 3, str(tmp_path / which), final=True)
        for which, p in (("ema_params", state.ema_params), ("params", state.params))}
  logged = [r["eval/loss"] for r in rows if "eval/loss" in r][-1]
  np.testing.assert_allclose(logged, on["ema_params"]["eval/loss"], rtol=1e-6)
  assert abs(on["params"]["eval/loss"] - logged) > 1e-5
  # The samples the run wrote at its last step are the EMA parameters' (same key, same tokens).
  expected = open(os.path.join(tmp_path, "samples", "step_0000003.png"), "rb").read()
  assert open(os.path.join(tmp_path / "ema_params", "samples", "step_0000003.png"), "rb").read() == expected


def test_a_checkpoint_written_before_loss_state_existed_still_restores(tmp_path):
  """A train state saved without the loss_state field (every run before it, every stateless family) resumes."""
  import flax  # pylint: disable=g-import-not-at-top

  @flax.struct.dataclass
  class EarlierTrainState:  # the train state as it was: four fields
    step: jax.Array
    params: dict
    opt_state: tuple
    ema_params: dict | None

  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  tx = optax.adam(1e-3)
  old = EarlierTrainState(step=jnp.array(7, jnp.int32), params=params, opt_state=tx.init(params), ema_params=None)
  ckpt = checkpoint_lib.Checkpoints(str(tmp_path), keep=1, async_save=False)
  ckpt.manager.save(7, args=checkpoint_lib.ocp.args.Composite(state=checkpoint_lib.ocp.args.StandardSave(old)))
  ckpt.close()

  new = train.TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params), ema_params=None)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), new)
  step, state = checkpoint_lib.restore_state(str(tmp_path), abstract)
  assert step == 7 and int(state.step) == 7 and state.loss_state is None
  np.testing.assert_array_equal(state.params["w"], params["w"])
