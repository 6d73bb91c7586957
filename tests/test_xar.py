"""xAR: entity orderings, masks, the network's causality and switches, the flow-matching loss, the solvers, the
cached sampler in every context mode, latents (posterior mean or draws), training steps."""

import json
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import kl_vae_digits, xar_digits, xar_imagenet
from kernels import dispatch
from kernels.masks import MaskSpec
from nbp import tasks
from nbp.models import entities as entities_lib
from nbp.models import xar as xar_model
from nbp.models.xar import SIZES, XAR
from nbp.samplers import xar as sampler
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
  params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, s, model.token_dim)), jnp.zeros((1, s)),
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

  stand_in = types.SimpleNamespace(entities=ents, teacher_forcing=False, seq_len=16, num_classes=5, dropout=0.0,
                                   apply=apply)
  batch = {"tokens": jnp.zeros((64, 4, 4, 3)), "class": jnp.zeros((64,), jnp.int32)}
  xar.loss(stand_in, None, batch, jax.random.key(0), class_dropout=0.0)
  t = np.asarray(seen["times"]).reshape(64, 4, 4)  # [B, cells, tokens per cell]
  assert np.all(t == t[:, :, :1]) and len(np.unique(t[:, :, 0])) == 64 * 4
  logits = np.log(t[:, :, 0] / (1 - t[:, :, 0]))
  assert abs(logits.mean()) < 0.2 and abs(logits.std() - 1.0) < 0.15  # logit-normal(0, 1)


# ---------------------------------------------------------------------------
# The network: causal across entities, and the switches of the official network's differences.


def _apply(model, params, x, t, labels, **kw):
  return np.asarray(model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(labels), **kw))


CAUSAL_CASES = [("token", {}, False), ("cell", {"cell": 2}, False), ("subsample", {"stride": 2}, False),
                ("scale", {}, False), ("image", {}, False), ("cell", {"cell": 2}, True)]


@pytest.mark.parametrize("kind,kw,teacher_forcing", CAUSAL_CASES,
                         ids=[f"{k}{'-tf' if tf else ''}" for k, _, tf in CAUSAL_CASES])
def test_velocity_of_an_entity_ignores_later_entities(kind, kw, teacher_forcing):
  """Through XAR.apply: new tokens and times for the entities after i leave the velocities of entities <= i as they
  were, while a change of entity i itself changes its own velocity and those after it (with teacher forcing: the
  noisy copy of entity i ignores the clean copies from i on and every other noisy entity)."""
  model = _tiny(kind, teacher_forcing=teacher_forcing, **kw)
  params = _params(model, noise=0.2)
  ents, s = model.entities, model.seq_len
  n = 2 * s if teacher_forcing else s
  rng = np.random.default_rng(0)
  x, t = rng.normal(size=(2, n, 3)).astype(np.float32), rng.uniform(size=(2, n)).astype(np.float32)
  apply = jax.jit(lambda x, t: model.apply({"params": params}, x, t, jnp.array([1, 4])))
  base = np.asarray(apply(x, t))
  ends = np.cumsum(ents.sizes)
  checked = sorted({0, len(ends) // 2, len(ends) - 1})  # first, middle and last entity
  for i in checked:
    start, end = int(ents.starts[i]), int(ends[i])
    later = np.zeros(n, bool)
    later[end:s] = True
    if teacher_forcing:  # the clean copies from i on, and the noisy copies of every other entity
      later[start:s] = True
      later[s:] = True
      later[s + start:s + end] = False
    x2, t2 = x.copy(), t.copy()
    x2[:, later] += rng.normal(size=x2[:, later].shape).astype(np.float32)
    t2[:, later] = rng.uniform(size=t2[:, later].shape)
    out = np.asarray(apply(x2, t2))
    rows = slice(s + start, s + end) if teacher_forcing else slice(0, end)
    np.testing.assert_allclose(out[:, rows], base[:, rows], rtol=1e-5, atol=1e-5)
    # Entity i's own tokens change its velocity, and the entities after it see it.
    x3 = x.copy()
    own = slice(s + start, s + end) if teacher_forcing else slice(start, end)
    x3[:, own] += 1.0
    out = np.asarray(apply(x3, t))
    assert np.abs(out[:, own] - base[:, own]).max() > 1e-3
    if not teacher_forcing and end < s:
      assert np.abs(out[:, end:] - base[:, end:]).max() > 1e-3


def test_integer_time_embedding_floors_t_times_1000():
  t = jnp.array([0.5, 0.50049, 0.0401, 0.04])
  continuous = xar_model.timestep_embedding(t, 16)
  integer = xar_model.timestep_embedding(t, 16, integer=True)
  np.testing.assert_allclose(integer[0], integer[1])  # 500 and 500
  np.testing.assert_allclose(integer[2], xar_model.timestep_embedding(jnp.array(0.04), 16), atol=1e-6)  # 40
  np.testing.assert_allclose(integer[0], continuous[0], atol=1e-6)
  assert np.abs(np.asarray(continuous[0] - continuous[1])).max() > 1e-3
  model = _tiny("cell", time_embedding="integer")
  params = _params(model)
  x = np.random.default_rng(0).normal(size=(1, 16, 3)).astype(np.float32)
  np.testing.assert_allclose(_apply(model, params, x, np.full((1, 16), 0.7001), [0]),
                             _apply(model, params, x, np.full((1, 16), 0.7008), [0]), rtol=1e-6)
  with pytest.raises(ValueError, match="config.model.time_embedding"):
    _tiny("cell", time_embedding="half").check()


def test_input_norm_makes_the_blocks_blind_to_the_input_embedding_scale():
  """With the input RMSNorm, scaling the input projection and the position table by 3 changes nothing."""
  x = np.random.default_rng(0).normal(size=(2, 16, 3)).astype(np.float32)
  t = np.full((2, 16), 0.3, np.float32)
  for input_norm in (True, False):
    model = _tiny("cell", input_norm=input_norm)
    params = _params(model)
    assert ("input_norm_layer" in params) == input_norm
    scaled = dict(params, input_proj=jax.tree.map(lambda p: 3 * p, params["input_proj"]),
                  positions=jax.tree.map(lambda p: 3 * p, params["positions"]))
    diff = np.abs(_apply(model, scaled, x, t, [0, 1]) - _apply(model, params, x, t, [0, 1])).max()
    assert (diff < 1e-4) if input_norm else (diff > 1e-3), (input_norm, diff)


def _init_params(model):
  return nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, model.seq_len, model.token_dim)),
                            jnp.zeros((1, model.seq_len)), jnp.zeros((1,), jnp.int32))["params"])


def test_official_block_switches_qkv_bias_adaln_init_and_dropout():
  default, official = _tiny("cell"), _tiny("cell", qkv_bias=True, adaln_init="xavier", dropout=0.5)
  p0, p1 = _init_params(default), _init_params(official)
  attention = p1["decoder"]["layer_0"]["attention"]
  assert all("bias" in attention[k] for k in ("query", "key", "value", "out"))
  assert all("bias" not in v for v in p0["decoder"]["layer_0"]["attention"].values())
  zeros = p0["decoder"]["layer_0"]["adaln"]["proj"]["kernel"]
  xavier = p1["decoder"]["layer_0"]["adaln"]["proj"]["kernel"]  # [E, 6, E]: fan_in E, fan_out 6E
  assert not np.any(np.asarray(zeros))
  e = xavier.shape[0]
  np.testing.assert_allclose(np.std(np.asarray(xavier)), np.sqrt(2.0 / (e + 6 * e)), rtol=0.1)
  # Dropout: on only when asked (deterministic=False with a dropout rng), and it changes the velocities.
  params = _params(official)
  x = np.random.default_rng(0).normal(size=(2, 16, 3)).astype(np.float32)
  t = np.full((2, 16), 0.3, np.float32)
  plain = _apply(official, params, x, t, [0, 1])
  np.testing.assert_allclose(plain, _apply(official, params, x, t, [0, 1], deterministic=True))
  dropped = [_apply(official, params, x, t, [0, 1], deterministic=False, rngs={"dropout": jax.random.key(k)})
             for k in (0, 1)]
  assert np.abs(dropped[0] - plain).max() > 1e-3 and np.abs(dropped[0] - dropped[1]).max() > 1e-3
  with pytest.raises(ValueError, match="config.model.adaln_init"):
    _tiny("cell", adaln_init="ones").check()


def test_dropout_under_scanned_and_rematerialised_layers():
  """The pod configs' layer stack (nn.scan, remat) with dropout: a gradient step with a mask per layer."""
  model = _tiny("cell", dropout=0.5, scan_layers=True, remat_policy="full", qkv_bias=True, adaln_init="xavier")
  params = _params(model)
  x = np.random.default_rng(0).normal(size=(2, 16, 3)).astype(np.float32)
  t, labels = np.full((2, 16), 0.3, np.float32), jnp.array([0, 1])

  def loss(p, key):
    v = model.apply({"params": p}, x, t, labels, deterministic=False, rngs={"dropout": key})
    return jnp.mean(jnp.square(v))

  values = [jax.jit(jax.value_and_grad(loss))(params, jax.random.key(k)) for k in (0, 1)]
  assert all(np.isfinite(float(v)) for v, _ in values) and float(values[0][0]) != float(values[1][0])
  without = model.clone(dropout=0.0)  # the same parameters; deterministic calls must equal it
  np.testing.assert_allclose(_apply(model, params, x, t, labels), _apply(without, params, x, t, labels), rtol=1e-6)


def test_a_train_step_with_every_official_switch(data_dir):
  """xar_imagenet.py's switches (nbp.models.xar.OFFICIAL) on the digits: a finite step, dropout in the loss only."""
  config = tiny_xar_config(data_dir, "cell", **{f"model.{k}": v for k, v in xar_model.OFFICIAL.items()})
  task = tasks.make_task(config)
  batch = next(task.data("train", seed=0, process_index=0, process_count=1, batch_size=4))
  params = task.model.init(jax.random.key(0), **task.init_inputs())["params"]
  (value, _), grads = jax.jit(jax.value_and_grad(task.loss, has_aux=True))(params, batch, jax.random.key(1))
  assert np.isfinite(float(value)) and all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  params = jax.tree.map(lambda p: p + 0.05 * jnp.sign(p + 0.5), params)  # a nonzero head: dropout shows
  key, loss_cfg = jax.random.key(2), dict(config.loss, class_dropout=0.0)
  held_out = float(task.predict_fn("eval_loss")(params, batch, key)[0])
  without = float(xar.objective(task.model, params, batch, key, train=False, **loss_cfg)[0])
  with_dropout = float(xar.objective(task.model, params, batch, key, train=True, **loss_cfg)[0])
  assert held_out == without and abs(with_dropout - without) > 1e-4


# ---------------------------------------------------------------------------
# Solvers and the sampler.


def test_solver_schedule_and_guidance_schedule():
  times = sampler.solver_times(5, 0.04)
  np.testing.assert_allclose(times, [1.0, 0.76, 0.52, 0.28, 0.04, 0.0], atol=1e-6)
  scales = [sampler.guidance_scale_at(k, 4, 2.5, "linear") for k in range(4)]
  np.testing.assert_allclose(scales, [1.0, 1.5, 2.0, 2.5])
  assert sampler.guidance_scale_at(0, 1, 2.5, "linear") == 2.5
  assert sampler.guidance_scale_at(2, 4, 2.5, "constant") == 2.5
  with pytest.raises(ValueError, match="config.sampler.num_steps"):
    sampler.solver_times(0, 0.04)


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
  out = jax.jit(lambda rng: sampler.sample(field, None, rng, num_samples=2, num_steps=7, solver="ode",
                                       use_cache=False))(jax.random.key(0))
  np.testing.assert_allclose(np.asarray(out), np.broadcast_to(target_grid, (2, 4, 4, 3)), rtol=1e-4, atol=1e-4)


def test_sde_step_is_euler_maruyama_of_the_reverse_sde():
  """By hand: drift v - (w/2) score with w = 2t and score -(x + (1-t) v) / t; noise sqrt(w |dt|); none at the end."""
  rng = np.random.default_rng(0)
  x, v, noise = (rng.normal(size=(3, 5)).astype(np.float32) for _ in range(3))
  t, t_next = 0.6, 0.45
  score = -(x + (1 - t) * v) / t
  drift = v - 0.5 * (2 * t) * score
  want = x + (t_next - t) * drift + np.sqrt(2 * t * (t - t_next)) * noise
  got = sampler.solver_step(jnp.asarray(x), jnp.asarray(v), t, t_next, jnp.asarray(noise), solver="sde")
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  final = sampler.solver_step(jnp.asarray(x), jnp.asarray(v), t, 0.0, None, solver="sde")
  np.testing.assert_allclose(np.asarray(final), x + (0.0 - t) * drift, rtol=1e-5, atol=1e-6)
  ode = sampler.solver_step(jnp.asarray(x), jnp.asarray(v), t, t_next, jnp.asarray(noise), solver="ode")
  np.testing.assert_allclose(np.asarray(ode), x + (t_next - t) * v, rtol=1e-6)


def _gaussian_field(mean: float, std: float, ents):
  """The exact velocity E[eps - x | x_t] of data N(mean, std^2) per value, x_t = (1 - t) x + t eps, as a model."""
  def apply(variables, x_t, t, labels):
    t = t[..., None]
    var = (1 - t) ** 2 * std ** 2 + t ** 2  # Var x_t
    r = x_t - (1 - t) * mean
    return t * r / var - (mean + (1 - t) * std ** 2 * r / var)  # E[eps | x_t] - E[x | x_t]
  return types.SimpleNamespace(entities=ents, teacher_forcing=False, seq_len=ents.seq_len, token_dim=4,
                               num_classes=2, apply=apply)


def test_sde_samples_have_the_spread_of_the_data():
  """With the exact velocity of N(1, 0.5^2) data, the SDE's samples have std 0.5 within 5% (4,096 values).

  Samplers with the noise wrong miss it: without noise the spread collapses
  (about 0.14), with half the noise variance it is about 0.36.
  """
  ents = _entities("cell", grid=(4, 4), cell=2)
  field = _gaussian_field(1.0, 0.5, ents)
  draw = jax.jit(lambda noise_scale: sampler.sample(field, None, jax.random.key(0), num_samples=64, num_steps=40,
                                                    solver="sde", noise_scale=noise_scale, use_cache=False))
  samples = np.asarray(draw(1.0))  # [64, 4, 4, 4]: 4,096 values
  assert abs(samples.mean() - 1.0) < 0.03 and abs(samples.std() / 0.5 - 1) < 0.05, samples.std()
  for wrong in (0.0, np.sqrt(0.5)):  # no noise; half the noise variance
    assert abs(np.asarray(draw(wrong)).std() / 0.5 - 1) > 0.15


SLOW = pytest.mark.slow


@pytest.mark.parametrize("kind,teacher_forcing,context", [
    ("cell", False, "t_end"), ("cell", False, "fixed"), ("scale", False, "t_end"),
    pytest.param("token", False, "clean", marks=SLOW), pytest.param("scale", True, "clean", marks=SLOW)])
def test_cached_sampling_equals_uncached(kind, teacher_forcing, context):
  """Every context mode, each kind of entity layout once: uniform entities (cells; tokens over several phases),
  entities of several sizes (scales), with and without teacher forcing."""
  model = _tiny(kind, teacher_forcing=teacher_forcing)
  params = _params(model)
  kw = dict(num_samples=3, num_steps=2, guidance_scale=2.0, labels=jnp.array([0, 3, 4]), cache_phases=1,
            context=context, context_t=0.3)
  cached = jax.jit(lambda p, r: sampler.sample(model, p, r, **kw))(params, jax.random.key(5))
  full = jax.jit(lambda p, r: sampler.sample(model, p, r, use_cache=False, **kw))(params, jax.random.key(5))
  assert cached.shape == (3, 4, 4, 3) and np.isfinite(np.asarray(cached)).all()
  np.testing.assert_allclose(np.asarray(cached), np.asarray(full), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("context", ["clean", "fixed"])
def test_a_prompt_is_kept_and_continued_alike_with_and_without_the_cache(context):
  """Given entities come back unchanged; the cached continuation equals the uncached reference, and what follows
  them depends on them. A prompt of every entity, or of entities of several sizes, is refused."""
  model = _tiny("cell")
  params = _params(model)
  prompt = jax.random.normal(jax.random.key(7), (3, 4, 4, 3))
  kw = dict(num_samples=3, num_steps=2, guidance_scale=2.0, labels=jnp.array([0, 3, 4]), cache_phases=1,
            context=context, context_t=0.3, given_entities=1)
  draw = jax.jit(lambda p, prompt, use_cache: sampler.sample(model, p, jax.random.key(5), prompt=prompt,
                                                             use_cache=use_cache, **kw), static_argnums=2)
  cached, full = np.asarray(draw(params, prompt, True)), np.asarray(draw(params, prompt, False))
  np.testing.assert_allclose(cached, full, rtol=1e-4, atol=1e-5)
  first = model.entities.sizes[0]
  seq = np.asarray(model.entities.decompose(jnp.asarray(cached)))
  np.testing.assert_allclose(seq[:, :first], np.asarray(model.entities.decompose(prompt))[:, :first], rtol=1e-6)
  other = np.asarray(model.entities.decompose(draw(params, prompt + 1.0, True)))
  assert np.abs(other[:, first:] - seq[:, first:]).max() > 1e-3
  with pytest.raises(ValueError, match="given_entities=4"):
    sampler.sample(model, params, jax.random.key(0), prompt=prompt, given_entities=4)
  with pytest.raises(ValueError, match="scale entities"):
    sampler.sample(_tiny("scale"), _params(_tiny("scale")), jax.random.key(0), prompt=prompt, given_entities=1)


def test_context_modes_differ_and_are_checked():
  """The three contexts give three different samples from the same noise (the later entities see them)."""
  model = _tiny("cell")
  params = _params(model, noise=0.2)
  draw = {c: np.asarray(sampler.sample(model, params, jax.random.key(3), num_samples=2, num_steps=2, context=c,
                                       use_cache=False)) for c in sampler.CONTEXTS}
  first = model.entities.sizes[0]
  for a, b in (("clean", "t_end"), ("clean", "fixed"), ("t_end", "fixed")):
    seq_a, seq_b = (np.asarray(model.entities.decompose(jnp.asarray(draw[c]))) for c in (a, b))
    np.testing.assert_allclose(seq_a[:, :first], seq_b[:, :first], rtol=1e-6)  # the first entity sees no context
    assert np.abs(seq_a[:, first:] - seq_b[:, first:]).max() > 1e-3, (a, b)
  with pytest.raises(ValueError, match="config.sampler.context"):
    sampler.sample(model, params, jax.random.key(0), context="noisy")
  with pytest.raises(ValueError, match="config.sampler.context_t"):
    sampler.sample(model, params, jax.random.key(0), context="fixed", context_t=1.0)


@pytest.mark.slow
def test_sampler_result_does_not_depend_on_the_cache_phases():
  model = _tiny("token")
  params = _params(model)
  runs = [sampler.sample(model, params, jax.random.key(1), num_samples=2, num_steps=2, cache_phases=p) for p in (1, 3)]
  np.testing.assert_allclose(np.asarray(runs[0]), np.asarray(runs[1]), rtol=1e-5, atol=1e-6)


def test_guidance_scale_one_equals_the_conditional_sampler():
  model = _tiny("cell")
  params = _params(model)
  labels = jnp.array([1, 2])
  kw = dict(num_samples=2, num_steps=2, labels=labels, cache_phases=1)
  plain = sampler.sample(model, params, jax.random.key(2), **kw)
  guided = jax.jit(lambda scale: sampler.sample(model, params, jax.random.key(2), guidance_scale=scale,
                                            guidance_schedule="constant", **kw))  # one compile, any scale
  np.testing.assert_allclose(np.asarray(guided(1.0)), np.asarray(plain), rtol=1e-5, atol=1e-5)
  # A different scale changes the samples (the null-class rows matter).
  assert np.abs(np.asarray(guided(3.0)) - np.asarray(plain)).max() > 1e-3


def test_the_sampler_compiles_to_loops_not_a_python_loop_per_step():
  """Token entities, 16 of them with 5 solver steps each: the program has one model call per phase, not 80."""
  model = _tiny("token")
  params = _params(model)
  jaxpr = jax.make_jaxpr(lambda p: sampler.sample(model, p, jax.random.key(0), num_samples=1, num_steps=5,
                                              cache_phases=2))(params)
  text = str(jaxpr)
  assert text.count("while[") + text.count("scan[") >= 2
  assert text.count("dot_general") < 200  # 80 unrolled calls of a 2-layer model would hold far more


# ---------------------------------------------------------------------------
# Sizes, configs and training.


def test_sizes_match_the_paper():
  counts = {}
  for variant in ("B", "L", "H"):
    model = XAR(token_dim=16, grid=(16, 16), num_classes=1000, variant=variant, scan_layers=True)  # traces 1 layer
    shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 256, 16)), jnp.zeros((1, 256)),
                                                   jnp.zeros((1,), jnp.int32)))
    counts[variant] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) / 1e6
  assert SIZES["B"] == (16, 768, 12) and SIZES["L"] == (32, 1024, 16) and SIZES["H"] == (40, 1280, 16)
  assert abs(counts["B"] - 172) < 3 and abs(counts["L"] - 608) < 10 and abs(counts["H"] - 1100) < 100, counts


def test_imagenet_configs_use_the_official_network_and_cache():
  for size in ("B", "L", "H"):
    c = xar_imagenet.get_config(size)
    assert {k: c.model[k] for k in xar_model.OFFICIAL} == xar_model.OFFICIAL and c.sampler.context == "clean"
    assert (c.evals.eval.split, c.evals.eval.pred) == ("validation", "eval_loss")
  assert xar_model.OFFICIAL == dict(qkv_bias=True, input_norm=True, dropout=0.1, adaln_init="xavier",
                                    time_embedding="integer")
  fid = xar_digits.get_config("cell,fid").evals.fid
  assert (fid.split, fid.pred, fid.num_images) == ("validation", "sample_images", 144)


def tiny_xar_config(data_dir, arg="cell", **overrides):
  c = xar_digits.get_config(arg + ",tiny")
  c.data.dir = data_dir
  c.model.num_layers = 1  # fewer ops to compile
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
    sampler.sample(_tiny(), None, jax.random.key(0), solver="heun")
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
  """VAE (1 step) -> latent cache of moments with flips -> xAR on posterior draws -> samples decoded by the VAE."""
  vae_config = kl_vae_digits.get_config("local")
  vae_config.data.dir = data_dir
  set_tiny_budget(vae_config, num_steps=1, checkpoint_every=1)
  vae_config.unlock()
  vae_config.evals = {}  # only the checkpoint matters here
  train.train_and_evaluate(vae_config, str(tmp_path / "vae"))
  latent_dir = str(tmp_path / "latents")
  metadata = kl_vae.encode_latents(str(tmp_path / "vae"), latent_dir, flips=True)
  assert list(metadata["latent_shape"]) == [4, 4, 4] and metadata["scaling_factor"] > 0 and metadata["moments"]
  assert set(metadata["num_examples"]) == {"train", "validation", "test"}

  config = tiny_xar_config(data_dir, "cell,latents", **{"data.latent_dir": latent_dir, "num_steps": 1,
                                                         "checkpoint_every": 1, "loss.posterior": "sample"})
  task = tasks.make_task(config)
  batch = next(task.data("train", seed=0, process_index=0, process_count=1, batch_size=4))
  assert batch["latent"].shape == batch["latent_std"].shape == (4, 4, 4, 4)
  np.testing.assert_allclose(np.std(batch["latent"]), 1.0, rtol=0.5)  # scaled to about unit spread
  to_images = task.predict_fn("to_images")
  assert to_images(np.asarray(batch["latent"])).shape == (4, 16, 16, 1)
  # The posterior: "mean" trains on the mean; "sample" on mean + std * eps, a new draw per key.
  draws = [np.asarray(xar.training_grid(batch, "sample", jax.random.key(k))) for k in range(2)]
  np.testing.assert_array_equal(np.asarray(xar.training_grid(batch, "mean", None)), batch["latent"])
  eps = (draws[0] - batch["latent"]) / batch["latent_std"]
  assert 0.5 < np.std(eps) < 1.5 and np.abs(draws[0] - draws[1]).max() > 0
  result = train.train_and_evaluate(config, str(tmp_path / "xar"))
  assert result["step"] == 1 and np.isfinite(result["loss"])
  assert os.path.exists(tmp_path / "xar" / "samples" / "step_0000001.png")
  with pytest.raises(ValueError, match="config.model.grid"):
    tasks.make_task(tiny_xar_config(data_dir, "cell,latents", **{"data.latent_dir": latent_dir, "model.grid": (8, 8)}))

  # A cache written before the moments were stored (means only) still trains on means; "sample" names the fix.
  with open(os.path.join(latent_dir, "metadata.json")) as f:
    old = json.load(f)
  del old["moments"]
  with open(os.path.join(latent_dir, "metadata.json"), "w") as f:
    json.dump(old, f)
  tasks.make_task(tiny_xar_config(data_dir, "cell,latents", **{"data.latent_dir": latent_dir}))
  with pytest.raises(ValueError, match="config.loss.posterior='sample'.*experiments.encode_latents"):
    tasks.make_task(config)
  with pytest.raises(ValueError, match="experiments.encode_latents"):
    xar.training_grid({"latent": batch["latent"], "class": batch["class"]}, "sample", jax.random.key(0))
  with pytest.raises(ValueError, match="config.loss.posterior"):
    tasks.make_task(tiny_xar_config(data_dir, "cell", **{"loss.posterior": "sample"}))
