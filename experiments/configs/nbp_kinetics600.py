r"""NBP frame prediction on Kinetics-600: 2 latent frames (5 video frames) given, 3 generated.

17x128x128 videos as 5x16x16 tokens: a prefix of 2x16x16 = 512 tokens, then
768 tokens generated as 48 blocks of one latent row.
Argument: "SIZE[,i3d=PATH]", the model size "700M", "1.2B" or "3B"
(nbp.models.block_transformer.SIZES); with i3d=PATH, a local Kinetics-400 I3D
weight file (nbp/models/i3d.py), the run ends with the FVD at the paper's
protocol (nbp_pod.fvd_section).

Pipeline (each step on the pod's hosts unless said):
  1. tokenizer: python -m experiments.train \
       --config experiments/configs/video_tokenizer_pod.py:kinetics600 \
       --workdir gs://BUCKET/video_tokenizer_k600 --multihost
  2. tokens (one host): python -m experiments.encode_tokens \
       --config experiments/configs/video_tokenizer_pod.py:kinetics600 \
       --workdir gs://BUCKET/video_tokenizer_k600 --output_dir data/tokens_k600
  3. NBP: python -m experiments.train --config experiments/configs/nbp_kinetics600.py:700M \
       --workdir gs://BUCKET/nbp_k600_700M --multihost \
       --config.data.token_dir=data/tokens_k600

Hyperparameters of RenShuhuai-Andy/NBP, scripts/lm_train/train_k600.sh (shared
ones in nbp_pod.py): global batch 64 for every size (700M: 32 GPUs of 40 GB x 2;
1.2B: 64 of 40 GB x 1; 3B: 32 of 80 GB x 1 with `--grad_accumulates 2`), learning rate 1e-3 (700M),
5e-4 (1.2B), 2e-4 (3B), 10,000 warmup steps, `--max_steps 4000000` (the run
directory is named "steps4m"; the cosine runs over those 4M steps, so a run
stopped earlier never decays: how long they actually trained is not stated in
the repository). Batch 64 splits over at most 64 devices on the data axes; on
more, add a tensor axis.

Condition: theirs trains unconditionally on all 5 latent frames (`--unconditional`,
no begin token: the first row is never predicted) and predicts frames at
evaluation by feeding the first 2 latent frames as a prompt
(transformer_eval.py `frame_prediction`). So does this config
(`model.given_frames="blocks"`), except that its start block also predicts
the first row. `given_frames="prefix"` instead makes the 2 latent frames a
prefix seen by every block, with the loss on the 3 generated frames only.

Expected (the paper, 50k samples, FVD at 64x64): 25.5 (700M), 23.0 (1.2B),
19.5 (3B). Not yet run here.
"""

from experiments.configs import nbp_pod

# size -> (global batch, peak learning rate), scripts/lm_train/train_k600.sh
HYPERPARAMETERS = {"700M": (64, 1e-3), "1.2B": (64, 5e-4), "3B": (64, 2e-4)}


def get_config(arg: str = "700M"):
  size, i3d_path = nbp_pod.parse_argument(arg, "nbp_kinetics600", HYPERPARAMETERS)
  batch_size, lr = HYPERPARAMETERS[size]
  c = nbp_pod.pod_config("kinetics600", size, batch_size=batch_size, lr=lr, warmup_steps=10_000,
                         num_steps=4_000_000, token_dir="data/tokens_k600", i3d_path=i3d_path)
  c.model.condition = "frames"
  c.model.prefix_frames = 2  # latent frames given (= 5 video frames)
  c.model.given_frames = "blocks"  # theirs: trained on as ordinary blocks, fed to the sampler as a prompt
  c.lock()
  return c
