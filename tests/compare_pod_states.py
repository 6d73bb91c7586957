"""Builds the abstract sharded training state of every contender of compare_digits.py:pod, and of its judge, on 8
fake CPU devices.

Used by tests/test_compare.py in a subprocess (the device count is fixed at start-up). Nothing is allocated:
the states are jax.eval_shape's. Prints one JSON line: per contender, its parameter count, the largest
parameter's share of it held by one device, and the parameters that are split over the fsdp axis.
"""

import json

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # pylint: disable=g-import-not-at-top

from experiments.configs import compare_digits  # pylint: disable=g-import-not-at-top
from nbp.training import loop as train  # pylint: disable=g-import-not-at-top


def run():
  c = compare_digits.get_config("pod")
  report = {}
  configs = {name: compare_digits.contender_config(c, name, seed=0) for name in c.contenders}
  configs["judge"] = compare_digits.judge_config(c)
  for name, config in configs.items():
    s = train.setup(config)
    params = jax.tree.leaves(s.abstract_state.params)
    per_device = [x.sharding.shard_shape(x.shape) for x in params]
    report[name] = {
        "params": int(sum(np.prod(x.shape) for x in params)),
        "params_per_device": int(sum(np.prod(shape) for shape in per_device)),
        "mesh": dict(s.mesh.shape),
        "split": sum(shape != x.shape for shape, x in zip(per_device, params)),
        "leaves": len(params),
    }
  print(json.dumps(report))


if __name__ == "__main__":
  run()
