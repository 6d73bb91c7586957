"""The Fréchet distance between Gaussians fitted to features, and batched feature extraction.

Shared by every distance of this kind: the I3D FVD (nbp.evaluators.fvd), the
in-domain FVD on moving digits (nbp.evaluators.fvd_digits), and later FID.
The videos they compare come from nbp.evaluators.generation.

Dimension letters: N examples, D feature width.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

# ---------------------------------------------------------------------------
# The distance.


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix (negative eigenvalues clipped)."""
  values, vectors = np.linalg.eigh(sigma)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

  d = |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^(1/2)). The last trace is
  computed without a general matrix square root: with A = s1^(1/2) and
  B = s2^(1/2) (symmetric, by eigendecomposition), s1 s2 = A (A B B A) A^-1 has
  the eigenvalues of (A B)(A B)^T, so tr((s1 s2)^(1/2)) is the sum of the
  singular values of A B. This stays stable for rank-deficient covariances.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise ValueError(f"shapes do not match: mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}")
  s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
  cross = np.sum(np.linalg.svd(_psd_sqrt(s1) @ _psd_sqrt(s2), compute_uv=False))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * cross)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Features [N, D] -> mean [D] and unbiased covariance [D, D] (float64)."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"features must be [N >= 2, D], got shape {features.shape}")
  mu = features.mean(axis=0)
  centred = features - mu
  return mu, centred.T @ centred / (features.shape[0] - 1)


def frechet_distance_of_features(real_features, fake_features) -> float:
  """The Fréchet distance of two feature sets [N1, D] and [N2, D], computed in their span when that is smaller.

  Both covariances and the difference of the means lie in the span of the
  N1 + N2 features minus the real mean, and the distance does not change under
  a rotation; so with N1 + N2 < D both sets, projected onto an orthonormal
  basis of that span, give the same distance (to float rounding) in
  O((N1 + N2)^3) instead of O(D^3): for a few hundred Inception features
  (D = 2048) seconds instead of a minute on a CPU.
  """
  real, fake = np.asarray(real_features, np.float64), np.asarray(fake_features, np.float64)
  if real.ndim != 2 or fake.ndim != 2 or len(real) + len(fake) >= real.shape[1]:
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))
  anchor = real.mean(axis=0)
  basis, _ = np.linalg.qr((np.concatenate([real, fake]) - anchor).T)  # [D, N1 + N2], orthonormal columns
  real, fake = (real - anchor) @ basis, (fake - anchor) @ basis
  return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


@dataclasses.dataclass(eq=False)
class FeatureExtractor:
  """Videos -> features [N, D], in batches of a fixed size through one jitted function.

  `apply(variables, videos) -> features` receives raw videos (any preprocessing
  belongs inside it); the last batch is padded, so only one shape is compiled.
  """

  apply: Callable[[Any, jax.Array], jax.Array]
  variables: Any
  batch_size: int = 8
  dtype: Any = np.float64  # of the output: float64 for the distance, an int type for token encoders

  def __post_init__(self):
    self._jitted = jax.jit(self.apply)

  def __call__(self, videos) -> np.ndarray:
    videos = np.asarray(videos)
    n = videos.shape[0]
    if n == 0:
      raise ValueError("no videos to extract features from")
    out = []
    for start in range(0, n, self.batch_size):
      chunk = pad_rows(videos[start:start + self.batch_size], self.batch_size)
      out.append(np.asarray(self._jitted(self.variables, chunk))[:min(self.batch_size, n - start)])
    return np.concatenate(out).astype(self.dtype)


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """[n, ...] -> [rows, ...] by repeating the last row (one compiled shape for a short last batch)."""
  pad = rows - x.shape[0]
  return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad > 0 else x
