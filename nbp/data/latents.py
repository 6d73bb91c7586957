"""KL-VAE latents on disk: an image dataset encoded once, read back for training xAR.

Dimension letters: S image side, C image channels, V views of an image (2 with
flips: the image and its horizontal mirror, else 1), h, w, c latent height,
width and channels.

`encode_latents` (the library side of `python -m experiments.encode_latents`)
runs an encode function (a trained VAE's posterior) over every image of each
split (train, validation, test). A latent directory holds, per split,
`<split>.array_record` with one record per image, {"latent": float32
[V, h, w, c] (the posterior mean), "logvar": float32 [V, h, w, c] (its
log-variance), "label": int32} (msgpack-serialised), in the dataset's order,
and `metadata.json`:

  vae_workdir     the VAE's run (its decoder turns sampled latents back into images)
  data            the image section the latents were encoded from (a plain dict;
                  nbp.data.images.image_data_config reads it for the real images)
  num_classes     classes of that dataset
  latent_shape    [h, w, c]
  flips, num_views  whether the mirrored view is stored, and V
  moments         whether the records hold "logvar" (the posterior's moments, so
                  a trainer can sample the posterior at every step, as MAR and
                  xAR do); caches written before had the means only
  scaling_factor  1 / std of every stored train mean value (all views), computed
                  from the data; latents are multiplied by it when read
  latent_mean, latent_std  the moments it comes from
  posterior_std   the mean posterior std exp(logvar / 2) over the train values
                  (with moments), beside latent_std: how far a draw strays
  num_examples    split -> images

The stored latents are raw (unscaled); `ChooseFlip` scales them (and the
posterior std, exp(logvar / 2), by the same factor), and a sampler divides by
the factor before decoding. The same factor is also written
beside the VAE's checkpoints, as `<vae workdir>/latent_scale.json`
(`write_latent_scale`), so it stays with the checkpoint it was measured on;
the latent directory's metadata.json is what training reads.

`latent_source` opens one split as a random-access source that grain takes as
it is; a damaged record raises `nbp.data.pipeline.DataCorruptionError` naming
the file, the record and how to encode the latents again. `latent_iterator`
is the checkpointable iterator of `config.data.name = "latents"`
(`config.data.latent_dir`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, SupportsIndex

import grain
import jax
import numpy as np
from array_record.python import array_record_module
from etils import epath
from flax import serialization

from nbp.data import pipeline
from nbp.data import tokens as tokens_lib

METADATA = tokens_lib.METADATA  # metadata.json
LATENT_SCALE = "latent_scale.json"  # in the VAE's workdir, beside checkpoints/
REQUIRED_METADATA = ("vae_workdir", "num_classes", "data")  # what the caller of encode_latents must name
ENCODE_HINT = "python -m experiments.encode_latents"

record_path = tokens_lib.record_path  # <directory>/<split>.array_record


def read_metadata(directory: str) -> dict[str, Any]:
  """The metadata.json of a latent directory."""
  path = os.path.join(directory, METADATA)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No {METADATA} in {directory}: encode the latents first ({ENCODE_HINT}).")
  with open(path) as f:
    return json.load(f)


# ---------------------------------------------------------------------------
# Writing.


@dataclasses.dataclass
class _Moments:
  """Running count, sum and sum of squares (float64) of every value seen."""

  count: int = 0
  total: float = 0.0
  squares: float = 0.0

  def add(self, values: np.ndarray) -> None:
    values = np.asarray(values, np.float64)
    self.count += values.size
    self.total += float(values.sum())
    self.squares += float(np.square(values).sum())

  @property
  def mean(self) -> float:
    return self.total / self.count

  @property
  def std(self) -> float:
    return float(np.sqrt(max(self.squares / self.count - self.mean ** 2, 0.0)))


def views(images: np.ndarray, flips: bool) -> np.ndarray:
  """uint8 [b, S, S, C] -> [b, V, S, S, C]: each image, then (flips) its horizontal mirror."""
  images = np.asarray(images)
  stacked = [images, images[:, :, ::-1]] if flips else [images]
  return np.stack(stacked, axis=1)


def split_moments(encoded) -> tuple[np.ndarray, np.ndarray | None]:
  """An encode function's output -> (mean, logvar or None), float32 [n, h, w, c] each.

  A dict {"mean", "logvar"} is the posterior's moments; an array is a
  deterministic encoding (means only).
  """
  if isinstance(encoded, dict):
    return np.asarray(encoded["mean"], np.float32), np.asarray(encoded["logvar"], np.float32)
  return np.asarray(encoded, np.float32), None


def encode_split(encode_fn: Callable, source, path: str, *, flips: bool, batch_size: int = 64,
                 moments: _Moments | None = None,
                 posterior: _Moments | None = None) -> tuple[int, tuple[int, ...], bool]:
  """Encodes every example of `source` ({"image": uint8 [S, S, C], "label"}) in order.

  `encode_fn` maps uint8 images [n, S, S, C] to the posterior's moments
  {"mean", "logvar"} (or to means alone) [n, h, w, c] (e.g. a jitted VAE's
  encoder); it is always called with n = batch_size * V: the last batch is
  padded with copies of its first image, not written. `moments`, when given,
  accumulates every mean written; `posterior`, every posterior std.
  Returns (count, latent shape, whether log-variances were written).
  """
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")  # random access per record
  count, shape, has_logvar = len(source), None, False
  for start in range(0, count, batch_size):
    examples = [source[i] for i in range(start, min(start + batch_size, count))]
    images = np.stack([np.asarray(e["image"], np.uint8) for e in examples])  # [b, S, S, C]
    n = len(images)
    if n < batch_size:
      images = np.concatenate([images, np.repeat(images[:1], batch_size - n, axis=0)])
    batch = views(images, flips)  # [batch_size, V, S, S, C]
    flat = batch.reshape((-1,) + batch.shape[2:])
    latents, logvars = split_moments(jax.device_get(encode_fn(flat)))  # [batch_size * V, h, w, c]
    latents = latents.reshape(batch.shape[:2] + latents.shape[1:])[:n]  # [b, V, h, w, c]
    has_logvar = logvars is not None
    if has_logvar:
      logvars = logvars.reshape(batch.shape[:2] + logvars.shape[1:])[:n]
    shape = latents.shape[2:]
    if moments is not None:
      moments.add(latents)
    if posterior is not None and has_logvar:
      posterior.add(np.exp(0.5 * logvars))
    for i, (e, latent) in enumerate(zip(examples, latents)):
      record = {"latent": latent, "label": np.asarray(e.get("label", 0), np.int32).reshape(())}
      if has_logvar:
        record["logvar"] = logvars[i]
      writer.write(serialization.msgpack_serialize(record))
  writer.close()
  return count, tuple(int(d) for d in shape or ()), has_logvar


def encode_latents(encode_fn: Callable, sources: dict[str, Any], output_dir: str, *, metadata: dict[str, Any],
                   flips: bool, batch_size: int = 64) -> dict[str, Any]:
  """Encodes each split's image source (split -> source) under `output_dir`; writes and returns the metadata.

  `metadata` must name "vae_workdir", "num_classes" and "data" (the caller
  knows them); latent_shape, flips, num_views, moments, the counts, the
  scaling factor (1 / std of the train split's stored means, both views) and
  the mean posterior std are added.
  """
  missing = [key for key in REQUIRED_METADATA if key not in metadata]
  if missing:
    raise ValueError(f"encode_latents: metadata lacks {missing} (it needs {list(REQUIRED_METADATA)}).")
  if "train" not in sources:
    raise ValueError(f"encode_latents: splits {sorted(sources)} hold no 'train'; the scaling factor is measured "
                     "on the train latents.")
  os.makedirs(output_dir, exist_ok=True)
  moments, posterior, counts, shape, stored = _Moments(), _Moments(), {}, None, set()
  for split in ("train", *sorted(set(sources) - {"train"})):  # train first: it is the one measured
    train = split == "train"
    counts[split], shape, has_logvar = encode_split(
        encode_fn, sources[split], record_path(output_dir, split), flips=flips, batch_size=batch_size,
        moments=moments if train else None, posterior=posterior if train else None)
    stored.add(has_logvar)
  if not moments.count or moments.std == 0:
    raise ValueError(f"encode_latents: the train latents (source of {counts['train']} images) have no spread; "
                     "cannot scale them.")
  metadata = {**metadata, "latent_shape": list(shape), "flips": bool(flips), "num_views": 2 if flips else 1,
              "moments": stored == {True}, "num_examples": counts, "scaling_factor": 1.0 / moments.std,
              "latent_mean": moments.mean, "latent_std": moments.std}
  if posterior.count:
    metadata["posterior_std"] = posterior.mean
  with open(os.path.join(output_dir, METADATA), "w") as f:
    json.dump(metadata, f, indent=2, sort_keys=True)
  return metadata


def write_latent_scale(vae_workdir: str, metadata: dict[str, Any], *, latent_dir: str, step: int) -> str:
  """Writes the scaling factor (and where it was measured) as `<vae_workdir>/latent_scale.json`; returns its path.

  `metadata` is encode_latents' result for `latent_dir`; `step` the VAE
  checkpoint encoded with. Any file system orbax reads (local, gs://). A later
  encoding with the same VAE replaces the file.
  """
  record = {key: metadata[key] for key in ("scaling_factor", "latent_mean", "latent_std", "latent_shape",
                                           "flips", "data")}
  record.update(step=int(step), latent_dir=latent_dir)
  path = epath.Path(vae_workdir) / LATENT_SCALE
  path.write_text(json.dumps(record, indent=2, sort_keys=True))
  return os.fspath(path)


def read_latent_scale(vae_workdir: str) -> dict[str, Any]:
  """`<vae_workdir>/latent_scale.json`: {"scaling_factor", "latent_mean", "latent_std", "step", ...}."""
  path = epath.Path(vae_workdir) / LATENT_SCALE
  if not path.exists():
    raise FileNotFoundError(f"No {LATENT_SCALE} in VAE workdir {vae_workdir!r}: encode latents with it first "
                            f"({ENCODE_HINT} --workdir {vae_workdir}).")
  return json.loads(path.read_text())


# ---------------------------------------------------------------------------
# Reading.


class LatentSource(tokens_lib.TokenSource):
  """Random-access latents of one split: [i] -> {"latent": float32 [V, h, w, c], "label": int32} (and "logvar")."""

  def __getitem__(self, index: SupportsIndex) -> dict[str, np.ndarray]:
    i = int(index)
    if not 0 <= i < len(self):  # not damage: a plain IndexError
      raise IndexError(f"record {i} out of range [0, {len(self)}) of {self.path}")
    try:
      record = serialization.msgpack_restore(self._records[i])
      out = {"latent": np.asarray(record["latent"], np.float32), "label": np.int32(record["label"])}
      if "logvar" in record:
        out["logvar"] = np.asarray(record["logvar"], np.float32)
      return out
    except Exception as e:  # pylint: disable=broad-except  # riegeli: RuntimeError; msgpack: any type
      raise pipeline.DataCorruptionError(
          f"Damaged latent file {self.path}: record {i} could not be read: {type(e).__name__}: {e}. "
          f"{self._rebuild_hint()}", self.path, i, i) from e

  def _rebuild_hint(self) -> str:
    directory = os.path.dirname(self.path)
    workdir = self.metadata.get("vae_workdir")
    return (f"The latents are derived data of the VAE in {workdir}: encode them again with {ENCODE_HINT} "
            f"--workdir {workdir} --output_dir {directory} (it rewrites the files).")

  def __repr__(self) -> str:
    return f"LatentSource({self.path!r}, {len(self)} examples)"


def latent_source(latent_dir: str, split: str, *, latent_shape: tuple[int, ...] | None = None) -> LatentSource:
  """The latents written for `split` under `latent_dir`; `latent_shape` (h, w, c), when given, is checked."""
  path = record_path(latent_dir, split)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No encoded split {split!r} at {path} (config.data.latent_dir={latent_dir!r}): "
                            f"run {ENCODE_HINT} first (it encodes the train, validation and test splits; a "
                            "cache written before validation existed lacks it).")
  metadata = read_metadata(latent_dir)
  if latent_shape is not None and tuple(metadata["latent_shape"]) != tuple(latent_shape):
    raise ValueError(f"the model expects latents {tuple(latent_shape)} but those in "
                     f"config.data.latent_dir={latent_dir!r} are {tuple(metadata['latent_shape'])} ({METADATA}).")
  return LatentSource(path, metadata)


@dataclasses.dataclass(frozen=True)
class ChooseFlip(grain.transforms.RandomMap):
  """{"latent" [V, h, w, c], "label"} -> {"latent": float32 [h, w, c] * scaling_factor, "class": int32}.

  One of the V views is chosen uniformly at random (with flips: the image or
  its mirror, each half the time). A record with "logvar" also gives that
  view's posterior std exp(logvar / 2), scaled alike, as "latent_std".
  """

  scaling_factor: float = 1.0  # metadata.json's: 1 / std of the train latents

  def random_map(self, element, rng: np.random.Generator):
    latent = np.asarray(element["latent"], np.float32)
    view = int(rng.integers(latent.shape[0]))
    scale = np.float32(self.scaling_factor)
    out = {"latent": latent[view] * scale, "class": np.int32(element["label"])}
    if "logvar" in element:
      out["latent_std"] = np.exp(0.5 * np.asarray(element["logvar"][view], np.float32)) * scale
    return out


def latent_iterator(latent_dir: str, split: str, *, seed: int, process_index: int, process_count: int,
                    batch_size: int, worker_count: int = 0) -> grain.DatasetIterator:
  """A checkpointable grain iterator of {"latent": float32 [b, h, w, c] (scaled), "class": int32 [b]}.

  With a cache of moments, also "latent_std" float32 [b, h, w, c] (the scaled
  posterior std). split: train, validation or test. batch_size is this host's b (the global batch is b * process_count);
  shuffled every epoch, repeated forever, one view chosen per example.
  """
  source = latent_source(latent_dir, split)
  return pipeline.make_iterator(
      source, global_batch_size=batch_size * process_count, seed=seed, shuffle=True,
      transforms=(ChooseFlip(float(source.metadata["scaling_factor"])),), process_index=process_index,
      process_count=process_count, worker_count=worker_count)
