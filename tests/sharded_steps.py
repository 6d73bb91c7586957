"""Runs two train steps of the tiny baseline under several meshes of 8 fake CPU devices.

Used by tests/test_train.py in a subprocess (the device count is fixed at start-up).
Prints one JSON line: per mesh, the losses, the largest parameter difference from
the one-device run, and whether any parameter is actually split across devices.
"""

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # pylint: disable=g-import-not-at-top

from nbp.training import loop as train  # pylint: disable=g-import-not-at-top
from nbp.training import sharding  # pylint: disable=g-import-not-at-top
from tests.conftest import tiny_ntp_config  # pylint: disable=g-import-not-at-top

MESHES = {
    "one_device": ((("data", 1), ("fsdp", 1), ("tensor", 1)), 1),
    "data8": ((("data", 8), ("fsdp", 1), ("tensor", 1)), 8),
    "fsdp8": ((("data", 1), ("fsdp", 8), ("tensor", 1)), 8),
    "data2_fsdp2_tensor2": ((("data", 2), ("fsdp", 2), ("tensor", 2)), 8),
}


def run(data_dir):
  report, reference = {}, None
  for name, (mesh, num_devices) in MESHES.items():
    config = tiny_ntp_config(data_dir, mesh=mesh, batch_size=16, grad_accum_steps=1)
    s = train.setup(config, devices=jax.devices()[:num_devices])
    state = train.init_state(s, config.seed)
    it = train.data_iterator(s, "train", config.seed)
    with s.context():
      step = train.compile_train_step(s)
      losses = []
      for _ in range(2):
        state, metrics = step(state, sharding.global_batch(next(it), s.batch_sharding), jax.random.key(1))
        losses.append(float(metrics["loss"]))
    params = jax.device_get(state.params)
    split = any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state.params))
    if reference is None:
      reference = params
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)))
    report[name] = {"losses": losses, "max_param_diff": diff, "sharded_params": split}
  print(json.dumps(report))


if __name__ == "__main__":
  run(sys.argv[1])
