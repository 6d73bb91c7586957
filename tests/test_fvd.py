"""FVD: the Fréchet distance against scipy, I3D with random weights, its weight file,
the preprocessing, and the in-domain moving-digits classifier and its FVD."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from nbp import tasks as families
from nbp import fvd
from nbp.training import loop as train
from nbp import video_classifier
from tests.conftest import set_tiny_budget


def _reference_distance(mu1, s1, mu2, s2):
  """The usual implementation (pytorch-fid, tfgan): scipy's sqrtm of s1 @ s2."""
  cross = np.real(scipy.linalg.sqrtm(s1 @ s2))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross))


def _gaussian(rng, dim, rank):
  a = rng.normal(size=(dim, rank))
  return rng.normal(size=dim), a @ a.T / rank


@pytest.mark.parametrize("dim,rank", [(2, 2), (8, 8), (64, 64), (32, 12), (128, 40)])
def test_frechet_distance_matches_scipy(dim, rank):
  rng = np.random.default_rng(dim + rank)
  mu1, s1 = _gaussian(rng, dim, rank)
  mu2, s2 = _gaussian(rng, dim, rank)
  expected = _reference_distance(mu1, s1, mu2, s2)
  np.testing.assert_allclose(fvd.frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-6)


def test_frechet_distance_of_one_distribution_is_zero():
  rng = np.random.default_rng(0)
  for rank in (16, 5):  # full rank and rank-deficient
    mu, sigma = _gaussian(rng, 16, rank)
    assert abs(fvd.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_frechet_distance_of_known_gaussians():
  """Diagonal covariances: sum (m1 - m2)^2 + (sqrt(v1) - sqrt(v2))^2."""
  v1, v2 = np.array([1.0, 4.0, 0.0]), np.array([9.0, 1.0, 2.0])
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  np.testing.assert_allclose(fvd.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)), expected, rtol=1e-12)


def test_feature_statistics_match_numpy():
  features = np.random.default_rng(0).normal(size=(50, 6))
  mu, sigma = fvd.feature_statistics(features)
  np.testing.assert_allclose(mu, features.mean(0))
  np.testing.assert_allclose(sigma, np.cov(features, rowvar=False))
  with pytest.raises(ValueError, match="N >= 2"):
    fvd.feature_statistics(features[:1])


# ---------------------------------------------------------------------------
# I3D.

def _random_i3d_variables(seed=0, num_classes=fvd.NUM_CLASSES):
  """Random weights of the right shapes, drawn in numpy (no jitted init: that takes 15 s)."""
  rng = np.random.default_rng(seed)
  flat = {}
  for key, shape in fvd.i3d_variable_shapes(num_classes).items():
    if key.endswith("kernel"):
      fan_in = int(np.prod(shape[:-1]))
      flat[key] = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
    elif key.endswith("bn/var"):
      flat[key] = rng.uniform(0.5, 1.5, size=shape)
    else:
      flat[key] = rng.normal(size=shape) * 0.1
  return fvd.unflatten_variables({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})


@pytest.fixture(scope="module")
def i3d_variables():
  return _random_i3d_variables()


def test_i3d_parameter_names_and_count():
  shapes = fvd.i3d_variable_shapes()
  assert shapes["Conv3d_1a_7x7/conv/kernel"] == (7, 7, 7, 3, 64)
  assert shapes["Conv3d_1a_7x7/bn/mean"] == (64,)
  assert "Conv3d_1a_7x7/bn/scale" not in shapes  # Sonnet's batch norm has no gamma
  assert shapes["Mixed_3b/Branch_1/Conv3d_0b_3x3/conv/kernel"] == (3, 3, 3, 96, 128)
  assert shapes["Mixed_5c/Branch_3/Conv3d_0b_1x1/conv/kernel"] == (1, 1, 1, 832, 128)
  assert shapes["Logits/conv/kernel"] == (1, 1, 1, 1024, 400)
  assert shapes["Logits/conv/bias"] == (400,)
  # The Kinetics I3D has about 12.7M weights (conv kernels, BN offsets, logits).
  assert 12.5e6 < sum(np.prod(s) for s in shapes.values()) < 12.9e6


def test_i3d_standard_input_gives_400_logits(i3d_variables):
  """The standard FVD input: 16 frames of 224x224, via the extractor (preprocessing included)."""
  videos = np.random.default_rng(0).integers(0, 256, size=(2, 16, 64, 64, 3), dtype=np.uint8)
  extractor = fvd.i3d_extractor(i3d_variables, batch_size=2)
  features = extractor(videos)
  assert features.shape == (2, 400)
  assert np.all(np.isfinite(features))
  assert not np.allclose(features[0], features[1])


def test_i3d_is_fully_convolutional_until_the_pool(i3d_variables):
  """At 112x112 the last map is 2x4x4 and the mean pool still gives [N, 400]."""
  x = jax.random.uniform(jax.random.key(0), (1, 16, 112, 112, 3), minval=-1, maxval=1)
  logits = jax.jit(fvd.InceptionI3D().apply)(i3d_variables, x)
  assert logits.shape == (1, 400)
  assert np.all(np.isfinite(logits))


def test_fvd_of_a_set_with_itself_is_zero_and_with_another_positive(i3d_variables):
  rng = np.random.default_rng(1)
  real = rng.integers(0, 256, size=(4, 16, 32, 32, 1), dtype=np.uint8)
  fake = rng.integers(0, 64, size=(4, 16, 32, 32, 1), dtype=np.uint8)
  extractor = fvd.i3d_extractor(i3d_variables, batch_size=3, resolution=64)  # padded last batch
  real_features = extractor(real)
  assert real_features.shape == (4, 400)
  assert abs(fvd.frechet_distance_of_features(real_features, real_features)) < 1e-6
  assert fvd.fvd(real, fake, extractor=extractor) > 0


@pytest.mark.parametrize("suffix", [".npz", ".msgpack"])
def test_weight_file_round_trip(tmp_path, i3d_variables, suffix):
  path = str(tmp_path / f"i3d{suffix}")
  fvd.save_i3d(path, i3d_variables)
  loaded = fvd.load_i3d(path)
  assert set(loaded) == {"params", "batch_stats"}
  flat_in, flat_out = fvd.flatten_variables(i3d_variables), fvd.flatten_variables(loaded)
  assert set(flat_in) == set(flat_out)
  for key in flat_in:
    np.testing.assert_array_equal(flat_in[key], flat_out[key])


def test_weight_file_errors_name_the_key_and_the_file(tmp_path, i3d_variables):
  flat = {k: np.asarray(v) for k, v in fvd.flatten_variables(i3d_variables).items()}
  missing = dict(flat)
  del missing["Mixed_4d/Branch_2/Conv3d_0b_3x3/bn/var"]
  path = str(tmp_path / "missing.npz")
  with open(path, "wb") as f:
    np.savez(f, **missing)
  with pytest.raises(ValueError, match=r"missing\.npz.*Mixed_4d/Branch_2/Conv3d_0b_3x3/bn/var"):
    fvd.load_i3d(path)

  wrong = dict(flat)
  wrong["Logits/conv/kernel"] = np.zeros((1, 1, 1, 1024, 600), np.float32)
  path = str(tmp_path / "wrong.npz")
  with open(path, "wb") as f:
    np.savez(f, **wrong)
  with pytest.raises(ValueError, match=r"wrong\.npz.*Logits/conv/kernel.*\(1, 1, 1, 1024, 600\)"):
    fvd.load_i3d(path)

  with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
    fvd.load_i3d(str(tmp_path / "absent.npz"))


# ---------------------------------------------------------------------------
# Preprocessing.

def _tf1_resize_bilinear(image, size):
  """numpy TF1 `resize_bilinear` (align_corners=False, no half pixels): input y = out y * H / size."""
  h, w = image.shape[:2]
  def axis(n_in):
    pos = np.arange(size) * n_in / size
    low = np.floor(pos).astype(int)
    return low, np.minimum(low + 1, n_in - 1), pos - low
  y0, y1, fy = axis(h)
  x0, x1, fx = axis(w)
  image = image.astype(np.float64)
  top = image[y0][:, x0] * (1 - fx)[None, :, None] + image[y0][:, x1] * fx[None, :, None]
  bottom = image[y1][:, x0] * (1 - fx)[None, :, None] + image[y1][:, x1] * fx[None, :, None]
  return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


@pytest.mark.parametrize("size_in,size_out", [(64, 224), (32, 112), (300, 224)])
def test_resize_matches_tf1_bilinear(size_in, size_out):
  image = np.random.default_rng(0).integers(0, 256, size=(size_in, size_in, 3)).astype(np.float32)
  out = fvd.resize_bilinear(jnp.asarray(image)[None], size_out)[0]
  np.testing.assert_allclose(out, _tf1_resize_bilinear(image, size_out), atol=1e-3)


def test_preprocess_shapes_range_and_grey():
  rng = np.random.default_rng(0)
  videos = rng.integers(0, 256, size=(2, 16, 20, 20, 3), dtype=np.uint8)
  videos[0, 0] = 0
  videos[0, 1] = 255
  x = fvd.preprocess(videos)
  assert x.shape == (2, 16, 224, 224, 3) and x.dtype == jnp.float32
  assert float(x.min()) == -1.0 and float(x.max()) == 1.0
  np.testing.assert_allclose(fvd.preprocess(videos.astype(np.float32)), x, atol=1e-6)  # floats in [0, 255]
  grey = videos[..., :1]
  g = fvd.preprocess(grey, resolution=64)
  assert g.shape == (2, 16, 64, 64, 3)
  np.testing.assert_array_equal(g[..., 0], g[..., 2])
  np.testing.assert_allclose(g, fvd.preprocess(np.repeat(grey, 3, axis=-1), resolution=64), atol=1e-6)


def test_preprocess_checks_the_frame_count():
  videos = np.zeros((1, 17, 8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match="16 frames.*got 17.*num_frames=None"):
    fvd.preprocess(videos)
  assert fvd.preprocess(videos, num_frames=None, resolution=16).shape == (1, 17, 16, 16, 3)
  with pytest.raises(ValueError, match=r"\[N, F, H, W, 1\|3\]"):
    fvd.preprocess(np.zeros((1, 16, 8, 8, 2), np.uint8))


# ---------------------------------------------------------------------------
# The moving-digits classifier and its in-domain FVD.

def tiny_classifier_config(data_dir):
  from experiments.configs import video_classifier_digits  # pylint: disable=g-import-not-at-top
  c = video_classifier_digits.get_config("local")
  c.data.dir = data_dir
  c.data.num_frames = 4
  c.data.frame_size = 16
  c.data.num_train = 32
  c.data.num_test = 16
  c.model.widths = (8, 16)
  c.model.feature_dim = 16
  set_tiny_budget(c, num_steps=2, checkpoint_every=2)
  return c


def test_multi_hot_counts_a_repeated_digit_once():
  targets = video_classifier.multi_hot(jnp.array([[3, 3], [0, 9]]))
  np.testing.assert_array_equal(targets.sum(-1), [1, 2])
  assert targets[0, 3] == 1 and targets[1, 0] == 1 and targets[1, 9] == 1


def test_classifier_trains_and_reports_accuracy(data_dir, tmp_path, monkeypatch):
  monkeypatch.setitem(families.FAMILIES, "video_classifier", "nbp.video_classifier")
  config = tiny_classifier_config(data_dir)
  result = train.train_and_evaluate(config, str(tmp_path / "work"))
  assert result["status"] == "done" and result["step"] == 2
  assert 0.0 <= result["accuracy"] <= 1.0 and np.isfinite(result["loss"])
  s, state = train.load_state(config, str(tmp_path / "work"))
  metrics = train.evaluate(s, state, 2)
  assert set(metrics) >= {"eval/accuracy", "eval/class_accuracy", "eval/loss"}

  # The in-domain FVD, named for what it is.
  model, params = video_classifier.load_classifier(config, str(tmp_path / "work"))
  from nbp.data import moving_digits  # pylint: disable=g-import-not-at-top
  real = moving_digits.make_moving_digits(12, seed=0, split="test", num_frames=4, frame_size=16,
                                          num_digits=2)["video"]
  same = video_classifier.digits_fvd(real, real, classifier_params=params, model=model, batch_size=5)
  assert set(same) == {"fvd_digits_classifier"}
  assert abs(same["fvd_digits_classifier"]) < 1e-6
  noise = np.random.default_rng(0).integers(0, 256, size=real.shape, dtype=np.uint8)
  apart = video_classifier.digits_fvd(real, noise, classifier_params=params, model=model)
  assert apart["fvd_digits_classifier"] > 1e-3


def test_classifier_shapes():
  model = video_classifier.VideoClassifier(widths=(8, 16), feature_dim=12)
  videos = jnp.zeros((3, 5, 16, 16, 1), jnp.uint8)
  params = model.init(jax.random.key(0), videos)["params"]
  assert model.apply({"params": params}, videos).shape == (3, 10)
  features = model.apply({"params": params}, videos, method=video_classifier.VideoClassifier.features)
  assert features.shape == (3, 12)


# ---------------------------------------------------------------------------
# experiments/benchmark_fvd.py: its pure pieces.

def _small_digits_data(**overrides):
  """The generators' data knobs at 4 frames of 8x8 (one digit, 8 grey levels)."""
  from experiments.configs import video_classifier_digits  # pylint: disable=g-import-not-at-top
  c = video_classifier_digits.get_config("local,4x12")
  c.data.frame_size = 8
  for key, value in overrides.items():
    c.data[key] = value
  return c.data


def test_requantize_matches_the_token_round_trip_and_is_idempotent():
  from nbp.data import pipeline  # pylint: disable=g-import-not-at-top
  videos = np.random.default_rng(0).integers(0, 256, size=(3, 2, 5, 5, 1), dtype=np.uint8)
  for levels in (8, 16, 5):
    expected = pipeline.dequantize_tokens(
        pipeline.quantize_video(videos, levels).reshape(3, -1), levels, (2, 5, 5, 1))
    once = video_classifier.requantize(videos, levels)
    np.testing.assert_array_equal(once, expected)
    np.testing.assert_array_equal(video_classifier.requantize(once, levels), once)
    np.testing.assert_array_equal(jax.jit(lambda v, n=levels: video_classifier.requantize(v, n))(videos), once)
  assert video_classifier.requantize(videos, 0) is videos
  assert len(np.unique(video_classifier.requantize(videos, 8))) == 8


def test_classifier_config_matches_the_generators_setting():
  from experiments.configs import nbp_digits, ntp_digits, video_classifier_digits  # pylint: disable=g-import-not-at-top
  from experiments import benchmark_fvd  # pylint: disable=g-import-not-at-top
  judge = video_classifier_digits.get_config("local,4x12")
  assert (judge.data.num_frames, judge.data.frame_size, judge.data.num_digits, judge.data.levels) == (4, 12, 1, 8)
  for generator in (nbp_digits.get_config("XS,local,row"), ntp_digits.get_config("XS,local")):
    benchmark_fvd.check_same_data(generator.data, judge.data)
  with pytest.raises(ValueError, match="data.levels"):
    benchmark_fvd.check_same_data(ntp_digits.get_config("XS,local").data, _small_digits_data(frame_size=12, levels=16))
  with pytest.raises(ValueError, match="data.frame_size"):
    benchmark_fvd.check_same_data(ntp_digits.get_config("XS,local").data, _small_digits_data())
  with pytest.raises(ValueError, match="unknown config flags"):
    video_classifier_digits.get_config("local,4x21")
  # The architecture at 12x12: stages 12 -> 6 -> 3 -> 2, features of the configured width.
  model = video_classifier.build_model(judge.model)
  videos = jnp.zeros((2, 4, 12, 12, 1), jnp.uint8)
  shapes = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), videos)[0])
  assert shapes.shape == (2, 10)


def test_benchmark_parses_runs_and_loads_configs():
  from experiments import benchmark_fvd  # pylint: disable=g-import-not-at-top
  spec = "experiments/configs/nbp_digits.py:XS,local,token=runs/fvd/nbp_token"
  assert benchmark_fvd.parse_run(spec) == ("experiments/configs/nbp_digits.py", "XS,local,token",
                                           "runs/fvd/nbp_token")
  assert benchmark_fvd.parse_run("a.py=w") == ("a.py", "", "w")
  with pytest.raises(ValueError, match="CONFIG_FILE:ARG=WORKDIR"):
    benchmark_fvd.parse_run("experiments/configs/nbp_digits.py:XS,local")
  import os  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = benchmark_fvd.load_config(os.path.join(repo, "experiments/configs/nbp_digits.py"), "XS,local,token")
  assert config.family == "next_block" and tuple(config.model.block) == (1, 1, 1)


def test_benchmark_real_sets_are_disjoint_and_go_through_the_generators_quantisation():
  from experiments import benchmark_fvd  # pylint: disable=g-import-not-at-top
  data = _small_digits_data()
  a = benchmark_fvd.real_videos(data, 0, 6)
  b = benchmark_fvd.real_videos(data, 6, 6)
  assert a["video"].shape == (6, 4, 8, 8, 1) and a["video"].dtype == np.uint8
  assert a["tokens"].shape == (6, 4, 8, 8) and int(a["tokens"].max()) < data.levels
  assert a["class"].shape == (6,) and 0 <= a["class"].min() and a["class"].max() < 10
  assert len(np.unique(a["video"])) <= data.levels
  assert not np.array_equal(a["video"], b["video"])
  np.testing.assert_array_equal(benchmark_fvd.real_videos(data, 3, 3)["video"], a["video"][3:])
  # A generator that drew exactly the real tokens gives exactly the real videos.
  np.testing.assert_array_equal(benchmark_fvd.tokens_to_videos(a["tokens"], data.levels), a["video"])


def test_benchmark_fvd_is_zero_for_one_set_and_positive_for_a_shifted_one():
  from experiments import benchmark_fvd  # pylint: disable=g-import-not-at-top
  data = _small_digits_data()
  model = video_classifier.VideoClassifier(widths=(8,), feature_dim=8)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4, 8, 8, 1), jnp.uint8))["params"]
  judge = benchmark_fvd.Judge(model, params, levels=data.levels, batch_size=8)
  real = benchmark_fvd.real_videos(data, 0, 16)
  features = judge.features(real["video"])
  assert features.shape == (16, 8) and features.dtype == np.float64
  # Raw videos and their token round trip give the same features (the judge requantises).
  raw = benchmark_fvd.moving_digits.make_moving_digits(16, seed=0, split="test", num_frames=4, frame_size=8,
                                                      num_digits=1)["video"]
  np.testing.assert_allclose(judge.features(raw), features, atol=1e-6)
  np.testing.assert_allclose(judge.features(benchmark_fvd.tokens_to_videos(real["tokens"], data.levels)),
                             features, atol=1e-6)
  assert abs(judge.distance(features, features)) < 1e-6
  shifted = np.roll(real["video"], 3, axis=3)  # the same digits, moved 3 pixels to the right
  brighter = np.clip(real["video"].astype(np.int32) + 64, 0, 255).astype(np.uint8)
  assert judge.distance(features, judge.features(shifted)) > 1e-4
  assert judge.distance(features, judge.features(brighter)) > 1e-4
  assert 0.0 <= judge.accuracy(real["video"], real["label"]) <= 1.0


@pytest.mark.parametrize("arg", ["tiny,local,row", "tiny,local,row,frames"])
def test_benchmark_generator_uses_the_given_classes_and_frames(arg):
  from experiments import benchmark_fvd  # pylint: disable=g-import-not-at-top
  from experiments.configs import nbp_digits  # pylint: disable=g-import-not-at-top
  from nbp import next_block  # pylint: disable=g-import-not-at-top
  config = nbp_digits.get_config(arg)
  config.data.frame_size = 8
  config.model.block = (1, 1, 8)
  model = next_block.build_model(config.model, config.data)
  extra = {"labels": jnp.zeros((1,), jnp.int32)} if model.condition == "class" else {}
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, model.frame_prefix_len + model.num_predicted),
                                                            jnp.int32), **extra)["params"]
  real = benchmark_fvd.real_videos(config.data, 0, 2)
  generate = jax.jit(benchmark_fvd.make_generator(config, model, batch_size=2))
  tokens = generate(params, jax.random.key(0), jnp.asarray(real["class"]), jnp.asarray(real["tokens"]))
  assert tokens.shape == (2, 4, 8, 8) and int(tokens.max()) < config.data.levels
  assert benchmark_fvd.generated_frames(config, model) == (2 if model.condition == "frames" else 4)
  if model.condition == "frames":
    np.testing.assert_array_equal(tokens[:, :2], real["tokens"][:, :2])
  assert benchmark_fvd.describe(config, model) == ("1x1x8", model.condition)
