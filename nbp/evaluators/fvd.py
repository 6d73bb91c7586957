"""The standard Fréchet Video Distance: I3D logits of preprocessed videos, and its evaluator.

FVD (Unterthiner et al. 2018) is the Fréchet distance between two Gaussians
fitted to I3D features of real and of generated videos. The standard recipe,
which the NBP paper follows: 16 frames per video (the first 16 of NBP's 17),
frames resized to 224x224 (bilinear), pixel values scaled to [-1, 1], the
400-d logits of the Kinetics-400 I3D (nbp.models.i3d) as the features. The
weights load from a local file the user names (`i3d_path`); nothing is
downloaded.

Resizing is bilinear without antialiasing, in one of two conventions
(`half_pixel_centers`): False is TF1's `tf.image.resize_bilinear`
(align_corners False), which the reference FVD code calls: output pixel i
samples input position i * H / R. True is the half-pixel convention of
PyTorch's `F.interpolate(mode="bilinear", align_corners=False)`, which the
NBP authors' evaluation calls, and of `jax.image.resize`: output pixel i
samples (i + 1/2) * H / R - 1/2. For Kinetics-600 the paper reports FVD at
64x64 (`downsample=64`): every frame is first resized to 64x64 in the same
convention and rounded to integer grey levels, as a video stored at that
size would be, then resized to 224x224.

`config.evals.<name> = dict(type="fvd", i3d_path=..., ...)` (the fields of
`Evaluator`) compares the run's sampler with real test videos of the videos
the run models (its data, or for token runs its tokenizer's data), raw: pixel
runs' quantisation counts against them. Reference, stand-in and generated sets
as nbp.evaluators.frechet describes (its `compare_with_real`, shared with
nbp.evaluators.fvd_digits).

Dimension letters: N videos, F frames, H height, W width, C channels, R the
resolution the I3D sees.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp

from nbp.evaluators import frechet
from nbp.evaluators import generation
from nbp.models.i3d import NUM_FRAMES, RESOLUTION, InceptionI3D, load_i3d
from nbp.models.resize import resize_bilinear

FVD_KEY = "fvd"  # the standard FVD; only this evaluator reports under that name


def preprocess(videos, *, resolution: int = RESOLUTION, num_frames: int | None = NUM_FRAMES,
               half_pixel_centers: bool = False, downsample: int = 0) -> jax.Array:
  """Videos [N, F, H, W, C] (uint8, or floats in [0, 255]) -> float32 [N, num_frames, R, R, 3] in [-1, 1].

  C = 1 (grey) is repeated to 3 channels. Videos longer than `num_frames` (16
  in the standard FVD) keep their first `num_frames`; shorter ones are an
  error; None keeps every frame. downsample > 0: frames first pass through
  downsample x downsample integer grey levels (module docstring).
  """
  if videos.ndim != 5 or videos.shape[-1] not in (1, 3):
    raise ValueError(f"videos must be [N, F, H, W, 1|3], got shape {tuple(videos.shape)}")
  if num_frames is not None:
    if videos.shape[1] < num_frames:
      raise ValueError(f"FVD expects {num_frames} frames per video, got {videos.shape[1]} (shape "
                       f"{tuple(videos.shape)}); pass num_frames=None to accept other lengths (the result is "
                       "then not the standard FVD).")
    videos = videos[:, :num_frames]
  n, f, h, w, c = videos.shape
  frames = jnp.asarray(videos).reshape(n * f, h, w, c)
  if downsample:
    frames = jnp.clip(jnp.round(resize_bilinear(frames, downsample, half_pixel_centers=half_pixel_centers)), 0, 255)
  frames = resize_bilinear(frames, resolution, half_pixel_centers=half_pixel_centers)
  frames = jnp.clip(2.0 * frames / 255.0 - 1.0, -1.0, 1.0)  # clip: float rounding of the resize
  if c == 1:
    frames = jnp.repeat(frames, 3, axis=-1)
  return frames.reshape(n, f, resolution, resolution, 3)


def i3d_apply(model: InceptionI3D, variables, videos, **preprocessing):
  """Raw videos -> I3D logits [N, 400]: the FVD features (`preprocess`'s keywords)."""
  x = preprocess(videos, **preprocessing)
  return model.apply(variables, x)


def i3d_extractor(variables, *, batch_size: int = 8, resolution: int = RESOLUTION,
                  num_frames: int | None = NUM_FRAMES, half_pixel_centers: bool = False,
                  downsample: int = 0) -> frechet.FeatureExtractor:
  """The standard FVD feature extractor, from variables (e.g. `load_i3d(path)`); `preprocess`'s keywords."""
  num_classes = variables["params"]["Logits"]["conv"]["bias"].shape[0]
  apply = functools.partial(i3d_apply, InceptionI3D(num_classes=num_classes), resolution=resolution,
                            num_frames=num_frames, half_pixel_centers=half_pixel_centers, downsample=downsample)
  return frechet.FeatureExtractor(apply, variables, batch_size)


def fvd(real_videos, fake_videos, *, extractor: frechet.FeatureExtractor) -> float:
  """Fréchet Video Distance between two sets of videos [N, F, H, W, C].

  With `i3d_extractor(load_i3d(path))` this is the standard FVD (16 frames);
  published figures use 2048 to 50k videos per set, and few videos bias it up.
  """
  return frechet.frechet_distance_of_features(extractor(real_videos), extractor(fake_videos))


@functools.cache
def _extractor(path: str, batch_size: int, **preprocessing) -> frechet.FeatureExtractor:
  """The I3D extractor of a weight file, loaded and jitted once per process."""
  return i3d_extractor(load_i3d(path), batch_size=batch_size, **preprocessing)


@dataclasses.dataclass
class Evaluator:
  """The I3D FVD of the run's sampler against real test videos; the schema of its config section."""

  i3d_path: str = ""  # a local .npz / .msgpack of the Kinetics-400 I3D (nbp.models.i3d's format)
  num_videos: int = 256  # N per set; published figures use 2048 to 50k (few videos bias FVD up)
  batch_size: int = 16  # videos per sampler call
  i3d_batch_size: int = 8  # videos per I3D call
  seed: int = 0  # the sampling key and the stand-in set: videos (seed+1)N..(seed+2)N-1 of the split
  num_frames: int = NUM_FRAMES  # the first frames of each video the I3D sees; 0: all (then not the standard FVD)
  resolution: int = RESOLUTION  # frame side the videos are resized to
  half_pixel_centers: bool = False  # the resize convention: TF1's (False) or PyTorch's / JAX's (module docstring)
  downsample: int = 0  # > 0: frames first stored at this side (Kinetics-600 in the NBP paper: 64)
  floor: bool = True  # also d(reference, stand-in): the FVD between two real sets of N videos
  split: str = "validation"  # the real videos' split: validation while choosing, test once

  def __post_init__(self):
    # Fails when the section is built (before the first training step), not at the first evaluation.
    if not self.i3d_path or not os.path.exists(self.i3d_path):
      raise FileNotFoundError(f"fvd: i3d_path={self.i3d_path!r} is not a file. Nothing is downloaded: convert the "
                              "Kinetics-400 I3D weights once into a local file (format: nbp/models/i3d.py).")

  def run(self, context) -> dict[str, float]:
    extract = _extractor(self.i3d_path, self.i3d_batch_size, resolution=self.resolution,
                         num_frames=self.num_frames or None, half_pixel_centers=self.half_pixel_centers,
                         downsample=self.downsample)
    metrics, _, _ = generation.compare_with_real(
        context, real_data=generation.run_video_data(context.setup.config), extract=extract, key=FVD_KEY,
        num_videos=self.num_videos, batch_size=self.batch_size, seed=self.seed, floor=self.floor,
        judge="the run's real videos", split=context.split_of(self))
    return metrics
