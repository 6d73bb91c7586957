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

Argument: "local" (2 CPU cores) or "tiny" (the test suite's: 5 frames of 8x8,
one layer, a few steps, fewer sampler rows).
"""

import importlib

import ml_collections

from experiments.configs import nbp_digits, ntp_digits

ARGS = ("local", "tiny")


def _contender(base: str, samplers: dict, **overrides) -> ml_collections.ConfigDict:
  """base: "file.py:arg" of experiments/configs; overrides: sections of keys set on it (model={...})."""
  return ml_collections.ConfigDict({"base": base, "overrides": overrides, "samplers": samplers})


def get_config(arg: str = "local"):
  if arg not in ARGS:
    raise ValueError(f"compare_digits config argument must be one of {ARGS}, got {arg!r}")
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
      if "image_size" in config.data:
        del config.data["image_size"]
      config.data.name = "moving_digits"
      config.data.levels = ntp_digits.LEVELS
      ntp_digits.set_digits_data(config.data, local=True)
    for key, value in c.data.items():
      _set(config, f"data.{key}", value)
    _fit_to_videos(config, spec.base)
    config.batch_size = c.batch_size
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


def _fit_to_videos(config, base: str) -> None:
  """The model fields the videos' shape sets: next_block's grid and block (the base's block kind), xAR's grid of
  2x2 patches of the stacked frames with a cell per frame."""
  frames, size = config.data.num_frames, config.data.frame_size
  if config.family == "next_block":
    config.model.grid = (frames, size, size)
    kind = next(f for f in base.partition(":")[2].split(",") if f in nbp_digits.BLOCKS)
    config.model.block = nbp_digits.block_shape(kind, size)
  elif config.family == "xar":
    patch = 2
    config.model.grid = (frames * size // patch, size // patch)
    config.model.token_dim = patch * patch
    config.model.entity = "cell"
    config.model.cell = size // patch  # one entity per frame
    config.model.num_classes = 10 ** config.data.num_digits


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


