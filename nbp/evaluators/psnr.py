"""Reconstruction PSNR of an autoencoder's sampler output: {"video" or "image", "reconstruction"} in [-1, 1].

The video tokenizer's sampler returns {"video", "reconstruction"}, the KL
VAE's {"image", "reconstruction"}; the PSNR (dB, on the [0, 1] scale, the mean
over examples) is the same rule for both.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nbp import reconstruction
from nbp.evaluators import samples as samples_lib

INPUT_KEYS = ("video", "image")  # what the sampler reconstructed, under one of these keys


@dataclasses.dataclass
class Evaluator:
  pred: str = "sample"  # the task's sampler, returning {"video" or "image", "reconstruction"}

  def run(self, context) -> dict[str, float]:
    s = context.setup
    s.task.predict_fn(self.pred, who="the psnr evaluator")  # a clear error when the family has none
    out = samples_lib.draw(s, context.params, jax.random.key(0), self.pred)
    given = [k for k in INPUT_KEYS if isinstance(out, dict) and k in out]
    if not given or "reconstruction" not in out:
      raise ValueError(f"the psnr evaluator needs {{'video' or 'image', 'reconstruction'}} samples; family "
                       f"{s.config.family!r} gives {sorted(out) if isinstance(out, dict) else type(out).__name__}")
    return {"psnr": float(reconstruction.psnr(jnp.asarray(out[given[0]]), jnp.asarray(out["reconstruction"])))}
