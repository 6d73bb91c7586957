r"""The paradigms compared on one task at one training budget: moving-digits videos, class-conditional.

  python -m experiments.compare --config experiments/configs/compare_digits.py:local

Every contender is trained on the same videos (the local pixel setting of
nbp_digits.py: 4 frames of 12x12, one digit, 8 grey levels), for the same
training FLOPs as XLA counts them for its compiled step: the reference
contender trains `budget_steps` steps, every other one as many steps as its
own step's FLOPs allow (experiments/compare.py calibrates them). Each model
does both tasks: class-conditional generation, and next-frame prediction by
continuing the first `given_frames` frames of real videos under their class.

Contenders (the same parameter count within 10%: tests/test_compare.py):
  ntp        next-token prediction: the block transformer with 1x1x1 blocks
  ntp_aaren  the same with Aaren's prefix-scan attention in every layer
             (learned positions), streaming at sampling
  nbp_row    next-block prediction, one 12-token row per step (the paper's)
  nbp_2row   next-block prediction, two frames' rows at once (2x1x12)
  nbp_patch  next-block prediction, 4x4 patches
  nbp_frame  next-block prediction, a whole frame per step
  xar_frames xAR with a frame per entity: flow matching with noisy context
  ebt        the energy transformer, a frame per token after a class token,
             thinking 1, 2 or 4 steps at inference, or the best of 4
The other NBP block shape is a choice (`choices`): 2row, patch and frame are
each trained at the first seed and measured on validation, and the one of
lowest FVD joins the comparison. Each has one or more sampler rows (`samplers`): keyword settings of its
family's sampler, each measured and reported on its own.

Argument: "local" (2 CPU cores), "tiny" (the test suite's: 5 frames of 8x8,
one layer, a few steps, fewer sampler rows) or "pod": the same comparison at
the paper's size on UCF-101 (class-conditional, 17 frames of 128x128). The
token models read the video tokenizer's tokens (nbp_ucf101.py:700M: 5x16x16
latent tokens of 64,000 codes, a 16-token row per block; a patch of 4x4 and
a latent frame are the other block shapes, two latent frames do not tile 5).
xAR and EBT read the same videos' pixels: xAR stacks the frames and cuts
16x16 patches (a frame per entity: 64 tokens of 768 values); EBT takes each
frame's 49,152 values as one token. Widths and depths are set so that every
contender has the parameters of the 700M reference within 10%
(tests/test_compare.py builds their sharded states abstractly, on 8 fake
devices); the budget is the reference's 100,000 steps of batch 256.
"""

import importlib

import ml_collections
from ml_collections import config_dict

from experiments.configs import nbp_digits, ntp_digits, video_classifier_digits, video_tokenizer_pod
from nbp.data import video_sources
from nbp.training import config as config_lib

ARGS = ("local", "tiny", "pod")


def _contender(base: str, samplers: dict, **overrides) -> ml_collections.ConfigDict:
  """base: "file.py:arg" of experiments/configs; overrides: sections of keys set on it (model={...})."""
  return ml_collections.ConfigDict({"base": base, "overrides": overrides, "samplers": samplers})


def get_config(arg: str = "local"):
  if arg not in ARGS:
    raise ValueError(f"compare_digits config argument must be one of {ARGS}, got {arg!r}")
  if arg == "pod":
    return _pod_config()
  c = ml_collections.ConfigDict()
  c.arg = arg
  # The samplers' settings are those each base config chose on validation (nbp_digits.py).
  c.contenders = ml_collections.ConfigDict({
      "ntp": _contender("nbp_digits.py:XS,local,token", {"guided": {}}),
      "ntp_aaren": _contender("nbp_digits.py:XS,local,token", {"guided": {}},
                              model={"attention": "aaren", "position": "learned"}),
      "nbp_row": _contender("nbp_digits.py:XS,local,row", {"guided": {}}),
      "nbp_2row": _contender("nbp_digits.py:XS,local,2row", {"guided": {}}),
      "nbp_patch": _contender("nbp_digits.py:XS,local,patch", {"guided": {}}),
      "nbp_frame": _contender("nbp_digits.py:XS,local,frame", {"guided": {}}),
      # Frames as entities (a 6x6 cell of 2x2 patches per 12x12 frame), flow matching with noisy context; the
      # sampler's settings are those xar_digits.py chose on validation: 20 SDE steps per entity, guidance 3,
      # each finished frame kept as context noised again to t = 0.1.
      "xar_frames": _contender("xar_digits.py:cell", {"guided": {}},
                               model={"variant": None, "num_layers": 3, "width": 104, "num_heads": 2}),
      # Frames as tokens, a class token first, trained with the System 2 recipe (randomised step size,
      # truncated steps, the loss at the last) at 3 steps every batch (its 2-3 drawn per batch would be two
      # compiled branches, which XLA's FLOP count cannot weigh) and without its replay buffer; System 2
      # thinking at inference: 1, 2 and 4 steps, and the best of 4 at 2.
      "ebt": _contender("ebt_video.py:s2,local", {
          "think1": {"num_steps": 1}, "think2": {"num_steps": 2}, "think4": {"num_steps": 4},
          "best_of4": {"num_steps": 2, "best_of": 4}},
          model={"num_layers": 3, "width": 128, "mlp_dim": 384, "num_classes": 10},
          loss={"replay_size": 0, "class_dropout": 0.1, "num_steps": 3, "num_steps_max": 0}),
  })
  # NBP's best other block shape, chosen on validation (experiments/compare.py: choose).
  c.choices = ml_collections.ConfigDict({"nbp_other": ("nbp_2row", "nbp_patch", "nbp_frame")})
  c.choice_split = "validation"
  c.batch_size = 8 if arg == "local" else 4  # every contender's (the digits configs' local budget)
  # The videos xAR and EBT read: the token models' (8 grey levels, nbp_digits.py's local setting); xAR cuts them
  # into patches of `xar_patch` pixels, a cell of patches per frame.
  c.pixel_data = ml_collections.ConfigDict({"name": "moving_digits", "levels": ntp_digits.LEVELS})
  ntp_digits.set_digits_data(c.pixel_data, local=True)
  c.xar_patch = 2
  c.mesh = config_dict.placeholder(tuple)  # every contender's base config's
  if arg == "tiny":  # the test suite's: fewer solver steps and sampler rows, each compiled program costs seconds
    c.contenders.xar_frames.samplers = {"guided": {"num_steps": 2}}
    c.contenders.ebt.samplers = {"think1": {"num_steps": 1}, "best_of2": {"num_steps": 1, "best_of": 2}}
    del c.contenders["nbp_2row"]  # two frames a block do not tile 5 frames
    c.choices.nbp_other = ("nbp_patch", "nbp_frame")
  c.reference = "ntp"  # its step FLOPs x budget_steps is every contender's training budget
  c.budget_steps = 300 if arg == "local" else 4
  c.seeds = (0, 1, 2) if arg != "tiny" else (0,)
  c.given_frames = 2  # next-frame prediction: the first frames given, the rest predicted
  c.num_videos = 256 if arg == "local" else 4  # generated per contender, sampler row and seed
  c.split = "test"  # choices were made on validation by the base configs; the comparison is reported once
  c.speed_batches = (1, 16) if arg != "tiny" else (4,)  # tiny: num_videos, one compiled sampler for both
  c.speed_repeats = 3 if arg != "tiny" else 1
  c.classifier_workdir = "runs/compare_digits_judge"  # video_classifier_digits.py:local,4x12 (trained if absent)
  c.workdir = f"runs/compare_digits_{arg}"
  c.data = ml_collections.ConfigDict()  # keys set on every contender's data section
  if arg == "tiny":
    c.data = ml_collections.ConfigDict({"num_frames": 5, "frame_size": 8, "num_train": 32, "num_test": 16})
  c.lock()
  return c


def _pod_config() -> ml_collections.ConfigDict:
  """The comparison at the paper's size on UCF-101 (module docstring); run on a pod with the tokens encoded
  (experiments/encode_tokens.py) and the videos prepared by tfds under data/tensorflow_datasets."""
  c = ml_collections.ConfigDict()
  c.arg = "pod"
  tokens = "nbp_ucf101.py:700M"
  one_class_token = {"num_class_tokens": 1}  # Aaren's prefix is one token; every token model has the same
  c.contenders = ml_collections.ConfigDict({
      "ntp": _contender(tokens, {"guided": {}}, model={"block": (1, 1, 1), "first_block": "start_block",
                                                       **one_class_token}),
      "ntp_aaren": _contender(tokens, {"guided": {}}, model={
          "block": (1, 1, 1), "first_block": "start_block", "attention": "aaren", **one_class_token}),
      "nbp_row": _contender(tokens, {"guided": {}}, model=one_class_token),
      "nbp_patch": _contender(tokens, {"guided": {}}, model={"block": (1, 4, 4), "first_block": "start_block",
                                                             **one_class_token}),
      "nbp_frame": _contender(tokens, {"guided": {}}, model={"block": (1, 16, 16), "first_block": "start_block",
                                                             **one_class_token}),
      # A frame per entity of 64 patches of 16x16x3; 20 adaLN blocks of width 1536 (16 heads).
      "xar_frames": _contender("xar_imagenet.py:L", {"guided": {}}, model={
          "variant": None, "num_layers": 20, "width": 1536, "num_heads": 16}, loss={"posterior": "mean"}),
      # A frame per token (49,152 values in, 49,152 out: 151M of the parameters), 20 layers of width 1536.
      "ebt": _contender("ebt_video.py:s2", {
          "think1": {"num_steps": 1}, "think2": {"num_steps": 2}, "think4": {"num_steps": 4},
          "best_of4": {"num_steps": 2, "best_of": 4}},
          model={"num_layers": 20, "width": 1536, "num_heads": 16, "mlp_dim": 6144, "num_classes": 101,
                 "scan_layers": True, "dtype": "bfloat16"},
          loss={"replay_size": 0, "class_dropout": 0.1, "num_steps": 3, "num_steps_max": 0}),
  })
  c.choices = ml_collections.ConfigDict({"nbp_other": ("nbp_patch", "nbp_frame")})
  c.choice_split = "validation"
  c.batch_size = 256  # nbp_ucf101.py's
  c.pixel_data = video_tokenizer_pod.get_config("ucf101").data  # the videos the tokens encode
  c.xar_patch = 16
  c.mesh = (("data", -1), ("fsdp", 8), ("tensor", 1))
  c.reference = "ntp"
  c.budget_steps = 100_000  # nbp_ucf101.py's
  c.seeds = (0, 1, 2)
  c.given_frames = 5  # of 17: the paper's frame prediction conditions on 5
  c.num_videos = 2048
  c.split = "test"
  c.speed_batches = (1, 16)
  c.speed_repeats = 3
  c.classifier_workdir = "runs/compare_ucf101_judge"
  c.workdir = "runs/compare_ucf101_pod"
  c.data = ml_collections.ConfigDict()
  c.lock()
  return c


def pixel_data(c) -> ml_collections.ConfigDict:
  """The data section of a pixel reader (xAR, EBT, the judge): the loop's defaults with c.pixel_data set."""
  data = config_lib.base_config().data
  data.update(c.pixel_data)
  return data


def judge_config(c) -> ml_collections.ConfigDict:
  """The judge's training config: the in-domain video classifier of the contenders' videos (its features give the
  FVD, its logits the class match). Local: video_classifier_digits.py:local,4x12; pod: the same network at its
  full width on the UCF-101 videos of the comparison, one of 101 actions per video."""
  if c.arg != "pod":
    return video_classifier_digits.get_config("local,4x12")
  config = video_classifier_digits.get_config("")
  with config.unlocked():
    config.data = pixel_data(c)
    config.data.update(c.data)  # the keys set on every contender's data
    config.model.num_classes = video_sources.num_classes(config.data)
    config.mesh = c.mesh
  return config


def contender_config(c, name: str, seed: int, num_steps: int | None = None) -> ml_collections.ConfigDict:
  """The training config of contender `name` and `seed`, `num_steps` steps (default its base config's); the
  sampler rows are not in it (experiments/compare.py applies them at sampling)."""
  if name not in c.contenders:
    raise ValueError(f"no contender {name!r} in the compare config; it has {sorted(c.contenders)}")
  spec = c.contenders[name]
  config = base_config(spec.base)
  with config.unlocked():
    for section, keys in spec.overrides.items():
      for key, value in keys.items():
        _set(config, f"{section}.{key}", value)
    if config.family in ("xar", "ebt"):  # the token models' videos: xAR stacks their frames (nbp/tasks/xar.py)
      config.data = pixel_data(c)
    for key, value in c.data.items():
      _set(config, f"data.{key}", value)
    _fit_to_videos(config, spec.base, c.xar_patch)
    config.batch_size = c.batch_size
    if c.mesh is not None:
      config.mesh = c.mesh
    if c.arg == "tiny":
      config.model.num_layers = 1
      config.log_every = 1
      config.keep_checkpoints = 1
    config.seed = seed
    if num_steps is not None:
      config.num_steps = num_steps
      config.optimizer.warmup_steps = max(1, num_steps // 10)
      config.checkpoint_every = max(1, num_steps // 3)
    config.evals = ml_collections.ConfigDict()  # experiments/compare.py measures after training
  config.lock()
  return config


def _fit_to_videos(config, base: str, patch: int) -> None:
  """The model fields the videos' shape sets: next_block's grid and block on pixels (the base's block kind;
  tokens keep the tokenizer's grid), xAR's grid of patch x patch patches of the stacked frames with a cell per
  frame."""
  if config.data.name == "tokens":
    return
  frames, size = config.data.num_frames, config.data.frame_size
  if config.family == "next_block":
    config.model.grid = (frames, size, size)
    kind = next(f for f in base.partition(":")[2].split(",") if f in nbp_digits.BLOCKS)
    config.model.block = nbp_digits.block_shape(kind, size)
  elif config.family == "xar":
    config.model.grid = (frames * size // patch, size // patch)
    config.model.token_dim = patch * patch * video_sources.num_channels(config.data)
    config.model.entity = "cell"
    config.model.cell = size // patch  # one entity per frame
    config.model.num_classes = video_sources.num_classes(config.data)


def base_config(base: str) -> ml_collections.ConfigDict:
  """"file.py:arg" of experiments/configs -> that config (unlocked)."""
  file, _, arg = base.partition(":")
  if not file.endswith(".py"):
    raise ValueError(f"contender base {base!r}: expected 'file.py:arg' of experiments/configs")
  config = importlib.import_module(f"experiments.configs.{file[:-3]}").get_config(arg)
  config.unlock()
  return config


def _set(config, dotted: str, value) -> None:
  *path, leaf = dotted.split(".")
  node = config
  for part in path:
    if part not in node:
      raise ValueError(f"compare config override {dotted}={value!r}: the contender's config has no {part!r}")
    node = node[part]
  node[leaf] = value  # a new key too (model fields a base config leaves at their default): the task checks them


