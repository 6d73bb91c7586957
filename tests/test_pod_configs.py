"""The pod-scale pipeline without pod data: video sources, tokenizer data, encoding, and the pod configs.

UCF-101 and Kinetics are not on this machine: their readers run on tiny files
written here with the fixture builders of tests/test_data.py (same layout as
the real datasets). The pod configs are built abstractly, their sharded train
state traced with `jax.eval_shape` on 8 fake CPU devices in one subprocess
(tests/pod_shapes.py).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import nbp_kinetics600, nbp_pod, nbp_ucf101, video_tokenizer_pod, xar_imagenet
from nbp import evaluators
from nbp import tasks
from nbp.data import splits
from nbp.data import tokens as tokens_lib
from nbp.data import video_sources
from nbp.tasks import video_tokenizer as vt
from tests.conftest import apply_overrides, run_module
from tests.test_data import _TinyUcf101, _write_mp4


@pytest.fixture(scope="module")
def ucf_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("ucf"))
  _TinyUcf101(data_dir=d, file_format="array_record").download_and_prepare()
  return d


@pytest.fixture(scope="module")
def kinetics_dir(tmp_path_factory):
  """root/train/<class>/<video> (5 videos) and root/val/<class>/<video> (2), as video_tokenizer_pod expects."""
  root = tmp_path_factory.mktemp("k600")
  layout = {"train": {"archery": ["a.mp4", "b.mp4", "f.mp4"], "bowling": ["c.mp4", "g.mp4"]},
            "val": {"archery": ["d.mp4"], "bowling": ["e.mp4"]}}
  for split, classes in layout.items():
    for k, (cls, names) in enumerate(classes.items()):
      (root / split / cls).mkdir(parents=True)
      for j, name in enumerate(names):
        _write_mp4(root / split / cls / name, 8, seed=10 * k + j)
  return str(root)


def _small_data(dataset: str, data_dir: str, **overrides):
  """The pod tokenizer config of `dataset`, reading `data_dir` at 5 frames of 16x16."""
  return apply_overrides(video_tokenizer_pod.get_config(dataset),
                         {"data.dir": data_dir, "data.num_frames": 5, "data.frame_size": 16, **overrides})


# ------------------------------------------------------------------ video_source


def _labels(source) -> list[int]:
  return [int(source[i]["label"][0]) for i in range(len(source))]


def test_video_source_ucf101(ucf_dir):
  data = _small_data("ucf101", ucf_dir).data
  source, validation, test = (video_sources.video_source(data, split) for split in splits.SPLITS)
  # tfds's train (3 videos) gives train and, carved by config.data, validation; test is tfds's test.
  assert (len(source), len(validation), len(test)) == (2, 1, 2)
  example = source[0]
  assert example["video"].shape == (5, 16, 16, 3) and example["video"].dtype == np.uint8
  assert example["label"].shape == (1,) and example["label"].dtype == np.int32
  assert sorted(_labels(source) + _labels(validation)) == [0, 10, 20] and sorted(_labels(test)) == [1, 11]
  assert video_sources.num_channels(data) == 3


def test_video_source_video_folder(kinetics_dir):
  data = _small_data("kinetics600", kinetics_dir).data
  train, validation, test = (video_sources.video_source(data, split) for split in splits.SPLITS)
  # test reads val/; validation is carved from train/ (a, b, f of class 0, c, g of class 1) by config.data.
  carved = splits.carve(5, data.validation_fraction, data.validation_seed)
  assert (len(train), len(validation), len(test)) == (4, 1, 2)
  folder_labels = [0, 0, 0, 1, 1]
  assert _labels(train) == [folder_labels[i] for i in carved["train"]]
  assert _labels(validation) == [folder_labels[i] for i in carved["validation"]] and _labels(test) == [0, 1]
  assert train[2]["video"].shape == (5, 16, 16, 3) and train[2]["video"].dtype == np.uint8


def test_video_source_errors(tmp_path, kinetics_dir):
  data = _small_data("kinetics600", kinetics_dir).data
  data.name = "kinetics"
  with pytest.raises(ValueError, match=r"config\.data\.name='kinetics'"):
    video_sources.video_source(data, "train")
  empty = str(tmp_path / "nothing_here")
  with pytest.raises(ValueError, match="nothing_here/ucf101/ucf101_1_256"):
    video_sources.video_source(_small_data("ucf101", empty).data, "train")
  with pytest.raises(ValueError, match="nothing_here/val"):
    video_sources.video_source(_small_data("kinetics600", empty).data, "test")


# ------------------------------------------------- tokenizer data and encoding


def _tiny_rgb_tokenizer(data_dir: str):
  """The kinetics600 tokenizer config shrunk: 5x16x16 RGB -> 2x4x4 tokens, 8 channels, float32; 2 of the 5
  train/ videos held out as validation."""
  return _small_data("kinetics600", data_dir, **{
      "model.channels": 8, "model.channel_multipliers": (1, 2, 2), "model.num_res_blocks": 1,
      "model.space_factor": 4, "model.norm_groups": 4, "model.dtype": "float32", "sampler.num_samples": 2,
      "data.worker_count": 0, "data.validation_fraction": 0.4, "batch_size": 2})


@pytest.mark.slow
def test_tokenizer_reads_rgb_videos_and_encode_dataset_writes_what_nbp_reads(tmp_path, kinetics_dir):
  config = _tiny_rgb_tokenizer(kinetics_dir)
  task = vt.make_task(config)
  assert task.model.out_channels == 3 and task.init_inputs()["video"].shape == (1, 5, 16, 16, 3)
  batch = next(task.data("train", seed=0, process_index=0, process_count=1, batch_size=2))
  assert batch["video"].shape == (2, 5, 16, 16, 3) and batch["video"].dtype == np.float32
  assert -1.0 <= batch["video"].min() and batch["video"].max() <= 1.0 and batch["label"].shape == (2, 1)
  # Random parameters are enough (and much faster here than compiling the model's init).
  shapes = jax.eval_shape(task.model.init, jax.random.key(0), **task.init_inputs())["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), s.dtype), shapes)
  samples = jax.jit(task.predict_fn("sample"))(params, jax.random.key(1))  # the first validation videos
  assert samples["video"].shape == samples["reconstruction"].shape == (2, 5, 16, 16, 3)
  validation = video_sources.video_source(config.data, "validation")
  np.testing.assert_allclose(samples["video"][1], validation[1]["video"] / 127.5 - 1.0, atol=1e-6)

  out = str(tmp_path / "tokens")
  encode = jax.jit(lambda v: task.predict_fn("encode")(params, v))
  sources = {split: video_sources.video_source(config.data, split) for split in splits.SPLITS}
  metadata = tokens_lib.encode_dataset(encode, sources, out, batch_size=2, metadata={
      "latent_shape": [2, 4, 4], "codebook_size": task.model.codebook_size, "video_shape": [5, 16, 16, 3]})
  assert {"latent_shape", "codebook_size", "num_examples", "video_shape"} <= set(metadata)
  assert metadata["latent_shape"] == [2, 4, 4] and metadata["video_shape"] == [5, 16, 16, 3]
  assert metadata["num_examples"] == {"train": 3, "validation": 2, "test": 2} and metadata["codebook_size"] == 64000
  source = tokens_lib.token_source(out, "test")  # in the dataset's order (values: test_video_tokenizer)
  for i in range(2):
    assert source[i]["tokens"].shape == (2, 4, 4) and source[i]["tokens"].dtype == np.int32
    assert source[i]["label"].tolist() == [i] and source[i]["label"].dtype == np.int32

  # The NBP pod config's token loader reads what was written.
  nbp_config = apply_overrides(nbp_kinetics600.get_config("700M"),
                               {"data.token_dir": out, "model.grid": (2, 4, 4), "model.block": (1, 1, 4),
                                "model.prefix_frames": 1})
  it = tasks.make_task(nbp_config).data("train", seed=0, process_index=0, process_count=1, batch_size=3)
  tokens = next(it)
  assert tokens["tokens"].shape == (3, 32) and tokens["tokens"].dtype == np.int32
  assert sorted(tokens["class"].tolist()) == sorted(_labels(sources["train"]))  # the 3 train videos' classes
  assert tokens["tokens"].min() >= 0 and tokens["tokens"].max() < 64000


# ------------------------------------------------------------------ pod configs


def test_pod_configs_agree_with_the_tokenizer_and_the_official_scripts():
  for dataset in video_tokenizer_pod.DATASETS:
    c = video_tokenizer_pod.get_config(dataset)
    model = tasks.build_model(vt.Model, c.model)
    assert model.out_channels == video_sources.num_channels(c.data) == 3
    assert model.latent_shape(c.data.num_frames, c.data.frame_size, c.data.frame_size) == nbp_pod.TOKEN_GRID
    assert model.codebook_size == nbp_pod.CODEBOOK_SIZE and c.model.dtype == "bfloat16"
  expected = {  # scripts/lm_train/train_ucf.sh, train_k600.sh: (batch, lr, warmup, steps)
      (nbp_ucf101, "700M"): (256, 6e-4, 5000, 100_000), (nbp_ucf101, "3B"): (256, 6e-4, 5000, 100_000),
      (nbp_kinetics600, "700M"): (64, 1e-3, 10_000, 4_000_000),
      (nbp_kinetics600, "1.2B"): (64, 5e-4, 10_000, 4_000_000),
      (nbp_kinetics600, "3B"): (64, 2e-4, 10_000, 4_000_000)}
  for (module, size), (batch, lr, warmup, steps) in expected.items():
    c = module.get_config(size)
    assert (c.batch_size, c.optimizer.lr, c.optimizer.warmup_steps, c.num_steps) == (batch, lr, warmup, steps)
    assert (c.optimizer.b1, c.optimizer.b2, c.optimizer.weight_decay, c.optimizer.clip_norm) == (0.9, 0.95, 0.01, 1.0)
    assert c.optimizer.schedule == "cosine" and c.optimizer.final_lr_fraction == 0.0
    assert tuple(c.model.block) == (1, 1, 16) and tuple(c.model.grid) == nbp_pod.TOKEN_GRID
    assert c.model.codebook_size == 64000 and c.model.dtype == "bfloat16" and c.model.scan_layers
    tasks.check_config(c)
  assert nbp_ucf101.get_config("700M").model.num_classes == 101
  k600 = nbp_kinetics600.get_config("700M")
  assert k600.model.condition == "frames" and k600.model.prefix_frames == 2 and "num_classes" not in k600.model
  with pytest.raises(ValueError, match="700M"):
    nbp_ucf101.get_config("7B")
  assert "fvd" not in k600.evals  # no I3D file named: no FVD evaluator


def test_pod_configs_with_an_i3d_file_end_with_the_papers_fvd_protocol(tmp_path):
  """SIZE,i3d=PATH adds the fvd evaluator: 16 of 17 frames, PyTorch's resize, Kinetics-600 through 64x64."""
  weights = tmp_path / "i3d.npz"
  weights.write_bytes(b"")
  built = {}
  for module in (nbp_ucf101, nbp_kinetics600):
    c = module.get_config(f"1.2B,i3d={weights}")
    assert c.model.variant == "1.2B" and c.evals.fvd.every == 0
    _, built[module] = evaluators.build({"fvd": c.evals.fvd})["fvd"]
  assert {m: (e.i3d_path, e.num_frames, e.half_pixel_centers, e.downsample) for m, e in built.items()} == {
      nbp_ucf101: (str(weights), 16, True, 0), nbp_kinetics600: (str(weights), 16, True, 64)}
  with pytest.raises(FileNotFoundError, match="i3d_path"):  # named but absent: refused before training
    evaluators.build({"fvd": nbp_kinetics600.get_config(f"700M,i3d={tmp_path / 'absent.npz'}").evals.fvd})
  with pytest.raises(ValueError, match="i3d=PATH.*'fvd=1'"):
    nbp_kinetics600.get_config("700M,fvd=1")


def test_xar_pod_configs_carry_the_papers_settings():
  for size, (steps, guidance) in {"B": (40, 2.7), "L": (50, 2.3), "H": (50, 2.2)}.items():
    c = xar_imagenet.get_config(size)
    assert (c.batch_size, c.optimizer.lr, c.optimizer.b1, c.optimizer.b2) == (2048, 4e-4, 0.9, 0.96)
    assert (c.optimizer.weight_decay, c.optimizer.ema_decay, c.optimizer.clip_norm) == (0.02, 0.9999, 1.0)
    assert (c.sampler.num_steps, c.sampler.guidance_scale, c.sampler.solver) == (steps, guidance, "sde")
    assert c.model.entity == "cell" and c.model.cell == 8 and tuple(c.model.grid) == (16, 16)
    assert c.loss.class_dropout == 0.1 and c.model.variant == size and c.loss.posterior == "sample"
    tasks.check_config(c)
  assert "fid" in xar_imagenet.get_config("B,fid").evals
  with pytest.raises(ValueError, match="B"):
    xar_imagenet.get_config("XL")


@pytest.mark.slow
def test_pod_train_states_are_sharded_on_eight_devices():
  result = run_module(["tests/pod_shapes.py"], timeout=300)
  assert result.returncode == 0, result.stderr[-5000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])

  for name in ("video_tokenizer_pod:ucf101", "video_tokenizer_pod:kinetics600"):
    r = report[name]
    # 370M parameters (128 x (1, 2, 2, 4) channels, 4 residual blocks per level, the official strided
    # convolutions; 294M with space-to-depth resampling); data parallel over 8.
    assert 0.35e9 < r["num_params"] < 0.40e9 and r["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}

  nominal = {"nbp_ucf101:700M": 0.7e9, "nbp_kinetics600:700M": 0.7e9, "nbp_ucf101:3B": 3e9}
  tolerance = {"nbp_ucf101:700M": 0.05, "nbp_kinetics600:700M": 0.05, "nbp_ucf101:3B": 0.25}
  for name, size in nominal.items():
    r = report[name]
    layers = sum(n for p, n in zip(r["param_names"], r["param_sizes"]) if p.startswith("decoder/"))
    # The transformer layers: 680M for "700M", 3.62B for "3B" (the paper's names round); the
    # 64,000-code embedding and head add 2 x 64,001 x width (197M at 700M, 394M at 3B).
    assert abs(layers / size - 1) < tolerance[name], (name, layers)
    assert layers < r["num_params"] < layers + 0.45e9, (name, r["num_params"])
    assert r["big_kernels"] >= 9 and not r["big_not_over_fsdp"], (name, r["big_not_over_fsdp"])
    assert r["mesh"]["fsdp"] == 8 and abs(r["state_share_per_device"] - 1 / 8) < 1e-3, (name, r)

  r = report["kl_vae_imagenet"]  # KL-16: encoder 26.2M, decoder 38.2M, patch discriminator 0.66M
  assert 60e6 < r["num_params"] < 70e6, r["num_params"]

  for name, size in {"xar_imagenet:B": 172e6, "xar_imagenet:H": 1.1e9}.items():
    r = report[name]
    assert abs(r["num_params"] / size - 1) < 0.1, (name, r["num_params"])
    assert r["big_kernels"] >= 3 and not r["big_not_over_fsdp"], (name, r["big_not_over_fsdp"])
    assert r["mesh"]["fsdp"] == 8 and abs(r["state_share_per_device"] - 1 / 8) < 2e-3, (name, r)


# ------------------------------------------------------------------ xAR and EBT on RGB videos (compare_digits.py:pod)

def test_xar_and_ebt_read_rgb_videos_of_the_pod_comparison(ucf_dir):
  """The pod comparison's pixel contenders on UCF-101's reader: xAR's stacked frames cut into patches of 3
  channels (and back), EBT's frames as tokens of H*W*3 values, 101 classes."""
  from experiments.configs import compare_digits  # pylint: disable=g-import-not-at-top
  from nbp.evaluators import generation  # pylint: disable=g-import-not-at-top
  from nbp.tasks import ebt as ebt_task  # pylint: disable=g-import-not-at-top
  from nbp.tasks import xar as xar_task  # pylint: disable=g-import-not-at-top
  c = compare_digits.get_config("pod")
  with c.unlocked():
    c.data = {"dir": ucf_dir, "num_frames": 5, "frame_size": 16, "worker_count": 0}
    c.xar_patch = 4
    c.mesh = (("data", 1), ("fsdp", 1), ("tensor", 1))
    c.batch_size = 2
  xar = compare_digits.contender_config(c, "xar_frames", seed=0)
  assert tuple(xar.model.grid) == (20, 4) and xar.model.token_dim == 48 and xar.model.cell == 4
  with xar.unlocked():
    xar.model.update(num_layers=1, width=32, num_heads=2)
  task = tasks.make_task(xar)
  batch = next(task.data("train", seed=0, process_index=0, process_count=1, batch_size=2))
  assert batch["tokens"].shape == (2, 20, 4, 48) and set(batch["class"].tolist()) <= {0, 10, 20}
  videos = generation.real_videos(xar.data, 0, 2, "test")["video"]  # uint8 [2, 5, 16, 16, 3]
  tokens = xar_task.videos_to_tokens(task.model, xar.data, videos)
  np.testing.assert_array_equal(xar_task.tokens_to_videos(task.model, xar.data, tokens), videos)

  ebt = compare_digits.contender_config(c, "ebt", seed=0)
  with ebt.unlocked():
    ebt.model.update(num_layers=1, width=32, num_heads=2, mlp_dim=64, scan_layers=False)
  task = tasks.make_task(ebt)
  assert task.model.input_dim == ebt_task.frame_values(ebt.data) == 16 * 16 * 3
  batch = next(task.data("train", seed=0, process_index=0, process_count=1, batch_size=2))
  assert batch["video"].shape == (2, 5, 16, 16, 3) and batch["video"].min() >= -1.0
  with ebt.unlocked():
    ebt.model.num_classes = 10
  with pytest.raises(ValueError, match="num_classes=10.*'ucf101' have 101 classes"):
    tasks.make_task(ebt)
  judge = compare_digits.judge_config(c)
  with judge.unlocked():
    judge.mesh = c.mesh
  task = tasks.make_task(judge)
  batch = next(task.data("train", seed=0, process_index=0, process_count=1, batch_size=2))
  assert batch["video"].shape == (2, 5, 16, 16, 3) and task.model.num_classes == 101
  with pytest.raises(ValueError, match="config.data.num_classes"):
    video_sources.num_classes(apply_overrides(video_tokenizer_pod.get_config("kinetics600"), {}).data)
