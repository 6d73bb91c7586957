"""A base for tfds builders whose data is generated locally (nothing to download).

tfds looks for a `checksums.tsv` beside a builder's code before preparing it;
for a builder inside a package this goes through `importlib_resources`, which
is not installed here. Generated datasets have no URLs to check, so the base
class declares no code path and tfds skips the lookup.

Several processes of one machine may ask for the same dataset at once (the
processes of a multi-process run, test workers, two runs sharing a data
directory): `prepare` takes an exclusive file lock beside the dataset, so one
process generates it and the others wait, then read what it wrote.
"""

import fcntl
import os

import tensorflow_datasets as tfds


class GeneratedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """GeneratorBasedBuilder for generated (or test-written) datasets."""

  code_path = None  # no checksums.tsv / metadata files to look up


def prepare(builder: tfds.core.DatasetBuilder, remake) -> tfds.core.DatasetBuilder:
  """`builder`'s dataset prepared as ArrayRecord, once per machine; returns a builder that reads it.

  remake: () -> a new builder of the same dataset. A builder made before
  another process finished preparing the dataset holds no splits; after the
  lock it is replaced by a new one, which reads what that process wrote.
  """
  directory = os.fspath(builder.data_dir)
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  with open(directory + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not builder.info.splits and os.path.exists(os.path.join(directory, "dataset_info.json")):
        builder = remake()
      builder.download_and_prepare(file_format="array_record")
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return builder
