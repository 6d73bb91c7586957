"""FVD: the Fréchet distance against scipy, I3D on fixed weights and its weight file, the preprocessing,
the moving-digits classifier, the two FVD evaluators on tiny trained runs, and experiments/benchmark_fvd.py."""

import dataclasses
import functools
import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

from experiments import benchmark_fvd
from experiments.configs import nbp_digits
from experiments.configs import ntp_digits
from experiments.configs import video_classifier_digits
from experiments.configs import video_tokenizer_digits
from nbp import evaluators
from nbp import tasks
from nbp.data import moving_digits
from nbp.data import pipeline
from nbp.evaluators import frame_prediction
from nbp.evaluators import frechet
from nbp.evaluators import fvd
from nbp.evaluators import fvd_digits
from nbp.evaluators import generation
from nbp.models import resize
from nbp.models import i3d
from nbp.models.video_classifier import VideoClassifier
from nbp.tasks import next_block
from nbp.tasks import video_classifier
from nbp.tasks import video_tokenizer
from nbp.training import loop as train
from nbp.training import metrics as metrics_lib
from nbp.training import workdir as workdir_lib
from tests.conftest import set_tiny_budget, tiny_classifier_config
from tests.test_video_tokenizer import tiny_tokenizer_config

FVD_KEY = fvd_digits.FVD_KEY


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
  np.testing.assert_allclose(frechet.frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-6)


def test_frechet_distance_of_one_distribution_is_zero():
  rng = np.random.default_rng(0)
  for rank in (16, 5):  # full rank and rank-deficient
    mu, sigma = _gaussian(rng, 16, rank)
    assert abs(frechet.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_frechet_distance_of_known_gaussians():
  """Diagonal covariances: sum (m1 - m2)^2 + (sqrt(v1) - sqrt(v2))^2."""
  v1, v2 = np.array([1.0, 4.0, 0.0]), np.array([9.0, 1.0, 2.0])
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  np.testing.assert_allclose(frechet.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)), expected, rtol=1e-12)


def test_feature_statistics_match_numpy():
  features = np.random.default_rng(0).normal(size=(50, 6))
  mu, sigma = frechet.feature_statistics(features)
  np.testing.assert_allclose(mu, features.mean(0))
  np.testing.assert_allclose(sigma, np.cov(features, rowvar=False))
  with pytest.raises(ValueError, match="N >= 2"):
    frechet.feature_statistics(features[:1])


def test_feature_extractor_pads_the_last_batch_and_keeps_the_order():
  calls = []

  def apply(scale, x):
    calls.append(x.shape)  # traced once: one compiled shape
    return x.reshape(x.shape[0], -1).astype(jnp.float32) * scale

  videos = np.arange(7 * 3, dtype=np.int32).reshape(7, 3)
  out = frechet.FeatureExtractor(apply, 2.0, batch_size=3)(videos)
  np.testing.assert_array_equal(out, videos * 2.0)
  assert out.dtype == np.float64 and calls == [(3, 3)]
  as_int = frechet.FeatureExtractor(lambda s, x: x * s, 1, batch_size=4, dtype=np.int32)(videos)
  assert as_int.dtype == np.int32 and np.array_equal(as_int, videos)


# ---------------------------------------------------------------------------
# I3D on fixed weights.

def _fixed_i3d_variables(seed=0, num_classes=i3d.NUM_CLASSES):
  """Weights of the right shapes from numpy, each key's from its own seed (fold of `seed` and the key's
  CRC), so they do not depend on the order of the variables; no jitted init (that takes 15 s)."""
  flat = {}
  for key, shape in i3d.i3d_variable_shapes(num_classes).items():
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    if key.endswith("kernel"):
      flat[key] = rng.standard_normal(size=shape, dtype=np.float32) * np.sqrt(2.0 / int(np.prod(shape[:-1])))
    elif key.endswith("bn/var"):
      flat[key] = rng.uniform(0.5, 1.5, size=shape)
    else:
      flat[key] = rng.standard_normal(size=shape, dtype=np.float32) * 0.1
  return i3d.unflatten_variables({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})


def _fixed_rgb_videos(n=2, frames=8, side=20):
  """uint8 [n, frames, side, side, 3]: a different ramp per video, frame and channel (no randomness)."""
  v, t, y, x, c = np.meshgrid(*(np.arange(k) for k in (n, frames, side, side, 3)), indexing="ij")
  return ((7 * x + 13 * y + 29 * t + 50 * c + 101 * v + (x * y) % 17) % 256).astype(np.uint8)


@pytest.fixture(scope="module")
def i3d_variables():
  return _fixed_i3d_variables()


@pytest.fixture(scope="module")
def small_i3d(i3d_variables):
  """The FVD extractor at 8 frames of 32x32, batch 2: the one compiled I3D of most tests here."""
  return fvd.i3d_extractor(i3d_variables, batch_size=2, resolution=32, num_frames=8)


def test_i3d_parameter_names_and_count():
  shapes = i3d.i3d_variable_shapes()
  assert shapes["Conv3d_1a_7x7/conv/kernel"] == (7, 7, 7, 3, 64)
  assert shapes["Conv3d_1a_7x7/bn/mean"] == (64,)
  assert "Conv3d_1a_7x7/bn/scale" not in shapes  # Sonnet's batch norm has no gamma
  assert shapes["Mixed_3b/Branch_1/Conv3d_0b_3x3/conv/kernel"] == (3, 3, 3, 96, 128)
  assert shapes["Mixed_5c/Branch_3/Conv3d_0b_1x1/conv/kernel"] == (1, 1, 1, 832, 128)
  assert shapes["Logits/conv/kernel"] == (1, 1, 1, 1024, 400)
  assert shapes["Logits/conv/bias"] == (400,)
  # The Kinetics I3D has about 12.7M weights (conv kernels, BN offsets, logits).
  assert 12.5e6 < sum(np.prod(s) for s in shapes.values()) < 12.9e6


# Logits 0, 94, 207, 298, 399 of the two `_fixed_rgb_videos` (20x20, resized to 32x32) on
# `_fixed_i3d_variables(0)`, computed once on CPU with this code; all are above 0.5 in size, so rtol
# is never asked of a near-zero. A change to the preprocessing (resize convention, scaling, channel
# order) or to any layer (kernel, stride, padding, pool, batch-norm epsilon, branch order) moves
# them. Measured when pinned: half-pixel resizing moves them by up to 187%, BGR for RGB by 3100%,
# a batch-norm epsilon of 1e-5 for 1e-3 by 1.2%.
PINNED_INDICES = [0, 94, 207, 298, 399]
PINNED_LOGITS = [[1.18122852, -1.72067213, 0.6777401, -0.7081449, 1.11839688],
                 [1.02315533, -1.80374837, 0.76376474, -0.85566694, 1.51879263]]


def test_i3d_logits_on_fixed_weights_are_pinned_and_give_the_fvd(small_i3d):
  """One compiled I3D (2 videos of 8 frames at 32x32) for the pinned logits and the FVD on them."""
  real = _fixed_rgb_videos(n=3)  # 3 videos in batches of 2: a padded last batch
  logits = small_i3d(real)
  assert logits.shape == (3, 400)
  np.testing.assert_allclose(logits[:2, PINNED_INDICES], PINNED_LOGITS, rtol=1e-4)
  np.testing.assert_allclose(logits[:2], small_i3d(real[:2]), rtol=1e-6)  # the padding changes nothing
  assert abs(fvd.fvd(real, real, extractor=small_i3d)) < 1e-6
  assert fvd.fvd(real, real // 4, extractor=small_i3d) > 1.0


@pytest.mark.parametrize("suffix", [".npz", ".msgpack"])
def test_weight_file_round_trip(tmp_path, i3d_variables, suffix):
  path = str(tmp_path / f"i3d{suffix}")
  i3d.save_i3d(path, i3d_variables)
  loaded = i3d.load_i3d(path)
  assert set(loaded) == {"params", "batch_stats"}
  flat_in, flat_out = i3d.flatten_variables(i3d_variables), i3d.flatten_variables(loaded)
  assert set(flat_in) == set(flat_out)
  for key in flat_in:
    np.testing.assert_array_equal(flat_in[key], flat_out[key])


def _write_npz(path, flat):
  with open(path, "wb") as f:
    np.savez(f, **flat)
  return str(path)


def test_weight_file_errors_name_the_first_bad_key_and_the_file(tmp_path, i3d_variables):
  flat = {k: np.asarray(v) for k, v in i3d.flatten_variables(i3d_variables).items()}
  order = list(i3d.i3d_variable_shapes())
  # The first missing key in the file format's order (params, then batch_stats), not alphabetically.
  first, later = "Mixed_5c/Branch_0/Conv3d_0a_1x1/conv/kernel", "Conv3d_1a_7x7/bn/var"
  assert order.index(first) < order.index(later)
  missing = {k: v for k, v in flat.items() if k not in (first, later)}
  with pytest.raises(ValueError, match=rf"missing\.npz.*lacks the key '{first}'"):
    i3d.load_i3d(_write_npz(tmp_path / "missing.npz", missing))

  wrong = dict(flat, **{"Logits/conv/kernel": np.zeros((1, 1, 1, 1024, 600), np.float32)})
  with pytest.raises(ValueError, match=r"wrong\.npz.*'Logits/conv/kernel' has shape \(1, 1, 1, 1024, 600\)"):
    i3d.load_i3d(_write_npz(tmp_path / "wrong.npz", wrong))

  extra = dict(flat, **{"Mixed_9z/conv/kernel": np.zeros(1), "Aux/bias": np.zeros(1)})
  with pytest.raises(ValueError, match=r"extra\.npz.*unexpected key 'Aux/bias' \(2 unexpected"):
    i3d.load_i3d(_write_npz(tmp_path / "extra.npz", extra))

  with pytest.raises(FileNotFoundError, match=r"absent\.npz.*nothing is downloaded"):
    i3d.load_i3d(str(tmp_path / "absent.npz"))
  with pytest.raises(ValueError, match=r"i3d\.pt.*\.npz or \.msgpack"):
    i3d.load_i3d(_write_npz(tmp_path / "i3d.pt", {}))


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
  out = resize.resize_bilinear(jnp.asarray(image)[None], size_out)[0]
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


def test_preprocess_keeps_the_first_16_frames_and_checks_the_count():
  videos = np.random.default_rng(0).integers(0, 256, size=(1, 17, 8, 8, 3), dtype=np.uint8)
  np.testing.assert_array_equal(fvd.preprocess(videos, resolution=16), fvd.preprocess(videos[:, :16], resolution=16))
  with pytest.raises(ValueError, match="16 frames.*got 15.*num_frames=None"):
    fvd.preprocess(videos[:, :15])
  assert fvd.preprocess(videos, num_frames=None, resolution=16).shape == (1, 17, 16, 16, 3)
  with pytest.raises(ValueError, match=r"\[N, F, H, W, 1\|3\]"):
    fvd.preprocess(np.zeros((1, 16, 8, 8, 2), np.uint8))


@pytest.mark.parametrize("half_pixel_centers", [False, True])
def test_preprocess_downsamples_to_stored_integer_frames_first(half_pixel_centers):
  """Kinetics-600's protocol: frames at 64x64 grey levels, then the I3D's size, in one resize convention."""
  videos = np.random.default_rng(1).integers(0, 256, size=(1, 16, 32, 32, 1), dtype=np.uint8)
  frames = jnp.asarray(videos[0])
  if half_pixel_centers:  # PyTorch's bilinear resize with align_corners=False: 2x down is the 2x2 mean
    small = np.asarray(videos[0], np.float32).reshape(16, 16, 2, 16, 2, 1).mean((2, 4))
  else:  # TF1's: output pixel i samples input pixel 2i
    small = np.asarray(videos[0, :, ::2, ::2], np.float32)
  np.testing.assert_allclose(resize.resize_bilinear(frames, 16, half_pixel_centers=half_pixel_centers), small, atol=1e-4)
  stored = np.round(small)[None]
  got = fvd.preprocess(videos, resolution=24, downsample=16, half_pixel_centers=half_pixel_centers)
  want = fvd.preprocess(stored, resolution=24, half_pixel_centers=half_pixel_centers)
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert np.abs(np.asarray(got) - np.asarray(fvd.preprocess(videos, resolution=24))).max() > 0.01


# ---------------------------------------------------------------------------
# The moving-digits classifier.

def test_multi_hot_counts_a_repeated_digit_once():
  targets = video_classifier.multi_hot(jnp.array([[3, 3], [0, 9]]), 10)
  np.testing.assert_array_equal(targets.sum(-1), [1, 2])
  assert targets[0, 3] == 1 and targets[1, 0] == 1 and targets[1, 9] == 1


def test_requantize_matches_the_token_round_trip_and_is_idempotent():
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


def _separable_set(n, seed):
  """Digit 3: the top half lit; digit 7: the bottom half; noise on both. [n, 2, 8, 8, 1], labels [n, 1]."""
  rng = np.random.default_rng(seed)
  labels = rng.choice([3, 7], size=(n, 1)).astype(np.int32)
  videos = rng.integers(0, 60, size=(n, 2, 8, 8, 1))
  top = labels[:, 0] == 3
  videos[top, :, :4] += 180
  videos[~top, :, 4:] += 180
  return {"video": videos.astype(np.uint8), "label": labels}


@pytest.mark.slow
def test_classifier_learns_a_trivially_separable_set():
  """A few Adam steps on the task's loss: exact-set accuracy on held-out videos goes from ~0 to 1."""
  model = VideoClassifier(widths=(8,), feature_dim=8)
  train_set, test_set = _separable_set(64, 0), _separable_set(32, 1)
  params = jax.jit(model.init)(jax.random.key(0), train_set["video"][:1])["params"]
  loss = jax.jit(lambda p, b: video_classifier.loss(model, p, b, None))
  tx = optax.adam(1e-2)

  @jax.jit
  def step(p, state):
    grads = jax.grad(lambda q: loss(q, train_set)[0])(p)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  before = float(loss(params, test_set)[1]["accuracy"])
  state = tx.init(params)
  for _ in range(40):
    params, state = step(params, state)
  _, metrics = loss(params, test_set)
  assert before < 0.2 and float(metrics["accuracy"]) == 1.0
  logits = np.asarray(jax.jit(model.apply)({"params": params}, test_set["video"]))
  assert fvd_digits.class_match(logits, test_set["label"]) == 1.0


def test_class_match_on_hand_made_logits():
  logits = np.array([[0.0, 5.0, 1.0],   # top-1 is 1
                     [4.0, 3.0, -1.0],  # top-2 is {0, 1}
                     [2.0, 0.0, 3.0]])  # top-1 is 2
  assert fvd_digits.class_match(logits, np.array([[1, 1], [0, 1], [2, 2]])) == 1.0
  assert fvd_digits.class_match(logits, np.array([[1, 1], [0, 2], [0, 0]])) == pytest.approx(1 / 3)
  assert fvd_digits.class_match(logits[:1], np.array([[0, 1]])) == 0.0  # 0 asked for, but 2 is the runner-up


def test_the_demo_judge_is_trained_on_the_demos_videos():
  """video_classifier_digits.py:5x16 judges `make demo`'s token runs: the tokenizer's videos, validation first."""
  judge = video_classifier_digits.get_config("5x16").data
  videos = video_tokenizer_digits.get_config("local").data  # what the demo's tokens decode to
  for knob in ("num_frames", "frame_size", *fvd_digits.KNOBS):
    assert judge[knob] == videos[knob], knob
  assert judge.levels == 0  # decoded videos are not quantised
  np.testing.assert_array_equal(generation.real_videos(judge, 0, 4)["video"],
                                generation.real_videos(videos, 0, 4)["video"])  # the same carve of the same pool
  with pytest.raises(ValueError, match="two video shapes"):
    video_classifier_digits.get_config("4x12,5x16")


def _without_samples(c):
  """No sample evaluator at the end of training: one compilation less per tiny run."""
  with c.unlocked():
    del c.evals["sample"]
  return c


@pytest.mark.slow
def test_load_run_gives_the_classifier_the_loop_evaluated(classifier_workdir, data_dir):
  """tasks.load_run(workdir) alone (config.json + checkpoint) gives the loop's final eval/loss exactly."""
  run = tasks.load_run(classifier_workdir)
  as_json = lambda c: json.loads(c.to_json_best_effort())
  assert as_json(run.config) == as_json(tiny_classifier_config(data_dir))  # config.json is the run's config
  rows = metrics_lib.read_jsonl(os.path.join(classifier_workdir, "metrics.jsonl"))
  logged = [r for r in rows if r.get("step") == 2 and "eval/loss" in r][-1]
  batch = next(run.task.data("validation", seed=run.config.seed, process_index=0, process_count=1,
                             batch_size=run.config.batch_size))  # the eval's batch: validation, as in training
  value, metrics = jax.jit(run.predict("eval_loss"))(batch, None)
  np.testing.assert_allclose(float(value), logged["eval/loss"], rtol=1e-5)
  np.testing.assert_allclose(float(metrics["class_accuracy"]), logged["eval/class_accuracy"], rtol=1e-6)


def _judge(config, params, batch_size):
  """An fvd_digits Judge of an untrained classifier: its task's "features" and "logits", as load_judge builds it."""
  task = video_classifier.make_task(config)
  features, logits = (frechet.FeatureExtractor(task.predict_fn(name), params, batch_size)
                      for name in ("features", "logits"))
  return fvd_digits.Judge(config, features, logits)


def test_digits_features_requantise_and_separate_sets():
  config = video_classifier_digits.get_config("local,4x12")
  data = config.data
  data.frame_size = 8
  config.model.widths = (8,)
  config.model.feature_dim = 8
  task = video_classifier.make_task(config)
  params = jax.jit(task.model.init)(jax.random.key(0), **task.init_inputs())["params"]
  extract = _judge(config, params, batch_size=8).features
  raw = generation.real_videos(data, 0, 16)["video"]
  quantised = video_classifier.requantize(raw, data.levels)
  assert data.levels == 8 and not np.array_equal(raw, quantised)
  features = extract(quantised)
  assert features.shape == (16, 8) and features.dtype == np.float64
  np.testing.assert_allclose(extract(raw), features, atol=1e-6)  # "features" requantises to data.levels
  same = fvd_digits.digits_fvd(quantised, raw, _judge(config, params, batch_size=5))
  assert set(same) == {FVD_KEY} and abs(same[FVD_KEY]) < 1e-6
  shifted = np.roll(quantised, 3, axis=3)  # the same digits, moved 3 pixels to the right
  brighter = np.clip(quantised.astype(np.int32) + 64, 0, 255).astype(np.uint8)
  assert frechet.frechet_distance_of_features(features, extract(shifted)) > 1e-4
  assert frechet.frechet_distance_of_features(features, extract(brighter)) > 1e-4


# ---------------------------------------------------------------------------
# Real sets and the generation shared by the FVD evaluators.

def test_real_sets_are_disjoint_random_access_and_reach_past_num_test():
  data = video_classifier_digits.get_config("local,4x12").data
  data.num_digits = 2
  a, b = generation.real_videos(data, 0, 6), generation.real_videos(data, 6, 6)  # validation, by default
  assert a["video"].shape == (6, 4, 12, 12, 1) and a["video"].dtype == np.uint8
  assert a["label"].shape == (6, 2)
  np.testing.assert_array_equal(a["class"], a["label"][:, 0] + 10 * a["label"][:, 1])
  assert not np.array_equal(a["video"], b["video"])
  np.testing.assert_array_equal(generation.real_videos(data, 3, 3)["video"], a["video"][3:])
  knobs = dict(seed=0, num_frames=4, frame_size=12, num_digits=2)
  for split, videos in (("validation", a), ("test", generation.real_videos(data, 0, 6, "test"))):
    built = moving_digits.make_moving_digits(6, split=split, **knobs)
    np.testing.assert_array_equal(videos["video"], built["video"])  # the dataset's own videos of that split
  assert not np.array_equal(a["video"], generation.real_videos(data, 0, 6, "test")["video"])
  late = generation.real_videos(data, data.num_test + 5, 2)  # past the split's 1000
  assert late["video"].shape == (2, 4, 12, 12, 1) and late["video"].max() > 0


def tiny_generator_config(data_dir, arg="tiny,local,row", **overrides):
  """NBP on the tiny classifier's videos (5 frames of 8x8 pixels), blocks of one row, 2 steps.

  `overrides`: "section.key" values, keys the config leaves at their defaults included.
  """
  c = nbp_digits.get_config(arg)
  if c.model.condition == "class":  # unguided at top-p 1.0 unless a test says otherwise (the local configs guide)
    c.sampler.guidance_scale = 1.0
    c.sampler.top_p = 1.0
  c.data.dir = data_dir
  c.data.num_frames = 5
  c.data.frame_size = 8
  c.data.num_train = 32
  c.data.num_test = 16
  c.model.grid = (5, 8, 8)
  c.model.block = (1, 1, 8)
  if c.model.condition == "frames":
    c.model.prefix_frames = 2
  c.sampler.num_samples = 2
  set_tiny_budget(c, num_steps=2, checkpoint_every=2)
  with c.unlocked():
    c.sampler.cache_phases = 1  # one compiled decoding loop: a third of the sampler's compile time
    for key, value in overrides.items():
      section, name = key.split(".")
      c[section][name] = value
  return _without_samples(c)


@pytest.fixture(scope="module")
def generator_workdir(data_dir, tmp_path_factory):
  """A class-conditional pixel run with guidance 2 (the doubled-batch sampler), trained 2 steps; the newest
  checkpoint is step 2, and step 1's is kept as well (a training curve's)."""
  workdir = str(tmp_path_factory.mktemp("generator"))
  config = tiny_generator_config(data_dir, **{"sampler.guidance_scale": 2.0})
  with config.unlocked():
    config.checkpoint_every, config.keep_checkpoints, config.keep_checkpoint_steps = 1, 1, (1,)
  train.train_and_evaluate(config, workdir)
  return workdir


def _context(s, params, seed=0):
  return evaluators.Context(setup=s, params=params, params_name="params", step=0, workdir="", rng=jax.random.key(seed))


def _untrained(config):
  s = train.setup(config)
  return s, train.init_state(s, 0).params


def test_sampler_settings_are_the_configs_with_the_tasks_guidance_rule(data_dir):
  for arg, scale, expected in [("tiny,local,row", 1.0, None), ("tiny,local,row", 3.0, 3.0),
                               ("tiny,local,row,frames", 3.0, None)]:
    config = tiny_generator_config(data_dir, arg, **{"sampler.guidance_scale": scale, "sampler.top_k": 5})
    model = next_block.make_task(config).model
    assert next_block.sampler_kwargs(model, config.sampler) == {
        "num_samples": 2, "guidance_scale": expected, "temperature": 1.0, "top_k": 5, "top_p": config.sampler.top_p,
        "cache_phases": 1, "candidates": 1, "selection": "consensus"}
  # A family without a conditioned sampler (or decoded videos): the error names the evaluator and what it offers.
  classifier = video_classifier.make_task(tiny_classifier_config(data_dir))
  with pytest.raises(ValueError, match=r"an FVD evaluator asks for predict function 'to_videos'.*"
                                       r"\['eval_loss', 'features', 'logits'\]"):
    generation.check_video_shape(classifier, (5, 8, 8, 1), "the judge")


@pytest.mark.slow
def test_conditioned_sampler_is_the_task_sampler_with_explicit_conditions(data_dir):
  s, params = _untrained(tiny_generator_config(data_dir, **{"sampler.guidance_scale": 3.0}))
  model, labels = s.task.model, jnp.array([3, 8], jnp.int32)
  prompt = jnp.zeros((2, 0, 8, 8), jnp.int32)
  ours = jax.jit(s.task.predict_fn("sample_conditioned"))(params, jax.random.key(1), labels, prompt)
  theirs = jax.jit(lambda p: next_block.sample(model, p, jax.random.key(1), num_samples=2, labels=labels,
                                               guidance_scale=3.0))(params)
  np.testing.assert_array_equal(ours, theirs)


@pytest.mark.slow
def test_fvd_digits_evaluator_on_a_tiny_trained_run(classifier_workdir, generator_workdir):
  s, params, _, _ = train.load_params(workdir_lib.read_config(generator_workdir), generator_workdir)
  evaluator = evaluators.build({"fvd": dict(type="fvd_digits", classifier_workdir=classifier_workdir, num_videos=6,
                                            batch_size=4, seed=1)})["fvd"][1]
  metrics, stand_in, generated = evaluator.measure(_context(s, params))
  assert set(metrics) == {FVD_KEY, FVD_KEY + "_floor", "class_match", "class_match_real", "frames_per_s",
                          "tokens_per_s", "sample_seconds", "compile_seconds", "num_videos"}
  assert generated.videos.shape == (6, 5, 8, 8, 1) and generated.videos.dtype == np.uint8
  assert set(np.unique(generated.videos)) <= set(video_classifier.requantize(np.arange(256, dtype=np.uint8), 8))
  assert generated.drawn == 8 and generated.frames == 5  # 6 videos in batches of 4; every frame drawn
  # The numbers are the distances of these very sets (validation videos), through the classifier alone.
  judge = fvd_digits.load_judge(classifier_workdir, 4)  # the evaluator's own judge (batch 4)
  reference = generation.real_videos(judge.config.data, 0, 6, "validation")["video"]
  stand_in_videos = generation.real_videos(judge.config.data, 12, 6, "validation")["video"]  # seed 1
  np.testing.assert_array_equal(stand_in["video"], stand_in_videos)
  direct = lambda a, b: fvd_digits.digits_fvd(a, b, judge)[FVD_KEY]
  np.testing.assert_allclose(metrics[FVD_KEY], direct(reference, generated.videos), rtol=1e-6)
  np.testing.assert_allclose(metrics[FVD_KEY + "_floor"], direct(reference, stand_in["video"]), rtol=1e-6)
  # Both positive and apart. Their order is not tested: a judge trained 2 steps orders them by chance
  # (on the test split generated > floor, on validation 0.50 < 0.87).
  assert metrics[FVD_KEY] > 0 and metrics[FVD_KEY + "_floor"] > 0 and metrics[FVD_KEY] != metrics[FVD_KEY + "_floor"]
  # The same seed draws the same videos (one compilation), another seed others.
  again, _, same = evaluator.measure(_context(s, params))
  np.testing.assert_array_equal(same.videos, generated.videos)
  assert again[FVD_KEY] == metrics[FVD_KEY] and again["compile_seconds"] == metrics["compile_seconds"]
  other = fvd_digits.Evaluator(classifier_workdir=classifier_workdir, num_videos=6, batch_size=4, seed=2)
  assert not np.array_equal(other.measure(_context(s, params))[2].videos, generated.videos)
  # The context's split (experiments.evaluate --split test) replaces the evaluator's own validation.
  _, on_test, _ = evaluator.measure(dataclasses.replace(_context(s, params), split="test"))
  np.testing.assert_array_equal(on_test["video"], generation.real_videos(judge.config.data, 12, 6, "test")["video"])
  assert not np.array_equal(on_test["video"], stand_in["video"])


@pytest.mark.slow
def test_frame_prediction_is_prompted_with_the_stand_in_first_frames(classifier_workdir, data_dir):
  s, params = _untrained(tiny_generator_config(data_dir, "tiny,local,row,frames"))
  evaluator = fvd_digits.Evaluator(classifier_workdir=classifier_workdir, num_videos=4, batch_size=4, floor=False)
  metrics, stand_in, generated = evaluator.measure(_context(s, params))
  assert "class_match" not in metrics and FVD_KEY + "_floor" not in metrics and np.isfinite(metrics[FVD_KEY])
  np.testing.assert_array_equal(generated.videos[:, :2], video_classifier.requantize(stand_in["video"][:, :2], 8))
  assert generated.frames == 3  # the two given frames are not counted as drawn
  # Frame prediction's own figures: the predicted frames 2..4 against the stand-in's.
  want = generation.frame_prediction_metrics(stand_in["video"], generated.videos, 2)
  assert {k: metrics[k] for k in want} == want and set(want) == {
      "com_error_px", "com_error_px_repeat_last", "empty_frames", "mse", "mse_repeat_last", "mse_black"}


@pytest.mark.slow
def test_frame_prediction_scores_the_pixel_mean_of_several_draws(data_dir):
  """draws=K: K continuations per video, the single-draw figures over all of them, the mean frame scored apart."""
  s, params = _untrained(tiny_generator_config(data_dir, "tiny,local,row,frames"))
  evaluator = frame_prediction.Evaluator(num_videos=3, batch_size=4, draws=2)
  metrics = evaluator.run(_context(s, params))
  real = generation.real_videos(generation.run_video_data(s.config), 0, 3, "validation")
  repeated = {k: np.repeat(v, 2, axis=0) for k, v in real.items()}  # video 0, video 0, video 1, ...
  drawn = generation.generate_videos(s, params, jax.random.key(0), repeated, batch_size=4,
                                     expected_shape=real["video"].shape[1:], judge="test").videos
  assert not np.array_equal(drawn[0::2, 2:], drawn[1::2, 2:])  # two draws of one video differ
  single = generation.frame_prediction_metrics(repeated["video"], drawn, 2)
  assert {k: metrics[k] for k in single} == single
  mean = drawn.astype(np.float64).reshape(3, 2, *drawn.shape[1:]).mean(1)
  of_mean = generation.frame_prediction_metrics(real["video"], mean, 2)
  assert metrics["mse_mean_of_draws"] == of_mean["mse"] and metrics["draws"] == 2
  assert metrics["com_error_px_mean_of_draws"] == of_mean["com_error_px"] or np.isnan(of_mean["com_error_px"])
  assert metrics["mse_mean_of_draws"] <= metrics["mse"]  # averaging never raises the MSE (convexity)
  with pytest.raises(ValueError, match="draws=0"):
    frame_prediction.Evaluator(draws=0).run(_context(s, params))


@pytest.mark.slow
def test_frame_log_likelihoods_sum_to_the_loss_and_the_belief_is_scored(data_dir, monkeypatch):
  """The frames' teacher-forced log-likelihoods add up to the loss; the evaluator's belief figures exist, and
  the sampler continues draws of the belief."""
  s, params = _untrained(tiny_generator_config(data_dir, "tiny,local,row,frames"))
  real = generation.real_videos(generation.run_video_data(s.config), 0, 3, "validation")
  tokens = s.task.predict_fn("from_videos")(real["video"])  # [3, F, H, W]
  score = s.task.predict_fn("frame_log_likelihood")
  model = s.task.model
  total = sum(score(params, tokens, frame=f) for f in range(model.prefix_frames, model.grid[0]))  # [3]
  loss, _ = s.task.predict_fn("eval_loss")(params, {"tokens": tokens.reshape(3, -1)}, jax.random.key(0))
  np.testing.assert_allclose(-float(total.mean()) / model.num_predicted, float(loss), rtol=1e-5)
  with pytest.raises(ValueError, match="frame 1 of 5 is not predicted"):
    score(params, tokens, frame=1)
  metrics = frame_prediction.Evaluator(num_videos=2, batch_size=2, belief=True, draws=2).run(_context(s, params))
  assert 0 <= metrics["com_error_px_first_belief"] < 8 and np.isfinite(metrics["com_error_px_first"])
  for name in ("after_belief", "after_truth"):
    assert np.isfinite(metrics[f"com_error_px_{name}"]) and f"com_error_px_{name}_mean_of_draws" in metrics
  assert 0 <= metrics["com_error_px_after_truth_belief"] < 8 and metrics["com_error_px_after_truth_exact_sampler"] == 0
  assert np.isfinite(metrics["com_error_px_belief_chain"]) and "com_error_px_belief_chain_mean_of_draws" in metrics
  assert metrics["com_error_px_first_exact_sampler"] == 0  # an 8x8 digit in an 8x8 frame cannot move
  # Videos whose digit moves by the furthest shift down and right, and a scorer sure of that shift (it scores
  # ink lower and further right higher): a draw of its belief misses by nothing, one sure of no move by the move.
  videos = real["video"][:2].copy()
  last = s.task.predict_fn("from_videos")(videos)[:, 1]
  moves = [frame_prediction.position_shifts(np.asarray(f) != 0)[-1] for f in last]
  assert max(map(max, moves)) > 0  # the digit's ink leaves room to move
  for video, move in zip(videos, moves):
    video[2] = np.roll(video[1], move, axis=(0, 1))
  reach = np.add.outer(np.arange(8), np.arange(8))
  # The sampler continues draws of the belief (here the true next frame, then the last frame repeated) and the
  # true first predicted frame, scored from the frame after it.
  continued = {}
  monkeypatch.setattr(frame_prediction, "_continued", lambda s, params, rng, prompts, *, scored_from, name, **kw:
                      continued.update({name: (prompts, scored_from)}) or {})
  belief = functools.partial(frame_prediction._belief, s, params, videos, 2, 3, 2, jax.random.key(0))
  s.task.predict_fns["frame_log_likelihood"] = lambda params, grids, frame: (
      1e3 * ((grids[:, frame] != 0) * reach).sum((1, 2)))
  assert belief()["com_error_px_first_belief"] == 0
  true = np.repeat(s.task.predict_fn("from_videos")(videos)[:, :3], 3, axis=0)
  np.testing.assert_array_equal(continued["after_belief"][0], true)
  assert continued["after_belief"][1] == 2 and continued["after_truth"][1] == 3
  s.task.predict_fns["frame_log_likelihood"] = lambda params, grids, frame: (
      -1e3 * (grids[:, frame] != grids[:, frame - 1]).sum((1, 2)))
  np.testing.assert_allclose(belief()["com_error_px_first_belief"],
                             np.linalg.norm(np.asarray(moves, float), axis=-1).mean(), rtol=1e-9)
  np.testing.assert_array_equal(continued["after_belief"][0][:, 2], true[:, 1])
  np.testing.assert_array_equal(continued["after_truth"][0], true)


@pytest.mark.slow
def test_whole_frame_draws_follow_the_belief_frame_by_frame(data_dir):
  """Each next frame is a whole shift of the one before it, drawn from the scorer's belief over the shifts."""
  s, params = _untrained(tiny_generator_config(data_dir, "tiny,local,row,frames"))
  real = generation.real_videos(generation.run_video_data(s.config), 0, 2, "validation")
  prompts = np.repeat(np.asarray(s.task.predict_fn("from_videos")(real["video"]))[:, :2], 3, axis=0)  # [6, 2, H, W]
  draw = functools.partial(frame_prediction.whole_frame_draws, s, params, prompts, background=0, batch_size=4)
  reach = np.add.outer(np.arange(8), np.arange(8))
  scorers = {"still": lambda params, grids, frame: -1e3 * (grids[:, frame] != grids[:, frame - 1]).sum((1, 2)),
             "down right": lambda params, grids, frame: 1e3 * ((grids[:, frame] != 0) * reach).sum((1, 2)),
             "flat": lambda params, grids, frame: np.zeros(len(grids))}
  drawn = {}
  for name, scorer in scorers.items():
    s.task.predict_fns["frame_log_likelihood"] = scorer
    drawn[name] = draw(np.random.default_rng(0))
    np.testing.assert_array_equal(drawn[name][:, :2], prompts)
  np.testing.assert_array_equal(drawn["still"], np.concatenate([prompts, np.repeat(prompts[:, 1:], 3, axis=1)], 1))
  for frame in range(2, 5):
    for grid in drawn["down right"]:
      furthest = frame_prediction.position_shifts(grid[frame - 1] != 0)[-1]
      np.testing.assert_array_equal(grid[frame], np.roll(grid[frame - 1], furthest, axis=(0, 1)))
    for grid in drawn["flat"]:  # a whole shift of the frame before, whatever the draw
      assert any(np.array_equal(grid[frame], np.roll(grid[frame - 1], move, axis=(0, 1)))
                 for move in frame_prediction.position_shifts(grid[frame - 1] != 0))
  assert len({drawn["flat"][i].tobytes() for i in range(3)}) > 1  # draws of one prompt differ under a flat belief


def test_position_shifts_keep_every_inked_pixel():
  ink = np.zeros((5, 6), bool)
  ink[1:3, 2] = True  # rows 1-2, column 2
  inside = [(dy, dx) for dy in range(-5, 6) for dx in range(-6, 7)  # brute force: both pixels stay in the frame
            if 0 <= 1 + dy and 2 + dy < 5 and 0 <= 2 + dx < 6]
  assert frame_prediction.position_shifts(ink) == inside and len(inside) == 4 * 6
  assert frame_prediction.position_shifts(np.zeros((3, 3), bool)) == [(0, 0)]


def test_frame_prediction_metrics_on_known_motion():
  """A 2x2 square moving one pixel right per frame: exact, shifted, empty and repeated predictions."""
  real = np.zeros((2, 5, 8, 8, 1), np.uint8)
  for t in range(5):
    real[:, t, 3:5, t:t + 2] = 200
  exact = generation.frame_prediction_metrics(real, real, given=2)
  assert exact["com_error_px"] == 0 and exact["mse"] == 0 and exact["empty_frames"] == 0
  # Repeating frame 1 misses frames 2, 3, 4 by 1, 2, 3 pixels.
  np.testing.assert_allclose(exact["com_error_px_repeat_last"], 2.0)
  np.testing.assert_allclose(exact["mse_black"], 4 * (200 / 255) ** 2 / 64)
  shifted = np.roll(real, 2, axis=2)  # two rows down
  np.testing.assert_allclose(generation.frame_prediction_metrics(real, shifted, given=2)["com_error_px"], 2.0)
  grey = np.minimum(real.astype(np.int32) + 16, 255).astype(np.uint8)  # background at the zero bin's centre
  assert generation.frame_prediction_metrics(real, grey, given=2)["com_error_px"] < 1e-9
  half_empty = real.copy()
  half_empty[0, 2:] = 0
  got = generation.frame_prediction_metrics(real, half_empty, given=2)
  assert got["empty_frames"] == 0.5 and got["com_error_px"] == 0.0
  np.testing.assert_allclose(got["mse"], got["mse_black"] / 2)
  with pytest.raises(ValueError, match="5 given frames"):
    generation.frame_prediction_metrics(real, real, given=5)


@pytest.mark.slow
def test_fvd_digits_checks_the_generator_against_the_classifier(classifier_workdir, data_dir, tmp_path):
  judge = video_classifier_digits.get_config("local,4x12").data
  for generator in (nbp_digits.get_config("XS,local,row"), ntp_digits.get_config("XS,local")):
    fvd_digits.check_generator(generator, judge, "the judge")  # the local pixel runs and their judge agree
  with pytest.raises(ValueError, match=r"8 grey levels.*data.levels=16"):
    fvd_digits.check_generator(ntp_digits.get_config("XS,local"), dict(judge.to_dict(), levels=16), "the judge")
  with pytest.raises(ValueError, match=r"data.speed: generator 2.0 vs the judge 3.0"):
    fvd_digits.check_generator(ntp_digits.get_config("XS,local"), dict(judge.to_dict(), speed=3.0), "the judge")
  # A run of 4 frames of 8x8 against the 5-frame classifier: the error names both shapes.
  small = tiny_generator_config(data_dir, **{"data.num_frames": 4, "model.grid": (4, 8, 8)})
  s = train.setup(small)
  evaluator = fvd_digits.Evaluator(classifier_workdir=classifier_workdir, num_videos=2, batch_size=2)
  with pytest.raises(ValueError, match=rf"\(4, 8, 8, 1\) but the classifier in {classifier_workdir} has "
                                       r"\(5, 8, 8, 1\)"):
    evaluator.run(_context(s, None))
  with pytest.raises(ValueError, match="classifier_workdir"):
    evaluators.build({"f": dict(type="fvd_digits")})
  with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*config.json"):
    fvd_digits.Evaluator(classifier_workdir=str(tmp_path))


# ---------------------------------------------------------------------------
# A token run: a tiny tokenizer, its tokens, NBP on them; samples decoded through the tokenizer.

@pytest.fixture(scope="module")
def token_run(data_dir, tmp_path_factory):
  """(setup, params) of frame-prediction NBP on the tokens of a tokenizer trained one step (not trained itself)."""
  root = tmp_path_factory.mktemp("token_run")
  train.train_and_evaluate(_without_samples(tiny_tokenizer_config(data_dir, checkpoint_every=1, **{"data.num_train": 32})),
                           str(root / "tokenizer"))
  video_tokenizer.encode_tokens(str(root / "tokenizer"), str(root / "tokens"), batch_size=16)
  c = nbp_digits.get_config("tiny,local,tokens,row,frames")
  c.data.token_dir = str(root / "tokens")
  c.model.codebook_size = 125
  c.model.grid = (2, 2, 2)
  c.model.block = (1, 1, 2)
  c.model.prefix_frames = 1
  with c.unlocked():
    c.sampler.cache_phases = 1
  return _untrained(c)


@pytest.mark.slow  # a tokenizer's training, its encoder and decoder, and the sampler: ~25 s on 2 cores
def test_fvd_digits_evaluator_on_a_token_run(classifier_workdir, token_run):
  s, _ = token_run
  evaluator = fvd_digits.Evaluator(classifier_workdir=classifier_workdir, num_videos=4, batch_size=4)
  metrics, stand_in, generated = evaluator.measure(_context(*token_run))
  assert np.isfinite(metrics[FVD_KEY]) and metrics[FVD_KEY] > 0
  assert generated.videos.shape == (4, 5, 8, 8, 1) and generated.tokens.shape == (4, 2, 2, 2)
  # The prompt is the stand-in's first latent frame, through the run's tokenizer.
  given = s.task.predict_fn("from_videos")(stand_in["video"])[:, :1]
  np.testing.assert_array_equal(generated.tokens[:, :1], given)
  np.testing.assert_array_equal(generated.videos, s.task.predict_fn("to_videos")(generated.tokens))
  # One latent frame given: the first video frame alone (the tokenizer codes it apart).
  assert generation.given_video_frames(s.config) == 1 and np.isfinite(metrics["com_error_px"])


# ---------------------------------------------------------------------------
# The I3D evaluator.

def test_fvd_evaluator_needs_a_local_weight_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=rf"i3d_path='{tmp_path}/i3d.npz' is not a file.*Nothing is downloaded"):
    evaluators.build({"fvd": dict(type="fvd", i3d_path=str(tmp_path / "i3d.npz"))})
  with pytest.raises(FileNotFoundError, match="i3d_path=''"):
    fvd.Evaluator()


@pytest.mark.slow  # the I3D's compilation at a second input shape: ~15 s on 2 cores
def test_fvd_evaluator_on_a_tiny_trained_run(generator_workdir, i3d_variables, tmp_path):
  path = str(tmp_path / "i3d.npz")
  i3d.save_i3d(path, i3d_variables)
  s, params, _, _ = train.load_params(workdir_lib.read_config(generator_workdir), generator_workdir)
  with pytest.raises(ValueError, match="16 frames.*got 5"):  # the standard FVD wants 16 frames
    fvd.Evaluator(i3d_path=path, num_videos=4, batch_size=4).run(_context(s, params))
  evaluator = fvd.Evaluator(i3d_path=path, num_videos=4, batch_size=4, i3d_batch_size=4, num_frames=0,
                            resolution=32)
  metrics = evaluator.run(_context(s, params))
  assert {"fvd", "fvd_floor", "frames_per_s"} <= set(metrics)
  assert metrics["fvd"] > 0 and metrics["fvd_floor"] > 0


# ---------------------------------------------------------------------------
# experiments/benchmark_fvd.py.

def test_benchmark_parses_runs_and_loads_configs():
  spec = "experiments/configs/nbp_digits.py:XS,local,token=runs/fvd/nbp_token"
  assert benchmark_fvd.parse_run(spec) == ("experiments/configs/nbp_digits.py", "XS,local,token",
                                           "runs/fvd/nbp_token")
  assert benchmark_fvd.parse_run("a.py=w") == ("a.py", "", "w")
  assert benchmark_fvd.parse_run("runs/fvd/ntp") == ("", "", "runs/fvd/ntp")
  with pytest.raises(ValueError, match="CONFIG_FILE:ARG=WORKDIR"):
    benchmark_fvd.parse_run("experiments/configs/nbp_digits.py:XS,local=")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = benchmark_fvd.load_config(os.path.join(repo, "experiments/configs/nbp_digits.py"), "XS,local,token")
  assert config.family == "next_block" and tuple(config.model.block) == (1, 1, 1)
  assert benchmark_fvd.describe(config) == ("1x1x1", "class")


def test_benchmark_table_gives_each_run_its_seeds_mean_and_sd():
  rows = [{"run": "real 4..7", "block": "-", "condition": "-", "seed": 0, FVD_KEY: 9.0, "class_match": 0.5,
           "frames_per_s": None, "floor": True},
          {"run": "a", "spec": "runs/a", "block": "1x1x8", "condition": "class", "seed": 0, FVD_KEY: 100.0,
           "class_match": 0.25, "frames_per_s": 40.0},
          {"run": "real 8..11", "block": "-", "condition": "-", "seed": 1, FVD_KEY: 11.0, "class_match": 0.5,
           "frames_per_s": None, "floor": True},
          {"run": "a", "spec": "runs/a", "block": "1x1x8", "condition": "class", "seed": 1, FVD_KEY: 110.0,
           "class_match": 0.75, "frames_per_s": 60.0}]
  lines = benchmark_fvd.table(rows).splitlines()
  assert lines[2] == "| real videos (floor) | - | - | 9.0 / 11.0 | 10.0 (1.4) | - | 0.500 |"
  assert lines[3] == "| runs/a | 1x1x8 | class | 100.0 / 110.0 | 105.0 (7.1) | 40-60 | 0.500 |"
  assert len(lines) == 4  # no frame-prediction run, no second table
  frames = dict(com_error_px=1.0, com_error_px_repeat_last=2.0, empty_frames=0.0, mse=0.01, mse_repeat_last=0.02,
                mse_black=0.03)
  rows += [{"run": "f", "spec": "runs/f", "block": "1x1x8", "condition": "frames", "seed": seed, FVD_KEY: 50.0,
            "class_match": None, "frames_per_s": 10.0, **frames, "com_error_px": 1.0 + seed} for seed in (0, 1)]
  lines = benchmark_fvd.table(rows).splitlines()
  assert lines[-1] == "| runs/f | 1.50 (0.71) | 2.00 (0.00) | 0.0100 (0.0000) | 0.0200 (0.0000) | 0.0300 (0.0000) | 0.000 (0.000) |"


@pytest.mark.slow
def test_benchmark_runs_the_evaluator_over_runs_and_seeds(classifier_workdir, generator_workdir, tmp_path):
  rows = benchmark_fvd.benchmark([generator_workdir], classifier_workdir, num_videos=4, batch_size=4, seeds=[0, 3],
                                 out_dir=str(tmp_path))
  floors, runs = [r for r in rows if r.get("floor")], [r for r in rows if not r.get("floor")]
  assert [r["seed"] for r in floors] == [0, 3] and [r["seed"] for r in runs] == [0, 3]
  assert floors[1]["run"] == "real validation videos 16..19" and runs[0]["split"] == "validation"
  judge = fvd_digits.load_judge(classifier_workdir, 4)  # the evaluator's own judge (batch 4)
  real = lambda start, split="validation": generation.real_videos(judge.config.data, start, 4, split)["video"]
  floor = fvd_digits.digits_fvd(real(0), real(16), judge)[FVD_KEY]
  assert floors[1][FVD_KEY] == pytest.approx(floor, rel=1e-6)
  on_test = benchmark_fvd.benchmark([generator_workdir], classifier_workdir, num_videos=4, batch_size=4, seeds=[3],
                                    split="test")
  assert on_test[0]["run"] == "real test videos 16..19" and on_test[1]["split"] == "test"
  assert on_test[0][FVD_KEY] == pytest.approx(fvd_digits.digits_fvd(real(0, "test"), real(16, "test"), judge)[FVD_KEY],
                                              rel=1e-6)
  assert on_test[0][FVD_KEY] != pytest.approx(floor, rel=1e-6)
  assert runs[1][FVD_KEY] > floor and runs[0][FVD_KEY] != runs[1][FVD_KEY]
  assert runs[0]["compile_seconds"] == runs[1]["compile_seconds"]  # one compilation for both seeds
  assert runs[0]["block"] == "1x1x8" and runs[0]["condition"] == "class" and runs[0]["step"] == 2
  assert os.path.getsize(tmp_path / f"samples_{os.path.basename(generator_workdir)}.png") > 0
  json.dumps(rows)  # plain numbers: results.json takes them
  assert f"| {generator_workdir} | 1x1x8 | class |" in benchmark_fvd.table(rows)


@pytest.mark.slow
def test_benchmark_evaluates_kept_steps_with_a_sampler_override(classifier_workdir, generator_workdir, tmp_path):
  rows = benchmark_fvd.benchmark([generator_workdir], classifier_workdir, num_videos=4, batch_size=4, seeds=[0],
                                 steps=[1, 2], sampler=["top_p=0.5"])
  runs = [r for r in rows if not r.get("floor")]
  assert [(r["step"], r["seed"]) for r in runs] == [(1, 0), (2, 0)]
  assert runs[0][FVD_KEY] != runs[1][FVD_KEY]  # two checkpoints, two sets of videos
  plain = benchmark_fvd.benchmark([generator_workdir], classifier_workdir, num_videos=4, batch_size=4, seeds=[0],
                                  steps=[2])
  assert plain[1][FVD_KEY] != runs[1][FVD_KEY]  # top-p 0.5 draws other videos than the config's 1.0
  lines = benchmark_fvd.table(rows).splitlines()
  assert any(line.startswith(f"| {generator_workdir} @ 1 |") for line in lines)
  assert any(line.startswith(f"| {generator_workdir} @ 2 |") for line in lines)
  benchmark_fvd.save_curves(str(tmp_path / "curves.png"), rows)
  assert os.path.getsize(tmp_path / "curves.png") > 0
  with pytest.raises(FileNotFoundError, match="keep_checkpoint_steps"):
    benchmark_fvd.benchmark([generator_workdir], classifier_workdir, num_videos=4, batch_size=4, seeds=[0], steps=[3])
  config = benchmark_fvd.override_sampler(workdir_lib.read_config(generator_workdir), ["top_q=0.5", "candidates=2"])
  assert config.sampler.candidates == 2  # an option the run's config lacks, read as a literal
  with pytest.raises(ValueError, match="top_q.*top_p"):
    next_block.make_task(config)
  with pytest.raises(ValueError, match="KEY=VALUE"):
    benchmark_fvd.override_sampler(workdir_lib.read_config(generator_workdir), ["top_p"])
