r"""NBP's video tokenizer at the paper's scale: 17x128x128 RGB -> 5x16x16 tokens of 64,000 codes.

Argument: "ucf101" or "kinetics600" (the dataset the tokenizer is trained on;
the NBP authors trained one tokenizer per dataset, magvit2_ucf.pt and
magvit2_k600.pt).

Launch (TPU pod or GPU hosts; every host runs the same command):
  python -m experiments.train --config experiments/configs/video_tokenizer_pod.py:ucf101 \
      --workdir gs://BUCKET/video_tokenizer_ucf101 --multihost \
      --config.data.dir=/path/to/tensorflow_datasets
then encode the dataset once (one host; see experiments/encode_tokens.py) and
train NBP on the tokens (experiments/configs/nbp_ucf101.py,
experiments/configs/nbp_kinetics600.py).

Data (nbp.data.videos.video_source):
- ucf101: tfds-prepared `ucf101/ucf101_1_256` under data.dir (split 1: 9,537
  train and 3,783 test videos, as the official annotations/ucf_train.txt and
  ucf_val.txt), read without TensorFlow. Stride 3: the official training reads
  UCF-101 at 8 fps (scripts/lm_train/train_ucf.sh `--fps 8`; UCF-101 is 25 fps).
- kinetics600: class folders data.dir/train/<class>/<video> and
  data.dir/val/<class>/<video> ("test" reads "val", as the official
  evaluation reads annotations/k600_val.txt). Stride 2: the official code reads
  Kinetics at 16 fps (nbp/data.py default `--fps 16`; Kinetics is 25-30 fps).
One clip per video, centred (the official code draws a random clip per step).

Model: the official tokenizer's shape (nbp/magvit2.py of RenShuhuai-Andy/NBP):
channels 128 -> 256 -> 256 -> 512 (here 128 x (1, 2, 2, 4)), 4 residual blocks
per level, GroupNorm of 32 groups, 2x space on every stage and 2x time on the
last two (4x time, 8x space), FSQ levels (8, 8, 8, 5, 5, 5) (their README).
Their Swish with a learned beta per channel (activation="swish_beta") and
their resampling (resample="conv"): strided causal 3x3x3 convolutions down,
stride (1, 2, 2) then (2, 2, 2) twice, each keeping the width; up, a causal
3x3x3 convolution to 8 (or 4) times the width, then depth-to-space. 370M
parameters (294M with resample="space_to_depth", the cheaper option).
Losses: their README names a PatchGAN; their code carries LPIPS with VGG16
(nbp/modules/lpips.py and its heads, vgg.pth) but no tokenizer training
script, so neither weight nor start step was released and both terms are off.
Turn LPIPS on with a local weight file (nbp/models/vgg.py converts
torchvision's VGG16 and the LPIPS heads; nothing is downloaded):
  --config.loss.perceptual_weight=1.0 --config.loss.perceptual_weights_file=/path/lpips_vgg16.npz
and the GAN with --config.model.discriminator_channels=64 --config.loss.adversarial_weight=0.1.

Training numbers: the authors released no tokenizer training code, so batch,
learning rate, steps and EMA are our choice (the same as
video_tokenizer_digits.py:pod), not the paper's.

Sharding: the tokenizer's parameters carry no logical axis names, so they are
replicated (370M parameters, with Adam and EMA about 6 GB per chip in float32)
and the batch is split over every device: the mesh is data parallel.

Expected: not yet run. The authors' tokenizers reach rFVD 15.50 (UCF-101) and
6.73 (K600) at 128x128 (their README).
"""

from nbp.training import config as config_lib

DATASETS = ("ucf101", "kinetics600")


def set_data(c, dataset: str) -> None:
  """The data section for `dataset`, 17 frames of 128x128 RGB (shared with the NBP pod configs)."""
  if dataset not in DATASETS:
    raise ValueError(f"video_tokenizer_pod config argument must be one of {DATASETS}, got {dataset!r}")
  c.data.num_frames = 17  # 1 + 4*4 -> 5 latent frames
  c.data.frame_size = 128  # -> 16x16 latent
  if dataset == "ucf101":
    c.data.name = "ucf101"
    c.data.dir = "data/tensorflow_datasets"  # tfds data_dir holding ucf101/ucf101_1_256/2.0.0
    c.data.frame_stride = 3  # 25 fps -> ~8 fps (train_ucf.sh --fps 8)
  else:
    c.data.name = "video_folder"
    c.data.dir = "data/kinetics600"  # holds train/<class>/<video> and val/<class>/<video>
    c.data.frame_stride = 2  # 25-30 fps -> ~16 fps (nbp/data.py --fps default 16)
    c.data.split_folders = (("train", "train"), ("test", "val"))
  c.data.worker_count = 16  # video decoding in grain worker processes


def get_config(arg: str = "ucf101"):
  c = config_lib.base_config()
  c.family = "video_tokenizer"
  c.seed = 0
  set_data(c, arg)

  c.model.levels = (8, 8, 8, 5, 5, 5)  # FSQ, 64,000 codes
  c.model.channels = 128
  c.model.channel_multipliers = (1, 2, 2, 4)  # 128, 256, 256, 512
  c.model.num_res_blocks = 4
  c.model.time_factor = 4  # 17 frames -> 5 latent frames
  c.model.space_factor = 8  # 128 -> 16
  c.model.norm_groups = 32
  c.model.dtype = "bfloat16"
  c.model.out_channels = 3  # RGB
  c.model.discriminator_channels = 0  # the authors used a PatchGAN (64 wide here); weight not released
  c.model.activation = "swish_beta"  # the official Swish: x * sigmoid(beta x), beta learned per channel
  c.model.resample = "conv"  # the official strided causal 3x3x3 convs down, 3x3x3 conv + depth-to-space up

  c.loss.l1_weight = 1.0
  c.loss.mse_weight = 1.0
  c.loss.perceptual_weight = 0.0  # LPIPS: the official code carries it, its weight was not released
  c.loss.perceptual_weights_file = ""  # a local LPIPS/VGG16 .npz (nbp/models/vgg.py says how to make one)
  c.loss.perceptual_features = ""
  c.loss.adversarial_weight = 0.0
  c.sampler.num_samples = 4  # test videos reconstructed at each sampling step

  c.batch_size = 64
  c.num_steps = 100_000
  c.optimizer.lr = 1e-4
  c.optimizer.warmup_steps = 2000
  c.optimizer.b2 = 0.99
  c.optimizer.weight_decay = 1e-4
  c.optimizer.ema_decay = 0.999
  c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))  # parameters replicated (see the docstring)
  c.log_every = 100
  c.checkpoint_every = 5000
  c.evals.eval.every = 5000
  c.evals.eval.steps = 4
  c.lock()
  return c
