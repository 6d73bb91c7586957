"""The demo's stages, tiny, on 2 fake CPU devices (as `make demo` runs on CPU): each batch split between them.

Used by tests/test_train.py in a subprocess (the device count is fixed at start-up).
Arguments: DATA_DIR WORKDIR CLASSIFIER_WORKDIR. Runs the demo twice, the second time judging its samples with
the classifier, and prints both summaries and the tokens' metadata's mtime after each as one JSON line:
{"first": ..., "again": ..., "tokens_written": [t1, t2]}.
"""

import json
import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 2)

from experiments import demo  # pylint: disable=g-import-not-at-top
from tests.test_next_block import tiny_nbp_config  # pylint: disable=g-import-not-at-top
from tests.test_video_tokenizer import tiny_tokenizer_config  # pylint: disable=g-import-not-at-top


def run(data_dir, workdir, classifier):
  assert jax.device_count() == 2
  config = tiny_nbp_config(data_dir, "tiny,local,tokens,row", num_steps=3)
  tokenizer_config = tiny_tokenizer_config(data_dir, num_steps=2)
  metadata = os.path.join(workdir, "tokens", "metadata.json")
  first = demo.run(config, tokenizer_config, workdir)
  written = [os.path.getmtime(metadata)]
  again = demo.run(config, tokenizer_config, workdir, classifier=classifier, judged_videos=4)
  written.append(os.path.getmtime(metadata))
  print(json.dumps({"first": first, "again": again, "tokens_written": written}))


if __name__ == "__main__":
  run(*sys.argv[1:4])
