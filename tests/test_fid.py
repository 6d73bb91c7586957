"""FID: Inception-v3 (the FID variant) on fixed weights and its weight file, the preprocessing, the distance in
the features' span, the digit image classifier, and the fid / fid_digits evaluators on fake image generators."""

import contextlib
import dataclasses
import os
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import image_classifier_digits
from nbp import evaluators
from nbp import tasks
from nbp.data import images
from nbp.evaluators import fid
from nbp.evaluators import fid_digits
from nbp.evaluators import frechet
from nbp.evaluators import image_generation
from nbp.models import inception
from nbp.tasks import video_classifier
from nbp.training import config as config_lib
from nbp.training import loop as train
from nbp.training import metrics as metrics_lib
from nbp.training import sharding
from tests.conftest import trained_once

FID_KEY = fid_digits.FID_KEY
SMALL = inception.MIN_RESOLUTION  # the fastest side the network takes: most tests run there


# ---------------------------------------------------------------------------
# Inception-v3 on fixed weights.

def _fixed_inception_variables(seed=0):
  """Weights of the right shapes from numpy, each key's from its own seed (fold of `seed` and the key's CRC):
  He-scaled kernels, batch-norm scales and variances near 1, small offsets and means; no jitted init."""
  flat = {}
  for key, shape in inception.variable_shapes().items():
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    if key.endswith("kernel"):
      flat[key] = rng.standard_normal(size=shape, dtype=np.float32) * np.sqrt(2.0 / int(np.prod(shape[:-1])))
    elif key.endswith(("bn/var", "bn/scale")):
      flat[key] = rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
    else:
      flat[key] = rng.standard_normal(size=shape, dtype=np.float32) * 0.1
  return inception.unflatten_variables({k: jnp.asarray(v) for k, v in flat.items()})


def _fixed_rgb_images(n=3, side=20):
  """uint8 [n, side, side, 3]: a different ramp per image and channel (no randomness)."""
  v, y, x, c = np.meshgrid(*(np.arange(k) for k in (n, side, side, 3)), indexing="ij")
  return ((7 * x + 13 * y + 50 * c + 101 * v + (x * y) % 17) % 256).astype(np.uint8)


@pytest.fixture(scope="module")
def inception_variables():
  return _fixed_inception_variables()


@pytest.fixture(scope="module")
def small_inception(inception_variables):
  """The FID extractor at 75x75, batch 2: the one compiled Inception of most tests here."""
  return fid.inception_extractor(inception_variables, batch_size=2, resolution=SMALL)


def test_inception_parameter_names_and_count():
  shapes = inception.variable_shapes()
  assert shapes["params/Conv2d_1a_3x3/conv/kernel"] == (3, 3, 3, 32)
  assert shapes["params/Conv2d_1a_3x3/bn/scale"] == (32,) and shapes["batch_stats/Conv2d_1a_3x3/bn/var"] == (32,)
  assert "params/Conv2d_1a_3x3/conv/bias" not in shapes  # the convolutions have no bias
  assert shapes["params/Mixed_5b/branch_pool/conv/kernel"] == (1, 1, 192, 32)  # pool_features 32
  assert shapes["params/Mixed_6b/branch7x7_2/conv/kernel"] == (1, 7, 128, 128)
  assert shapes["params/Mixed_6e/branch7x7dbl_2/conv/kernel"] == (7, 1, 192, 192)
  assert shapes["params/Mixed_7a/branch3x3_2/conv/kernel"] == (3, 3, 192, 320)
  assert shapes["params/Mixed_7c/branch3x3dbl_3b/conv/kernel"] == (3, 1, 384, 384)
  assert shapes["params/Mixed_7c/branch_pool/conv/kernel"] == (1, 1, 2048, 192)
  assert not any("Aux" in k or "fc" in k or "Logits" in k for k in shapes)  # pool3 is the output
  # Inception-v3's 94 conv units; 21,785,568 weights: torchvision's 27,161,264 less the auxiliary
  # classifier (3,326,696) and the 1000-way fc (2,049,000). 17,216 batch-norm channels in all.
  assert len(shapes) == 94 * 5
  count = lambda prefix: sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith(prefix))
  assert count("params/") == 21_785_568 and count("batch_stats/") == 2 * 17_216


# Features 4, 711, 1065, 1377, 2047 of the first two `_fixed_rgb_images` (20x20, resized to 299x299) on
# `_fixed_inception_variables(0)`, computed once on CPU with this code; all are above 0.5, so rtol is never
# asked of a near-zero. A change to the preprocessing or to any layer moves them. Measured when pinned: the
# padding counted in the block average pools moves them by up to 14%, an average pool in Mixed_7c by 31%,
# half-pixel resizing by 13%, BGR for RGB by 31%. (At 75x75 Mixed_7c sees 1x1: its pool kind cannot show.)
PINNED_INDICES = [4, 711, 1065, 1377, 2047]
PINNED_FEATURES = [[1.69100642, 2.64799595, 3.84855032, 9.20878792, 8.38726234],
                   [0.80263102, 1.28081024, 4.43953133, 7.14132547, 6.71763706]]


def test_inception_features_on_fixed_weights(small_inception, inception_variables):
  real = _fixed_rgb_images(3)  # 3 images in batches of 2: a padded last batch
  features = small_inception(real)
  assert features.shape == (3, inception.FEATURE_DIM) and np.all(np.isfinite(features))
  assert np.all(features >= 0)  # a mean of ReLUs
  np.testing.assert_allclose(features[:2], small_inception(real[:2]), rtol=1e-6)  # the padding changes nothing
  # The standard side: 299x299 in, [N, 2048] out, pinned; an input below 75 is refused.
  full = np.asarray(jax.jit(inception.pool3_features)(inception_variables, real[:2]))
  assert full.shape == (2, 2048) and np.all(np.isfinite(full))
  np.testing.assert_allclose(full[:, PINNED_INDICES], PINNED_FEATURES, rtol=1e-4)
  with pytest.raises(ValueError, match="at least 75x75.*resolution=64"):
    inception.preprocess(real, resolution=64)


def test_preprocess_shapes_range_and_grey():
  rng = np.random.default_rng(0)
  batch = rng.integers(0, 256, size=(2, 20, 20, 3), dtype=np.uint8)
  batch[0] = 0
  batch[1, :10] = 255
  x = inception.preprocess(batch)
  assert x.shape == (2, 299, 299, 3) and x.dtype == jnp.float32
  assert float(x.min()) == -1.0 and float(x.max()) == 1.0
  np.testing.assert_allclose(inception.preprocess(batch.astype(np.float32)), x, atol=1e-6)  # floats in [0, 255]
  grey = batch[..., :1]
  g = inception.preprocess(grey, resolution=80)
  assert g.shape == (2, 80, 80, 3)
  np.testing.assert_array_equal(g[..., 0], g[..., 2])
  np.testing.assert_allclose(g, inception.preprocess(np.repeat(grey, 3, axis=-1), resolution=80), atol=1e-6)
  with pytest.raises(ValueError, match=r"\[N, H, W, 1\|3\]"):
    inception.preprocess(np.zeros((2, 8, 8, 2), np.uint8))


# ---------------------------------------------------------------------------
# The weight file.

def _write_npz(path, flat):
  with open(path, "wb") as f:
    np.savez(f, **flat)
  return str(path)


def test_weight_file_round_trip(tmp_path, inception_variables):
  path = str(tmp_path / "inception.npz")
  inception.save_params(path, inception_variables)
  loaded = inception.load_params(path)
  assert set(loaded) == {"params", "batch_stats"}
  flat_in, flat_out = inception.flatten_variables(inception_variables), inception.flatten_variables(loaded)
  assert list(flat_out) == list(inception.variable_shapes())
  for key in flat_in:
    np.testing.assert_array_equal(flat_in[key], flat_out[key])
  # Any reference tree: its keys and shapes are the schema.
  small = {"params": {"a": {"kernel": np.ones((2, 3), np.float32)}}, "batch_stats": {"a": {"mean": np.zeros(3)}}}
  inception.save_params(str(tmp_path / "small.npz"), small)
  again = inception.load_params(str(tmp_path / "small.npz"), jax.eval_shape(lambda: small))
  np.testing.assert_array_equal(again["params"]["a"]["kernel"], small["params"]["a"]["kernel"])


def test_weight_file_errors_name_the_first_bad_key_and_the_file(tmp_path, inception_variables):
  flat = {k: np.asarray(v) for k, v in inception.flatten_variables(inception_variables).items()}
  order = list(inception.variable_shapes())
  first, later = "params/Mixed_5b/branch5x5_2/conv/kernel", "params/Mixed_7c/branch_pool/bn/bias"
  assert order.index(first) < order.index(later)
  missing = {k: v for k, v in flat.items() if k not in (first, later)}
  with pytest.raises(ValueError, match=rf"missing\.npz.*lacks the key '{first}' \(shape \(5, 5, 48, 64\)\)"):
    inception.load_params(_write_npz(tmp_path / "missing.npz", missing))

  wrong = dict(flat, **{"params/Mixed_6a/branch3x3/conv/kernel": np.zeros((3, 3, 288, 380), np.float32)})
  with pytest.raises(ValueError, match=r"wrong\.npz.*'params/Mixed_6a/branch3x3/conv/kernel' has shape "
                                       r"\(3, 3, 288, 380\), expected \(3, 3, 288, 384\)"):
    inception.load_params(_write_npz(tmp_path / "wrong.npz", wrong))

  extra = dict(flat, **{"params/fc/kernel": np.zeros((2048, 1008)), "params/AuxLogits/conv0/conv/kernel": np.zeros(1)})
  with pytest.raises(ValueError, match=r"extra\.npz.*unexpected key 'params/AuxLogits/conv0/conv/kernel' "
                                       r"\(2 unexpected"):
    inception.load_params(_write_npz(tmp_path / "extra.npz", extra))

  with pytest.raises(FileNotFoundError, match=r"absent\.npz.*nothing is downloaded"):
    inception.load_params(str(tmp_path / "absent.npz"))
  (tmp_path / "weights.pt").write_bytes(b"not a zip archive")
  with pytest.raises(ValueError, match=r"weights\.pt.*not a \.npz archive"):
    inception.load_params(str(tmp_path / "weights.pt"))


def test_torch_state_dict_conversion(tmp_path, inception_variables):
  """A PyTorch-layout state dict (OIHW kernels, torch names, extras to drop) converts to the same variables."""
  leaves = {"conv/kernel": "conv.weight", "bn/scale": "bn.weight", "bn/bias": "bn.bias", "bn/mean": "bn.running_mean",
            "bn/var": "bn.running_var"}
  state = {"fc.weight": np.zeros((1008, 2048)), "AuxLogits.conv0.conv.weight": np.zeros((128, 768, 1, 1))}
  for key, value in inception.flatten_variables(inception_variables).items():
    module, kind, name = key.split("/", 1)[1].rsplit("/", 2)  # "params/Mixed_5b/branch1x1/conv/kernel"
    leaf, value = f"{kind}/{name}", np.asarray(value)
    state[f"{module.replace('/', '.')}.{leaves[leaf]}"] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
    if leaf == "bn/var":
      state[f"{module.replace('/', '.')}.bn.num_batches_tracked"] = np.zeros((), np.int64)
  assert state["Mixed_5b.branch5x5_2.conv.weight"].shape == (64, 48, 5, 5)
  path = str(tmp_path / "converted.npz")
  inception.save_params(path, inception.from_torch_state_dict(state))
  converted = inception.flatten_variables(inception.load_params(path))
  for key, value in inception.flatten_variables(inception_variables).items():
    np.testing.assert_array_equal(converted[key], value)
  with pytest.raises(ValueError, match="'Mixed_5b.branch1x1.conv.bias' is not"):
    inception.from_torch_state_dict({"Mixed_5b.branch1x1.conv.bias": np.zeros(3)})


# ---------------------------------------------------------------------------
# The distance.

@pytest.mark.parametrize("n_real,n_fake,dim", [(5, 7, 64), (10, 10, 21), (3, 40, 128)])
def test_distance_in_the_span_of_the_features_is_the_full_one(n_real, n_fake, dim):
  rng = np.random.default_rng(dim)
  real = rng.normal(size=(n_real, dim)) * rng.uniform(0.1, 3.0, size=dim)
  fake = rng.normal(size=(n_fake, dim)) + 0.5
  full = frechet.frechet_distance(*frechet.feature_statistics(real), *frechet.feature_statistics(fake))
  np.testing.assert_allclose(frechet.frechet_distance_of_features(real, fake), full, rtol=1e-6)


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift(small_inception, data_dir):
  real = images.read_images(_digits(8, data_dir), "test", 0, 6)["image"]  # grey: repeated to 3 channels
  features = small_inception(real)
  scale = np.trace(np.cov(features, rowvar=False))
  assert abs(fid.fid(real, real, extractor=small_inception)) < 1e-9 * scale
  distances = [frechet.frechet_distance_of_features(
      features, small_inception(np.clip(real.astype(np.int32) + shift, 0, 255).astype(np.uint8)))
      for shift in (16, 64, 128)]
  assert 0 < distances[0] < distances[1] < distances[2]


# ---------------------------------------------------------------------------
# Fake image generators: a setup with a Task whose "sample_images" returns real digits, or noise.

def _digits(image_size, data_dir):
  return ml_collections.ConfigDict({"name": "digits", "image_size": image_size, "dir": data_dir, "worker_count": 0})


@dataclasses.dataclass(eq=False)
class FakeSetup:
  """What the image evaluators read of nbp.training.loop.Setup."""

  config: Any
  task: tasks.Task
  mesh: jax.sharding.Mesh

  @contextlib.contextmanager
  def context(self):
    with jax.set_mesh(self.mesh):
      yield


BANK_START = 640  # train images 640.. feed the real-digit generator, past every stand-in set of the tests


def _digit_bank(data_cfg, per_class=40):
  """uint8 [10, per_class, S, S, 1]: train images from BANK_START on, sorted by class."""
  real = images.read_images(data_cfg, "train", BANK_START, len(images.image_source(data_cfg, "train")) - BANK_START)
  return np.stack([real["image"][real["class"] == k][:per_class] for k in range(10)])


def _real_digit_sampler(params, rng, labels):
  """A real train image of each class asked for: index drawn from the key (the params are the bank)."""
  index = jax.random.randint(rng, labels.shape, 0, params.shape[1])
  return params[labels, index]


def _noise_sampler(params, rng, labels):
  return jax.random.randint(rng, (labels.shape[0], *params.shape[2:]), 0, 256).astype(jnp.uint8)


def _fake_context(data_cfg, sampler, params, seed=0):
  task = tasks.Task(model=None, init_inputs=dict, loss=None, data=None,
                    predict_fns={"sample_images": sampler, "to_images": lambda samples: np.asarray(samples, np.uint8)})
  config = ml_collections.ConfigDict({"family": "fake", "data": data_cfg.to_dict()})
  s = FakeSetup(config, task, sharding.make_mesh(config_lib.base_config().mesh))
  return evaluators.Context(setup=s, params=params, params_name="params", step=0, workdir="",
                            rng=jax.random.key(seed))


def test_generated_images_are_conditioned_on_the_stand_in_and_keyed_by_batch_start(data_dir):
  data = _digits(8, data_dir)
  bank = jnp.asarray(_digit_bank(data))
  context = _fake_context(data, _real_digit_sampler, bank)
  extract = lambda x: x.reshape(len(x), -1)[:, :40]  # raw pixels as features: no network
  metrics, stand_in, generated = image_generation.compare_with_real_images(
      context, extract=extract, key="d", num_images=10, batch_size=4, seed=2, floor=True)
  assert set(metrics) == {"d", "d_floor", "images_per_s", "sample_seconds", "compile_seconds", "num_images"}
  np.testing.assert_array_equal(stand_in["image"], images.read_images(data, "train", 20, 10)["image"])  # seed 2
  assert generated.images.shape == (10, 8, 8, 1) and generated.drawn == 12  # batches of 4, the last padded
  labels = frechet.pad_rows(stand_in["class"], 12)
  expected = np.concatenate([_real_digit_sampler(bank, jax.random.fold_in(jax.random.key(2), i), labels[i:i + 4])
                             for i in (0, 4, 8)])[:10]
  np.testing.assert_array_equal(generated.images, expected)
  assert metrics["images_per_s"] > 0 and metrics["num_images"] == 10.0
  reference = images.read_images(data, "validation", 0, 10)["image"]  # the reference: validation by default
  np.testing.assert_allclose(metrics["d"], frechet.frechet_distance_of_features(
      extract(reference), extract(generated.images)), rtol=1e-6)
  on_test, same_stand_in, same = image_generation.compare_with_real_images(
      context, extract=extract, key="d", num_images=10, batch_size=4, seed=2, floor=True, split="test")
  test_reference = images.read_images(data, "test", 0, 10)["image"]
  assert not np.array_equal(test_reference, reference)
  np.testing.assert_array_equal(same.images, generated.images)  # only the reference set changes
  np.testing.assert_array_equal(same_stand_in["image"], stand_in["image"])
  np.testing.assert_allclose(on_test["d"], frechet.frechet_distance_of_features(
      extract(test_reference), extract(generated.images)), rtol=1e-6)
  # A generator of another image size: the error names both shapes.
  wrong = _fake_context(data, _real_digit_sampler, jnp.zeros((10, 2, 6, 6, 1), jnp.uint8))
  with pytest.raises(ValueError, match=r"\(6, 6, 1\) but the test's set has \(8, 8, 1\)"):
    image_generation.compare_with_real_images(wrong, extract=extract, key="d", num_images=4, batch_size=4, seed=0,
                                              floor=False, judge="the test's set")
  no_images = dataclasses.replace(context, setup=FakeSetup(context.setup.config, dataclasses.replace(
      context.setup.task, predict_fns={"to_images": np.asarray}), context.setup.mesh))
  with pytest.raises(ValueError, match=r"an FID evaluator asks for predict function 'sample_images'.*\['to_images'\]"):
    image_generation.compare_with_real_images(no_images, extract=extract, key="d", num_images=4, batch_size=4,
                                              seed=0, floor=False)


# ---------------------------------------------------------------------------
# The digit image classifier and fid_digits.

def tiny_image_classifier_config(data_dir, image_size=8):
  c = image_classifier_digits.get_config(str(image_size))
  c.data.dir = data_dir
  c.model.widths = (8, 16)
  c.model.feature_dim = 16
  c.num_steps = 400
  c.log_every = 100
  c.checkpoint_every = 400
  c.evals.eval.steps = 4
  c.optimizer.warmup_steps = 10
  return c


@pytest.fixture(scope="module")
def image_classifier_workdir(data_dir, tmp_path_factory):
  """The classifier trained once per session, for every worker (read only)."""
  workdir, result = trained_once(tmp_path_factory, "image_classifier",
                                 lambda w: train.train_and_evaluate(tiny_image_classifier_config(data_dir), w))
  assert result["status"] == "done" and result["step"] == 400
  return workdir


def test_image_classifier_config_and_data(data_dir):
  c = image_classifier_digits.get_config("")
  assert c.family == "video_classifier" and c.data.image_size == 16 and "sample" not in c.evals
  with pytest.raises(ValueError, match="image side"):
    image_classifier_digits.get_config("big")
  data = _digits(8, data_dir)
  batch = next(video_classifier.make_data(data, "train", seed=0, process_index=0, process_count=1, batch_size=5))
  assert batch["video"].shape == (5, 1, 8, 8, 1) and batch["video"].dtype == np.uint8
  assert batch["label"].shape == (5, 1) and batch["label"].dtype == np.int32
  assert video_classifier.video_shape(data) == (1, 8, 8, 1)


@pytest.mark.slow  # the classifier's 400 steps and two fake generators: ~25 s on 2 cores
def test_fid_digits_is_near_the_floor_for_real_digits_and_far_above_for_noise(image_classifier_workdir, data_dir):
  rows = metrics_lib.read_jsonl(os.path.join(image_classifier_workdir, "metrics.jsonl"))
  accuracy = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r][-1]
  assert accuracy > 0.5  # 400 steps on 8x8 digits: well above chance (0.1)
  data = _digits(8, data_dir)
  evaluator = evaluators.build({"f": dict(type="fid_digits", classifier_workdir=image_classifier_workdir,
                                          num_images=100, batch_size=50)})["f"][1]
  real, _, generated = evaluator.measure(_fake_context(data, _real_digit_sampler, jnp.asarray(_digit_bank(data))))
  noise = evaluator.run(_fake_context(data, _noise_sampler, jnp.zeros((10, 1, 8, 8, 1), jnp.uint8)))
  assert set(real) == {FID_KEY, FID_KEY + "_floor", "class_match", "class_match_real", "images_per_s",
                       "sample_seconds", "compile_seconds", "num_images"}
  assert generated.images.shape == (100, 8, 8, 1)
  floor = real[FID_KEY + "_floor"]
  # Measured (validation, the default): floor 3.01, real digits 3.82, noise 19.2; 100 of the 144 validation
  # images are further from the train stand-in than 100 of the 360 test images are (below).
  assert 0 < floor and real[FID_KEY] < 2 * floor
  assert noise[FID_KEY] > 5 * floor
  assert real["class_match"] > 0.5 and noise["class_match"] < 0.5
  # On the test split (Context.split, as experiments.evaluate --split test sets it): floor 0.75, real 1.38,
  # noise 17.0 measured.
  on_test = lambda context: evaluator.run(dataclasses.replace(context, split="test"))
  real_test = on_test(_fake_context(data, _real_digit_sampler, jnp.asarray(_digit_bank(data))))
  noise_test = on_test(_fake_context(data, _noise_sampler, jnp.zeros((10, 1, 8, 8, 1), jnp.uint8)))
  floor_test = real_test[FID_KEY + "_floor"]
  assert floor_test != floor and 0 < floor_test and real_test[FID_KEY] < 2 * floor_test
  assert noise_test[FID_KEY] > 10 * floor_test
  # The number is the distance of these very sets (validation images), through the classifier alone.
  extract = fid_digits.load_judge(image_classifier_workdir, 32).features
  reference = images.read_images(data, "validation", 0, 100)["image"]
  np.testing.assert_allclose(real[FID_KEY], frechet.frechet_distance_of_features(
      extract(reference), extract(generated.images)), rtol=1e-6)


@pytest.mark.slow
def test_fid_digits_checks_the_classifier_against_the_run(image_classifier_workdir, data_dir, tmp_path):
  evaluator = fid_digits.Evaluator(classifier_workdir=image_classifier_workdir, num_images=4, batch_size=4)
  bigger = _fake_context(_digits(16, data_dir), _real_digit_sampler, jnp.zeros((10, 1, 16, 16, 1), jnp.uint8))
  with pytest.raises(ValueError, match=rf"images are 16 but the classifier in {image_classifier_workdir} was "
                                       r"trained at 8.*image_classifier_digits.py:16"):
    evaluator.run(bigger)
  with pytest.raises(ValueError, match="'moving_digits', not the 'digits'"):
    fid_digits.check_judge(_digits(8, data_dir), ml_collections.ConfigDict({"name": "moving_digits"}), "the judge")
  with pytest.raises(ValueError, match="classifier_workdir"):
    evaluators.build({"f": dict(type="fid_digits")})
  with pytest.raises(FileNotFoundError, match=rf"config.evals.f: .*{tmp_path}.*config.json"):
    evaluators.build({"f": dict(type="fid_digits", classifier_workdir=str(tmp_path))})


# ---------------------------------------------------------------------------
# The Inception evaluator.

def test_fid_evaluator_needs_a_local_weight_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=rf"config.evals.fid: fid: inception_path='{tmp_path}/inception.npz' "
                                              r"is not a file.*Nothing is downloaded"):
    evaluators.build({"fid": dict(type="fid", inception_path=str(tmp_path / "inception.npz"))})
  with pytest.raises(FileNotFoundError, match="inception_path=''"):
    fid.Evaluator()


def test_fid_evaluator_on_fake_generators(inception_variables, data_dir, tmp_path):
  """Random Inception weights through a .npz, at the standard 299x299, on 4 images per set."""
  path = str(tmp_path / "inception.npz")
  inception.save_params(path, inception_variables)
  data = _digits(8, data_dir)
  evaluator = evaluators.build({"fid": dict(type="fid", inception_path=path, num_images=4, batch_size=4,
                                            inception_batch_size=4)})["fid"][1]
  real = evaluator.run(_fake_context(data, _real_digit_sampler, jnp.asarray(_digit_bank(data))))
  noise = evaluator.run(_fake_context(data, _noise_sampler, jnp.zeros((10, 1, 8, 8, 1), jnp.uint8)))
  assert {"fid", "fid_floor", "images_per_s", "num_images"} <= set(real)
  assert real["fid"] > 0 and real["fid_floor"] > 0
  assert noise["fid"] > real["fid"]  # fixed weights and seeds: deterministic (measured 2788 vs 1831)
  assert noise["fid_floor"] == real["fid_floor"]  # the same real sets
