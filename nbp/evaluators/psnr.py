"""Reconstruction PSNR of an autoencoder's sampler output ({"video", "reconstruction"} in [-1, 1])."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from nbp.evaluators import samples as samples_lib


def psnr(video, reconstruction) -> float:
  """Mean over videos of the PSNR (dB) on the [0, 1] scale; both in [-1, 1] (the reconstruction clipped)."""
  x = (np.asarray(video, np.float64) + 1) / 2
  y = np.clip((np.asarray(reconstruction, np.float64) + 1) / 2, 0.0, 1.0)
  mse = np.mean(np.square(x - y), axis=tuple(range(1, x.ndim)))
  return float(np.mean(10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))))


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
    return {"psnr": psnr(out["video"], out["reconstruction"])}
