"""xAR: entity orderings, masks, the flow-matching loss, the solvers, the cached sampler, training steps."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import kl_vae_digits, xar_digits
from kernels import dispatch
from kernels.masks import MaskSpec
from nbp import tasks
from nbp.models import entities as entities_lib
from nbp.models.xar import SIZES, XAR
from nbp.tasks import kl_vae
from nbp.tasks import xar
from nbp.training import loop as train
from tests.conftest import apply_overrides, set_tiny_budget

LAYOUTS = [("token", {}), ("cell", {"cell": 2}), ("cell", {"cell": 4}), ("subsample", {"stride": 2}),
           ("subsample", {"stride": 4}), ("scale", {}), ("scale", {"scales": (4, 2, 1)}), ("image", {})]
LAYOUT_IDS = [f"{k}{''.join(map(str, v.values()))}" for k, v in LAYOUTS]


def _entities(kind, grid=(8, 4), **kw):
  return entities_lib.Entities(kind, grid, **kw)


# ---------------------------------------------------------------------------
# Entities.


@pytest.mark.parametrize("kind,kw", LAYOUTS, ids=LAYOUT_IDS)
def test_every_ordering_inverts_exactly(kind, kw):
  ents = _entities(kind, **kw)
  x = np.random.default_rng(0).normal(size=(3, 8, 4, 5)).astype(np.float32)
  seq = ents.decompose(jnp.asarray(x))
  assert seq.shape == (3, ents.seq_len, 5) and sum(ents.sizes) == ents.seq_len
  np.testing.assert_array_equal(np.asarray(ents.reconstruct(seq)), x)
  assert ents.positions().shape == (ents.seq_len, 2)


@pytest.mark.parametrize("kind,kw", [l for l in LAYOUTS if l[0] != "scale"], ids=[i for i in LAYOUT_IDS if "scale" not in i])
def test_permutation_entities_hold_the_tokens_the_paper_names(kind, kw):
  """Every entity, brute force from the grid: raster tokens, k x k cells, x[a::s, b::s] subsamples, the image."""
  ents = _entities(kind, **kw)
  x = np.arange(32).reshape(1, 8, 4, 1)
  seq = np.asarray(ents.decompose(jnp.asarray(x)))[0, :, 0]
  pieces = np.split(seq, np.cumsum(ents.sizes)[:-1])
  if kind == "token":
    expected = [np.array([v]) for v in range(32)]
  elif kind == "cell":
    k = kw["cell"]
    expected = [x[0, r:r + k, c:c + k, 0].reshape(-1) for r in range(0, 8, k) for c in range(0, 4, k)]
  elif kind == "subsample":
    s = kw["stride"]
    expected = [x[0, a::s, b::s, 0].reshape(-1) for a in range(s) for b in range(s)]
  else:
    expected = [x[0, :, :, 0].reshape(-1)]
  assert len(pieces) == len(expected)
  for got, want in zip(pieces, expected):
    np.testing.assert_array_equal(got, want)
  # A token's position is its grid coordinate.
  np.testing.assert_array_equal(ents.positions()[:, 0] * 4 + ents.positions()[:, 1], seq)


def test_scale_pyramid_is_nested_average_pooling():
  ents = _entities("scale", grid=(8, 8))
  assert ents.factors == (8, 4, 2, 1) and ents.sizes == (1, 4, 16, 64)
  x = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
  pieces = np.split(np.asarray(ents.decompose(jnp.asarray(x))), np.cumsum(ents.sizes)[:-1], axis=1)
  for f, piece in zip(ents.factors, pieces):
    want = x.reshape(2, 8 // f, f, 8 // f, f, 3).mean(axis=(2, 4)).reshape(2, -1, 3)
    np.testing.assert_allclose(piece, want, rtol=1e-6, atol=1e-6)
  # A coarse scale is the next finer one pooled by 2: the pyramid is exact.
  finer = pieces[2].reshape(2, 4, 4, 3)
  np.testing.assert_allclose(pieces[1], finer.reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4)).reshape(2, 4, 3),
                             rtol=1e-5, atol=1e-6)
  # Positions: the centre of the pooled tokens, on the finest grid.
  np.testing.assert_allclose(ents.positions()[0], [3.5, 3.5])


@pytest.mark.parametrize("kind,kw,error", [
    ("cell", {"cell": 3}, "config.model.cell"), ("subsample", {"stride": 3}, "config.model.stride"),
    ("scale", {"scales": (4, 3, 1)}, "config.model.scales"), ("scale", {"scales": (2, 4, 1)}, "config.model.scales"),
    ("patch", {}, "config.model.entity")])
def test_bad_entity_settings_are_named(kind, kw, error):
  with pytest.raises(ValueError, match=error):
    _entities(kind, **kw)


# ---------------------------------------------------------------------------
# Masks.


def _brute_force_mask(entity_of_slot, teacher_forcing=False):
  s = len(entity_of_slot)
  e = np.asarray(entity_of_slot)
  causal = e[None, :] <= e[:, None]  # query row sees key column
  if not teacher_forcing:
    return causal
  full = np.zeros((2 * s, 2 * s), bool)
  full[:s, :s] = causal
  full[s:, :s] = e[None, :] < e[:, None]
  full[s:, s:] = e[None, :] == e[:, None]
  return full


MASK_CASES = [(k, kw, False) for k, kw in LAYOUTS] + [("cell", {"cell": 2}, True), ("scale", {}, True)]


@pytest.mark.parametrize("kind,kw,teacher_forcing", MASK_CASES,
                         ids=[f"{i}{'-tf' if c[2] else ''}" for i, c in zip(LAYOUT_IDS + ["cell2", "scale"], MASK_CASES)])
def test_model_mask_is_bidirectional_inside_and_causal_across_entities(kind, kw, teacher_forcing):
  model = XAR(token_dim=2, grid=(8, 4), num_classes=3, entity=kind, variant="tiny", teacher_forcing=teacher_forcing,
              **kw)
  mask = model.mask()
  n = model.seq_len * (2 if teacher_forcing else 1)
  want = _brute_force_mask(model.entities.entity_of_slot(), teacher_forcing)
  np.testing.assert_array_equal(np.asarray(mask.make(n)), want)
  # A decoding step at an entity's slots sees what the full mask gives those rows.
  start, length = int(model.entities.starts[-1]), model.entities.sizes[-1]
  np.testing.assert_array_equal(np.asarray(mask.make(length, model.seq_len, q_offset=start)),
                                want[start:start + length, :model.seq_len])


def test_masks_of_several_block_sizes_go_to_dense_attention():
  mask = MaskSpec("block_causal", block_sizes=(1, 4, 16))
  assert dispatch.resolve_impl("auto", "cpu", 21, 21, tiled=mask.tiled) == "xla"
  assert dispatch.resolve_impl("auto", "gpu", 21, 21, tiled=mask.tiled) == "xla"
  with pytest.raises(dispatch.AttentionImplError, match="several sizes"):
    dispatch.resolve_impl("pallas", "cpu", 21, 21, tiled=False)
  with pytest.raises(ValueError, match="block_sizes"):
    MaskSpec("causal", block_sizes=(2, 2))
  q = jax.random.normal(jax.random.key(0), (1, 21, 2, 8))
  out = dispatch.attention(q, q, q, mask=mask, impl="auto")
  # The first token (its own entity) attends only to itself.
  np.testing.assert_allclose(np.asarray(out[0, 0]), np.asarray(q[0, 0]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# The loss.


def _tiny(kind="cell", **kw):
  fields = dict(token_dim=3, grid=(4, 4), num_classes=5, entity=kind, cell=2, variant="tiny")
  fields.update(kw)
  return XAR(**fields)


def _params(model, seed=0, noise=0.05):
  """Parameters with the zero-initialised heads perturbed, so velocities depend on everything."""
  s = model.seq_len * (2 if model.teacher_forcing else 1)
  params = model.init(jax.random.key(seed), jnp.zeros((1, s, model.token_dim)), jnp.zeros((1, s)),
                      jnp.zeros((1,), jnp.int32))["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [p + noise * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.mark.parametrize("teacher_forcing", [False, True])
def test_loss_at_fixed_times_against_a_hand_computation(teacher_forcing):
  """A stand-in network that returns 2 x_t + t: the loss must be mean((2 x_t + t - (eps - x))^2) by hand."""
  ents = _entities("cell", grid=(4, 4), cell=2)
  seen = {}

  def apply(variables, inputs, times, labels):
    seen["inputs"], seen["times"], seen["labels"] = inputs, times, labels
    return 2.0 * inputs + times[..., None]

  stand_in = types.SimpleNamespace(entities=ents, teacher_forcing=teacher_forcing, seq_len=16, apply=apply)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 16, 3)).astype(np.float32)
  eps = rng.normal(size=(2, 16, 3)).astype(np.float32)
  t_entity = np.array([[0.1, 0.5, 0.9, 0.3], [0.7, 0.2, 0.4, 0.6]], np.float32)
  value, _, _ = xar.flow_matching_loss(stand_in, None, jnp.asarray(x), jnp.asarray(t_entity), jnp.asarray(eps),
                                       jnp.array([1, 2]))
  t = np.repeat(t_entity, 4, axis=1)[..., None]  # 4 tokens per cell, in order
  x_t = (1 - t) * x + t * eps
  want = np.mean((2 * x_t + t - (eps - x)) ** 2)
  np.testing.assert_allclose(float(value), want, rtol=1e-5)
  if teacher_forcing:  # the clean copy at t = 0 first
    np.testing.assert_allclose(np.asarray(seen["inputs"][:, :16]), x)
    np.testing.assert_array_equal(np.asarray(seen["times"][:, :16]), 0)
    np.testing.assert_allclose(np.asarray(seen["inputs"][:, 16:]), x_t, rtol=1e-6, atol=1e-6)


def test_noisy_context_draws_a_time_per_entity_of_every_sample():
  """Inside the loss, tokens of one entity share t; entities and samples do not."""
  ents = _entities("cell", grid=(4, 4), cell=2)
  seen = {}

  def apply(variables, inputs, times, labels):
    seen["times"] = times
    return inputs

  stand_in = types.SimpleNamespace(entities=ents, teacher_forcing=False, seq_len=16, num_classes=5, apply=apply)
  batch = {"tokens": jnp.zeros((64, 4, 4, 3)), "class": jnp.zeros((64,), jnp.int32)}
  xar.loss(stand_in, None, batch, jax.random.key(0), class_dropout=0.0)
  t = np.asarray(seen["times"]).reshape(64, 4, 4)  # [B, cells, tokens per cell]
  assert np.all(t == t[:, :, :1]) and len(np.unique(t[:, :, 0])) == 64 * 4
  logits = np.log(t[:, :, 0] / (1 - t[:, :, 0]))
  assert abs(logits.mean()) < 0.2 and abs(logits.std() - 1.0) < 0.15  # logit-normal(0, 1)


# ---------------------------------------------------------------------------
# Solvers and the sampler.


def test_solver_schedule_and_guidance_schedule():
  times = xar.solver_times(5, 0.04)
  np.testing.assert_allclose(times, [1.0, 0.76, 0.52, 0.28, 0.04, 0.0], atol=1e-6)
  scales = [xar.guidance_scale_at(k, 4, 2.5, "linear") for k in range(4)]
  np.testing.assert_allclose(scales, [1.0, 1.5, 2.0, 2.5])
  assert xar.guidance_scale_at(0, 1, 2.5, "linear") == 2.5
  assert xar.guidance_scale_at(2, 4, 2.5, "constant") == 2.5
  with pytest.raises(ValueError, match="config.sampler.num_steps"):
    xar.solver_times(0, 0.04)


@pytest.mark.parametrize("kind", ["cell", "scale", "token"])
def test_ode_sampler_on_an_analytic_velocity_field_lands_on_its_target(kind):
  """For data that is one point x*, the flow's velocity is (x_t - x*) / t: Euler reaches x* exactly."""
  ents = _entities(kind, grid=(4, 4), cell=2)
  target_grid = np.random.default_rng(3).normal(size=(1, 4, 4, 3)).astype(np.float32)
  target = ents.decompose(jnp.asarray(target_grid))  # [1, S, 3]

  def apply(variables, x, t, labels):
    return jnp.where(t[..., None] > 0, (x - target) / jnp.maximum(t[..., None], 1e-9), 0.0)

  field = types.SimpleNamespace(entities=ents, teacher_forcing=False, seq_len=ents.seq_len, token_dim=3,
                                num_classes=2, apply=apply)
  out = jax.jit(lambda rng: xar.sample(field, None, rng, num_samples=2, num_steps=7, solver="ode",
                                       use_cache=False))(jax.random.key(0))
  np.testing.assert_allclose(np.asarray(out), np.broadcast_to(target_grid, (2, 4, 4, 3)), rtol=1e-4, atol=1e-4)
  # The SDE solver, started from the same noise, also ends near the point (its last step is not exact).
  sde = xar.sample(field, None, jax.random.key(0), num_samples=2, num_steps=40, solver="sde", use_cache=False)
  assert np.abs(np.asarray(sde) - target_grid).max() < 0.2


SLOW = pytest.mark.slow


@pytest.mark.parametrize("kind,teacher_forcing", [
    ("cell", False), ("scale", False), ("cell", True), pytest.param("token", False, marks=SLOW),
    pytest.param("scale", True, marks=SLOW)])
def test_cached_sampling_equals_uncached(kind, teacher_forcing):
  """Uniform entities (cells; tokens over several phases) and entities of several sizes, each way of training."""
  model = _tiny(kind, teacher_forcing=teacher_forcing)
  params = _params(model)
  kw = dict(num_samples=3, num_steps=2, guidance_scale=2.0, labels=jnp.array([0, 3, 4]), cache_phases=1)
  cached = jax.jit(lambda p, r: xar.sample(model, p, r, **kw))(params, jax.random.key(5))
  full = jax.jit(lambda p, r: xar.sample(model, p, r, use_cache=False, **kw))(params, jax.random.key(5))
  assert cached.shape == (3, 4, 4, 3) and np.isfinite(np.asarray(cached)).all()
  np.testing.assert_allclose(np.asarray(cached), np.asarray(full), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sampler_result_does_not_depend_on_the_cache_phases():
  model = _tiny("token")
  params = _params(model)
  runs = [xar.sample(model, params, jax.random.key(1), num_samples=2, num_steps=2, cache_phases=p) for p in (1, 3)]
  np.testing.assert_allclose(np.asarray(runs[0]), np.asarray(runs[1]), rtol=1e-5, atol=1e-6)


def test_guidance_scale_one_equals_the_conditional_sampler():
  model = _tiny("cell")
  params = _params(model)
  labels = jnp.array([1, 2])
  kw = dict(num_samples=2, num_steps=2, labels=labels, cache_phases=1)
  plain = xar.sample(model, params, jax.random.key(2), **kw)
  guided = jax.jit(lambda scale: xar.sample(model, params, jax.random.key(2), guidance_scale=scale,
                                            guidance_schedule="constant", **kw))  # one compile, any scale
  np.testing.assert_allclose(np.asarray(guided(1.0)), np.asarray(plain), rtol=1e-5, atol=1e-5)
  # A different scale changes the samples (the null-class rows matter).
  assert np.abs(np.asarray(guided(3.0)) - np.asarray(plain)).max() > 1e-3


def test_the_sampler_compiles_to_loops_not_a_python_loop_per_step():
  """Token entities, 16 of them with 5 solver steps each: the program has one model call per phase, not 80."""
  model = _tiny("token")
  params = _params(model)
  jaxpr = jax.make_jaxpr(lambda p: xar.sample(model, p, jax.random.key(0), num_samples=1, num_steps=5,
                                              cache_phases=2))(params)
  text = str(jaxpr)
  assert text.count("while[") + text.count("scan[") >= 2
  assert text.count("dot_general") < 200  # 80 unrolled calls of a 2-layer model would hold far more


# ---------------------------------------------------------------------------
# Sizes, configs and training.


def test_sizes_match_the_paper():
  counts = {}
  for variant in ("B", "L", "H"):
    model = XAR(token_dim=16, grid=(16, 16), num_classes=1000, variant=variant)
    shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 256, 16)), jnp.zeros((1, 256)),
                                                   jnp.zeros((1,), jnp.int32)))
    counts[variant] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) / 1e6
  assert SIZES["B"] == (16, 768, 12) and SIZES["L"] == (32, 1024, 16) and SIZES["H"] == (40, 1280, 16)
  assert abs(counts["B"] - 172) < 3 and abs(counts["L"] - 608) < 10 and abs(counts["H"] - 1100) < 100, counts


def tiny_xar_config(data_dir, arg="cell", **overrides):
  c = xar_digits.get_config(arg + ",tiny")
  c.data.dir = data_dir
  c.sampler.num_samples = 2
  c.sampler.num_steps = 2
  set_tiny_budget(c, num_steps=2, checkpoint_every=2)
  c.evals.eval.every = 0
  return apply_overrides(c, overrides)


def test_config_mismatches_are_named(data_dir):
  with pytest.raises(ValueError, match="config.model.token_dim"):
    tasks.make_task(tiny_xar_config(data_dir, **{"model.token_dim": 3}))
  with pytest.raises(ValueError, match="config.model.grid"):
    tasks.make_task(tiny_xar_config(data_dir, **{"model.grid": (5, 5), "model.cell": 5}))
  with pytest.raises(ValueError, match="config.sampler.solver"):
    xar.sample(_tiny(), None, jax.random.key(0), solver="heun")
  bad = tiny_xar_config(data_dir)
  bad.unlock()
  bad.sampler.temperature = 1.0
  with pytest.raises(ValueError, match="config.sampler.temperature"):
    tasks.check_config(bad)


@pytest.mark.parametrize("arg", ["cell", pytest.param("token", marks=pytest.mark.slow),
                                 pytest.param("subsample", marks=pytest.mark.slow), "scale",
                                 pytest.param("image", marks=pytest.mark.slow), pytest.param("cell,tf", marks=pytest.mark.slow)])
def test_one_train_step_per_entity_type(arg, data_dir):
  """One jitted gradient step of the config's task on real digit patches: finite, nonzero gradients."""
  config = tiny_xar_config(data_dir, arg)
  task = tasks.make_task(config)
  batch = next(task.data("train", seed=0, process_index=0, process_count=1, batch_size=4))
  assert batch["tokens"].shape == (4, 8, 8, 4) and -1 <= batch["tokens"].min() < batch["tokens"].max() <= 1
  params = task.model.init(jax.random.key(0), **task.init_inputs())["params"]
  (loss, metrics), grads = jax.jit(jax.value_and_grad(task.loss, has_aux=True))(params, batch, jax.random.key(1))
  norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))))
  assert np.isfinite(float(loss)) and 0 < norm < np.inf
  assert float(metrics["num_targets"]) == 4 * task.model.seq_len * 4


@pytest.mark.slow
def test_loss_falls_in_a_short_run(tmp_path, data_dir):
  config = tiny_xar_config(data_dir, "cell", num_steps=40, log_every=10,
                           **{"optimizer.warmup_steps": 5, "checkpoint_every": 40})
  train.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
  assert losses[-1] < 0.8 * losses[0], losses
  assert os.path.exists(tmp_path / "samples" / "step_0000040.png")  # the samples evaluator wrote them


@pytest.mark.slow
def test_xar_on_kl_vae_latents_end_to_end(tmp_path, data_dir):
  """VAE (2 steps) -> latent cache with flips -> xAR on scaled latents -> samples decoded by the VAE."""
  vae_config = kl_vae_digits.get_config("local")
  vae_config.data.dir = data_dir
  set_tiny_budget(vae_config, num_steps=1, checkpoint_every=1)
  vae_config.unlock()
  vae_config.evals = {}  # only the checkpoint matters here
  train.train_and_evaluate(vae_config, str(tmp_path / "vae"))
  metadata = kl_vae.encode_latents(str(tmp_path / "vae"), str(tmp_path / "latents"), flips=True)
  assert list(metadata["latent_shape"]) == [4, 4, 4] and metadata["scaling_factor"] > 0

  config = tiny_xar_config(data_dir, "cell,latents", **{"data.latent_dir": str(tmp_path / "latents"),
                                                         "num_steps": 1, "checkpoint_every": 1})
  config.unlock()
  del config.evals["eval"]  # the samples (decoded by the VAE) are what this run checks
  task = tasks.make_task(config)
  batch = next(task.data("train", seed=0, process_index=0, process_count=1, batch_size=4))
  assert batch["latent"].shape == (4, 4, 4, 4)
  np.testing.assert_allclose(np.std(batch["latent"]), 1.0, rtol=0.5)  # scaled to about unit spread
  assert task.to_images(np.asarray(batch["latent"])).shape == (4, 16, 16, 1)
  result = train.train_and_evaluate(config, str(tmp_path / "xar"))
  assert result["step"] == 1 and np.isfinite(result["loss"])
  assert os.path.exists(tmp_path / "xar" / "samples" / "step_0000001.png")
  with pytest.raises(ValueError, match="config.model.grid"):
    tasks.make_task(tiny_xar_config(data_dir, "cell,latents", **{"data.latent_dir": str(tmp_path / "latents"),
                                                                  "model.grid": (8, 8)}))
