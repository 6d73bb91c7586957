"""xAR's KL VAE: shapes, the KL term, the GAN's parameter groups, training through the shared loop, latent cache."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import integrate, stats

from experiments.configs import kl_vae_digits, kl_vae_imagenet
from nbp import tasks
from nbp.data import images as images_lib
from nbp.data import latents as latents_lib
from nbp.data import pipeline
from nbp.models import kl_vae as kv
from nbp.tasks import kl_vae as kv_task
from nbp.training import loop as train
from nbp.training import metrics as metrics_lib
from tests.conftest import apply_overrides, set_tiny_budget
from tests.test_faults import _damage_record


def _vae(**kw):
  fields = dict(channels=1, latent_channels=2, downsample=2, width=8, channel_mult=(1, 2), num_res_blocks=1,
                mid_attention=False, norm_groups=4)
  fields.update(kw)
  return kv.KLVAE(**fields)


def _init(model, images, seed: int = 1):
  """Random parameters of `model`'s shapes, drawn in numpy: kernels N(0, 1 / fan_in), norm scales 1, biases 0.

  Compiling `model.init` (a random op per parameter) takes seconds on a CPU;
  these tests need parameters of the right shapes only.
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if leaf.ndim >= 2:
      return jnp.asarray(rng.normal(0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape), leaf.dtype)
    return jnp.ones(leaf.shape, leaf.dtype) if "scale" in name else jnp.zeros(leaf.shape, leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def tiny_vae_config(data_dir: str, **overrides):
  """8x8 digits -> 4x4x2 latents, 8 channels: a step takes a few milliseconds."""
  c = kl_vae_digits.get_config("local")
  c.data.dir = data_dir
  c.data.image_size = 8
  c.model.latent_channels = 2
  c.model.downsample = 2
  c.model.width = 8
  c.model.channel_mult = (1, 2)
  c.model.norm_groups = 4
  c.sampler.num_samples = 2
  set_tiny_budget(c, num_steps=1, checkpoint_every=100)
  return apply_overrides(c, overrides)


# ------------------------------------------------------------------ the network


@pytest.mark.parametrize("size,downsample,channels,attention", [(8, 2, 1, False), (16, 4, 3, True),
                                                                (32, 8, 1, False)])
def test_encode_decode_shapes(size, downsample, channels, attention):
  levels = int(np.log2(downsample)) + 1
  model = _vae(channels=channels, downsample=downsample, channel_mult=(1,) * levels, latent_channels=3,
               mid_attention=attention, width=4)
  images = jax.random.uniform(jax.random.key(0), (2, size, size, channels), minval=-1, maxval=1)
  params = _init(model, images)
  h = size // downsample
  assert model.latent_shape(size) == (h, h, 3)

  @jax.jit
  def run(x, rng):
    reconstruction, mean, logvar = model.apply({"params": params}, x, rng)
    decoded = model.apply({"params": params}, mean, method=kv.KLVAE.decode)
    return reconstruction, mean, logvar, decoded, model.apply({"params": params}, x)[0]

  reconstruction, mean, logvar, decoded, deterministic = run(images, jax.random.key(2))
  assert reconstruction.shape == decoded.shape == images.shape and reconstruction.dtype == jnp.float32
  assert mean.shape == logvar.shape == (2, h, h, 3) and mean.dtype == logvar.dtype == jnp.float32
  # Without an rng the reconstruction decodes the mean; with one, a sample around it.
  np.testing.assert_allclose(deterministic, decoded, atol=1e-5)
  assert float(jnp.abs(reconstruction - deterministic).max()) > 0


@pytest.fixture(scope="module")
def tiny():
  """A 2x VAE on 8x8 grey images and its parameters."""
  model = _vae()
  return model, _init(model, jnp.zeros((1, 8, 8, 1)))


def test_logvar_is_clipped(tiny):
  model, params = tiny
  images = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1), minval=-1, maxval=1)
  out = params["encoder"]["conv_out"]
  huge = dict(params, encoder=dict(params["encoder"], conv_out=dict(out, kernel=out["kernel"] * 1e6)))
  _, logvar = jax.jit(lambda p: model.apply({"params": p}, images, method=kv.KLVAE.encode))(huge)
  assert float(logvar.min()) == kv.LOGVAR_MIN and float(logvar.max()) == kv.LOGVAR_MAX


def test_bad_shapes_are_named():
  with pytest.raises(ValueError, match="config.model.downsample=6 must be a power of two"):
    _vae(downsample=6).latent_shape(12)
  with pytest.raises(ValueError, match="config.model.channel_mult=.*needs log2\\(4\\) \\+ 1 = 3"):
    _vae(downsample=4, channel_mult=(1, 2)).latent_shape(8)
  with pytest.raises(ValueError, match="config.data.image_size=9 does not divide"):
    _vae().latent_shape(9)


def test_size_table():
  assert kv.SIZES["kl16"] == dict(latent_channels=16, downsample=16, width=128, channel_mult=(1, 1, 2, 2, 4),
                                  num_res_blocks=2, mid_attention=True)
  model = kv.KLVAE(channels=3, **kv.SIZES["kl16"])
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 256, 256, 3))))["params"]
  count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  assert 64e6 < count < 65e6  # 64.4M, as the table in nbp/models/kl_vae.py says
  assert model.latent_shape(256) == (16, 16, 16)


# ------------------------------------------------------------------------ loss


def test_kl_matches_numerical_integration():
  """The closed form against the integral of q log(q / p) per value, summed per image, averaged over images."""
  rng = np.random.default_rng(0)
  mean = rng.normal(0, 1.5, (3, 2, 2, 2))
  logvar = rng.uniform(-4, 2, (3, 2, 2, 2))

  def kl_one(m, lv):
    q = stats.norm(m, np.exp(0.5 * lv))
    integrand = lambda z: q.pdf(z) * (q.logpdf(z) - stats.norm.logpdf(z))
    lo, hi = m - 12 * q.std(), m + 12 * q.std()
    return integrate.quad(integrand, lo, hi, points=[m], epsabs=1e-12, epsrel=1e-10, limit=200)[0]

  per_image = [sum(kl_one(m, lv) for m, lv in zip(mean[b].ravel(), logvar[b].ravel())) for b in range(3)]
  got = float(kv_task.kl_divergence(jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32)))
  np.testing.assert_allclose(got, np.mean(per_image), rtol=1e-5)
  assert float(kv_task.kl_divergence(jnp.zeros((2, 3, 3, 4)), jnp.zeros((2, 3, 3, 4)))) == 0.0  # the prior itself


def test_loss_terms_and_metrics(tiny):
  model, params = tiny
  batch = {"image": jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1)), jnp.uint8)}
  rng = jax.random.key(3)

  @jax.jit
  def both(p):
    value, metrics = kv_task.loss(model, p, batch, rng, l1_weight=0.5, mse_weight=2.0, kl_weight=0.1)
    recon, mean, logvar = model.apply({"params": p}, kv_task.normalize(batch["image"]), rng)
    err = recon - kv_task.normalize(batch["image"])
    kl = kv_task.kl_divergence(mean, logvar)
    return value, metrics, 0.5 * jnp.mean(jnp.abs(err)) + 2.0 * jnp.mean(err ** 2) + 0.1 * kl / 64

  value, metrics, expected = both(params)
  assert set(metrics) >= {"psnr", "kl", "l1", "num_targets"} and float(metrics["num_targets"]) == 4
  np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_adversarial_term_trains_each_side_on_its_own_objective():
  """Two parameter groups: the discriminator's gradient is the hinge loss's, the encoder's the VAE + generator's."""
  model = _vae(discriminator_channels=4, discriminator_layers=2)
  batch = {"image": jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1)), jnp.uint8)}
  images = kv_task.normalize(batch["image"])
  params = _init(model, images)
  assert "discriminator" in params
  rng = jax.random.key(5)
  loss = lambda p, b, r: kv_task.loss(model, p, b, r, adversarial_weight=0.5, kl_weight=0.01)
  (value, metrics), grads = jax.jit(lambda p: train.loss_and_grad(loss, p, batch, rng, kv_task.param_labels))(params)
  assert set(metrics) >= {"loss_model", "loss_discriminator", "discriminator_loss"}

  def d_loss(d, recon):
    disc = lambda x: model.apply({"params": dict(params, discriminator=d)}, x, method=kv.KLVAE.discriminate)
    return jnp.mean(jax.nn.relu(1 - disc(images))) + jnp.mean(jax.nn.relu(1 + disc(recon)))

  def g_loss(p):
    recon, mean, logvar = model.apply({"params": p}, images, rng)
    fake = model.apply({"params": params}, recon, method=kv.KLVAE.discriminate)
    kl = jnp.mean(jnp.sum(0.5 * (mean ** 2 + jnp.exp(logvar) - 1 - logvar), axis=(1, 2, 3)))
    return jnp.mean(jnp.abs(recon - images)) + 0.01 * kl / 64 - 0.5 * jnp.mean(fake)

  @jax.jit
  def expected_grads(p):
    recon = model.apply({"params": p}, images, rng)[0]
    return g_loss(p), jax.grad(g_loss)(p), jax.grad(d_loss)(p["discriminator"], recon)

  # Discriminator gradient = that of the hinge loss alone (reconstruction held fixed); the encoder's and
  # decoder's = that of reconstruction + KL + 0.5 * generator term (no discriminator loss in it).
  expected_value, expected_g, expected_d = expected_grads(params)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  jax.tree.map(close, grads["discriminator"], expected_d)
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  for part in ("encoder", "decoder"):
    jax.tree.map(close, grads[part], expected_g[part])


def test_adversarial_weight_without_discriminator_is_refused(data_dir):
  with pytest.raises(ValueError, match="config.model.discriminator_channels"):
    train.setup(tiny_vae_config(data_dir, **{"loss.adversarial_weight": 0.1}))
  with pytest.raises(ValueError, match="config.model.channels=3"):
    train.setup(tiny_vae_config(data_dir, **{"model.channels": 3}))


def test_configs_pass_the_schema():
  for config in (kl_vae_digits.get_config("local"), kl_vae_imagenet.get_config()):
    tasks.check_config(config)
  c = kl_vae_imagenet.get_config()
  assert (c.model.downsample, c.model.latent_channels, c.data.image_size) == (16, 16, 256)
  assert c.loss.adversarial_weight > 0 and c.model.discriminator_channels > 0 and "discriminator" in c.param_groups


# ----------------------------------------------------------------- latent cache


def _fake_images(n: int, seed: int):
  rng = np.random.default_rng(seed)
  return [{"image": rng.integers(0, 256, (4, 4, 1)).astype(np.uint8), "label": np.int32(i % 3)} for i in range(n)]


def _fake_encode(images):
  """uint8 [n, 4, 4, 1] -> [n, 2, 2, 3]: a fixed function of the pixels that a mirror changes."""
  x = np.asarray(images, np.float32) / 255.0
  pooled = x.reshape(-1, 2, 2, 2, 2, 1).mean(axis=(2, 4))  # [n, 2, 2, 1]
  return np.concatenate([pooled, 3 * x[:, ::2, ::2] - 1, pooled * np.arange(2)[None, None, :, None]], axis=-1)


def _fake_moments(images):
  """uint8 [n, 4, 4, 1] -> {"mean": _fake_encode, "logvar": a fixed function of the pixels} [n, 2, 2, 3]."""
  mean = _fake_encode(images)
  return {"mean": mean, "logvar": -4.0 + np.tanh(mean)}


META = {"vae_workdir": "/runs/vae", "num_classes": 3, "data": {"name": "digits", "dir": "/data", "image_size": 4}}


def test_latent_cache_round_trip(tmp_path):
  """Flips: view 0 encodes the image, view 1 its mirror; the scale is 1 / std of the stored train latents."""
  directory = str(tmp_path / "latents")
  train_images, test_images = _fake_images(37, 0), _fake_images(5, 1)
  metadata = latents_lib.encode_latents(_fake_encode, {"train": train_images, "test": test_images}, directory,
                                        metadata=META, flips=True, batch_size=8)  # the last batch is padded
  assert metadata["latent_shape"] == [2, 2, 3] and metadata["flips"] and metadata["num_views"] == 2
  assert not metadata["moments"] and "posterior_std" not in metadata  # a deterministic encoder: means only
  assert metadata["num_examples"] == {"train": 37, "test": 5} and metadata["data"] == META["data"]
  assert latents_lib.read_metadata(directory) == metadata
  data_cfg = images_lib.image_data_config(ml_collections.ConfigDict({"name": "latents", "latent_dir": directory}))
  assert data_cfg.to_dict() == META["data"]  # the image section, where the FID evaluators read it

  source = latents_lib.latent_source(directory, "train", latent_shape=(2, 2, 3))
  assert len(source) == 37
  stored = np.stack([source[i]["latent"] for i in range(37)])  # [37, 2, 2, 2, 3]
  assert stored.shape == (37, 2, 2, 2, 3) and stored.dtype == np.float32
  images = np.stack([e["image"] for e in train_images])
  np.testing.assert_allclose(stored[:, 0], _fake_encode(images), rtol=1e-6)
  np.testing.assert_allclose(stored[:, 1], _fake_encode(images[:, :, ::-1]), rtol=1e-6)
  assert np.abs(stored[:, 0] - stored[:, 1]).max() > 0.1
  np.testing.assert_array_equal([source[i]["label"] for i in range(37)], [i % 3 for i in range(37)])
  np.testing.assert_allclose(metadata["scaling_factor"], 1.0 / np.std(stored.astype(np.float64)), rtol=1e-9)
  np.testing.assert_allclose(metadata["latent_mean"], np.mean(stored.astype(np.float64)), rtol=1e-9)
  with pytest.raises(ValueError, match="config.data.latent_dir"):
    latents_lib.latent_source(directory, "train", latent_shape=(4, 4, 3))
  with pytest.raises(FileNotFoundError, match="split 'validation'.*experiments.encode_latents"):
    latents_lib.latent_source(directory, "validation")  # a cache of train and test only (as written before)

  # ChooseFlip: one view, scaled, each of the two chosen over many draws.
  choose = latents_lib.ChooseFlip(2.5)
  rng = np.random.default_rng(0)
  element = source[0]
  picks = [choose.random_map(element, rng) for _ in range(32)]
  assert all(p["latent"].shape == (2, 2, 3) and p["latent"].dtype == np.float32 for p in picks)
  assert all(p["class"] == element["label"] and p["class"].dtype == np.int32 for p in picks)
  chosen = [[np.allclose(p["latent"], 2.5 * view) for view in element["latent"]] for p in picks]
  assert all(any(c) for c in chosen) and {c.index(True) for c in chosen} == {0, 1}

  it = latents_lib.latent_iterator(directory, "train", seed=0, process_index=0, process_count=1, batch_size=16)
  batch = next(it)
  assert batch["latent"].shape == (16, 2, 2, 3) and batch["latent"].dtype == np.float32
  assert batch["class"].shape == (16,) and batch["class"].dtype == np.int32
  raw = stored.reshape(-1, 2, 2, 3)
  for latent in batch["latent"]:  # every example is a stored view times the factor
    assert np.min(np.abs(raw * metadata["scaling_factor"] - latent).max(axis=(1, 2, 3))) < 1e-5

  vae = tmp_path / "vae"
  vae.mkdir()
  latents_lib.write_latent_scale(str(vae), metadata, latent_dir=directory, step=7)
  scale = latents_lib.read_latent_scale(str(vae))
  assert scale["scaling_factor"] == metadata["scaling_factor"] and scale["step"] == 7
  assert scale["latent_dir"] == directory and scale["flips"]


def test_latent_cache_of_posterior_moments(tmp_path):
  """An encoder of moments: each record keeps mean and log-variance per view; batches carry the scaled std."""
  directory = str(tmp_path / "latents")
  train_images = _fake_images(20, 0)
  sources = {"train": train_images, "validation": _fake_images(6, 2), "test": _fake_images(5, 1)}
  metadata = latents_lib.encode_latents(_fake_moments, sources, directory, metadata=META, flips=True, batch_size=8)
  assert metadata["moments"] and metadata["num_examples"] == {"train": 20, "validation": 6, "test": 5}
  source = latents_lib.latent_source(directory, "train")
  images = np.stack([e["image"] for e in train_images])
  logvar = np.stack([source[i]["logvar"] for i in range(20)])  # [20, V, 2, 2, 3]
  np.testing.assert_allclose(logvar[:, 0], _fake_moments(images)["logvar"], rtol=1e-6)
  np.testing.assert_allclose(logvar[:, 1], _fake_moments(images[:, :, ::-1])["logvar"], rtol=1e-6)
  np.testing.assert_allclose(metadata["posterior_std"], np.mean(np.exp(0.5 * logvar.astype(np.float64))), rtol=1e-6)
  stored = np.stack([source[i]["latent"] for i in range(20)])
  np.testing.assert_allclose(metadata["scaling_factor"], 1.0 / np.std(stored.astype(np.float64)), rtol=1e-9)

  choose = latents_lib.ChooseFlip(2.5)
  rng = np.random.default_rng(0)
  for _ in range(8):  # the std belongs to the view chosen, scaled like the mean
    pick = choose.random_map(source[3], rng)
    view = [np.allclose(pick["latent"], 2.5 * v) for v in source[3]["latent"]].index(True)
    np.testing.assert_allclose(pick["latent_std"], 2.5 * np.exp(0.5 * source[3]["logvar"][view]), rtol=1e-6)
  it = latents_lib.latent_iterator(directory, "validation", seed=0, process_index=0, process_count=1, batch_size=4)
  batch = next(it)
  assert batch["latent"].shape == batch["latent_std"].shape == (4, 2, 2, 3) and np.all(batch["latent_std"] > 0)


def test_damaged_latent_record_is_named(tmp_path):
  directory = str(tmp_path / "latents")
  latents_lib.encode_latents(_fake_encode, {"train": _fake_images(32, 0)}, directory, metadata=META, flips=False,
                             batch_size=8)
  assert latents_lib.latent_source(directory, "train")[3]["latent"].shape == (1, 2, 2, 3)
  path = latents_lib.record_path(directory, "train")
  _damage_record(path, 20, lambda: latents_lib.latent_source(directory, "train"))
  source = latents_lib.latent_source(directory, "train")
  with pytest.raises(pipeline.DataCorruptionError) as info:
    source[20]
  message = str(info.value)
  assert info.value.path == path and path in message and "record 20 " in message
  assert "experiments.encode_latents" in message and "/runs/vae" in message
  with pytest.raises(IndexError):  # out of range is not damage
    source[32]
  it = latents_lib.latent_iterator(directory, "train", seed=0, process_index=0, process_count=1, batch_size=32)
  with pytest.raises(pipeline.DataCorruptionError, match="record 20 "):
    next(it)


def test_encode_latents_needs_train_and_metadata(tmp_path):
  with pytest.raises(ValueError, match="no 'train'"):
    latents_lib.encode_latents(_fake_encode, {"test": _fake_images(4, 0)}, str(tmp_path), metadata=META,
                               flips=True)
  with pytest.raises(ValueError, match="lacks \\['data'\\]"):
    latents_lib.encode_latents(_fake_encode, {"train": _fake_images(4, 0)}, str(tmp_path),
                               metadata={"vae_workdir": "/runs/vae", "num_classes": 3}, flips=True)
  with pytest.raises(FileNotFoundError, match="config.data.latent_dir"):
    latents_lib.latent_source(str(tmp_path / "missing"), "train")
  with pytest.raises(FileNotFoundError, match="experiments.encode_latents"):
    latents_lib.read_latent_scale(str(tmp_path))


# ------------------------------------------------------------ the shared loop


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory, data_dir):
  """A tiny VAE trained one step through the shared loop (its samples written)."""
  workdir = str(tmp_path_factory.mktemp("vae"))
  config = tiny_vae_config(data_dir)
  result = train.train_and_evaluate(config, workdir)
  assert result["status"] == "done" and result["step"] == 1
  return workdir, config


@pytest.mark.slow
def test_one_training_step_through_the_shared_loop(trained_vae):
  workdir, _ = trained_vae
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  last = {k: v for r in rows for k, v in r.items()}
  for key in ("loss", "psnr", "kl", "l1", "eval/psnr", "eval/kl", "sample/psnr"):
    assert np.isfinite(last[key]), key
  assert last["num_targets"] == 8 and 0 < last["sample/psnr"] < 60
  np.testing.assert_allclose(last["psnr/psnr"], last["sample/psnr"], rtol=1e-5)  # the psnr evaluator, same images
  assert os.path.exists(os.path.join(workdir, "samples", "step_0000001.png"))

  run = tasks.load_run(workdir)  # the workdir alone: its config.json and checkpoint
  encode, decode = run.predict("encode"), run.predict("decode")  # what other families call
  images = jnp.zeros((3, 8, 8, 1), jnp.float32)

  @jax.jit
  def round_trip(x):
    moments = encode(x)
    return moments, decode(moments["mean"])

  moments, decoded = round_trip(images)
  assert moments["mean"].shape == moments["logvar"].shape == (3, 4, 4, 2) and moments["mean"].dtype == jnp.float32
  assert decoded.shape == (3, 8, 8, 1) and float(jnp.abs(decoded).max()) <= 1.0
  assert kv_task.to_uint8(decoded).dtype == np.uint8


@pytest.mark.slow
def test_encode_latents_of_a_trained_vae(trained_vae, tmp_path):
  """experiments.encode_latents' library side: the digits through the VAE, the scale beside its checkpoints."""
  workdir, config = trained_vae
  out = str(tmp_path / "latents")
  metadata = kv_task.encode_latents(workdir, out, flips=True, batch_size=256)
  assert metadata["num_examples"] == {"train": 1293, "validation": 144, "test": 360}
  assert metadata["latent_shape"] == [4, 4, 2] and metadata["moments"] and metadata["posterior_std"] > 0
  assert metadata["vae_workdir"] == os.path.abspath(workdir) and metadata["num_classes"] == 10
  assert metadata["data"]["name"] == "digits" and metadata["data"]["image_size"] == 8
  scale = latents_lib.read_latent_scale(workdir)
  assert scale["scaling_factor"] == metadata["scaling_factor"] and scale["step"] == 1
  assert scale["latent_dir"] == os.path.abspath(out)
  encode = jax.jit(tasks.load_run(workdir).predict("encode"))
  for split in ("validation", "test"):
    source = latents_lib.latent_source(out, split)
    images = images_lib.read_images(config.data, split, 0, 5)
    for view, batch in ((0, images["image"]), (1, images["image"][:, :, ::-1])):
      moments = encode(kv_task.normalize(jnp.asarray(batch)))
      for key, stored in (("mean", "latent"), ("logvar", "logvar")):
        got = np.stack([source[i][stored][view] for i in range(5)])
        np.testing.assert_allclose(got, np.asarray(moments[key]), atol=1e-5)
    np.testing.assert_array_equal([source[i]["label"] for i in range(5)], images["class"])


@pytest.mark.slow
def test_reconstruction_loss_falls_in_a_few_steps(tmp_path, data_dir):
  config = tiny_vae_config(data_dir, num_steps=12, checkpoint_every=100, **{
      "optimizer.lr": 1e-2, "sampler.num_samples": 0})
  config.unlock()
  del config.evals["psnr"]  # no sampler, so no reconstruction PSNR
  train.train_and_evaluate(config, str(tmp_path))
  rows = [r for r in metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl")) if "l1" in r]
  assert rows[-1]["l1"] < 0.7 * rows[0]["l1"], [r["l1"] for r in rows]
