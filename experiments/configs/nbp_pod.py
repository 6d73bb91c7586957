"""The part shared by the NBP pod configs (nbp_ucf101.py, nbp_kinetics600.py); not a config itself.

NBP on video-tokenizer tokens: 17x128x128 videos encoded by
video_tokenizer_pod.py to 5x16x16 = 1,280 tokens of 64,000 codes
(experiments/encode_tokens.py writes them). What follows is taken from the
official code, RenShuhuai-Andy/NBP (file named on each line), unless marked
"ours":

- Transformer: minGPT (nbp/modules/gpt.py): learned absolute positions
  (`pos_emb`, one vector per sequence slot, 5,120 slots; `vtokens_pos` off),
  LayerNorm, GELU MLP of 4x width, no tied head. Sizes 700M / 1.2B / 3B =
  (24 layers, 1536 wide, 16 heads) / (24, 2048, 32) / (32, 3072, 32)
  (scripts/lm_train/train_*.sh), nbp.models.block_transformer.SIZES here. Dropout 0.1 on
  embeddings and residuals (`--transformer_dropout` default in nbp/lm_transformer.py; the
  scripts do not change it).
- Block: 16 tokens, one latent row 1x1x16 (`BLOCK=16`, `--token_number_per_step`).
- Optimizer (nbp/lm_transformer.py `configure_optimizers`): AdamW, betas
  (0.9, 0.95), weight decay 0.01 (theirs on Linear weights only; here on
  kernels and embeddings), gradient clipping 1.0 (`--grad_clip_val` default),
  timm cosine schedule with linear warmup from 0 (`--warmup_lr_init 0.`) to
  0 at the end (`--lr_min 0`). No EMA. Adam epsilon: PyTorch's default 1e-8.
- Precision: bfloat16 (`--bf16` in train_ucf.sh; commented out in
  train_k600.sh, so their K600 700M trained in float32).
- Sampling (scripts/lm_eval/eval_*.sh): top-k 16000, top-p 0.9, temperature 1.0.

Ours: scan over layers, rematerialisation, the mesh (FSDP over 8 devices for
700M and 1.2B, 16 for 3B; their runs used DeepSpeed ZeRO stage 1 on 32-64
GPUs), and everything about classifier-free guidance.
"""

from nbp.training import config as config_lib

SIZES = ("700M", "1.2B", "3B")
TOKEN_GRID = (5, 16, 16)  # (f, h, w) latent grid of a 17x128x128 video
CODEBOOK_SIZE = 64_000  # FSQ levels (8, 8, 8, 5, 5, 5)


def parse_argument(arg: str, config_name: str, sizes) -> tuple[str, str]:
  """(size, i3d_path) of a pod config's argument "SIZE[,i3d=PATH]" ("" when no I3D file is named)."""
  size, *rest = arg.split(",")
  if size not in sizes:
    raise ValueError(f"{config_name} config argument must start with one of {list(sizes)}, got {arg!r}")
  i3d_path = ""
  for part in rest:
    if not part.startswith("i3d=") or not part[len("i3d="):]:
      raise ValueError(f"{config_name} config argument {arg!r}: after the size only i3d=PATH (a local I3D weight "
                       f"file for the FVD evaluator), got {part!r}")
    i3d_path = part[len("i3d="):]
  return size, i3d_path


def fvd_section(dataset: str, i3d_path: str) -> dict:
  """The `fvd` evaluator at the paper's protocol, run at the end of training.

  The first 16 of the 17 frames, resized for the I3D in PyTorch's
  half-pixel convention as the authors' evaluation does, and for
  Kinetics-600 through 64x64 frames first (the paper's FVD there is at
  64x64). 2,048 videos per set; the paper's UCF-101 and Kinetics-600 figures
  use 10,000 and 50,000 (few videos bias FVD up).
  """
  return dict(type="fvd", i3d_path=i3d_path, every=0, num_videos=2048, num_frames=16, half_pixel_centers=True,
              downsample=64 if dataset == "kinetics600" else 0)


def pod_config(dataset: str, size: str, *, batch_size: int, lr: float, warmup_steps: int, num_steps: int,
               token_dir: str, i3d_path: str = ""):
  """The NBP config of `size` on the tokens of `dataset` ("ucf101" or "kinetics600"), unlocked.

  Samples are decoded by the tokenizer whose workdir the tokens' metadata.json
  names (experiments.encode_tokens records it). With `i3d_path` (a local
  Kinetics-400 I3D weight file; nothing is downloaded), the run also reports
  the FVD at the paper's protocol at its end (`fvd_section`).
  """
  if size not in SIZES:
    raise ValueError(f"NBP pod config size must be one of {SIZES}, got {size!r}")
  c = config_lib.base_config()
  c.family = "next_block"
  c.seed = 0

  c.data.name = "tokens"
  c.data.token_dir = token_dir  # experiments/encode_tokens.py output: {train,test}.array_record, metadata.json
  c.data.worker_count = 0  # tokens are small: reading them in the main process is enough

  c.model.codebook_size = CODEBOOK_SIZE  # checked against metadata.json when the data is read
  c.model.grid = TOKEN_GRID
  c.model.variant = size  # nbp.models.block_transformer.SIZES
  c.model.activation = "gelu"  # theirs; "swiglu" is the modern choice
  c.model.norm = "layernorm"  # theirs; or "rmsnorm"
  c.model.position = "learned"  # theirs (absolute, per slot); "rope3d" is the alternative here
  c.model.dropout = 0.1  # theirs, on embeddings and residuals
  c.model.tie_embeddings = False
  c.model.scan_layers = True
  c.model.remat_policy = "dots_with_no_batch_dims_saveable"
  c.model.attention_impl = "auto"  # kernels.dispatch: Pallas on GPU/TPU
  c.model.dtype = "bfloat16"
  c.model.block = (1, 1, TOKEN_GRID[2])  # one latent row, 16 tokens
  c.model.condition = "none"  # set by the dataset's config

  c.loss.cond_dropout = 0.0
  c.sampler.guidance_scale = 1.0  # 1.0: plain conditional sampling
  c.sampler.temperature = 1.0
  c.sampler.top_k = 16_000
  c.sampler.top_p = 0.9
  c.sampler.num_samples = 8

  c.batch_size = batch_size
  c.num_steps = num_steps
  c.optimizer.lr = lr
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.01
  c.optimizer.clip_norm = 1.0
  c.optimizer.warmup_steps = warmup_steps
  c.optimizer.schedule = "cosine"
  c.optimizer.final_lr_fraction = 0.0
  c.optimizer.ema_decay = 0.0
  # Parameters and optimizer state split 8 (16 for 3B) ways along "embed"; the
  # batch over data x fsdp, so batch_size must divide by the device count.
  c.mesh = (("data", -1), ("fsdp", 16 if size == "3B" else 8), ("tensor", 1))
  c.log_every = 50  # theirs: 49 (transformer_train.py)
  c.checkpoint_every = 10_000  # theirs: --save_every_n_train_steps 10000
  c.evals.eval.every = 10_000
  c.evals.eval.steps = 8
  c.evals.sample.every = 0  # samples at the end only (decoding needs the tokenizer's checkpoint)
  if i3d_path:
    c.evals.fvd = fvd_section(dataset, i3d_path)
  return c
