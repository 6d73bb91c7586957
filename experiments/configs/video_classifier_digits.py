r"""Video classifier on moving digits: the feature network of the in-domain FVD.

Trains `nbp.video_classifier.VideoClassifier` (a 3-stage 3D CNN, multi-label
head over the 10 digit classes) with the shared loop. Its penultimate features
give `digits_fvd` ("fvd_digits_classifier"); train it on the same data knobs
(frames, frame size, digits) as the generator it will judge, e.g.
`--config.data.num_frames=9 --config.data.frame_size=32`.

Launch (CPU, 2 cores):
  python -m experiments.train --config experiments/configs/video_classifier_digits.py:local \
      --workdir runs/video_classifier_digits_local
Full setting (GPU/TPU; not yet run):
  python -m experiments.train --config experiments/configs/video_classifier_digits.py \
      --workdir gs://BUCKET/video_classifier_digits

Argument: "" or "local". `local`: 16 frames of 32x32, two digits, 4000
training videos, batch 32, 1500 steps.
Measured (local): not yet measured. A run started here (2 shared cores, other
jobs running) took about 1 s per step, so the 1500 steps need roughly 25
minutes; after 150 steps of an earlier, smaller variant the loss was still at
the class prior (about 4.9 nats), so expect the accuracy to rise late. Check
`eval/accuracy` (exact set of digits) in the workdir's metrics.jsonl.
"""

from nbp import config as config_lib


def get_config(arg: str = "local"):
  local = "local" in arg.split(",")
  c = config_lib.base_config()
  c.family = "video_classifier"
  c.seed = 0

  c.model.widths = (16, 32, 64) if local else (32, 64, 128)  # channels per stage
  c.model.feature_dim = 128 if local else 256  # the FVD feature width
  c.model.dtype = "float32" if local else "bfloat16"

  c.data.name = "moving_digits"
  c.data.num_frames = 16
  c.data.frame_size = 32
  c.data.num_digits = 2
  c.data.speed = 2.0
  c.data.num_train = 4000 if local else 20000
  c.data.num_test = 500 if local else 2000

  c.batch_size = 32 if local else 256
  c.num_steps = 1500 if local else 10_000
  c.optimizer.lr = 2e-3 if local else 1e-3
  c.optimizer.warmup_steps = 50 if local else 500
  c.optimizer.weight_decay = 0.01
  c.log_every = 50 if local else 100
  c.checkpoint_every = 500 if local else 2000
  c.eval_every = 500 if local else 2000
  c.eval_steps = 8
  c.lock()
  return c
