"""A base for tfds builders whose data is generated locally (nothing to download).

tfds looks for a `checksums.tsv` beside a builder's code before preparing it;
for a builder inside a package this goes through `importlib_resources`, which
is not installed here. Generated datasets have no URLs to check, so the base
class declares no code path and tfds skips the lookup.
"""

import tensorflow_datasets as tfds


class GeneratedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """GeneratorBasedBuilder for generated (or test-written) datasets."""

  code_path = None  # no checksums.tsv / metadata files to look up
