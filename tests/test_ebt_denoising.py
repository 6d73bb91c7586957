"""Image denoising: the bidirectional EBT's loss and thinking, the flow's start point, the PSNR, config errors."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import apply_overrides, set_tiny_budget
from experiments.configs import ebt_denoising as denoising_config
from nbp import tasks
from nbp.models import bidirectional_ebt
from nbp.tasks import ebt_denoising as task_lib
from nbp.training import loop as train

SIGMA = task_lib.SIGMA


def _config(kind, data_dir, **overrides):
  """8x8 digits (the scans as they are) in 2x2 patches, one block of width 32, batch 8."""
  c = denoising_config.get_config(f"{kind},local")
  c.unlock()
  c.data.dir = data_dir
  c.data.image_size = 8
  c.model.variant = None
  c.model.num_layers, c.model.width, c.model.num_heads = 1, 32, 2
  c.sampler.update(num_samples=2, steps=(1, 2))
  set_tiny_budget(c, num_steps=1, checkpoint_every=1)
  c.evals = type(c.evals)()
  return apply_overrides(c, overrides)


def _metrics(workdir) -> dict:
  merged = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    merged.update(json.loads(line))
  return merged


# ---------------------------------------------------------------------------
# Training through the shared loop; thinking on the trained EBT.


@pytest.fixture(scope="module")
def trained_ebt(tmp_path_factory, data_dir):
  """The tiny EBT trained 30 steps by the official recipe, but 1-2 steps drawn per batch (cheaper to compile than
  2-3), PSNR and samples at the end."""
  workdir = tmp_path_factory.mktemp("ebt")
  config = _config("ebt", data_dir, num_steps=30, checkpoint_every=30, log_every=30, **{"loss.num_steps": 1,
                                                                                        "loss.num_steps_max": 2})
  config.evals.psnr = dict(type="split_metrics", every=0, split="validation")
  config.evals.sample = dict(type="samples", every=0)
  result = train.train_and_evaluate(config, str(workdir))
  return config, workdir, result


def test_ebt_trains_through_the_shared_loop_and_reports_psnr_against_passes(trained_ebt):
  config, workdir, result = trained_ebt
  assert result["status"] == "done" and result["step"] == 30 and np.isfinite(result["loss"])
  metrics = _metrics(workdir)
  assert 1.0 < metrics["num_steps"] < 2.0 and metrics["alpha"] == config.model.alpha  # the mean of 30 draws
  assert metrics["psnr/num_examples"] == 144  # the whole validation split
  for k in (1, 2):  # an EBT step is one forward and one backward pass
    assert metrics[f"psnr/forward_{k}_steps"] == k and metrics[f"psnr/backward_{k}_steps"] == k
    assert np.isfinite(metrics[f"psnr/psnr_{k}_steps"])
  assert list((workdir / "samples").glob("step_*.png"))


def test_thinking_from_the_noisy_image_lowers_the_energy_of_the_trained_ebt(trained_ebt, data_dir):
  config, workdir, _ = trained_ebt
  s, params, _, _ = train.load_params(config, str(workdir))
  model = s.task.model
  arrays = task_lib.split_arrays(config.data, "validation")
  noisy = jnp.asarray(arrays["image"][:16] + SIGMA * arrays["noise"][:16])

  @jax.jit
  def energies(noisy):
    thought = task_lib.think_from(model, params, noisy, num_steps=3, alpha=model.alpha)
    energy = task_lib.image_energy(model, params)
    return [thought.energies[0]] + [energy(y, 0) for y in thought.ys]  # [B, 1] each: before, after each step

  start, *after = (float(jnp.mean(e)) for e in energies(noisy))
  assert all(e < start for e in after), (start, after)


def test_the_ebt_loss_is_twice_differentiable():
  """The loss reaches the parameters only through dE/dx: its gradient, along a random direction, is a second-order
  term, and it matches central differences (one step, where truncation changes nothing)."""
  model = bidirectional_ebt.BidirectionalEBT(image_size=8, num_layers=1, width=16, num_heads=2, alpha=5.0)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 4))))["params"]
  eps = 1e-3

  @jax.jit
  def analytic_and_numeric(params):
    """The gradient along a random direction, and the central difference of the loss along it (one compile)."""
    clean = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1), minval=-1.0, maxval=1.0)
    noisy = clean + SIGMA * jax.random.normal(jax.random.key(2), clean.shape)
    objective = lambda p: task_lib.ebt_loss(model, p, clean, noisy, jax.random.key(3), num_steps=1, num_steps_max=0,
                                            alpha_scale=1.0, detach=False, truncate=True)[0]
    direction = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape), params)
    grad = jax.grad(objective)(params)
    analytic = sum(jnp.vdot(g, u) for g, u in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    shifted = lambda s: jax.tree.map(lambda x, u: x + s * eps * u, params, direction)
    return analytic, (objective(shifted(1)) - objective(shifted(-1))) / (2 * eps)

  analytic, numeric = (float(v) for v in analytic_and_numeric(params))
  assert abs(analytic) > 1e-3
  np.testing.assert_allclose(analytic, numeric, rtol=2e-2)


# ---------------------------------------------------------------------------
# The flow's denoising path.


class _OracleFlow(bidirectional_ebt.FlowTransformer):
  """The exact velocity of a flow whose data is one image, every pixel `value`: v(x_t, t) = (x_t - x) / t."""

  value: float = 0.25

  @nn.compact
  def __call__(self, patches, t):
    return (patches - self.value) / t[:, None, None]


def test_the_flows_start_point_lies_on_the_path_and_euler_steps_recover_the_image():
  x = jnp.full((2, 8, 8, 1), 0.25)
  eps = jax.random.normal(jax.random.key(0), x.shape)
  t_star = task_lib.flow_start_time(SIGMA)
  np.testing.assert_allclose((1 - t_star) * (x + SIGMA * eps), (1 - t_star) * x + t_star * eps, atol=1e-6)
  model = _OracleFlow(kind="flow", image_size=8, num_layers=1, width=16, num_heads=2)
  for steps in (1, 3):  # the path of one image is straight: Euler is exact at any step count
    out = task_lib.flow_denoise(model, {}, x + SIGMA * eps, sigma=SIGMA, num_steps=steps)
    np.testing.assert_allclose(out, x, atol=1e-5)


def test_patches_are_the_images_2x2_blocks_and_go_back():
  model = bidirectional_ebt.FlowTransformer(image_size=4, patch_size=2, channels=1)
  images = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 1)
  patches = np.asarray(model.patchify(images))
  assert patches.shape == (2, 4, 4)
  np.testing.assert_array_equal(patches[0, 1], images[0, 0:2, 2:4, 0].reshape(-1))  # the second patch of row 0
  np.testing.assert_array_equal(patches[1, 2], images[1, 2:4, 0:2, 0].reshape(-1))  # the first patch of row 1
  np.testing.assert_array_equal(model.unpatchify(patches), images)


# ---------------------------------------------------------------------------
# The PSNR evaluator, by hand.


def test_a_flow_step_through_the_shared_loop_and_its_psnr_equal_a_hand_computation(tmp_path, data_dir):
  """One flow training step at learning rate 0 leaves the parameters at init, where the head is zero: N Euler
  steps of zero velocity leave (1 - t*) x_noisy. The loop's split_metrics evaluator over the validation split
  must give the numpy PSNR of exactly that, and of the noisy input."""
  config = _config("flow", data_dir, **{"sampler.steps": (2,), "optimizer.lr": 0.0})
  config.evals.psnr = dict(type="split_metrics", every=0, split="validation", batch_size=32)
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["status"] == "done" and result["step"] == 1 and np.isfinite(result["loss"])
  assert result["mse"] == pytest.approx(result["loss"])
  out = _metrics(tmp_path)
  arrays = task_lib.split_arrays(config.data, "validation")
  clean = arrays["image"].astype(np.float64)
  noisy = clean + SIGMA * arrays["noise"]

  def psnr(output):
    x, y = (clean + 1) / 2, np.clip((output + 1) / 2, 0, 1)
    return float(np.mean(10 * np.log10(1 / np.mean((x - y) ** 2, axis=(1, 2, 3)))))

  assert out["psnr/num_examples"] == len(clean) == 144
  np.testing.assert_allclose(out["psnr/psnr_noisy"], psnr(noisy), rtol=1e-4)
  np.testing.assert_allclose(out["psnr/psnr_2_steps"], psnr((1 - task_lib.flow_start_time(SIGMA)) * noisy), rtol=1e-4)
  assert out["psnr/forward_2_steps"] == 2 and out["psnr/backward_2_steps"] == 0


# ---------------------------------------------------------------------------
# Config errors name their key.


@pytest.mark.parametrize("key,value", [
    ("loss.sigma", -0.1), ("loss.num_steps_max", 1), ("loss.alpha_scale", 0.5), ("model.kind", "gan"),
    ("model.patch_size", 3), ("model.image_size", 16), ("sampler.steps", (0, 2)), ("model.learn_alpha", True),
])
def test_a_bad_config_value_is_refused_naming_its_key(data_dir, key, value):
  config = _config("ebt", data_dir, **{key: value})
  with pytest.raises(ValueError, match=f"config.{key.replace('.', '[.]')}"):
    task_lib.make_task(config)


def test_the_flow_refuses_a_learned_step_size(data_dir):
  config = _config("flow", data_dir, **{"model.learn_alpha": True})
  config.param_groups = type(config.param_groups)({"alpha": dict(lr=1.0)})
  with pytest.raises(ValueError, match="config.model.learn_alpha"):
    task_lib.make_task(config)


def test_an_unknown_config_key_is_refused(data_dir):
  config = _config("ebt", data_dir)
  config.loss.langevin_sigma = 1.0  # not part of the denoising recipe
  with pytest.raises(ValueError, match="config.loss.langevin_sigma"):
    tasks.check_config(config)
