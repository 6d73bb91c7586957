r"""Next-token transformer on the bytes of CPython's documentation topics.

EBT's Transformer++ baseline setting (RoPE, SwiGLU, RMSNorm) at byte level on
`pydoc_data.topics` (about 465 KB of English shipped with Python); every tenth
topic is held out as the test split.

Launch (CPU):
  python -m experiments.train --config experiments/configs/ntp_text.py:S,local \
      --workdir runs/ntp_text_local

Argument: "SIZE[,local]" with SIZE a key of nbp.ntp.SIZES; `local` trains 256-byte
windows at batch 16 for 300 steps on 2 CPU cores.
"""

from experiments.configs import ntp_digits


def get_config(arg: str = "S,local"):
  size, *flags = arg.split(",")
  local = "local" in flags
  c = ntp_digits.get_config(arg)
  c.unlock()
  c.data.name = "text"
  c.data.seq_len = 256 if local else 1024
  c.data.num_frames = c.data.frame_size = c.data.num_digits = 0
  c.data.levels = 0
  c.model.num_samples = 4
  c.model.top_p = 0.9
  c.lock()
  del size
  return c
