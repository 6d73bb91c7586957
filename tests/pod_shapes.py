"""Builds the train state of each pod config abstractly on 8 fake CPU devices; prints one JSON line.

Used by tests/test_pod_configs.py in a subprocess (the device count is fixed at
start-up). Nothing is materialised: `train.setup` traces the init with
`jax.eval_shape` and derives the shardings from the logical axis rules, exactly
as a pod run does before its first compilation. Per config: parameter counts,
how the big kernels are split, and the share of the whole train state
(parameters and optimizer moments) one device holds.
"""

import json
import math
import os
import sys
import tempfile

import jax

jax.config.update("jax_num_cpu_devices", 8)

from experiments.configs import kl_vae_imagenet, nbp_kinetics600, nbp_ucf101, video_tokenizer_pod, xar_imagenet  # pylint: disable=g-import-not-at-top
from nbp.training import loop as train  # pylint: disable=g-import-not-at-top

BIG = 1 << 20  # a kernel of at least this many entries counts as big

CONFIGS = {
    "video_tokenizer_pod:ucf101": lambda: video_tokenizer_pod.get_config("ucf101"),
    "video_tokenizer_pod:kinetics600": lambda: video_tokenizer_pod.get_config("kinetics600"),
    "nbp_ucf101:700M": lambda: nbp_ucf101.get_config("700M"),
    "nbp_kinetics600:700M": lambda: nbp_kinetics600.get_config("700M"),
    "nbp_ucf101:3B": lambda: nbp_ucf101.get_config("3B"),
    "kl_vae_imagenet": kl_vae_imagenet.get_config,
    "xar_imagenet:B": lambda: xar_imagenet.get_config("B"),
    "xar_imagenet:H": lambda: xar_imagenet.get_config("H"),
}


def latent_dir_stand_in() -> str:
  """A latent directory holding only the metadata of 16x16x16 ImageNet latents (xAR reads their shape)."""
  directory = tempfile.mkdtemp()
  with open(os.path.join(directory, "metadata.json"), "w") as f:
    json.dump({"latent_shape": [16, 16, 16], "moments": True,
               "data": {"name": "imagenet2012", "image_size": 256}}, f)
  return directory


def _name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _axes(spec) -> set[str]:
  out = set()
  for entry in spec:
    if entry is None:
      continue
    out.update((entry,) if isinstance(entry, str) else entry)
  return out


def summarize(config) -> dict:
  s = train.setup(config, devices=jax.devices()[:8])
  params = jax.tree_util.tree_leaves_with_path(s.abstract_state.params)
  big = [(_name(p), leaf) for p, leaf in params if leaf.size >= BIG]
  state = jax.tree.leaves(s.abstract_state)
  per_device = sum(math.prod(x.sharding.shard_shape(x.shape)) for x in state)
  return {
      "mesh": dict(s.mesh.shape),
      "num_params": sum(leaf.size for _, leaf in params),
      "param_names": [_name(p) for p, _ in params],
      "param_sizes": [int(leaf.size) for _, leaf in params],
      "big_kernels": len(big),
      "big_over_fsdp": [n for n, leaf in big if "fsdp" in _axes(leaf.sharding.spec)],
      "big_not_over_fsdp": [n for n, leaf in big if "fsdp" not in _axes(leaf.sharding.spec)],
      "state_share_per_device": per_device / sum(x.size for x in state),
  }


def run(names):
  report = {}
  for name in names:
    config = CONFIGS[name]()
    if name.endswith(":3B"):
      config.unlock()
      config.mesh = (("data", -1), ("fsdp", 8), ("tensor", 1))  # 16-way on a pod; 8 devices here
    if name.startswith("xar_"):
      config.data.latent_dir = latent_dir_stand_in()
    report[name] = summarize(config)
  print(json.dumps(report))


if __name__ == "__main__":
  run(sys.argv[1:] or list(CONFIGS))
