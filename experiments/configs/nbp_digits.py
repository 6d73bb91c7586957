r"""Next-block prediction (NBP) on moving digits: video-tokenizer tokens, or pixels as tokens.

With `tokens`, the token grid is the latent grid of the video tokenizer of
video_tokenizer_digits.py; the tokens are read from `data.token_dir`, and
samples are decoded by the tokenizer whose workdir the tokens' metadata names. Without it, the grid is F x H x W pixels quantised
to `levels` grey levels, no tokenizer needed. Blocks are cut from the grid and
predicted one block per step (nbp/tasks/next_block.py).

`make demo` runs XS,local,tokens,row (experiments/demo.py trains the
tokenizer, encodes the tokens and trains this model, in one workdir). By hand:
  python -m experiments.train --config experiments/configs/video_tokenizer_digits.py:local \
      --workdir runs/video_tokenizer_local
  python -m experiments.encode_tokens --config experiments/configs/video_tokenizer_digits.py:local \
      --workdir runs/video_tokenizer_local --output_dir runs/video_tokens_local
  python -m experiments.train --config experiments/configs/nbp_digits.py:XS,local,tokens,row \
      --workdir runs/nbp_tokens_local
Expected (the demo: 2 CPU cores, four class tokens, 1000 steps of batch 8 on
5x8x8 tokens of 125 codes, 286 s; 8m38s alone with the 600-step tokenizer, or
8m30s on a slower machine with the demo's two CPU devices, where 0.70 is found):
validation cross-entropy 0.887 nats/token; sampled at top-p 0.9 with guidance
2, the digit asked for is found in 0.71 of 128 videos by
video_classifier_digits.py:5x16 (0.73 by a second judge; fvd_digits_classifier
50.8, floor 28.0); the measured tables are in docs/nbp.md.

Pixels as tokens (2 CPU cores, 300 steps of batch 8, 2.4 minutes):
  python -m experiments.train --config experiments/configs/nbp_digits.py:XS,local,row \
      --workdir runs/nbp_digits_local
Frame prediction (the first 2 frames given, the last 2 generated):
  python -m experiments.train --config experiments/configs/nbp_digits.py:XS,local,row,frames \
      --workdir runs/nbp_digits_frames_local
On a GPU or TPU host (16 frames of 32x32 = 16384 tokens; not yet run):
  python -m experiments.train --config experiments/configs/nbp_digits.py:B,row \
      --workdir gs://BUCKET/nbp_digits_B --config.model.dtype=bfloat16

Argument: "SIZE[,local][,tokens][,BLOCK][,frames|uncond]" with SIZE a key of
nbp.models.block_transformer.SIZES and BLOCK one of
  row    1 x 1 x W  one token row (the paper's best), the default
  2row   2 x 1 x W  a row in two consecutive frames
  patch  1 x 4 x 4  square patches
  frame  1 x H x W  a whole frame per step
  token  1 x 1 x 1  next-token prediction: the NTP baseline from the same code
The default condition is the class of the digit (UCF-101 style, class tokens as
a prefix, condition dropout 0.1 for classifier-free guidance); "frames" gives
the first half of the frames as a prefix (Kinetics style); "uncond" neither.
`local` is the 2-core CPU setting: 4 frames of 12x12 pixels, one digit, 8 grey
levels (576 tokens), batch 8, 300 steps. Its rows and tokens against the
next-token baseline (test cross-entropy, in-domain FVD, sampling speed):
docs/nbp.md.
"""

import ml_collections
from ml_collections import config_dict

from experiments.configs import ntp_digits, video_tokenizer_digits
from nbp.training import config as config_lib

BLOCKS = ("row", "2row", "patch", "frame", "token")
TOKEN_DIR = "runs/video_tokens_local"  # experiments.encode_tokens --output_dir (the demo sets its own)


def block_shape(name: str, frame_size: int) -> tuple[int, int, int]:
  return {"row": (1, 1, frame_size), "2row": (2, 1, frame_size), "patch": (1, 4, 4),
          "frame": (1, frame_size, frame_size), "token": (1, 1, 1)}[name]


def get_config(arg: str = "XS,local,row"):
  variant, *flags = arg.split(",")
  unknown = set(flags) - {"local", "tokens", "frames", "uncond", *BLOCKS}
  if unknown:
    raise ValueError(f"unknown config flags {sorted(unknown)} in {arg!r}")
  local = "local" in flags
  block = next((f for f in flags if f in BLOCKS), "row")
  condition = "frames" if "frames" in flags else "none" if "uncond" in flags else "class"
  c = config_lib.base_config()
  c.family = "next_block"
  c.seed = 0

  videos = ml_collections.ConfigDict()
  ntp_digits.set_digits_data(videos, local)
  if "tokens" in flags:
    # The latent grid of video_tokenizer_digits.py's tokenizer: its videos, its FSQ codebook.
    tokenizer = video_tokenizer_digits.get_config("local" if local else "pod")
    videos = tokenizer.data
    c.data.name = "tokens"
    c.data.token_dir = TOKEN_DIR
    c.model.codebook_size = video_tokenizer_digits.codebook_size(tokenizer)
    c.model.grid = video_tokenizer_digits.token_grid(tokenizer)
  else:
    c.data.name = "moving_digits"
    for key, value in videos.items():
      c.data[key] = value
    c.model.codebook_size = ntp_digits.LEVELS  # grey levels are the token values
    c.model.grid = (videos.num_frames, videos.frame_size, videos.frame_size)
  grid = c.model.grid

  c.model.block = block_shape(block, grid[2])  # (t, h, w) tokens per block
  c.model.condition = condition  # "none", "class" or "frames"
  c.model.num_classes = 10 ** videos.num_digits if condition == "class" else 0  # ordered digit tuples
  c.model.num_class_tokens = 1 if local else 4  # prefix tokens per class
  c.model.prefix_frames = grid[0] // 2 if condition == "frames" else 0
  c.model.given_frames = "prefix"  # frames: a prefix every block sees, or "blocks" trained on (the authors' K600)
  c.model.first_block = "start_block"  # or "tokens": block 0 token by token (the authors' UCF-101 model)
  c.model.in_block = "independent"  # the paper's; or "causal": a small stack draws a block's tokens jointly
  c.model.in_block_layers = 1  # layers of that stack
  c.model.variant = variant  # a key of nbp.models.block_transformer.SIZES
  c.model.num_layers = config_dict.placeholder(int)  # set, it overrides the variant's depth
  c.model.activation = "swiglu"
  c.model.norm = "rmsnorm"
  c.model.position = "rope3d"  # or "rope3d_split", "learned" (the paper's code) or "rope" (1D over slots)
  c.model.absolute_positions = False  # rope3d*: also learned (t, h, w) embeddings of what each slot holds
  # Dropout on embeddings and residual branches in training (the paper's code: 0.1). Local: none, measured on
  # validation (XS,local,row pixels, 300 steps, seed 0): cross-entropy 0.5391 without, 0.5419 with 0.1.
  c.model.dropout = 0.0
  c.model.scan_layers = not local  # CPU decoding is 2-3x faster with unstacked layers
  c.model.remat_policy = "none" if local else "dots_with_no_batch_dims_saveable"
  c.model.attention_impl = "auto"  # kernels.dispatch
  c.model.dtype = "float32" if local else "bfloat16"

  c.loss.cond_dropout = 0.1 if condition == "class" else 0.0  # null class in training (CFG)
  # The paper's teacher forcing; p: each token read as the model's own draw with probability p. Frame prediction
  # (XS,local,row,frames fine-tuned 2,000 steps from a 10,000-step run, docs/nbp.md "Reading its own draws"):
  # the mean of 8 draws misses by 1.136 px at p = 1, 1.179 at 0.5, 1.231 teacher forced (training seed 1; on the
  # test split at top-p 1.0, 0.475 and 0.502 of repeat-last for training seeds 1 and 2). At the frames config's
  # own 300 steps (training seeds 0 / 1, one draw, 64 validation videos): 1.712 / 1.664 at p = 1 against
  # 1.701 / 1.810, better on one seed only, and a worse pixel MSE (0.108 / 0.104 against 0.092 / 0.101): off.
  c.loss.context_draws = 0.0
  c.sampler.num_samples = 8
  c.sampler.guidance_scale = 1.0  # 1.0: plain conditional sampling (no doubled batch)
  c.sampler.temperature = 1.0
  c.sampler.top_k = 0
  c.sampler.top_p = 0.9 if not local else 1.0
  c.sampler.candidates = 1  # K > 1: K draws per condition, one kept by `selection`
  # The draw agreeing most with the others, or "likelihood": the likeliest under the model. Frame prediction
  # (XS,local,row,frames, 50,000 videos, 12,000 steps, seed 1; centres before the background fix): the likeliest
  # of 8 misses by 1.35 px, one draw by 1.39, the pixel mean of 8 draws by 1.24 (docs/nbp.md).
  c.sampler.selection = "consensus"

  ntp_digits.set_digits_budget(c, local)
  c.optimizer.weight_decay = 0.01
  if local and "tokens" in flags:
    # make demo's budget (docs/nbp.md, "The demo's samples"): chosen on validation with the 5x16 judge, on the
    # tokens of the demo's 600-step tokenizer, 1000 steps. Four class tokens (the pod's) against one: the digit
    # asked for is found in 0.71 of the samples against 0.42 (top-p 0.9, guidance 2); guidance 2 against 1.5 /
    # 2.5 / 3: 0.71 against 0.69 / 0.61 / 0.56.
    c.model.num_class_tokens = 4
    c.num_steps = 1000
    c.sampler.top_p = 0.9
    c.sampler.guidance_scale = 2.0
  if local and "tokens" not in flags and condition == "class" and block == "row":
    # Chosen on validation (300 steps, training seeds 0 and 1, 128 videos, the local,4x12 judge): guidance 3 with
    # top-p 0.9 gives fvd_digits_classifier 96.6 / 120.4, guidance 3 alone 108.5 / 133.8, top-p 1.0 unguided
    # (before) 206.4 / 214.7 (docs/nbp.md).
    c.sampler.top_p = 0.9
    c.sampler.guidance_scale = 3.0
  if local and "tokens" not in flags and condition == "class" and block == "token":
    # Chosen on validation (300 steps, sampling seeds 0 and 1, 128 videos, the local,4x12 judge):
    # fvd_digits_classifier at top-p 1.0 unguided 98.2, top-p 0.9 113.7, top-p 0.8 207.2, temperature 0.9 92.1,
    # guidance 3 74.4 (class match 0.37 against 0.26), top-p 0.9 with guidance 3 80.9 (docs/nbp.md).
    c.sampler.guidance_scale = 3.0
  if condition == "frames":  # the predicted frames against the true ones, at the end (nbp.evaluators.frame_prediction)
    c.evals.frames = dict(type="frame_prediction", every=0, num_videos=64 if local else 256, batch_size=16, seed=0,
                          draws=1, belief=False)
    if local and "tokens" not in flags:
      # Chosen on validation (XS pixels, 300 steps, seeds 0 and 1, 64 videos; centre-of-mass error in pixels, taken
      # before the centres left out the decoded background; repeating the last given frame: 2.16): rope3d 1.80,
      # rope3d_split 1.73; top-p 0.9 1.73 and 1.61,
      # temperature 0.8 worse (1.86, 1.74). Given frames as blocks: 1.80 (rope3d), no better than a prefix.
      # 20,000 training videos: cross-entropy 0.094-0.098 against 0.469 at 1,000 steps, but 1.66-1.74 px
      # against 1.65 (docs/nbp.md, "What the given frames leave open"): 2,000 kept. Absolute positions beside
      # rope3d_split: 1.67 on both seeds at this budget, against 1.57 and 1.65 without (at 9,000 steps on 50,000
      # videos they reach in 9,000 steps what rope alone did in 24,000; docs/nbp.md, "Where each token sits").
      c.model.position = "rope3d_split"
      c.sampler.top_p = 0.9
  c.lock()
  return c
