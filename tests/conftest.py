"""Shared fixtures: a tiny next-token config, and a data directory and trained runs that the xdist workers share."""

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole suite: its tests (and the
# subprocesses they start, which inherit the environment) compile the same tiny
# models many times. Entries are keyed by the computation and the jax version.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "nbp-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# The suite's programs are tiny and compiled once each, so compile time dominates it: XLA's CPU
# backend without LLVM optimisation compiles them much faster (the whole suite, cold cache, 2
# workers: 20m20s -> 12m48s, 446 tests), and its older elemental emitters compile faster than the
# MLIR fusion emitters (tests/test_xar.py and test_layers.py, cold cache, 2 workers: 286 s -> 189 s).
# Semantics are the same; runs outside the tests keep the defaults.
# (The rbg PRNG would compile faster still, but it changes every random draw, and tests tuned on
# threefry's, such as a 40-step classifier fit, then miss their thresholds.)
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")

import pytest  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_ntp_config(data_dir: str, **overrides):
  """2 frames of 8x8 (128 tokens), a 2-layer model: one step takes milliseconds."""
  from experiments.configs import ntp_digits  # pylint: disable=g-import-not-at-top
  c = ntp_digits.get_config("tiny,local")
  c.data.dir = data_dir
  c.data.num_frames = 2
  c.data.frame_size = 8
  c.data.num_train = 64
  c.data.num_validation = 16
  c.data.num_test = 16
  c.model.grid = (2, 8, 8)
  c.model.num_layers = 1  # the loop's tests need a model, not a deep one (fewer ops to compile)
  c.sampler.num_samples = 2
  set_tiny_budget(c, num_steps=4, checkpoint_every=2)
  return apply_overrides(c, overrides)


def set_tiny_budget(c, *, num_steps: int, checkpoint_every: int) -> None:
  """Batch 8, metrics every step, one eval batch, one warm-up step: the tests' training budget."""
  c.batch_size = 8
  c.num_steps = num_steps
  c.log_every = 1
  c.checkpoint_every = checkpoint_every
  c.evals.eval.steps = 1
  c.optimizer.warmup_steps = 1


def apply_overrides(config, overrides: dict):
  """Sets dotted keys ("model.width": 32) on a config; returns it."""
  for key, value in overrides.items():
    target = config
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  return config


def config_flags_for(config) -> list[str]:
  """The --config.KEY=VALUE flags that turn the tiny default into `config`."""
  flags = []
  for section in ("data", "model", "loss", "sampler", "optimizer"):
    for key, value in config[section].items():
      if value is not None:
        flags.append(f"--config.{section}.{key}={value}")
  for key in ("batch_size", "num_steps", "log_every", "checkpoint_every", "seed", "grad_accum_steps"):
    flags.append(f"--config.{key}={config[key]}")
  flags.append(f"--config.evals.eval.steps={config.evals.eval.steps}")
  return flags


def run_module(args, *, env=None, timeout=600, **kwargs):
  full_env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.run([sys.executable, *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                        timeout=timeout, **kwargs)


def shared_path(tmp_path_factory, name: str) -> str:
  """A path under the session's base directory that every xdist worker of the session sees."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER") is not None:
    base = base.parent  # the workers' common base
  return os.path.join(base, name)


def trained_once(tmp_path_factory, name: str, train_fn) -> tuple[str, dict]:
  """(workdir, result) of train_fn(workdir), run once per session by whichever worker asks first.

  The others wait on a file lock, then read the result it wrote; a workdir whose result is missing (its
  worker died mid-way) is trained again from scratch.
  """
  workdir = shared_path(tmp_path_factory, name)
  with open(workdir + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not os.path.exists(workdir + ".json"):
        shutil.rmtree(workdir, ignore_errors=True)
        result = train_fn(workdir)
        with open(workdir + ".json", "w") as f:
          json.dump(result, f, default=float)
      with open(workdir + ".json") as f:
        return workdir, json.load(f)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def tiny_classifier_config(data_dir: str):
  """The judge of the tiny video runs: 5 frames of 8x8, one digit, 8 grey levels, 2 steps, no sample evaluator."""
  from experiments.configs import video_classifier_digits  # pylint: disable=g-import-not-at-top
  c = video_classifier_digits.get_config("local,4x12")
  c.data.dir = data_dir
  c.data.num_frames = 5
  c.data.frame_size = 8
  c.data.num_train = 32
  c.data.num_test = 16
  c.model.widths = (8, 16)
  c.model.feature_dim = 16
  set_tiny_budget(c, num_steps=2, checkpoint_every=2)
  with c.unlocked():
    del c.evals["sample"]
  return c


@pytest.fixture(scope="session")
def classifier_workdir(data_dir, tmp_path_factory):
  """A tiny_classifier_config run, trained once per session for every worker."""
  from nbp.training import loop as train  # pylint: disable=g-import-not-at-top
  workdir, result = trained_once(tmp_path_factory, "tiny_classifier",
                                 lambda w: train.train_and_evaluate(tiny_classifier_config(data_dir), w))
  assert result["status"] == "done" and result["step"] == 2
  return workdir


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One data directory for the whole session, shared by the xdist workers: each generated dataset is made once
  (nbp.data.generated.prepare locks it while one worker writes it)."""
  path = shared_path(tmp_path_factory, "data")
  os.makedirs(path, exist_ok=True)
  return path
