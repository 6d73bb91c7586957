"""The in-domain FVD on moving digits: the Fréchet distance of a digit classifier's features.

The classifier is trained in this codebase (nbp.tasks.video_classifier); its
penultimate features of real and generated videos replace I3D's. Its figures
are reported under the name "fvd_digits_classifier", never "fvd", and are not
comparable with published FVD: compare them only with each other (same
classifier, same N) and with the real-vs-real floor.

Dimensions: N videos, F frames, H height, W width, E feature width.
"""

from __future__ import annotations

from nbp.evaluators import frechet
from nbp.models.video_classifier import VideoClassifier
from nbp.tasks.video_classifier import requantize

FVD_KEY = "fvd_digits_classifier"  # the name of the in-domain FVD in every output


def feature_extractor(model: VideoClassifier, params, *, batch_size: int = 64,
                      levels: int = 0) -> frechet.FeatureExtractor:
  """Penultimate features [N, E] of uint8 videos, requantised to `levels` grey levels first, in jitted batches."""
  def apply(p, videos):
    return model.apply({"params": p}, requantize(videos, levels), method=VideoClassifier.features)
  return frechet.FeatureExtractor(apply, params, batch_size)


def digits_fvd(real, fake, *, classifier_params, model: VideoClassifier,
               batch_size: int = 64, levels: int = 0) -> dict[str, float]:
  """In-domain FVD of moving digits: {"fvd_digits_classifier": distance}.

  `real` and `fake` are uint8 videos [N, F, H, W, 1] at the classifier's
  training size. `levels`: the classifier's `data.levels` (both sets are
  requantised to it).
  """
  extract = feature_extractor(model, classifier_params, batch_size=batch_size, levels=levels)
  return {FVD_KEY: frechet.frechet_distance_of_features(extract(real), extract(fake))}
