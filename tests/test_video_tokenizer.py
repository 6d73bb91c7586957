"""The video tokenizer: FSQ, causality in time, shapes, its switches (swish_beta, conv resampling, LPIPS),
training through the shared loop, token export."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import video_tokenizer_digits
from nbp import tasks
from nbp.data import clips, moving_digits, pipeline
from nbp.data import tokens as tokens_lib
from nbp.models import vgg
from nbp.models import video_tokenizer as vt
from nbp.tasks import video_tokenizer as vt_task
from nbp.training import loop as train
from nbp.training import metrics as metrics_lib
from tests.conftest import apply_overrides, set_tiny_budget


def _tokenizer(**kw):
  fields = dict(levels=(8, 5, 5), channels=8, channel_multipliers=(1, 2, 2), num_res_blocks=1,
                time_factor=4, space_factor=4, norm_groups=4)
  fields.update(kw)
  return vt.VideoTokenizer(**fields)


def _init(model, video):
  """Parameters, initialised under jit (eager init compiles every random op on its own: slower)."""
  return jax.jit(model.init)(jax.random.key(1), video)["params"]


def tiny_tokenizer_config(data_dir: str, **overrides):
  """5 frames of 8x8 -> 2x2x2 tokens, 8 channels: a step takes a few milliseconds."""
  c = video_tokenizer_digits.get_config("local")
  c.data.dir = data_dir
  c.data.frame_size = 8
  c.data.num_train = 64
  c.data.num_test = 16
  c.model.channels = 8
  c.model.channel_multipliers = (1, 2, 2)
  c.model.time_factor = 4
  c.model.space_factor = 4
  c.model.levels = (5, 5, 5)
  c.sampler.num_samples = 2
  set_tiny_budget(c, num_steps=1, checkpoint_every=100)
  return apply_overrides(c, overrides)


# ------------------------------------------------------------------------- FSQ


def test_fsq_indices_round_trip_over_every_code():
  fsq = vt.FSQ((4, 3, 5))
  indices = jnp.arange(fsq.codebook_size)
  codes = fsq.indices_to_codes(indices)
  assert codes.shape == (60, 3)
  np.testing.assert_array_equal(fsq.codes_to_indices(codes), indices)
  assert len({tuple(c) for c in np.asarray(codes).tolist()}) == fsq.codebook_size  # all distinct
  assert vt.FSQ().codebook_size == 64_000 and vt.FSQ().dim == 6


def test_fsq_values_lie_on_the_grid():
  fsq = vt.FSQ((8, 5, 2, 3))
  z = 4.0 * jax.random.normal(jax.random.key(0), (4096, 4))
  codes = np.asarray(fsq.quantize(z))
  for i, levels in enumerate(fsq.levels):
    half = levels // 2
    grid = (np.arange(levels) - half) / half
    values = np.unique(codes[:, i])
    assert np.all(np.isclose(values[:, None], grid[None]).any(axis=1)), (levels, values)
    assert len(values) == levels  # wide inputs reach every level
  indices = np.asarray(fsq.codes_to_indices(codes))
  assert indices.min() >= 0 and indices.max() < fsq.codebook_size
  np.testing.assert_allclose(fsq.indices_to_codes(indices), codes, atol=1e-6)


def test_straight_through_gradient_is_identity():
  x = jnp.linspace(-3.0, 3.0, 13)
  np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(vt.round_ste(v)))(x), np.ones(13))
  fsq = vt.FSQ((8, 5))
  z = jax.random.normal(jax.random.key(1), (7, 2))
  grad_quantized = jax.grad(lambda v: jnp.sum(fsq.quantize(v) * fsq._half_width()))(z)
  grad_bound = jax.grad(lambda v: jnp.sum(fsq.bound(v)))(z)
  np.testing.assert_allclose(grad_quantized, grad_bound, rtol=1e-6)


# ------------------------------------------------------------------ the network


@pytest.mark.parametrize("strides", [(1, 1, 1), (2, 2, 2)])
def test_conv_implementations_agree(strides):
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 6, 3))
  taps = vt.CausalConv3D(4, strides=strides, impl="taps")
  params = taps.init(jax.random.key(1), x)
  y = taps.apply(params, x)
  np.testing.assert_allclose(vt.CausalConv3D(4, strides=strides, impl="conv3d").apply(params, x), y, atol=1e-5)
  st, sh, _ = strides
  assert y.shape == (2, 1 + 4 // st, 6 // sh, 6 // sh, 4)
  # Which input frames each output frame sees, by changing one input frame at a time: output frame j sees input
  # frames st*j-2..st*j (with stride 2 they overlap by one), never a later one.
  sees = {j: {i for i in range(5) if float(jnp.abs(taps.apply(params, x.at[:, i].add(5.0))[:, j] - y[:, j]).max()) > 0}
          for j in range(y.shape[1])}
  assert sees == {j: {i for i in range(st * j - 2, st * j + 1) if i >= 0} for j in range(y.shape[1])}


@pytest.mark.slow
@pytest.mark.parametrize("frames,size,time,space", [(9, 16, 4, 4), (3, 8, 2, 2), (2, 8, 1, 2)])
def test_encode_decode_shapes(frames, size, time, space):
  model = _tokenizer(time_factor=time, space_factor=space, num_res_blocks=0, channels=4)
  video = jax.random.uniform(jax.random.key(0), (2, frames, size, size, 1), minval=-1, maxval=1)
  params = _init(model, video)
  codes, indices = jax.jit(lambda v: model.apply({"params": params}, v, method=vt.VideoTokenizer.encode))(video)
  f, h, w = model.latent_shape(frames, size, size)
  assert (f, h, w) == (1 + (frames - 1) // time, size // space, size // space)
  assert codes.shape == (2, f, h, w, 3) and indices.shape == (2, f, h, w) and indices.dtype == jnp.int32
  assert int(indices.min()) >= 0 and int(indices.max()) < model.codebook_size
  np.testing.assert_array_equal(model.fsq.codes_to_indices(codes), indices)
  decoded = jax.jit(lambda i: model.apply({"params": params}, i, method=vt.VideoTokenizer.decode_indices))(indices)
  assert decoded.shape == video.shape
  reconstruction, aux = jax.jit(lambda v: model.apply({"params": params}, v))(video)
  np.testing.assert_allclose(reconstruction, decoded, atol=1e-5)  # decode(codes) == decode_indices(indices)
  assert aux["indices"].shape == (2, f, h, w)


def test_bad_frame_count_is_named():
  with pytest.raises(ValueError, match="1 \\+ 4\\*k"):
    _tokenizer().latent_shape(6, 16, 16)
  with pytest.raises(ValueError, match="power of two"):
    vt.downsample_schedule(2, 3, 4)
  with pytest.raises(ValueError, match="config.model.resample='pixel_shuffle'"):
    jax.eval_shape(_tokenizer(resample="pixel_shuffle").init, jax.random.key(0), jnp.zeros((1, 5, 4, 4, 1)))
  with pytest.raises(ValueError, match="config.model.activation='gelu'"):
    jax.eval_shape(_tokenizer(activation="gelu").init, jax.random.key(0), jnp.zeros((1, 5, 4, 4, 1)))


# "conv" is checked without residual blocks (the same in both options): only what it changes, cheaper.
RESAMPLES = [{}, {"resample": "conv", "num_res_blocks": 0}]


@pytest.mark.slow
@pytest.mark.parametrize("fields", RESAMPLES, ids=["space_to_depth", "conv"])
def test_encoder_is_causal_in_time(fields):
  """F=9, time 4x: latent frame j depends on frames <= 4j; changing frame 5 leaves latents 0, 1 unchanged."""
  model = _tokenizer(**fields)
  video = jax.random.uniform(jax.random.key(0), (2, 9, 16, 16, 1), minval=-1, maxval=1)
  params = _init(model, video)
  if model.resample == "conv":  # strided 3x3x3 convs down keeping the width, a 3x3x3 conv before depth-to-space
    shapes = jax.tree.map(jnp.shape, params)
    assert [shapes["encoder"][f"downsample_{i}"]["kernel"] for i in range(2)] == [(3, 3, 3, 8, 8)] * 2
    assert shapes["decoder"]["upsample_1"]["kernel"] == (3, 3, 3, 16, 8 * 16)  # 2x2x2 at the decoder's width, 16
    assert not any(name.startswith("Dense") for name in params["decoder"])
  # The latents before quantisation (a strict check: rounding could hide small leaks), then the codes.
  encode = jax.jit(lambda v: model.apply({"params": params}, v, method=lambda m, x: m.encoder(x)))
  codes = jax.jit(lambda v: model.apply({"params": params}, v, method=vt.VideoTokenizer.encode)[0])
  np.testing.assert_array_equal(codes(video)[:, :2], codes(video.at[:, 5:].set(0.0))[:, :2])
  latents = encode(video)
  assert latents.shape == (2, 3, 4, 4, 3)
  changed = encode(video.at[:, 5].set(jax.random.uniform(jax.random.key(2), (2, 16, 16, 1))))
  np.testing.assert_array_equal(latents[:, :2], changed[:, :2])  # bit-identical, not merely close
  assert float(jnp.abs(latents[:, 2] - changed[:, 2]).max()) > 0
  # Frame 4 is the last frame of latent frame 1.
  changed = encode(video.at[:, 4].set(0.5))
  np.testing.assert_array_equal(latents[:, :1], changed[:, :1])
  assert float(jnp.abs(latents[:, 1] - changed[:, 1]).max()) > 0


@pytest.mark.slow
@pytest.mark.parametrize("fields", RESAMPLES, ids=["space_to_depth", "conv"])
def test_decoder_is_causal_in_time(fields):
  """Output frame i depends on latent frames <= ceil(i / 4): changing latent 2 leaves frames 0..4 unchanged."""
  model = _tokenizer(**fields)
  video = jnp.zeros((2, 9, 16, 16, 1))
  params = _init(model, video)
  decode = jax.jit(lambda i: model.apply({"params": params}, i, method=vt.VideoTokenizer.decode_indices))
  indices = jax.random.randint(jax.random.key(3), (2, 3, 4, 4), 0, model.codebook_size)
  out = decode(indices)
  changed = decode(indices.at[:, 2].set((indices[:, 2] + 7) % model.codebook_size))
  np.testing.assert_array_equal(out[:, :5], changed[:, :5])
  assert float(jnp.abs(out[:, 5:] - changed[:, 5:]).max()) > 0


def test_swish_beta_adds_a_beta_per_channel_and_equals_swish_at_one():
  fields = dict(num_res_blocks=1, channels=4, channel_multipliers=(1, 2), time_factor=1, space_factor=2)
  video = jax.random.uniform(jax.random.key(0), (1, 2, 4, 4, 1), minval=-1, maxval=1)
  plain, learned = _tokenizer(**fields), _tokenizer(activation="swish_beta", **fields)
  strip = lambda tree: ({k: strip(v) for k, v in tree.items() if not k.startswith("Swish")}
                        if isinstance(tree, dict) else tree)  # the betas removed
  # The parameters' shapes (an init is not compiled: that would cost more than the whole check).
  shapes = jax.eval_shape(learned.init, jax.random.key(1), video)["params"]
  betas = [leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
           if "beta" in jax.tree_util.keystr(path)]
  # One beta per channel after every norm: 2 per residual block (3 per coder), 1 before each coder's output.
  assert len(betas) == 2 * (2 * 3 + 1) and sorted(set(betas)) == [(4,), (8,)]
  assert jax.tree.structure(strip(shapes)) == jax.tree.structure(
      jax.eval_shape(plain.init, jax.random.key(1), video)["params"])  # otherwise the plain network's
  np.testing.assert_array_equal(vt.Swish().init(jax.random.key(0), jnp.ones((2, 4)))["params"]["beta"],
                                np.ones(4))  # initialised at 1

  # At beta = 1 both networks compute the same function (random weights elsewhere).
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: np.ones(leaf.shape, np.float32) if "beta" in jax.tree_util.keystr(path)
      else 0.3 * rng.standard_normal(leaf.shape).astype(np.float32), shapes)
  outputs = jax.jit(lambda p, q: (learned.apply({"params": p}, video)[0], plain.apply({"params": q}, video)[0]))
  np.testing.assert_allclose(*outputs(params, strip(params)), rtol=1e-5, atol=1e-6)
  x = jnp.linspace(-3.0, 3.0, 8).reshape(2, 4)
  beta = jnp.asarray([0.5, 1.0, 2.0, 4.0])
  np.testing.assert_allclose(vt.Swish().apply({"params": {"beta": beta}}, x), x * jax.nn.sigmoid(beta * x),
                             rtol=1e-6)


@pytest.mark.slow
def test_adversarial_term_trains_each_side_on_its_own_objective():
  """Two parameter groups: the discriminator's gradient is the hinge loss's, the encoder's the generator's."""
  model = _tokenizer(discriminator_channels=4, num_res_blocks=0, channels=4, time_factor=2, space_factor=2,
                     channel_multipliers=(1, 1))
  video = jax.random.uniform(jax.random.key(0), (2, 3, 8, 8, 1), minval=-1, maxval=1)
  params = _init(model, video)
  assert "discriminator" in params
  loss = lambda p, batch, rng: vt_task.loss(model, p, batch, rng, adversarial_weight=0.5)
  (value, metrics), grads = jax.jit(lambda p: train.loss_and_grad(
      loss, p, {"video": video}, None, vt_task.param_labels))(params)
  assert set(metrics) >= {"loss_model", "loss_discriminator", "discriminator_loss"}

  # Discriminator gradient = gradient of the hinge loss alone (reconstruction held fixed).
  recon, _ = model.apply({"params": params}, video)
  def d_loss(d):
    p = dict(params, discriminator=d)
    disc = lambda v: model.apply({"params": p}, v, method=vt.VideoTokenizer.discriminate)
    return jnp.mean(jax.nn.relu(1 - disc(video))) + jnp.mean(jax.nn.relu(1 + disc(recon)))
  expected = jax.jit(jax.grad(d_loss))(params["discriminator"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads["discriminator"],
               expected)
  # Encoder gradient = gradient of reconstruction + 0.5 * generator term (no discriminator loss in it).
  def g_loss(p):
    recon, _ = model.apply({"params": p}, video)
    err = recon - video
    fake = model.apply({"params": params}, recon, method=vt.VideoTokenizer.discriminate)
    return jnp.mean(jnp.abs(err)) + jnp.mean(err ** 2) - 0.5 * jnp.mean(fake)
  np.testing.assert_allclose(value, g_loss(params), rtol=1e-5)
  expected = jax.jit(jax.grad(g_loss))(params)["encoder"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads["encoder"], expected)


def test_discriminator_group_gets_its_own_optimizer(data_dir):
  """config.param_groups.discriminator: that group's optimizer only; a learning rate of 0 leaves it unchanged."""
  config = tiny_tokenizer_config(data_dir, **{"optimizer.warmup_steps": 0, "optimizer.lr": 0.1})
  with config.unlocked():
    config.param_groups.discriminator = {"lr": 0.0}
  params = {"encoder": {"kernel": jnp.ones((2, 2))}, "discriminator": {"kernel": jnp.ones((2, 2))}}
  task = tasks.Task(model=None, init_inputs=None, data=None, param_labels=vt_task.param_labels,
                    loss=lambda p, batch, rng: ({"model": jnp.sum(p["encoder"]["kernel"] * p["discriminator"]["kernel"]),
                                                 "discriminator": -jnp.sum(p["discriminator"]["kernel"] ** 2)}, {}))
  tx, _ = train.make_optimizer(config, task)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema_params=None)
  new, metrics = jax.jit(lambda st: train.train_step(st, {}, jax.random.key(0), task=task, tx=tx,
                                                     schedule=lambda step: 0.1, grad_accum_steps=1,
                                                     ema_decay=0.0))(state)
  np.testing.assert_array_equal(new.params["discriminator"]["kernel"], params["discriminator"]["kernel"])
  assert float(jnp.max(jnp.abs(new.params["encoder"]["kernel"] - 1.0))) > 0.01  # its own optimizer moved it
  assert float(metrics["loss_discriminator"]) == -4.0 and float(metrics["loss"]) == 4.0
  with config.unlocked():
    config.param_groups.discriminator = {"learning_rate": 0.0}
  with pytest.raises(ValueError, match="config.param_groups.discriminator.learning_rate"):
    train.make_optimizer(config, task)


def test_perceptual_weight_without_features_is_refused(data_dir):
  with pytest.raises(ValueError, match="perceptual_features"):
    train.setup(tiny_tokenizer_config(data_dir, **{"loss.perceptual_weight": 1.0}))


def _random_lpips_weights(seed: int = 0) -> dict[str, np.ndarray]:
  """VGG16 + LPIPS heads of the right shapes, He-scaled random values (no real weights on this machine)."""
  rng = np.random.default_rng(seed)
  weights = {}
  for key, shape in vgg.EXPECTED_SHAPES.items():
    fan_in = int(np.prod(shape[:-1])) if key.endswith("/kernel") else 1
    scale = np.sqrt(2.0 / fan_in) if key.endswith("/kernel") else 0.1
    values = rng.standard_normal(shape, np.float32)
    weights[key] = np.abs(values) * np.float32(0.1) if key.startswith("lin") else values * np.float32(scale)
  return weights


def test_lpips_loads_local_weights_and_names_a_bad_key(tmp_path):
  weights = _random_lpips_weights()
  path = str(tmp_path / "lpips_vgg16.npz")
  vgg.save_weights(path, weights)
  loaded = vgg.load_weights(path)
  assert set(loaded) == set(vgg.EXPECTED_SHAPES) and len(loaded) == 2 * 13 + 5
  msgpack = str(tmp_path / "lpips_vgg16.msgpack")  # the other format, nested {"conv1_1": {"kernel", ...}}
  vgg.save_weights(msgpack, weights)
  np.testing.assert_array_equal(vgg.load_weights(msgpack)["conv5_3/kernel"], weights["conv5_3/kernel"])

  # The distance: 0 for equal frames, > 0 otherwise; grey frames are the same frames repeated to RGB.
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 16, 16, 1)).astype(np.float32)
  y = np.clip(x + 0.3 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
  z = rng.standard_normal((2, 2, 2, 512)).astype(np.float32)
  video = lambda frames: frames.reshape(1, 2, 16, 16, -1)

  @jax.jit  # one compilation
  def run(w):
    conv = jax.lax.conv_general_dilated(z, w["conv5_1/kernel"], (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return (vgg.lpips(w, x, x), vgg.lpips(w, x, y), vgg.lpips(w, jnp.repeat(x, 3, -1), jnp.repeat(y, 3, -1)),
            vt_task.lpips_loss(w, video(x), video(y)),  # the task's term: the mean over frames
            vgg._conv(z, w["conv5_1/kernel"], w["conv5_1/bias"]), jax.nn.relu(conv + w["conv5_1/bias"]))

  same, grey, rgb, term, small_conv, conv = run(loaded)
  np.testing.assert_allclose(same, 0.0, atol=1e-6)
  assert grey.shape == (2,) and np.all(np.asarray(grey) > 0)
  np.testing.assert_allclose(rgb, grey, rtol=1e-5)
  np.testing.assert_allclose(term, np.mean(grey), rtol=1e-5)
  np.testing.assert_allclose(small_conv, conv, rtol=1e-4, atol=1e-4)  # the CPU path of small inputs

  # torchvision's VGG16 state dict and the LPIPS heads convert to the same arrays.
  conv_names = [name for block in vgg.BLOCKS for name, _, _ in block]
  torch_vgg = {}
  for i, name in zip((0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), conv_names):
    torch_vgg[f"features.{i}.weight"] = weights[f"{name}/kernel"].transpose(3, 2, 0, 1)  # [Cout, Cin, 3, 3]
    torch_vgg[f"features.{i}.bias"] = weights[f"{name}/bias"]
  heads = {f"lin{k}.model.1.weight": weights[f"lin{k}"].reshape(1, -1, 1, 1) for k in range(5)}
  converted = vgg.from_torch_state_dicts(torch_vgg, heads)
  jax.tree.map(np.testing.assert_array_equal, converted, weights)

  # A missing file, a missing key, a wrong shape: each error names the file and the key.
  with pytest.raises(FileNotFoundError, match="nowhere.npz"):
    vgg.load_weights(str(tmp_path / "nowhere.npz"))
  bad = str(tmp_path / "bad_key.npz")
  vgg.save_weights(bad, {k: v for k, v in weights.items() if k != "conv3_2/bias"})
  with pytest.raises(ValueError, match="bad_key.npz.*lacks the key 'conv3_2/bias'"):
    vgg.load_weights(bad)
  with pytest.raises(ValueError, match="conv3_2/bias"):  # through the config, when the task is built
    tasks.make_task(tiny_tokenizer_config(str(tmp_path), **{"loss.perceptual_weight": 1.0,
                                                            "loss.perceptual_weights_file": bad}))
  vgg.save_weights(bad, dict(weights, lin2=np.ones(255, np.float32)))
  with pytest.raises(ValueError, match="bad_key.npz.*'lin2' has shape \\(255,\\), expected \\(256,\\)"):
    vgg.load_weights(bad)


def test_perceptual_hook_takes_a_user_feature_function():
  features = lambda frames: [frames, jnp.mean(frames, axis=(1, 2), keepdims=True) * jnp.ones((1, 1, 1, 2))]
  video = jnp.zeros((1, 5, 8, 8, 1)) + 0.5
  assert float(vt_task.perceptual_loss(features, video, video)) == 0.0
  assert float(vt_task.perceptual_loss(features, video, -video)) > 0.0


# ------------------------------------------------------------ the shared loop


@pytest.mark.slow
def test_one_training_step_through_the_shared_loop(tmp_path, data_dir):
  config = tiny_tokenizer_config(data_dir)
  with config.unlocked():
    config.evals.psnr = dict(type="psnr")  # the reconstruction PSNR of the sampler's validation videos
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["status"] == "done" and result["step"] == 1
  rows = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  evals = [r for r in rows if "eval/psnr" in r]
  assert evals and np.isfinite(evals[-1]["eval/psnr"]) and "eval/recon" in evals[-1]
  last = {k: v for r in rows for k, v in r.items()}
  assert np.isfinite(last["psnr/psnr"]) and 0 < last["psnr/psnr"] < 60
  np.testing.assert_allclose(last["psnr/psnr"], last["sample/psnr"], rtol=1e-5)  # the same videos, two ways
  assert os.path.exists(os.path.join(tmp_path, "samples", "step_0000001.gif"))

  # The run's "encode" and "decode", loaded from the workdir alone (its config.json and checkpoint).
  run = tasks.load_run(str(tmp_path))
  video = jnp.zeros((1, 5, 8, 8, 1))
  tokens = jax.jit(run.predict("encode"))(video)
  assert tokens.shape == (1, 2, 2, 2) and tokens.dtype == jnp.int32
  decoded = jax.jit(run.predict("decode"))(tokens)
  assert decoded.shape == video.shape and float(jnp.max(jnp.abs(decoded))) <= 1.0


@pytest.mark.slow
def test_reconstruction_loss_falls_in_a_short_run(tmp_path, data_dir):
  config = tiny_tokenizer_config(data_dir, num_steps=30, log_every=5, **{"optimizer.lr": 3e-3,
                                                                         "sampler.num_samples": 0})
  train.train_and_evaluate(config, str(tmp_path))
  rows = [r for r in metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl")) if "recon" in r]
  assert rows[-1]["recon"] < 0.6 * rows[0]["recon"], [r["recon"] for r in rows]
  assert rows[-1]["psnr"] > rows[0]["psnr"] + 2.0


@pytest.mark.slow
def test_encode_tokens_round_trip(tmp_path, data_dir):
  config = tiny_tokenizer_config(data_dir)
  workdir = str(tmp_path / "tokenizer")
  train.train_and_evaluate(config, workdir)
  encode = jax.jit(tasks.load_run(workdir).predict("encode"))
  out = str(tmp_path / "tokens")
  metadata = vt_task.encode_tokens(workdir, out, splits=("test",), batch_size=6)
  assert metadata["num_examples"] == {"test": 16} and metadata["latent_shape"] == [2, 2, 2]

  source = tokens_lib.token_source(out, "test")
  assert len(source) == 16 and source.metadata["codebook_size"] == 125
  d = config.data
  videos = pipeline.load_source(moving_digits.builder_from_config(d), "test", d.dir)
  batch = np.stack([videos[i]["video"] for i in range(16)]).astype(np.float32) / 127.5 - 1.0
  expected = np.asarray(encode(jnp.asarray(batch)))
  for i in range(16):
    record = source[i]
    assert record["tokens"].dtype == np.int32 and record["tokens"].shape == (2, 2, 2)
    np.testing.assert_array_equal(record["tokens"], expected[i])
    np.testing.assert_array_equal(record["label"], videos[i]["label"])
  it = pipeline.make_iterator(source, global_batch_size=4, seed=0, process_index=0, process_count=1)
  assert next(it)["tokens"].shape == (4, 2, 2, 2)
  with pytest.raises(FileNotFoundError):
    tokens_lib.token_source(out, "train")

  # Two clips of each train video, the second mirrored (moving digits have one start); test stays centred.
  policy = clips.ClipPolicy(per_video=2, offsets="random", flip=True, seed=1)
  mirrored = str(tmp_path / "mirrored")
  metadata = vt_task.encode_tokens(workdir, mirrored, splits=("train", "test"), batch_size=6, train_clips=policy)
  assert metadata["num_examples"] == {"train": 128, "test": 16}
  assert metadata["clips"]["train"] == policy.to_metadata() and metadata["clips"]["test"]["offsets"] == "center"
  train_tokens = tokens_lib.token_source(mirrored, "train")
  train_videos = pipeline.load_source(moving_digits.builder_from_config(d), "train", d.dir)
  for r in range(4):
    record = train_tokens[r]
    assert int(record["video_index"]) == r // 2 and int(record["clip_start"]) == 0
    video = train_videos[r // 2]["video"]
    video = video[:, :, ::-1] if record["flip"] else video
    expected = encode(jnp.asarray(video[None].astype(np.float32) / 127.5 - 1.0))[0]
    np.testing.assert_array_equal(record["tokens"], np.asarray(expected))
  assert int(train_tokens[0]["flip"]) + int(train_tokens[1]["flip"]) == 1
  np.testing.assert_array_equal(tokens_lib.token_source(mirrored, "test")[3]["tokens"], source[3]["tokens"])
  with pytest.raises(ValueError, match=r"--clips_per_video=2: .*moving_digits.*--clip_flip"):
    vt_task.encode_tokens(workdir, str(tmp_path / "bad"), train_clips=clips.ClipPolicy(2, "random"))
