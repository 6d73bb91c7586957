r"""Next-token transformer on the bytes of CPython's documentation topics.

EBT's Transformer++ baseline setting (RoPE, SwiGLU, RMSNorm) at byte level on
`pydoc_data.topics` (about 465 KB of English shipped with Python); every tenth
topic is held out as the test split.

Launch (2 CPU cores):
  python -m experiments.train --config experiments/configs/ntp_text.py:S,local \
      --workdir runs/ntp_text_local
Expected: not yet measured (run time and loss alike).

Argument: "SIZE[,local][,aaren]" with SIZE a key of nbp.models.block_transformer.SIZES; `local` trains
256-byte windows at batch 16 for 300 steps on 2 CPU cores; `aaren` swaps every layer's softmax attention
for Aaren's prefix-scan attention (ntp_digits.set_aaren).
"""

import ml_collections

from experiments.configs import ntp_digits


def get_config(arg: str = "S,local"):
  local = "local" in arg.split(",")
  c = ntp_digits.get_config(arg)
  c.unlock()
  seq_len = 256 if local else 1024
  c.data = ml_collections.ConfigDict(dict(name="text", dir=c.data.dir, worker_count=c.data.worker_count))
  c.model.codebook_size = 256  # bytes
  c.model.grid = (1, 1, seq_len)  # text is a 1 x 1 x N grid
  c.sampler.num_samples = 4
  c.sampler.top_p = 0.9
  c.lock()
  return c
