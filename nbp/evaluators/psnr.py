"""Reconstruction PSNR of an autoencoder's sampler output ({"video", "reconstruction"} in [-1, 1])."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nbp.evaluators import samples as samples_lib
from nbp.tasks import video_tokenizer


@dataclasses.dataclass
class Evaluator:

  def run(self, context) -> dict[str, float]:
    s = context.setup
    if s.task.sample is None:
      raise ValueError("the psnr evaluator needs a sampler returning {'video', 'reconstruction'} "
                       "(config.sampler.num_samples > 0)")
    out = samples_lib.draw(s, context.params, jax.random.key(0))
    if not isinstance(out, dict) or not {"video", "reconstruction"} <= set(out):
      raise ValueError(f"the psnr evaluator needs {{'video', 'reconstruction'}} samples; family "
                       f"{s.config.family!r} gives {type(out).__name__}")
    return {"psnr": float(video_tokenizer.psnr(jnp.asarray(out["video"]), jnp.asarray(out["reconstruction"])))}
