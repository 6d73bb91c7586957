"""nbp.profiling: exclusive op times from a trace, and op labels from compiled HLO."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from nbp import profiling


def test_exclusive_seconds_subtracts_enclosed_events_on_the_same_thread():
  events = [
      {"name": "while.1", "ts": 0, "dur": 100, "pid": 1, "tid": 1},
      {"name": "fusion.2", "ts": 10, "dur": 30, "pid": 1, "tid": 1},
      {"name": "dot.3", "ts": 50, "dur": 40, "pid": 1, "tid": 1},
      {"name": "fusion.2", "ts": 20, "dur": 50, "pid": 1, "tid": 2},  # another thread: not enclosed
      {"name": "ThunkExecutor::Execute", "ts": 0, "dur": 500, "pid": 1, "tid": 1},  # a container, dropped
  ]
  seconds = profiling.exclusive_seconds(events)
  assert seconds["while.1"] == pytest.approx(30e-6)
  assert seconds["fusion.2"] == pytest.approx(80e-6)
  assert seconds["dot.3"] == pytest.approx(40e-6)
  assert "ThunkExecutor::Execute" not in seconds


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(256, name="wi")(x)
    return nn.Dense(64, name="wo")(jnp.tanh(h) * jnp.sin(h))


def test_a_traced_step_splits_into_matmuls_and_elementwise_by_model_path(tmp_path):
  model = _Block()
  x = jnp.ones((512, 64))
  params = model.init(jax.random.key(0), x)
  step = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2)))
  compiled = step.lower(params).compile()
  ops = profiling.profile_ops(compiled.as_text(), lambda: compiled(params), 3, str(tmp_path))
  kinds = {label for label, _, _ in profiling.summarise(ops, "kind")}
  assert "matmul" in kinds and "elementwise" in kinds
  wheres = {r["where"] for r in ops if r["kind"] == "matmul"}
  assert any(w.startswith("wi") for w in wheres) and any(w.startswith("wo") for w in wheres), wheres
  shares = [share for _, _, share in profiling.summarise(ops, "where")]
  assert sum(shares) == pytest.approx(1.0) and all(r["seconds"] >= 0 for r in ops[:3])


def test_profile_ops_names_a_directory_without_a_trace(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    profiling.trace_events(str(tmp_path))


def test_profile_steps_traces_a_loop_carrying_a_cache_without_copying_it(tmp_path):
  w = jnp.ones((64, 64)) * 0.01

  def step(i, w, carry):  # a decode step: write a row of the cache, read the whole cache
    cache, x = carry
    cache = jax.lax.dynamic_update_slice(cache, x[None], (i, 0))
    return cache, jnp.tanh(x @ w) + cache.sum(0)

  # A copy of the 1 MB cache every step would rank near the top in every trace; a small copy can too, in one
  # trace taken while other tests load the cores. So three traces, and one of them must be free of it.
  tops = []
  for k in range(3):
    ops = profiling.profile_steps(step, w, (jnp.zeros((4096, 64)), jnp.ones((64,))), 8, 2, str(tmp_path / str(k)))
    assert ops
    tops.append(ops[:3])
    if all(r["kind"] != "layout copy" for r in ops[:3]):
      break
  else:
    raise AssertionError(f"a layout copy among the 3 costliest ops of every trace: {tops}")
