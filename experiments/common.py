"""Flags and set-up shared by experiments.train, .sample and .evaluate."""

from __future__ import annotations

import jax
from absl import flags, logging
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. experiments/configs/ntp_digits.py:S,local")
WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for multi-process runs. On a TPU pod or SLURM cluster, "
    "pass --multihost instead and jax finds the cluster itself.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() with auto-detection.")
NUM_CPU_DEVICES = flags.DEFINE_integer("num_cpu_devices", 0, "Fake CPU devices (tests and local sharding runs).")
# The encode scripts' (encode_tokens, encode_latents): a dataset encoded once by a trained autoencoder.
OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the encoded ArrayRecords and metadata.json go.")
SPLITS = flags.DEFINE_list("splits", ["train", "validation", "test"], "Splits to encode.")
ENCODE_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Examples encoded per call.")


def initialize() -> None:
  """Distributed start-up and device set-up, before any JAX computation."""
  if NUM_CPU_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", NUM_CPU_DEVICES.value)
  if COORDINATOR.value:
    # Several CPU processes (the local stand-in for a pod) need gloo collectives;
    # the setting only concerns the CPU backend, so it is harmless elsewhere.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(COORDINATOR.value, num_processes=NUM_PROCESSES.value,
                               process_id=PROCESS_ID.value)
  elif MULTIHOST.value:
    jax.distributed.initialize()
  logging.info("process %d of %d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend())
