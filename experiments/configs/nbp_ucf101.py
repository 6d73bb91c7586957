r"""NBP class-conditional generation on UCF-101 (101 classes), 17x128x128 videos as 5x16x16 tokens.

Argument: "SIZE[,i3d=PATH]", the model size "700M", "1.2B" or "3B"
(nbp.models.block_transformer.SIZES); with i3d=PATH, a local Kinetics-400 I3D
weight file (nbp/models/i3d.py), the run ends with the FVD at the paper's
protocol (nbp_pod.fvd_section).

Pipeline (each step on the pod's hosts unless said):
  1. tokenizer: python -m experiments.train \
       --config experiments/configs/video_tokenizer_pod.py:ucf101 \
       --workdir gs://BUCKET/video_tokenizer_ucf101 --multihost
  2. tokens (one host): python -m experiments.encode_tokens \
       --config experiments/configs/video_tokenizer_pod.py:ucf101 \
       --workdir gs://BUCKET/video_tokenizer_ucf101 --output_dir data/tokens_ucf101
  3. NBP: python -m experiments.train --config experiments/configs/nbp_ucf101.py:700M \
       --workdir gs://BUCKET/nbp_ucf101_700M --multihost \
       --config.data.token_dir=data/tokens_ucf101

Hyperparameters of RenShuhuai-Andy/NBP, scripts/lm_train/train_ucf.sh (shared
ones in nbp_pod.py): global batch 256 for every size (64 GPUs x 4; the 3B
line's `--grad_accumulates 2` is commented out), learning rate 6e-4 for every
size, 5,000 warmup steps, 100,000 steps (`--max_steps 100000`), bfloat16.
Hardware there: 64 GPUs of 40 GB (700M) or 80 GB (1.2B, 3B), DeepSpeed stage 1.

Condition: theirs is the class name as text (`--cond_stage_key text
--cond_token_num 8`: up to 8 LLaMA-tokenizer tokens, `--hybrid`); here
`num_class_tokens` = 8 learned tokens per class, a prefix seen by every block.
They train without condition dropout (`--p_drop_cond` unset) and evaluate with
cfg 0.0 (scripts/lm_eval/eval_ucf.sh); here 10% of the training conditions are
dropped (ours), so --config.sampler.guidance_scale > 1 gives classifier-free
guidance; 1.0 samples as they do.

The first block (`--hybrid`): theirs draws the first latent row token by
token from a begin-of-video token, then switches to rows; so does this config
(`model.first_block="tokens"`). "start_block" instead predicts the first row
in one step from a block of begin tokens. The block kernels take blocks of
one size, so with the token-by-token first row the dispatcher runs XLA's
dense attention.

Expected (the paper, 10k samples, FVD at 128x128): 103.3 (700M), 85.8 (1.2B),
55.3 (3B). Not yet run here.
"""

from experiments.configs import nbp_pod

# size -> (global batch, peak learning rate), scripts/lm_train/train_ucf.sh
HYPERPARAMETERS = {"700M": (256, 6e-4), "1.2B": (256, 6e-4), "3B": (256, 6e-4)}


def get_config(arg: str = "700M"):
  size, i3d_path = nbp_pod.parse_argument(arg, "nbp_ucf101", HYPERPARAMETERS)
  batch_size, lr = HYPERPARAMETERS[size]
  c = nbp_pod.pod_config("ucf101", size, batch_size=batch_size, lr=lr, warmup_steps=5000, num_steps=100_000,
                         token_dir="data/tokens_ucf101", i3d_path=i3d_path)
  c.model.condition = "class"
  c.model.num_classes = 101
  c.model.num_class_tokens = 8  # theirs: 8 text tokens of the class name
  c.model.first_block = "tokens"  # theirs (--hybrid): the first row token by token
  c.loss.cond_dropout = 0.1  # ours: trains the null class for classifier-free guidance
  c.lock()
  return c
