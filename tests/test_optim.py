"""The optimizer: the learning-rate schedule against its closed form, and where weight decay applies."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nbp.training import config as config_lib
from nbp.training import optim


def _optimizer_config(**overrides):
  cfg = config_lib.base_config().optimizer
  cfg.update(overrides)
  return cfg


def _values(schedule, steps):
  return np.array([float(schedule(jnp.asarray(s, jnp.int32))) for s in steps])


# ---------------------------------------------------------------------------
# The schedule.

LR, WARMUP, NUM_STEPS, FINAL = 1e-3, 10, 110, 0.1


def _cosine_closed_form(step: int) -> float:
  """Warmup linear from 0 to LR over WARMUP steps, then cosine from LR to LR * FINAL at NUM_STEPS."""
  if step < WARMUP:
    return LR * step / WARMUP
  progress = min(step - WARMUP, NUM_STEPS - WARMUP) / (NUM_STEPS - WARMUP)
  end = LR * FINAL
  return end + (LR - end) * 0.5 * (1 + math.cos(math.pi * progress))


def test_cosine_schedule_is_the_closed_form():
  schedule = optim.learning_rate_schedule(
      _optimizer_config(lr=LR, warmup_steps=WARMUP, final_lr_fraction=FINAL, schedule="cosine"), NUM_STEPS)
  steps = [0, 1, 5, WARMUP, 35, 60, 85, NUM_STEPS - 1, NUM_STEPS, NUM_STEPS + 50]
  want = [_cosine_closed_form(s) for s in steps]
  np.testing.assert_allclose(_values(schedule, steps), want, rtol=1e-6, atol=1e-12)
  # The landmarks, written out: 0 at step 0, the peak at the end of warmup,
  # halfway between peak and floor mid-cosine, the floor at the end and after.
  np.testing.assert_allclose(_values(schedule, [0, WARMUP, 60, NUM_STEPS, NUM_STEPS + 50]),
                             [0.0, LR, (LR + LR * FINAL) / 2, LR * FINAL, LR * FINAL], rtol=1e-6)


def test_cosine_from_holds_the_peak_then_decays_over_the_rest():
  """xAR's schedule: warmup, the peak held to 75% of the run, then a cosine to the floor at the end."""
  schedule = optim.learning_rate_schedule(
      _optimizer_config(lr=LR, warmup_steps=WARMUP, final_lr_fraction=FINAL, schedule="cosine", cosine_from=0.75),
      NUM_STEPS)
  hold = int(0.75 * NUM_STEPS)
  mid = hold + (NUM_STEPS - hold) // 2
  end = LR * FINAL
  want = [0.0, LR / 2, LR, LR, LR, end + (LR - end) * 0.5 * (1 + math.cos(math.pi * (mid - hold) / (NUM_STEPS - hold))),
          end]
  np.testing.assert_allclose(_values(schedule, [0, WARMUP // 2, WARMUP, hold - 1, hold, mid, NUM_STEPS]), want,
                             rtol=1e-5)


def test_constant_schedule_warms_up_then_stays():
  schedule = optim.learning_rate_schedule(_optimizer_config(lr=LR, warmup_steps=WARMUP, schedule="constant"),
                                          NUM_STEPS)
  steps = [0, 5, WARMUP, 60, NUM_STEPS, 10 * NUM_STEPS]
  np.testing.assert_allclose(_values(schedule, steps), [0.0, LR / 2, LR, LR, LR, LR], rtol=1e-6)


@pytest.mark.parametrize("name", ["cosine", "constant"])
def test_no_warmup_starts_at_the_peak(name):
  """warmup_steps=0: the first step already has the full rate (not 0, as an empty optax warmup gives)."""
  schedule = optim.learning_rate_schedule(_optimizer_config(lr=LR, warmup_steps=0, schedule=name), NUM_STEPS)
  np.testing.assert_allclose(_values(schedule, [0]), [LR], rtol=1e-6)


def test_warmup_longer_than_the_run_is_cut_to_reach_the_peak():
  schedule = optim.learning_rate_schedule(_optimizer_config(lr=LR, warmup_steps=100, schedule="cosine"), 5)
  # The warmup ends at the last step (4), the cosine over the one step after it.
  np.testing.assert_allclose(_values(schedule, [0, 2, 4, 5]), [0.0, LR / 2, LR, LR * 0.1], rtol=1e-6)


def test_unknown_schedule_is_named():
  with pytest.raises(ValueError, match=r"config\.optimizer\.schedule='linear'"):
    optim.learning_rate_schedule(_optimizer_config(schedule="linear"), NUM_STEPS)


def test_the_optimizer_logs_the_schedule_it_applies():
  cfg = _optimizer_config(lr=LR, warmup_steps=WARMUP, final_lr_fraction=FINAL, schedule="cosine")
  _, schedule = optim.make_optimizer(cfg, NUM_STEPS)
  np.testing.assert_allclose(_values(schedule, [5, 60]), [_cosine_closed_form(5), _cosine_closed_form(60)],
                             rtol=1e-6)


# ---------------------------------------------------------------------------
# Weight decay: kernels and embeddings only.


class _Tiny(nn.Module):
  """Every kind of leaf the models have: kernels (boxed and not), an embedding, biases, norm scales, a scalar."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(5, 4)(tokens)
    x = nn.Dense(4, kernel_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed", "mlp")))(x)
    x = nn.LayerNorm()(x)
    x = nn.Dense(3)(x)
    gate = self.param("gate", nn.initializers.ones, ())
    return gate * x


def _leaf_name(path) -> str:
  return [getattr(k, "key", None) for k in path if getattr(k, "key", None) not in (None, "value")][-1]


def test_weight_decay_shrinks_kernels_and_embeddings_only():
  """A step with zero gradients: AdamW moves exactly the decayed leaves, by lr * weight_decay * p."""
  boxed = _Tiny().init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
  params = nn.meta.unbox(boxed)
  # The mask is the same whether the tree is boxed (as at init) or not.
  assert jax.tree.leaves(optim.weight_decay_mask(boxed)) == jax.tree.leaves(optim.weight_decay_mask(params))
  params = jax.tree.map(lambda p: p + 1.0, params)  # no zero leaf: every decay would show
  lr, decay = 0.1, 0.5
  tx, _ = optim.make_optimizer(_optimizer_config(lr=lr, weight_decay=decay, warmup_steps=0, schedule="constant"),
                               10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)

  names = set()
  for (path, p), u in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(updates)):
    name = _leaf_name(path)
    names.add(name)
    want = -lr * decay * np.asarray(p) if name in ("kernel", "embedding") else np.zeros_like(p)
    np.testing.assert_allclose(u, want, rtol=1e-6, atol=0, err_msg=jax.tree_util.keystr(path))
  assert names == {"embedding", "kernel", "bias", "scale", "gate"}  # every kind was checked
