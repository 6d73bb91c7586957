"""Reconstruction PSNR of an autoencoder's sampler output: {"video" or "image", "reconstruction"} in [-1, 1].

The video tokenizer's sampler returns {"video", "reconstruction"}, the KL
VAE's {"image", "reconstruction"}; the PSNR (dB, on the [0, 1] scale, the mean
over examples) is the same rule for both.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nbp.evaluators import samples as samples_lib
from nbp.tasks import video_tokenizer

INPUT_KEYS = ("video", "image")  # what the sampler reconstructed, under one of these keys


@dataclasses.dataclass
class Evaluator:

  def run(self, context) -> dict[str, float]:
    s = context.setup
    if s.task.sample is None:
      raise ValueError("the psnr evaluator needs a sampler returning {'video' or 'image', 'reconstruction'} "
                       "(config.sampler.num_samples > 0)")
    out = samples_lib.draw(s, context.params, jax.random.key(0))
    given = [k for k in INPUT_KEYS if isinstance(out, dict) and k in out]
    if not given or "reconstruction" not in out:
      raise ValueError(f"the psnr evaluator needs {{'video' or 'image', 'reconstruction'}} samples; family "
                       f"{s.config.family!r} gives {sorted(out) if isinstance(out, dict) else type(out).__name__}")
    return {"psnr": float(video_tokenizer.psnr(jnp.asarray(out[given[0]]), jnp.asarray(out["reconstruction"])))}
