r"""Next-token transformer on moving digits (pixels quantised to tokens).

The baseline of NBP: the same model (nbp/models/block_transformer.py) with
1x1x1 blocks, no condition and 1D RoPE, on data made here from sklearn's real
handwritten digits. Each video is flattened frame by frame, row by row, into
F*H*W tokens of `levels` grey levels.

Launch (CPU, a few minutes):
  python -m experiments.train --config experiments/configs/ntp_digits.py:XS,local \
      --workdir runs/ntp_digits_local
On a GPU or TPU host, the full setting (16 frames of 32x32, 16384 tokens; not
yet run, so no expected figure yet):
  python -m experiments.train --config experiments/configs/ntp_digits.py:B \
      --workdir gs://BUCKET/ntp_digits_B --config.model.dtype=bfloat16

Argument: "SIZE[,local][,aaren]" with SIZE a key of nbp.models.block_transformer.SIZES. `aaren`
swaps every layer's softmax attention for Aaren's prefix-scan attention (same model otherwise; it
takes learned positions, as its learned query has no rotary position). `local` is the
2-core CPU setting: 4 frames of 12x12 pixels, one digit, 8 grey levels (576
tokens), batch 8, 300 steps. Expected (XS,local, 2.3 minutes on 2 cores): test
cross-entropy 0.478 nats/token (uniform over 8 levels would be ln 8 = 2.08
nats); samples show digit-like strokes drifting across frames, not yet clean
digits. The measured tables, against NBP: docs/nbp.md.
"""

from ml_collections import config_dict

from nbp.training import config as config_lib


def get_config(arg: str = "XS,local"):
  """The next-token baseline: nbp_digits.py's model and data with 1x1x1 blocks, no condition, 1D RoPE."""
  variant, *flags = arg.split(",")
  local = "local" in flags
  c = config_lib.base_config()
  c.family = "next_block"  # next-token prediction is next-block prediction with 1x1x1 blocks
  c.seed = 0

  c.data.name = "moving_digits"
  set_digits_data(c.data, local)

  c.model.codebook_size = LEVELS  # grey levels are the token values
  c.model.grid = (c.data.num_frames, c.data.frame_size, c.data.frame_size)
  c.model.block = (1, 1, 1)
  c.model.condition = "none"
  c.model.variant = variant  # a key of nbp.models.block_transformer.SIZES
  c.model.num_layers = config_dict.placeholder(int)  # set, it overrides the variant's depth
  c.model.activation = "swiglu"
  c.model.norm = "rmsnorm"
  c.model.position = "rope"  # 1D over the sequence
  c.model.dropout = 0.0  # on embeddings and residual branches in training
  c.model.scan_layers = not local  # CPU decoding is faster with unstacked layers
  c.model.remat_policy = "none" if local else "dots_with_no_batch_dims_saveable"
  c.model.attention_impl = "auto"  # kernels.dispatch: Pallas on GPU/TPU, block-sparse XLA on long CPU sequences
  c.model.dtype = "float32" if local else "bfloat16"
  if "aaren" in flags:
    set_aaren(c.model)

  c.sampler.num_samples = 8
  c.sampler.temperature = 1.0
  c.sampler.top_k = 0
  c.sampler.top_p = 1.0

  set_digits_budget(c, local)
  c.lock()
  return c


def set_aaren(model_cfg) -> None:
  """Aaren's attention in every layer; learned positions (RoPE rotates queries, and Aaren's query is a parameter)."""
  model_cfg.attention = "aaren"
  model_cfg.position = "learned"


LEVELS = 8  # grey levels of the pixels-as-tokens settings (the vocabulary, plus one begin token)


def set_digits_data(d, local: bool) -> None:
  """The moving-digits section shared by the pixels-as-tokens configs (NBP, NTP) and their judge."""
  d.num_frames = 4 if local else 16
  d.frame_size = 12 if local else 32
  d.num_digits = 1 if local else 2  # classes: 10 ** num_digits (ordered digit tuples)
  d.speed = 2.0
  d.num_train = 2000 if local else 20000
  d.num_validation = 200 if local else 2000  # validation scans carved from the train pool
  d.num_test = 200 if local else 2000


def set_digits_budget(c, local: bool) -> None:
  """Batch, steps, optimizer and hook cadence shared by the moving-digits configs,
  so NBP and its next-token baseline are compared at the same budget."""
  c.batch_size = 8 if local else 256
  c.num_steps = 300 if local else 50_000
  c.optimizer.lr = 2e-3 if local else 3e-4
  c.optimizer.warmup_steps = 30 if local else 1000
  c.optimizer.b2 = 0.95
  c.optimizer.ema_decay = 0.0 if local else 0.9999
  c.log_every = 10 if local else 100
  c.checkpoint_every = 100 if local else 2000
  c.evals.eval.every = 100 if local else 5000
  c.evals.eval.steps = 4
