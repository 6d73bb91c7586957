r"""Encodes an image dataset once into KL-VAE latents, as ArrayRecord files (xAR's input).

  python -m experiments.encode_latents \
      --workdir runs/kl_vae_local --output_dir runs/latents_local

`--workdir` names the trained VAE (its config.json says which images it was
trained on, and those are encoded: digits or imagenet2012, read by
`nbp.data.images.image_source`); a `--config` replaces that data section by
its own. `--splits` (default train, validation, test) names the splits
encoded; the validation split is carved from train by the image source, as
`config.data.validation_fraction` and `validation_seed` say. `--flips` stores
each image's horizontal mirror as a second view (xAR's training picks one of
the two at random). After training with experiments/configs/kl_vae_imagenet.py,
on one host (the latents are written with local file APIs):

  python -m experiments.encode_latents --workdir gs://BUCKET/kl_vae_imagenet \
      --output_dir data/latents_imagenet256 --flips --batch_size 256

The output directory then holds, per split, `<split>.array_record` with one
record per image, {"latent": float32 [V, h, w, c] (the posterior mean,
unscaled), "logvar": float32 [V, h, w, c] (its log-variance), "label": int32}
(V = 2 with --flips, else 1), in the dataset's order, and `metadata.json`
(the VAE's workdir, the image data section, latent shape, flips, counts,
"moments": true, and the scaling factor: 1 / std of the train means). With
both moments xAR can train on the posterior mean or on a fresh draw from the
posterior at every step (`config.loss.posterior`). The scaling factor is also
written into the VAE's workdir as latent_scale.json, beside its checkpoints.
The library side is `nbp.tasks.kl_vae.encode_latents` over
`nbp.data.latents`; xAR reads the directory with
`config.data.name = "latents"`, `config.data.latent_dir`.
"""

from __future__ import annotations

import json

import jax
from absl import app, flags

from experiments import common
from nbp.tasks import kl_vae

FLIPS = flags.DEFINE_bool("flips", False, "Also store each image's horizontal mirror (two views per record).")


def main(argv):
  del argv
  common.initialize()
  if jax.process_count() > 1:
    raise ValueError("encode_latents runs in one process.")
  config = common.CONFIG.value  # optional: its data section replaces the VAE's own
  metadata = kl_vae.encode_latents(
      common.WORKDIR.value, common.OUTPUT_DIR.value, data_cfg=config.data if config is not None else None,
      splits=tuple(common.SPLITS.value), flips=FLIPS.value, batch_size=common.ENCODE_BATCH_SIZE.value)
  print(json.dumps(metadata, sort_keys=True))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "output_dir"])
  app.run(main)
