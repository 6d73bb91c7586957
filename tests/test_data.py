"""Tests of nbp.data: generated datasets, grain pipelines, video/image loaders.

Everything runs on CPU, offline, in tmp_path. The UCF-101 and ImageNet readers
are exercised on tiny datasets written here by test-only tfds builders named
`ucf101` / `imagenet2012` (config, version, split and feature names as the
real ones), fed JPEG bytes so no TensorFlow is needed: the files on disk have
the layout of the real prepared datasets, and the readers open them by the same
path and code as on a pod.
"""

import io
import json
import os

import av
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from pydoc_data.topics import topics as pydoc_topics

from nbp.data import clips
from nbp.data import frames
from nbp.data import images
from nbp.data import moving_digits as md
from nbp.data import pipeline
from nbp.data import splits
from nbp.data import tfds_sources
from nbp.data import tokens as tokens_lib
from nbp.data import video_sources
from nbp.data.generated import GeneratedBuilder
from nbp.data.video_folder import VideoFolderSource

TINY = md.moving_digits_config(num_frames=6, frame_size=16, num_digits=2,
                               num_train=24, num_validation=6, num_test=8)
NUM_SCANS = 1797  # sklearn's digits
NUM_TRAIN_POOL = int(md.TRAIN_FRACTION * NUM_SCANS)  # 1437 scans: train + validation


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  """A data_dir with the tiny moving digits config and the digits dataset."""
  d = str(tmp_path_factory.mktemp("tfds"))
  md.build(md.MovingDigits(config=TINY, data_dir=d), d)
  md.build("digits", d)
  return d


def _all(source):
  return {k: np.stack([source[i][k] for i in range(len(source))]) for k in source[0]}


# ------------------------------------------------------------- moving digits


def test_motion_floors_against_brute_force_over_the_same_paths():
  """The ideal predictors' errors against a loop over groups of paths with equal given positions."""
  kw = dict(num_frames=4, frame_size=12, speed=2.0, given=2, num_paths=4000, seed=3)
  got = md.motion_floors(**kw)
  # The same paths, step by step with the generator's own `_bounce`.
  rng = np.random.default_rng(3)
  pos, angle = rng.uniform(0, 4.0, size=(4000, 2)), rng.uniform(0, 2 * np.pi, size=4000)
  paths = np.zeros((4000, 4, 2))
  for i in range(4000):
    (y, x), vy, vx = pos[i], 2.0 * np.sin(angle[i]), 2.0 * np.cos(angle[i])
    for f in range(4):
      paths[i, f] = round(y), round(x)
      y, vy = md._bounce(y, vy, 4.0)
      x, vx = md._bounce(x, vx, 4.0)
  groups = {}
  for i in range(4000):
    groups.setdefault(paths[i, :2].tobytes(), []).append(i)
  points = np.stack(np.meshgrid(np.arange(5), np.arange(5), indexing="ij"), -1).reshape(-1, 2)
  pairs, pair_weight, best, to_mean = 0.0, 0, 0.0, 0.0
  for members in groups.values():
    future = paths[members, 2:]  # [m, 2, 2]
    to_mean += np.linalg.norm(future - future.mean(0), axis=-1).sum()
    for f in range(2):
      best += min(np.linalg.norm(future[:, f] - p, axis=-1).sum() for p in points)
    if len(members) > 1:  # every ordered pair of two paths, weighted like one partner per path
      apart = np.linalg.norm(future[:, None] - future[None], axis=-1).mean(-1)  # [m, m]
      pairs += apart.sum() / (len(members) - 1)
      pair_weight += len(members)
  np.testing.assert_allclose(got["best_point"], best / (4000 * 2), rtol=1e-9)
  np.testing.assert_allclose(got["exact_mean"], to_mean / (4000 * 2), rtol=1e-9)
  np.testing.assert_allclose(got["exact_sampler"], pairs / pair_weight, atol=0.05)  # one random partner per path
  np.testing.assert_allclose(got["repeat_last"], np.linalg.norm(paths[:, 2:] - paths[:, 1:2], axis=-1).mean())
  assert got["best_point"] < got["exact_mean"] < got["exact_sampler"] < got["repeat_last"]
  still = md.motion_floors(num_frames=4, frame_size=12, speed=0.0, given=1, num_paths=100)
  assert still == {"exact_sampler": 0.0, "best_point": 0.0, "exact_mean": 0.0, "repeat_last": 0.0}
  with pytest.raises(ValueError, match="given=4"):
    md.motion_floors(num_frames=4, frame_size=12, speed=2.0, given=4)


def test_make_moving_digits_shapes_range_and_motion():
  d = md.make_moving_digits(5, seed=0, split="train", num_frames=10, frame_size=32)
  assert d["video"].shape == (5, 10, 32, 32, 1) and d["video"].dtype == np.uint8
  assert d["label"].shape == (5, 2) and d["label"].dtype == np.int32
  assert ((d["label"] >= 0) & (d["label"] <= 9)).all()
  assert d["video"].max() > 100  # digits are drawn
  for v in d["video"]:  # digits move: consecutive frames differ
    assert all(not np.array_equal(v[f], v[f + 1]) for f in range(9))


def test_single_digit_stays_inside_frame():
  d = md.make_moving_digits(4, seed=1, split="train", num_frames=20, frame_size=16,
                            num_digits=1, speed=3.0)
  images, _ = md._digits()  # pylint: disable=protected-access
  for video, idx in zip(d["video"], d["digit_index"][:, 0]):
    sums = video.reshape(20, -1).sum(-1)
    assert (sums == int(images[idx].sum())).all()  # the whole sprite is always shown


def test_moving_digits_random_access_and_large_frames():
  a = md.make_moving_digits(4, seed=3, split="test", num_frames=4)
  b = md.moving_digits_example(3, seed=3, split="test", num_frames=4)
  np.testing.assert_array_equal(a["video"][3], b["video"])
  big = md.make_moving_digits(1, seed=0, split="train", num_frames=3, frame_size=64)
  assert big["video"].shape == (1, 3, 64, 64, 1)
  assert md.default_digit_scale(64) == 2


def test_digit_pools_disjoint_cover_and_carve_validation_from_train():
  pools = {s: md.digit_pool(s) for s in splits.SPLITS}
  held_out = round(NUM_TRAIN_POOL * splits.VALIDATION_FRACTION)  # 144
  assert [len(pools[s]) for s in splits.SPLITS] == [NUM_TRAIN_POOL - held_out, held_out, NUM_SCANS - NUM_TRAIN_POOL]
  assert not set(pools["train"]) & set(pools["validation"])
  assert not (set(pools["train"]) | set(pools["validation"])) & set(pools["test"])
  assert len(set().union(*map(set, pools.values()))) == NUM_SCANS
  # Another carve: another validation pool from the same train pool; the test pool never changes.
  other = {s: md.digit_pool(s, validation_fraction=0.25, validation_seed=3) for s in splits.SPLITS}
  assert len(other["validation"]) == round(NUM_TRAIN_POOL * 0.25)
  np.testing.assert_array_equal(other["test"], pools["test"])
  np.testing.assert_array_equal(np.sort(np.concatenate([other["train"], other["validation"]])),
                                np.sort(np.concatenate([pools["train"], pools["validation"]])))
  reseeded = md.digit_pool("validation", validation_seed=1)
  assert len(reseeded) == held_out and set(reseeded) != set(pools["validation"])
  np.testing.assert_array_equal(md.digit_pool("validation", validation_seed=1), reseeded)  # deterministic
  with pytest.raises(ValueError, match="'valid'.*moving digits"):
    md.digit_pool("valid")
  with pytest.raises(ValueError, match=r"config\.data\.validation_fraction=0"):
    md.digit_pool("validation", validation_fraction=0.0)


def test_validation_videos_show_only_validation_scans():
  kw = dict(seed=0, num_frames=2, frame_size=16, num_digits=2)
  validation = md.make_moving_digits(40, split="validation", **kw)
  assert set(validation["digit_index"].ravel()) <= set(md.digit_pool("validation"))
  train = md.make_moving_digits(40, split="train", **kw)
  assert not set(train["digit_index"].ravel()) & set(md.digit_pool("validation"))
  reseeded = md.make_moving_digits(40, split="validation", validation_seed=5, **kw)
  assert set(reseeded["digit_index"].ravel()) <= set(md.digit_pool("validation", validation_seed=5))
  assert not np.array_equal(reseeded["digit_index"], validation["digit_index"])
  later = md.make_moving_digits(3, split="validation", start=37, **kw)
  np.testing.assert_array_equal(later["video"], validation["video"][37:])


def test_config_names():
  assert md.moving_digits_config().name == "f16_s32_d2"
  assert md.moving_digits_config(speed=3, num_train=64, num_test=16, seed=1).name == (
      "f16_s32_d2_v3_n64-1000-16_seed1")
  assert md.moving_digits_config(num_validation=8, validation_fraction=0.2, validation_seed=4).name == (
      "f16_s32_d2_n10000-8-1000_valfrac0.2_valseed4")
  names = [c.name for c in md.MovingDigits.BUILDER_CONFIGS]
  assert names == ["f16_s32_d2", "f8_s16_d1"]
  with pytest.raises(ValueError, match="unknown knobs"):
    md.moving_digits_config(fps=3)
  with pytest.raises(ValueError, match=r"config\.data\.num_validation=0"):
    md.moving_digits_config(num_validation=0)
  with pytest.raises(ValueError, match=r"config\.data\.validation_fraction=0"):
    md.moving_digits_config(validation_fraction=0.0)


def test_builder_deterministic_disjoint_and_typed(tiny_dir, tmp_path):
  other = str(tmp_path / "again")
  md.build(md.MovingDigits(config=TINY, data_dir=other), other)
  for split, n in (("train", 24), ("validation", 6), ("test", 8)):
    a = _all(pipeline.load_source(md.MovingDigits(config=TINY, data_dir=tiny_dir), split))
    b = _all(pipeline.load_source(md.MovingDigits(config=TINY, data_dir=other), split))
    assert a["video"].shape == (n, 6, 16, 16, 1) and a["video"].dtype == np.uint8
    assert a["label"].shape == (n, 2) and a["label"].dtype == np.int32
    assert ((a["label"] >= 0) & (a["label"] <= 9)).all()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  data = {s: _all(pipeline.load_source(md.MovingDigits(config=TINY, data_dir=tiny_dir), s)) for s in splits.SPLITS}
  for split in splits.SPLITS:  # each split shows only its own pool's scans
    assert set(data[split]["digit_index"].ravel()) <= set(md.digit_pool(split))
  for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
    assert not set(data[a]["digit_index"].ravel()) & set(data[b]["digit_index"].ravel())
    videos = {v.tobytes() for v in data[a]["video"]}
    assert not any(v.tobytes() in videos for v in data[b]["video"])
  # Rebuilding an already prepared dataset is a no-op that returns the builder.
  assert md.build(md.MovingDigits(config=TINY, data_dir=tiny_dir), tiny_dir).info.splits[
      "train"].num_examples == 24


def test_a_dataset_another_process_prepared_meanwhile_is_read_not_redone(tmp_path):
  """A builder made before the dataset existed (as in a worker that waited on the lock) reads what was written."""
  d = str(tmp_path)
  early = md.MovingDigits(config=TINY, data_dir=d)
  assert not early.info.splits
  md.build(md.MovingDigits(config=TINY, data_dir=d), d)  # the other process
  info_file = os.path.join(os.fspath(early.data_dir), "dataset_info.json")
  written = os.path.getmtime(info_file)
  builder = md.build(early, d)
  assert builder.info.splits["train"].num_examples == 24 and os.path.getmtime(info_file) == written
  assert len(pipeline.load_source(builder, "test")) == 8
  assert os.path.exists(os.fspath(early.data_dir) + ".lock")


def test_digits_builder(tiny_dir):
  data = {s: _all(pipeline.load_source("digits", s, tiny_dir)) for s in splits.SPLITS}
  held_out = round(NUM_TRAIN_POOL * splits.VALIDATION_FRACTION)
  assert data["train"]["image"].shape == (NUM_TRAIN_POOL - held_out, 8, 8, 1)
  assert data["validation"]["image"].shape == (held_out, 8, 8, 1) and data["train"]["image"].dtype == np.uint8
  assert set(np.unique(data["train"]["label"])) == set(range(10))
  for split in splits.SPLITS:  # the scan pools of moving digits
    np.testing.assert_array_equal(np.sort(data[split]["digit_index"]), md.digit_pool(split))


def test_registered_tiny_config_builds(tmp_path):
  b = md.build("moving_digits/f8_s16_d1", str(tmp_path))
  src = pipeline.load_source("moving_digits/f8_s16_d1", "test", str(tmp_path))
  assert len(src) == 128 and src[0]["video"].shape == (8, 16, 16, 1)
  assert len(pipeline.load_source("moving_digits/f8_s16_d1", "validation", str(tmp_path))) == 128
  assert b.builder_config.num_digits == 1


def _moving_digits_data(data_dir, **overrides):
  """A moving_digits config.data section of 2 frames of 16x16 and a few videos per split."""
  return ml_collections.ConfigDict({
      "name": "moving_digits", "dir": data_dir, "worker_count": 0, "num_frames": 2, "frame_size": 16,
      "num_digits": 2, "speed": 2.0, "num_train": 12, "num_validation": 5, "num_test": 4, "levels": 0,
      "validation_fraction": 0.1, "validation_seed": 0, **overrides})


def test_video_source_moving_digits_splits_follow_the_config(tmp_path):
  data = _moving_digits_data(str(tmp_path))
  sources = {s: video_sources.video_source(data, s) for s in splits.SPLITS}
  assert [len(sources[s]) for s in splits.SPLITS] == [12, 5, 4]
  for split, source in sources.items():  # the same videos as generated directly (tfds stores them shuffled)
    expected = md.videos_from_config(data, split, 0, len(source))["video"]
    assert sorted(v.tobytes() for v in _all(source)["video"]) == sorted(v.tobytes() for v in expected)
  reseeded = _moving_digits_data(str(tmp_path), validation_seed=7, validation_fraction=0.3)
  validation = _all(video_sources.video_source(reseeded, "validation"))
  assert set(validation["digit_index"].ravel()) <= set(md.digit_pool("validation", 0.3, 7))
  assert not np.array_equal(validation["video"], _all(sources["validation"])["video"])
  np.testing.assert_array_equal(  # the test split does not depend on the carve
      _all(video_sources.video_source(reseeded, "test"))["video"], _all(sources["test"])["video"])
  with pytest.raises(ValueError, match=r"'val'.*config\.data\.name='moving_digits'"):
    video_sources.video_source(data, "val")
  del data["num_validation"]  # a config that predates the key: as many as test
  assert md.num_videos(data, "validation") == 4


def test_clips_of_moving_digits_differ_by_the_mirror_only(tmp_path):
  """Generated videos are exactly num_frames long: one start, so two clips per video at most, the second mirrored."""
  data = _moving_digits_data(str(tmp_path))
  videos = _all(video_sources.video_source(data, "train"))["video"]
  mirrored = video_sources.clip_source(data, "train", clips.ClipPolicy(2, "random", flip=True, seed=1))
  assert len(mirrored) == 24
  records = _all(mirrored)
  assert records["video_index"].tolist() == np.repeat(np.arange(12), 2).tolist()
  assert not records["clip_start"].any() and records["flip"].reshape(12, 2).sum(1).tolist() == [1] * 12
  for r in range(24):
    video = videos[r // 2][:, :, ::-1] if records["flip"][r] else videos[r // 2]
    np.testing.assert_array_equal(records["video"][r], video)
  assert records["label"].shape == (24, 2)
  with pytest.raises(ValueError, match=r"--clips_per_video=2: .*moving_digits.*--clip_flip"):
    video_sources.clip_source(data, "train", clips.ClipPolicy(2, "random"))
  with pytest.raises(ValueError, match=r"--clips_per_video=3: .*moving_digits.*--clips_per_video=2 or fewer"):
    video_sources.clip_source(data, "train", clips.ClipPolicy(3, "random", flip=True))


# ------------------------------------------------------------------ pipeline


def _index_source(n):
  return [{"x": np.int32(i), "video": np.full((2, 4, 4, 1), i, np.uint8)} for i in range(n)]


def test_batches_shape_and_transforms(tiny_dir):
  src = pipeline.load_source(md.MovingDigits(config=TINY, data_dir=tiny_dir), "train")
  it = pipeline.make_iterator(
      src, global_batch_size=4, seed=0, process_index=0, process_count=1,
      transforms=[pipeline.QuantizeVideoToTokens(levels=16)])
  batch = next(it)
  assert batch["tokens"].shape == (4, 6 * 16 * 16) and batch["tokens"].dtype == np.int32
  assert batch["tokens"].min() >= 0 and batch["tokens"].max() <= 15
  assert "video" not in batch and batch["label"].shape == (4, 2)
  it = pipeline.make_iterator(src, global_batch_size=4, seed=0, process_index=0,
                              process_count=1, transforms=[pipeline.NormalizeVideo()])
  video = next(it)["video"]
  assert video.dtype == np.float32 and video.shape == (4, 6, 16, 16, 1)
  assert -1 <= video.min() and video.max() <= 1


def test_sharding_disjoint_and_covering():
  src = _index_source(22)  # 22 % 4 = 2 examples dropped so shards are equal
  seen = []
  for p in range(4):
    it = pipeline.make_iterator(src, global_batch_size=8, seed=1, process_index=p,
                                process_count=4, num_epochs=1, drop_remainder=False)
    xs = np.concatenate([b["x"] for b in it])
    assert len(xs) == 5
    seen.append(set(xs.tolist()))
  union = set().union(*seen)
  assert sum(map(len, seen)) == len(union) == 20


def test_epochs_reshuffle_and_cover():
  it = pipeline.make_iterator(_index_source(8), global_batch_size=8, seed=0,
                              process_index=0, process_count=1, num_epochs=2)
  e1, e2 = next(it)["x"], next(it)["x"]
  assert sorted(e1) == sorted(e2) == list(range(8))
  assert not np.array_equal(e1, e2)
  with pytest.raises(StopIteration):
    next(it)


def test_batch_not_divisible_names_numbers():
  with pytest.raises(ValueError, match=r"10.*3"):
    pipeline.make_iterator(_index_source(9), global_batch_size=10, seed=0,
                           process_index=0, process_count=3)


def test_iterator_state_round_trip():
  kw = dict(global_batch_size=3, seed=5, process_index=0, process_count=1)
  it = pipeline.make_iterator(_index_source(10), **kw)
  for _ in range(4):  # past the first epoch
    next(it)
  state = it.get_state()
  expected = [next(it)["x"] for _ in range(3)]
  fresh = pipeline.make_iterator(_index_source(10), **kw)
  fresh.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(fresh)["x"], e)


def test_worker_processes_give_same_batches_and_state():
  kw = dict(global_batch_size=4, seed=0, process_index=0, process_count=1)
  plain = pipeline.make_iterator(_index_source(20), **kw)
  expected = [next(plain)["x"] for _ in range(4)]
  it = pipeline.make_iterator(_index_source(20), worker_count=2, **kw)
  for e in expected[:2]:
    np.testing.assert_array_equal(np.asarray(next(it)["x"]), e)
  state = it.get_state()
  it.close()
  fresh = pipeline.make_iterator(_index_source(20), worker_count=2, **kw)
  fresh.set_state(state)
  np.testing.assert_array_equal(np.asarray(next(fresh)["x"]), expected[2])
  fresh.close()


def test_iterator_saved_with_orbax(tmp_path):
  kw = dict(global_batch_size=2, seed=7, process_index=0, process_count=1)
  it = pipeline.make_iterator(_index_source(9), **kw)
  for _ in range(3):
    next(it)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(3, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"w": np.arange(3.0)}),
      data=pipeline.iterator_checkpoint_args(it, save=True)))
  mngr.wait_until_finished()
  expected = next(it)["x"]
  fresh = pipeline.make_iterator(_index_source(9), **kw)
  restored = ocp.CheckpointManager(tmp_path / "ckpt").restore(3, args=ocp.args.Composite(
      state=ocp.args.StandardRestore({"w": np.zeros(3)}),
      data=pipeline.iterator_checkpoint_args(fresh, save=False)))
  np.testing.assert_array_equal(restored["state"]["w"], np.arange(3.0))
  np.testing.assert_array_equal(next(fresh)["x"], expected)


def test_quantize_dequantize_round_trip():
  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, (2, 3, 4, 4, 1)).astype(np.uint8)
  for levels in (2, 16, 256):
    tokens = pipeline.quantize_video(video, levels).reshape(2, -1)
    assert tokens.min() >= 0 and tokens.max() < levels
    frames = pipeline.dequantize_tokens(tokens, levels, (3, 4, 4, 1))
    assert frames.shape == video.shape and frames.dtype == np.uint8
    np.testing.assert_array_equal(pipeline.quantize_video(frames, levels).reshape(2, -1), tokens)
    assert np.abs(frames.astype(int) - video).max() <= 256 // levels // 2 + 1
  np.testing.assert_array_equal(pipeline.dequantize_tokens(
      pipeline.quantize_video(video, 256).reshape(2, -1), 256, (3, 4, 4, 1)), video)


# ---------------------------------------------------------------------- text


def test_text_source_deterministic_and_disjoint():
  train = pipeline.text_bytes_source("train", 64)
  test = pipeline.text_bytes_source("test", 64)
  again = pipeline.text_bytes_source("train", 64)
  assert not set(train.topics) & set(test.topics)
  assert len(train.topics) + len(test.topics) >= 50 and len(test) > 100
  x = train[17]["tokens"]
  assert x.shape == (65,) and x.dtype == np.int32 and 0 <= x.min() and x.max() < 256
  np.testing.assert_array_equal(again[17]["tokens"], x)
  np.testing.assert_array_equal(train[17]["tokens"][-1], train[18]["tokens"][0])
  train_windows = {train[i]["tokens"].tobytes() for i in range(len(train))}
  assert not any(test[i]["tokens"].tobytes() in train_windows for i in range(len(test)))
  batch = next(pipeline.make_iterator(train, global_batch_size=8, seed=0,
                                      process_index=0, process_count=1))
  assert batch["tokens"].shape == (8, 65)


def test_text_splits_are_whole_documents_carved_by_the_config():
  topics = {s: pipeline.text_topics(s) for s in splits.SPLITS}
  num_pool = len(topics["train"]) + len(topics["validation"])
  assert len(topics["validation"]) == round(num_pool * splits.VALIDATION_FRACTION) >= 1
  assert len(set().union(*map(set, topics.values()))) == sum(map(len, topics.values()))  # disjoint
  assert pipeline.text_bytes_source("test", 64).topics == topics["test"]  # the carve leaves test as it was
  validation = pipeline.text_bytes_source("validation", 64)
  assert validation.topics == topics["validation"] and len(validation) > 10
  text = "\n\n".join(pydoc_topics[n] for n in topics["validation"]).encode("utf-8")
  assert validation.data.tobytes() == text  # its own documents only
  assert pipeline.text_topics("validation") == topics["validation"]  # deterministic
  other = pipeline.text_topics("validation", validation_fraction=0.2, validation_seed=1)
  assert len(other) == round(num_pool * 0.2) and set(other) != set(topics["validation"])
  assert set(other) | set(pipeline.text_topics("train", 0.2, 1)) == set(topics["train"]) | set(topics["validation"])
  with pytest.raises(ValueError, match="'dev'.*text dataset"):
    pipeline.text_bytes_source("dev", 64)
  with pytest.raises(ValueError, match=r"config\.data\.validation_fraction=0"):
    pipeline.text_bytes_source("validation", 64, validation_fraction=0.0)


def test_carved_source_is_a_fixed_disjoint_subset():
  source = _index_source(20)
  data = ml_collections.ConfigDict({"validation_fraction": 0.25, "validation_seed": 3})
  parts = {s: pipeline.carved_source(source, s, data, "toy") for s in ("train", "validation")}
  xs = {s: [int(p[i]["x"]) for i in range(len(p))] for s, p in parts.items()}
  assert len(xs["validation"]) == 5 and sorted(xs["train"] + xs["validation"]) == list(range(20))
  assert xs["validation"] == sorted(splits.carve(20, 0.25, 3)["validation"].tolist())
  data.validation_seed = 4
  assert [int(e["x"]) for e in _all_list(pipeline.carved_source(source, "validation", data, "toy"))] != xs["validation"]
  with pytest.raises(ValueError, match="'test'.*toy"):  # test is never carved from train
    pipeline.carved_source(source, "test", data, "toy")
  with pytest.raises(IndexError, match="validation part of the train split of toy"):
    parts["validation"][5]  # pylint: disable=pointless-statement
  data.validation_fraction = 0.0
  with pytest.raises(ValueError, match=r"config\.data\.validation_fraction=0: toy"):
    pipeline.carved_source(source, "validation", data, "toy")


def _all_list(source):
  return [source[i] for i in range(len(source))]


# -------------------------------------------------------------- video folder


def _write_mp4(path, num_frames, height=24, width=32, seed=0):
  rng = np.random.default_rng(seed)
  with av.open(str(path), mode="w") as container:
    stream = container.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for f in range(num_frames):
      img = np.zeros((height, width, 3), np.uint8)
      img[:, : (f * 3) % width] = rng.integers(0, 255, 3)  # a changing picture
      for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("kinetics")
  for cls, names in (("archery", ["a.mp4", "b.mp4"]), ("bowling", ["c.mp4"])):
    (root / cls).mkdir()
    for k, name in enumerate(names):
      _write_mp4(root / cls / name, 10, seed=k)
  (root / "archery" / "notes.txt").write_text("not a video")
  return root


def test_video_folder_shapes_and_labels(video_root):
  src = VideoFolderSource(video_root, num_frames=4, frame_size=16, frame_stride=2)
  assert src.classes == ["archery", "bowling"] and len(src) == 3
  labels = [int(src[i]["label"]) for i in range(3)]
  assert labels == [0, 0, 1]
  ex = src[0]
  assert ex["video"].shape == (4, 16, 16, 3) and ex["video"].dtype == np.uint8
  long = VideoFolderSource(video_root, num_frames=8, frame_size=12, frame_stride=2,
                           center_clip=True)  # 15 frames needed: last one repeats
  v = long[2]["video"]
  assert v.shape == (8, 12, 12, 3)
  np.testing.assert_array_equal(v[-1], v[-2])
  batch = next(pipeline.make_iterator(src, global_batch_size=2, seed=0,
                                      process_index=0, process_count=1))
  assert batch["video"].shape == (2, 4, 16, 16, 3)


def test_video_folder_errors(tmp_path, video_root):
  with pytest.raises(ValueError, match="empty_root"):
    VideoFolderSource(tmp_path / "empty_root", num_frames=2, frame_size=8)
  (tmp_path / "empty_root" / "cls").mkdir(parents=True)
  with pytest.raises(ValueError, match="empty_root"):
    VideoFolderSource(tmp_path / "empty_root", num_frames=2, frame_size=8)
  bad_root = tmp_path / "bad"
  (bad_root / "cls").mkdir(parents=True)
  _write_mp4(bad_root / "cls" / "good.mp4", 3)
  bad = bad_root / "cls" / "zz_corrupt.mp4"
  bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4000).astype(np.uint8).tobytes())
  src = VideoFolderSource(bad_root, num_frames=2, frame_size=8)
  assert src[0]["video"].shape == (2, 8, 8, 3)
  with pytest.raises(ValueError, match=r"zz_corrupt\.mp4.*example 1"):
    src[1]


def _folder_data(root, split_folders):
  return ml_collections.ConfigDict({
      "name": "video_folder", "dir": str(root), "worker_count": 0, "num_frames": 2, "frame_size": 8,
      "frame_stride": 1, "split_folders": split_folders, "validation_fraction": 0.25, "validation_seed": 0})


@pytest.fixture(scope="module")
def split_root(tmp_path_factory):
  """root/train/<class>/ (4 videos), root/dev/<class>/ (1) and root/val/<class>/ (2)."""
  root = tmp_path_factory.mktemp("splits")
  layout = {"train": {"a": 2, "b": 2}, "dev": {"a": 1}, "val": {"a": 1, "b": 1}}
  for folder, classes in layout.items():
    for cls, n in classes.items():
      (root / folder / cls).mkdir(parents=True)
      for j in range(n):
        _write_mp4(root / folder / cls / f"{folder}{j}.mp4", 3, height=8, width=8, seed=j)
  return root


def test_video_folder_validation_folder_or_carve(split_root):
  listed = _folder_data(split_root, (("train", "train"), ("validation", "dev"), ("test", "val")))
  lengths = [len(video_sources.video_source(listed, s)) for s in splits.SPLITS]
  assert lengths == [4, 1, 2]
  validation = video_sources.video_source(listed, "validation").source  # LabelVector -> VideoFolderSource
  assert [os.path.basename(os.path.dirname(os.path.dirname(p))) for p, _ in validation.files] == ["dev"]
  carved = _folder_data(split_root, (("train", "train"), ("test", "val")))
  parts = {s: video_sources.video_source(carved, s) for s in splits.SPLITS}
  assert [len(parts[s]) for s in splits.SPLITS] == [3, 1, 2]  # 25% of the 4 train videos
  subsets = {s: parts[s].source for s in ("train", "validation")}  # LabelVector -> SubsetSource of train/
  train_files = [p for p, _ in subsets["train"].source.files]
  chosen = {s: {train_files[i] for i in subset.indices} for s, subset in subsets.items()}
  assert not chosen["train"] & chosen["validation"] and len(chosen["train"] | chosen["validation"]) == 4
  assert parts["validation"][0]["video"].shape == (2, 8, 8, 3) and parts["validation"][0]["label"].shape == (1,)
  with pytest.raises(ValueError, match=r"'dev'.*split_folders"):
    video_sources.video_source(_folder_data(split_root, (("dev", "dev"),)), "train")
  with pytest.raises(ValueError, match=r"'eval'.*config\.data\.name='video_folder'"):
    video_sources.video_source(carved, "eval")


def test_clip_policy_draws_are_valid_distinct_balanced_and_seeded():
  policy = clips.ClipPolicy(per_video=4, offsets="random", flip=True, seed=3)
  draws = policy.draw(7, num_starts=20)
  starts = [s for s, _ in draws]
  assert all(0 <= s < 20 for s in starts) and len(set(starts)) == 4  # distinct while the video has enough starts
  assert sum(f for _, f in draws) == 2  # half mirrored
  assert policy.draw(7, 20) == draws and clips.ClipPolicy(4, "random", True, seed=3).draw(7, 20) == draws
  assert clips.ClipPolicy(4, "random", True, seed=4).draw(7, 20) != draws and policy.draw(8, 20) != draws
  assert policy.draw(7, 1) in ([(0, False), (0, True)] * 2, [(0, True), (0, False)] * 2)  # one start: mirrors alternate
  assert len(set(policy.draw(7, 2))) == 4  # 2 starts x 2 mirrors: all distinct
  assert {f for v in range(20) for _, f in clips.ClipPolicy(1, flip=True).draw(v, 9)} == {False, True}
  assert clips.CENTRED.draw(7, frames.num_starts(12, 2, 2)) == [(frames.center_start(12, 2, 2), False)]
  assert clips.ClipPolicy.from_metadata(policy.to_metadata()) == policy
  assert clips.ClipPolicy.from_metadata(None) == clips.CENTRED and "seed" not in clips.CENTRED.to_metadata()
  with pytest.raises(ValueError, match=r"--clips_per_video=2: .*centred offsets.*--clip_flip"):
    clips.ClipPolicy(per_video=2)
  with pytest.raises(ValueError, match=r"--clip_offsets"):
    clips.ClipPolicy(offsets="middle")
  with pytest.raises(ValueError, match=r"--clips_per_video"):
    clips.ClipPolicy(per_video=0)


def test_clips_of_a_long_video_start_at_random_valid_frames_and_are_really_mirrored(tmp_path):
  (tmp_path / "walk").mkdir()
  _write_mp4(tmp_path / "walk" / "long.mp4", 24, height=16, width=24)  # 20 starts of 3 frames every 2nd
  _write_mp4(tmp_path / "walk" / "short.mp4", 4, height=16, width=24, seed=1)  # shorter than a clip: 1 start
  videos = VideoFolderSource(tmp_path, num_frames=3, frame_size=8, frame_stride=2, center_clip=True)
  assert [videos.num_starts(i) for i in range(2)] == [20, 1]
  policy = clips.ClipPolicy(per_video=4, offsets="random", flip=True, seed=0)
  source = clips.ClipSource(videos, policy)
  records = [source[r] for r in range(len(source))]
  assert len(records) == 8 and [int(e["video_index"]) for e in records] == [0] * 4 + [1] * 4
  long_starts = [int(e["clip_start"]) for e in records[:4]]
  assert all(0 <= s < 20 for s in long_starts) and len(set(long_starts)) == 4
  assert [int(e["clip_start"]) for e in records[4:]] == [0] * 4
  assert [sum(int(e["flip"]) for e in records[k:k + 4]) for k in (0, 4)] == [2, 2]
  for e in records:
    plain = videos.clip(int(e["video_index"]), int(e["clip_start"]))["video"]
    if e["flip"]:
      assert not np.array_equal(e["video"], plain)  # the frames are not symmetric: a mirror differs
      np.testing.assert_array_equal(e["video"], plain[:, :, ::-1])
    else:
      np.testing.assert_array_equal(e["video"], plain)
  again = clips.ClipSource(VideoFolderSource(tmp_path, num_frames=3, frame_size=8, frame_stride=2), policy)
  assert [(int(again[r]["clip_start"]), int(again[r]["flip"])) for r in range(8)] == [
      (int(e["clip_start"]), int(e["flip"])) for e in records]
  centred = clips.ClipSource(videos)  # CENTRED: the source's own centred clip, unflipped
  assert len(centred) == 2 and int(centred[0]["clip_start"]) == frames.center_start(24, 3, 2) == 9
  np.testing.assert_array_equal(centred[0]["video"], videos[0]["video"])
  assert not centred[0]["flip"] and not centred[1]["flip"]


# -------------------------------------------------- ucf101 and imagenet2012


def _jpeg(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


class _TinyUcf101(GeneratedBuilder, skip_registration=True):
  """Writes ucf101/ucf101_1_256/2.0.0 with tfds's own writer, like the real builder.

  The real builder's `Video` feature needs TensorFlow to be constructed; a
  `Sequence(Image(jpeg))` serializes frames identically ("video": bytes list of
  JPEGs, "label": int64) and takes pre-encoded JPEG bytes without TensorFlow.
  """
  name = "ucf101"
  VERSION = tfds.core.Version(tfds_sources.UCF101_VERSION)
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="ucf101_1_256")]
  frame_side = 256  # stored frame size; a wrong one tests the shape check

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "video": tfds.features.Sequence(tfds.features.Image(
            shape=(None, None, 3), encoding_format="jpeg")),
        "label": tfds.features.ClassLabel(num_classes=101),
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(3, 0), "test": self._generate_examples(2, 1)}

  def _generate_examples(self, n, split_seed):
    rng = np.random.default_rng(split_seed)
    s = self.frame_side
    for i in range(n):
      frames = [_jpeg(np.full((s, s, 3), rng.integers(0, 255, 3), np.uint8))
                for _ in range(5 + 2 * i)]
      yield i, {"video": frames, "label": 10 * i + split_seed}


class _WrongSizeUcf101(_TinyUcf101, skip_registration=True):
  name = "ucf101"  # tfds names each subclass anew
  frame_side = 200


@pytest.fixture(scope="module")
def ucf_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("ucf"))
  _TinyUcf101(data_dir=d, file_format="array_record").download_and_prepare()
  return d


def test_ucf101_source(ucf_dir):
  assert os.path.isdir(os.path.join(ucf_dir, "ucf101", "ucf101_1_256", "2.0.0"))
  src = tfds_sources.ucf101_source("train", ucf_dir, num_frames=6, frame_size=32)
  assert len(src) == 3
  labels = sorted(int(src[i]["label"]) for i in range(3))
  assert labels == [0, 10, 20]
  ex = src[0]
  assert ex["video"].shape == (6, 32, 32, 3) and ex["video"].dtype == np.uint8
  rand = tfds_sources.ucf101_source("test", ucf_dir, num_frames=2, frame_size=16,
                                  frame_stride=2, random_clip=True, seed=3)
  np.testing.assert_array_equal(rand[1]["video"], rand[1]["video"])
  batch = next(pipeline.make_iterator(src, global_batch_size=2, seed=0, process_index=0,
                                      process_count=1, transforms=[pipeline.NormalizeVideo()]))
  assert batch["video"].shape == (2, 6, 32, 32, 3) and batch["video"].dtype == np.float32
  with pytest.raises(ValueError, match=r"'validation'.*tfds ucf101.*carved from train"):
    tfds_sources.ucf101_source("validation", ucf_dir, num_frames=2, frame_size=8)


def test_ucf101_validation_is_carved_from_train(ucf_dir):
  data = ml_collections.ConfigDict({
      "name": "ucf101", "dir": ucf_dir, "worker_count": 0, "num_frames": 2, "frame_size": 8, "frame_stride": 1,
      "validation_fraction": 0.3, "validation_seed": 0})
  labels = {s: sorted(int(e["label"][0]) for e in _all_list(video_sources.video_source(data, s)))
            for s in splits.SPLITS}
  assert labels["test"] == [1, 11]  # tfds's test split as it is
  assert len(labels["validation"]) == 1 and sorted(labels["train"] + labels["validation"]) == [0, 10, 20]
  train = tfds_sources.ucf101_source("train", ucf_dir, num_frames=2, frame_size=8)
  held_out = splits.carve(3, 0.3, 0)["validation"]
  assert labels["validation"] == sorted(int(train[i]["label"]) for i in held_out)
  with pytest.raises(ValueError, match=r"'eval'.*config\.data\.name='ucf101'"):
    video_sources.video_source(data, "eval")


def test_ucf101_clips_of_a_carved_split_keep_the_train_indices(ucf_dir):
  data = ml_collections.ConfigDict({
      "name": "ucf101", "dir": ucf_dir, "worker_count": 0, "num_frames": 2, "frame_size": 8, "frame_stride": 1,
      "validation_fraction": 0.3, "validation_seed": 0})
  train = tfds_sources.ucf101_source("train", ucf_dir, num_frames=2, frame_size=8)  # 5, 7, 9 frames
  source = video_sources.clip_source(data, "train", clips.ClipPolicy(3, "random", seed=2))
  kept = splits.carve(3, 0.3, 0)["train"]
  assert len(source) == 3 * len(kept)
  for r in range(len(source)):
    e = source[r]
    v, start = int(e["video_index"]), int(e["clip_start"])
    assert v == kept[r // 3] and 0 <= start < train.num_starts(v) and not e["flip"]
    np.testing.assert_array_equal(e["video"], train.clip(v, start)["video"])
    assert e["label"].tolist() == [int(train[v]["label"])]
  assert len({int(source[r]["clip_start"]) for r in range(3)}) == 3
  validation = video_sources.clip_source(data, "validation")  # CENTRED
  held_out = splits.carve(3, 0.3, 0)["validation"]
  assert [int(e["video_index"]) for e in _all_list(validation)] == list(held_out)
  np.testing.assert_array_equal(validation[0]["video"], train[held_out[0]]["video"])


def test_ucf101_wrong_frame_shape_names_example(tmp_path):
  d = str(tmp_path)
  _WrongSizeUcf101(data_dir=d, file_format="array_record").download_and_prepare()
  src = tfds_sources.ucf101_source("train", d, num_frames=2, frame_size=16)
  with pytest.raises(ValueError, match=r"example 0.*\(256, 256, 3\).*\(200, 200, 3\)"):
    src[0]


class _TinyImagenet(GeneratedBuilder, skip_registration=True):
  """Writes imagenet2012/5.1.0 with the real builder's features (JPEG bytes in)."""
  name = "imagenet2012"
  VERSION = tfds.core.Version("5.1.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=1000),
        "file_name": tfds.features.Text(),
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(4), "validation": self._generate_examples(2)}

  def _generate_examples(self, n):
    rng = np.random.default_rng(n)
    for i in range(n):
      image = rng.integers(0, 255, (20 + 3 * i, 30, 3)).astype(np.uint8)
      yield i, {"image": _jpeg(image), "label": 100 + i, "file_name": f"n0_{i}.JPEG"}


def test_imagenet_source(tmp_path):
  d = str(tmp_path)
  _TinyImagenet(data_dir=d, file_format="array_record").download_and_prepare()
  src = tfds_sources.imagenet_source("validation", d, image_size=16)
  assert type(src.builder).__module__.startswith("tensorflow_datasets.")  # the real builder
  assert len(src) == 2
  ex = src[1]
  assert ex["image"].shape == (16, 16, 3) and ex["image"].dtype == np.uint8
  assert sorted(int(src[i]["label"]) for i in range(2)) == [100, 101]
  batch = next(pipeline.make_iterator(
      tfds_sources.imagenet_source("train", d, image_size=8), global_batch_size=4,
      seed=0, process_index=0, process_count=1))
  assert batch["image"].shape == (4, 8, 8, 3)

  data = ml_collections.ConfigDict({"name": "imagenet2012", "dir": d, "worker_count": 0, "image_size": 8,
                                    "validation_fraction": 0.25, "validation_seed": 0})
  labels = {s: sorted(int(e["label"]) for e in _all_list(images.image_source(data, s))) for s in splits.SPLITS}
  assert labels["test"] == [100, 101]  # tfds's "validation": the official validation set is our test split
  assert len(labels["validation"]) == 1 and sorted(labels["train"] + labels["validation"]) == [100, 101, 102, 103]
  data.validation_seed = 1
  assert sorted(int(e["label"]) for e in _all_list(images.image_source(data, "validation"))) != labels["validation"]
  with pytest.raises(ValueError, match=r"'val'.*config\.data\.name='imagenet2012'"):
    images.image_source(data, "val")


def test_digit_images_follow_the_carve(tmp_path):
  data = ml_collections.ConfigDict({"name": "digits", "dir": str(tmp_path), "worker_count": 0, "image_size": 8,
                                    "validation_fraction": 0.2, "validation_seed": 2})
  source = images.image_source(data, "validation")
  assert len(source) == round(NUM_TRAIN_POOL * 0.2) and source[0]["image"].shape == (8, 8, 1)
  scans = _all(pipeline.load_source(md.digits_builder(data), "validation"))["digit_index"]
  np.testing.assert_array_equal(np.sort(scans), md.digit_pool("validation", 0.2, 2))
  read = images.read_images(data, "validation", 3, 2)
  np.testing.assert_array_equal(read["image"][1], source[4]["image"])
  with pytest.raises(ValueError, match=r"'dev'.*config\.data\.name='digits'"):
    images.image_source(data, "dev")


# -------------------------------------------------------------------- tokens


def _video_split(n, offset):
  videos = np.stack([np.full((2, 4, 4, 1), 10 * (offset + i), np.uint8) for i in range(n)])
  return pipeline.ArraySource({"video": videos, "label": np.arange(offset, offset + n, dtype=np.int32)[:, None]})


def _encode(videos):  # float [b, F, H, W, C] in [-1, 1] -> int [b, 1, 1, 1]: the grey level back
  return np.round((videos[:, :1, :1, :1, 0] + 1.0) * 127.5).astype(np.int32)


def test_token_directories_hold_validation_and_name_the_command_for_old_ones(tmp_path):
  out = str(tmp_path / "tokens")
  metadata = {"latent_shape": [1, 1, 1], "codebook_size": 256, "tokenizer_workdir": "/runs/tok"}
  sources = {"train": _video_split(5, 0), "validation": _video_split(2, 5), "test": _video_split(3, 7)}
  old = tokens_lib.encode_dataset(_encode, {s: sources[s] for s in ("train", "test")}, out, metadata=metadata,
                                  batch_size=4)  # a directory encoded before validation splits existed
  assert old["num_examples"] == {"train": 5, "test": 3}
  with pytest.raises(FileNotFoundError) as info:
    tokens_lib.token_source(out, "validation")
  message = str(info.value)
  assert tokens_lib.record_path(out, "validation") in message and "before the validation split" in message
  assert f"experiments.encode_tokens --workdir /runs/tok --output_dir {out} --splits validation" in message
  # Encoding the missing split adds it beside the others.
  new = tokens_lib.encode_dataset(_encode, {"validation": sources["validation"]}, out, metadata=metadata)
  assert new["num_examples"] == {"train": 5, "validation": 2, "test": 3}
  with open(os.path.join(out, tokens_lib.METADATA)) as f:
    assert json.load(f)["num_examples"] == new["num_examples"]
  validation = tokens_lib.token_source(out, "validation", grid=(1, 1, 1), codebook_size=256)
  assert [int(validation[i]["tokens"].ravel()[0]) for i in range(2)] == [50, 60]
  assert [validation[i]["label"].tolist() for i in range(2)] == [[5], [6]]
  assert len(tokens_lib.token_source(out, "train")) == 5
  # Tokens of another tokenizer do not join the old ones silently.
  with pytest.raises(ValueError, match=r"split\(s\) \['test', 'train'\].*--splits train,validation,test"):
    tokens_lib.encode_dataset(_encode, {"validation": sources["validation"]}, out,
                              metadata={**metadata, "codebook_size": 64})
  with pytest.raises(ValueError, match=r"'dev'.*token directory"):
    tokens_lib.token_source(out, "dev")
  with pytest.raises(FileNotFoundError, match="tokenizer's workdir"):  # no metadata: the command still shown
    tokens_lib.token_source(str(tmp_path / "nothing"), "validation")


def test_token_directories_record_the_clip_policy_and_old_ones_read_as_centred(tmp_path):
  out = str(tmp_path / "tokens")
  metadata = {"latent_shape": [1, 1, 1], "codebook_size": 256, "tokenizer_workdir": "/runs/tok"}
  policy = clips.ClipPolicy(per_video=2, offsets="random", flip=True, seed=5)
  sources = {"train": clips.ClipSource(_video_split(3, 0), policy), "test": clips.ClipSource(_video_split(2, 3))}
  written = tokens_lib.encode_dataset(_encode, sources, out, metadata=metadata, clips={"train": policy},
                                      batch_size=4)
  assert written["num_examples"] == {"train": 6, "test": 2}
  assert written["clips"] == {"train": {"per_video": 2, "offsets": "random", "flip": True, "seed": 5},
                              "test": {"per_video": 1, "offsets": "center", "flip": False}}
  train = tokens_lib.token_source(out, "train")
  assert train.clips == policy and tokens_lib.token_source(out, "test").clips == clips.CENTRED
  assert [int(train[r]["video_index"]) for r in range(6)] == [0, 0, 1, 1, 2, 2]
  assert [int(train[r]["tokens"].ravel()[0]) for r in range(6)] == [0, 0, 10, 10, 20, 20]
  assert sorted(int(train[r]["flip"]) for r in range(2)) == [0, 1] and not train[0]["clip_start"]
  assert tokens_lib.encode_command(out, written, ("train",)).endswith(
      "--splits train --clips_per_video=2 --clip_offsets=random --clip_flip --clip_seed=5")
  # Adding a split keeps the others' policies.
  added = tokens_lib.encode_dataset(_encode, {"validation": _video_split(1, 5)}, out, metadata=metadata)
  assert added["clips"] == {**written["clips"], "validation": clips.CENTRED.to_metadata()}
  # A directory written before clip policies were recorded: one centred clip per video, records without clip keys.
  old = str(tmp_path / "old")
  tokens_lib.encode_dataset(_encode, {"train": _video_split(2, 0)}, old, metadata=metadata)
  path = os.path.join(old, tokens_lib.METADATA)
  with open(path) as f:
    recorded = json.load(f)
  del recorded["clips"]
  with open(path, "w") as f:
    json.dump(recorded, f)
  source = tokens_lib.token_source(old, "train", grid=(1, 1, 1), codebook_size=256)
  assert source.clips == clips.CENTRED and sorted(source[1]) == ["label", "tokens"]
  assert tokens_lib.encode_dataset(_encode, {"test": _video_split(1, 2)}, old, metadata=metadata)["clips"] == {
      "train": clips.CENTRED.to_metadata(), "test": clips.CENTRED.to_metadata()}
