r"""In-domain FVD of trained moving-digits generators, side by side: fvd_digits_classifier and frames/s.

  python -m experiments.benchmark_fvd \
      --classifier experiments/configs/video_classifier_digits.py:local,4x12=runs/fvd/classifier \
      --run experiments/configs/nbp_digits.py:XS,local,row=runs/fvd/nbp_row \
      --run experiments/configs/nbp_digits.py:XS,local,token=runs/fvd/nbp_token \
      [--run experiments/configs/ntp_digits.py:XS,local=runs/fvd/ntp] \
      [--num_videos 256] [--sample_batch_size 64] [--seeds 0,1] [--out_dir runs/fvd/benchmark]

Each `--run` is CONFIG_FILE:ARG=WORKDIR, a trained run of the `next_block` or
`ntp` family. The judge is the moving-digits classifier of
nbp/video_classifier.py trained on the generators' data
(video_classifier_digits.py:local,4x12); its data knobs (frames, size, digits,
grey levels) must equal every run's, else the script stops.

Per sampling seed s (N = --num_videos):
  reference  real test videos 0..N-1 (test split, never seen in training);
  stand-in   real test videos (s+1)N..(s+2)N-1: disjoint from the reference;
  floor      fvd_digits_classifier(reference, stand-in), the distance two real
             sets of N videos already have;
  run        N videos drawn by the run's sampler, conditioned like the stand-in
             (its digit classes for class-conditional runs, its first frames for
             frame prediction, nothing for unconditional ones), compared with the
             reference. A run's figure is to be read against the floor.
Test videos past the generators' 200 are drawn the same way (same seed, same
test pool of digit scans; `moving_digits_example` is random access).

All videos, real and generated, go through the same quantisation: real ones
are quantised to the generators' grey levels and dequantised, generated tokens
are dequantised (`video_classifier.requantize`).

Generation: the family's sampler (`nbp.next_block.sample`, `nbp.ntp.sample`)
jitted whole for a batch of --sample_batch_size, compiled ahead (compile time reported
apart) and timed over all N videos: frames/s = generated frames / seconds
(block_until_ready per batch), in the same process as the FVD. Classes are
passed explicitly: the training loop's sampler draws labels 0, 1, 2, ... mod 10
over its `num_samples` (8) rows, i.e. never the digits 8 and 9.

Beside the distance, "class match": the share of videos whose k top-scoring
classes are exactly the k distinct digits asked for (the stand-in's; for the
real row, the classifier's accuracy on the stand-in videos themselves); "-" for
unconditional runs.

Prints one JSON line per (run, seed) and a Markdown table; with --out_dir also
writes results.json and a PNG frame grid of the first generated videos per run.

Measured (2 shared CPU cores; 300 steps of batch 8 each, the shared local
budget; N = 256, batch 64, seeds 0-3; 3 min per two seeds for all five runs;
classifier test accuracy 0.973), mean (sd) over the four seeds:
  run                               fvd_digits_classifier   frames/s    class match
  real test videos (floor)            9.7  (2.6)             -           0.977
  nbp_digits XS,local,row            249.7 (14.7)          100-245       0.161
  nbp_digits XS,local,token          110.4  (7.8)           60-79        0.168
  nbp_digits XS,local,row,uncond     262.6  (6.9)          225-280       -
  nbp_digits XS,local,token,uncond   193.3 (12.3)           67-86        -
  ntp_digits XS,local                110.1  (8.1)           46-58        -
Row blocks generate about 3x the frames/s of token blocks, at about twice the
distance (far outside the seed spread); at 300 steps the class condition is
barely used (class match 0.16-0.17, chance 0.10). Frames/s varies with the
other jobs on the machine.

Dimensions: N videos, B batch, F frames, H = W frame side, D digits per video,
K classes (10), E classifier features.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from nbp import fvd as fvd_lib
from nbp.training import loop as train
from nbp import video_classifier
from nbp.data import moving_digits, pipeline

FVD_KEY = video_classifier.FVD_KEY  # "fvd_digits_classifier": never plain "fvd"

RUNS = flags.DEFINE_multi_string("run", [], "A trained generator: CONFIG_FILE:ARG=WORKDIR (repeatable).")
CLASSIFIER = flags.DEFINE_string(
    "classifier", "experiments/configs/video_classifier_digits.py:local,4x12=runs/fvd/classifier",
    "The judge: CONFIG_FILE:ARG=WORKDIR of a trained video_classifier run.")
NUM_VIDEOS = flags.DEFINE_integer("num_videos", 256, "N: generated videos per run and seed, and real videos per set.")
BATCH_SIZE = flags.DEFINE_integer("sample_batch_size", 64, "Videos per sampler call (and per classifier call).")
SEEDS = flags.DEFINE_list("seeds", ["0"], "Sampling seeds; seed s also picks the real stand-in set.")
OUT_DIR = flags.DEFINE_string("out_dir", "", "If set: results.json and samples_<run>.png here.")


# ---------------------------------------------------------------------------
# Pure pieces (tested in tests/test_fvd.py).

def parse_run(spec: str) -> tuple[str, str, str]:
  """"path.py:ARG=WORKDIR" -> (path, ARG, WORKDIR); ARG may hold commas, WORKDIR no "="."""
  config_part, sep, workdir = spec.rpartition("=")
  if not sep or not config_part or not workdir:
    raise ValueError(f"expected CONFIG_FILE:ARG=WORKDIR, got {spec!r}")
  path, _, arg = config_part.partition(":")
  return path, arg, workdir


def load_config(path: str, arg: str):
  """`get_config(arg)` of a config file, as `--config path:arg` would give it."""
  spec = importlib.util.spec_from_file_location(f"_benchmark_fvd_config_{abs(hash(path))}", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"no config file {path!r}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


DATA_KNOBS = ("num_frames", "frame_size", "num_digits", "speed", "levels")


def check_same_data(generator_data, classifier_data) -> None:
  """The judge must have been trained on the generator's kind of video (and grey levels)."""
  if generator_data.name != "moving_digits":
    raise ValueError(f"data.name={generator_data.name!r}: the benchmark reads runs on quantised pixels "
                     f"('moving_digits'); tokenizer-token runs need decoding first")
  for key in DATA_KNOBS:
    if generator_data[key] != classifier_data[key]:
      raise ValueError(f"data.{key}: generator {generator_data[key]!r} vs classifier {classifier_data[key]!r}; "
                       f"train the classifier on the generator's setting (video_classifier_digits.py:local,4x12)")


def real_videos(data_cfg, start: int, count: int) -> dict[str, np.ndarray]:
  """Test videos start..start+count-1 of the config's moving digits.

  Returns video uint8 [N, F, H, W, 1] (requantised to data.levels), label
  int32 [N, D], class int32 [N] (sum_i label_i 10^i, as the generators' class
  condition) and tokens int32 [N, F, H, W].
  """
  examples = [moving_digits.moving_digits_example(  # seed 0: the seed builder_from_config's datasets use
      i, seed=0, split="test", num_frames=data_cfg.num_frames, frame_size=data_cfg.frame_size,
      num_digits=data_cfg.num_digits, speed=data_cfg.speed) for i in range(start, start + count)]
  raw = np.stack([e["video"] for e in examples])  # [N, F, H, W, 1]
  labels = np.stack([e["label"] for e in examples]).astype(np.int64)  # [N, D]
  classes = np.sum(labels * 10 ** np.arange(labels.shape[1]), axis=1).astype(np.int32)
  return {"video": video_classifier.requantize(raw, data_cfg.levels), "class": classes,
          "label": labels.astype(np.int32), "tokens": pipeline.quantize_video(raw, data_cfg.levels)[..., 0]}


def tokens_to_videos(tokens, levels: int) -> np.ndarray:
  """Grid tokens int [N, F, H, W] -> uint8 videos [N, F, H, W, 1] at the bin centres."""
  tokens = np.asarray(tokens)
  return pipeline.dequantize_tokens(tokens.reshape(tokens.shape[0], -1), levels, tokens.shape[1:] + (1,))


@dataclasses.dataclass
class Judge:
  """The classifier that gives fvd_digits_classifier: features of videos, distances of feature sets."""

  model: video_classifier.VideoClassifier
  params: Any
  levels: int  # every video is requantised to these grey levels first
  batch_size: int = 64

  def __post_init__(self):
    self.extract = video_classifier.feature_extractor(self.model, self.params, batch_size=self.batch_size,
                                                      levels=self.levels)
    def logits(p, videos):
      return self.model.apply({"params": p}, video_classifier.requantize(videos, self.levels))
    self.logits = fvd_lib.FeatureExtractor(logits, self.params, self.batch_size)

  def features(self, videos) -> np.ndarray:
    """uint8 videos [N, F, H, W, 1] -> float64 features [N, E]."""
    return self.extract(videos)

  def accuracy(self, videos, labels) -> float:
    """Share of videos whose k top-scoring classes are the k distinct digits of `labels` int [N, D]."""
    logits = self.logits(videos)  # [N, K]
    wanted = np.asarray(video_classifier.multi_hot(labels), bool)  # [N, K]
    ranks = np.argsort(np.argsort(-logits, axis=-1), axis=-1)  # 0 for the top class
    top = ranks < wanted.sum(-1, keepdims=True)
    return float(np.mean(np.all(top == wanted, axis=-1)))

  @staticmethod
  def distance(reference_features, features) -> float:
    """fvd_digits_classifier between two feature sets."""
    return fvd_lib.frechet_distance_of_features(reference_features, features)


def generated_frames(config, model) -> int:
  """Frames a sampler draws per video (frame prediction does not draw the given ones)."""
  given = model.prefix_frames if config.family == "next_block" and model.condition == "frames" else 0
  return config.data.num_frames - given


def make_generator(config, model, batch_size: int) -> Callable[..., jax.Array]:
  """(params, rng, classes int [B], prompt int [B, F, H, W]) -> grid tokens int [B, F, H, W], unjitted.

  `classes` serve class-conditional NBP, `prompt` (its first prefix_frames)
  frame prediction; each is ignored where the run has no such condition. The
  sampling settings (temperature, top-k, top-p, guidance) are the config's.
  """
  m = config.model
  grid = (config.data.num_frames, config.data.frame_size, config.data.frame_size)
  if config.family == "ntp":
    from nbp import ntp  # pylint: disable=g-import-not-at-top

    def generate_ntp(params, rng, classes, prompt):
      del classes, prompt  # the next-token baseline is unconditional
      tokens = ntp.sample(model, params, rng, batch_size=batch_size, temperature=m.temperature,
                          top_k=m.top_k, top_p=m.top_p)
      return tokens.reshape(batch_size, *grid)
    return generate_ntp
  if config.family != "next_block":
    raise ValueError(f"family {config.family!r}: the benchmark samples 'next_block' and 'ntp' runs")
  from nbp import next_block  # pylint: disable=g-import-not-at-top
  guidance = m.guidance_scale if (model.condition == "class" and m.guidance_scale != 1.0) else None

  def generate_nbp(params, rng, classes, prompt):
    labels = classes.astype(jnp.int32) if model.condition == "class" else None
    given = prompt[:, :model.prefix_frames].astype(jnp.int32) if model.condition == "frames" else None
    return next_block.sample(model, params, rng, batch_size=batch_size, temperature=m.temperature,
                             top_k=m.top_k, top_p=m.top_p, labels=labels, guidance_scale=guidance, prompt=given)
  return generate_nbp


def describe(config, model) -> tuple[str, str]:
  """(block, condition) of a run for the table."""
  if config.family == "ntp":
    return "1x1x1 (ntp.py)", "none"
  return "x".join(map(str, model.block)), model.condition


# ---------------------------------------------------------------------------
# The benchmark.

def generate(s: train.Setup, params, rng, stand_in: dict[str, np.ndarray], batch_size: int):
  """N tokens [N, F, H, W] drawn in batches, and the timing: (tokens, compile_s, sample_s)."""
  n = stand_in["class"].shape[0]
  if n % batch_size:
    raise ValueError(f"--num_videos {n} must be a multiple of --sample_batch_size {batch_size}")
  fn = make_generator(s.config, s.task.model, batch_size)
  with s.context():
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(params, rng, jnp.asarray(stand_in["class"][:batch_size]),
                                 jnp.asarray(stand_in["tokens"][:batch_size])).compile()
    compile_s = time.perf_counter() - start
    out, seconds = [], 0.0
    for i in range(0, n, batch_size):
      classes = jnp.asarray(stand_in["class"][i:i + batch_size])
      prompt = jnp.asarray(stand_in["tokens"][i:i + batch_size])
      start = time.perf_counter()
      tokens = jax.block_until_ready(compiled(params, jax.random.fold_in(rng, i), classes, prompt))
      seconds += time.perf_counter() - start
      out.append(np.asarray(tokens))
  return np.concatenate(out), compile_s, seconds


def main(argv):
  del argv
  if not RUNS.value:
    raise app.UsageError("give at least one --run CONFIG_FILE:ARG=WORKDIR")
  n, batch = NUM_VIDEOS.value, BATCH_SIZE.value
  seeds = [int(x) for x in SEEDS.value]
  c_path, c_arg, c_workdir = parse_run(CLASSIFIER.value)
  c_config = load_config(c_path, c_arg)
  c_model, c_params = video_classifier.load_classifier(c_config, c_workdir)
  judge = Judge(c_model, c_params, c_config.data.levels, batch)
  if OUT_DIR.value:
    os.makedirs(OUT_DIR.value, exist_ok=True)

  runs = []
  for spec in RUNS.value:
    path, arg, workdir = parse_run(spec)
    config = load_config(path, arg)
    check_same_data(config.data, c_config.data)
    runs.append((spec, config, workdir))

  data_cfg = runs[0][1].data
  reference = real_videos(data_cfg, 0, n)
  reference_features = judge.features(reference["video"])
  rows = []
  for seed in seeds:
    stand_in = real_videos(data_cfg, (seed + 1) * n, n)
    floor = judge.distance(reference_features, judge.features(stand_in["video"]))
    rows.append({"run": f"real test videos {(seed + 1) * n}..{(seed + 2) * n - 1}", "block": "-",
                 "condition": "-", "seed": seed, "frames_per_s": None, FVD_KEY: floor,
                 "class_match": judge.accuracy(stand_in["video"], stand_in["label"])})
    print(json.dumps(rows[-1]), flush=True)
    for spec, config, workdir in runs:
      s, state = train.load_state(config, workdir)
      params = state.ema_params if state.ema_params is not None else state.params
      model = s.task.model
      tokens, compile_s, seconds = generate(s, params, jax.random.key(seed), stand_in, batch)
      videos = tokens_to_videos(tokens, config.data.levels)
      frames = n * generated_frames(config, model)
      block, condition = describe(config, model)
      rows.append({"run": os.path.basename(os.path.normpath(workdir)), "spec": spec, "block": block,
                   "condition": condition, "seed": seed, "step": int(state.step),
                   "frames_per_s": frames / seconds, "tokens_per_s": frames * config.data.frame_size ** 2 / seconds,
                   "sample_seconds": seconds, "compile_seconds": compile_s,
                   FVD_KEY: judge.distance(reference_features, judge.features(videos)),
                   "class_match": (judge.accuracy(videos, stand_in["label"]) if condition != "none" else None)})
      print(json.dumps(rows[-1]), flush=True)
      if OUT_DIR.value and seed == seeds[0]:
        from nbp import visualization as video_lib  # pylint: disable=g-import-not-at-top
        video_lib.save_frame_grid(os.path.join(OUT_DIR.value, f"samples_{rows[-1]['run']}.png"), videos,
                                  max_videos=8, title=f"{rows[-1]['run']} ({block}, {condition}), seed {seed}")

  print(f"\n{FVD_KEY}: N = {n} videos per set against real test videos 0..{n - 1}; "
        f"classifier {c_workdir} (levels {c_config.data.levels}); batch {batch}; "
        f"{jax.default_backend()}, {jax.device_count()} device(s)")
  print(f"\n| run | block | condition | seed | frames/s | {FVD_KEY} | class match |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    fps = "-" if r["frames_per_s"] is None else f"{r['frames_per_s']:.1f}"
    match = "-" if r["class_match"] is None else f"{r['class_match']:.3f}"
    print(f"| {r['run']} | {r['block']} | {r['condition']} | {r['seed']} | {fps} | {r[FVD_KEY]:.2f} | {match} |")
  if OUT_DIR.value:
    with open(os.path.join(OUT_DIR.value, "results.json"), "w") as f:
      json.dump({"num_videos": n, "batch_size": batch, "classifier": CLASSIFIER.value, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
