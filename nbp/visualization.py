"""Writing videos to look at: animated GIFs (imageio) and PNG frame grids (matplotlib).

Videos are uint8 [N, F, H, W, C] with C in {1, 3}.
"""

from __future__ import annotations

import os

import imageio.v3 as iio
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np


def _check(videos: np.ndarray) -> np.ndarray:
  videos = np.asarray(videos)
  if videos.ndim != 5 or videos.shape[-1] not in (1, 3) or videos.dtype != np.uint8:
    raise ValueError(f"videos must be uint8 [N, F, H, W, 1|3], got {videos.dtype} {videos.shape}")
  return videos


def tile(videos: np.ndarray, columns: int | None = None, pad: int = 1) -> np.ndarray:
  """[N, F, H, W, C] -> [F, rows*(H+pad), columns*(W+pad), C]: the videos side by side."""
  videos = _check(videos)
  n, f, h, w, c = videos.shape
  columns = columns or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / columns))
  canvas = np.full((f, rows * (h + pad) + pad, columns * (w + pad) + pad, c), 128, np.uint8)
  for i in range(n):
    r, col = divmod(i, columns)
    canvas[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = videos[i]
  return canvas


def save_gif(path: str, videos: np.ndarray, *, fps: int = 8, scale: int = 4) -> None:
  """All videos tiled in one looping GIF, each pixel scaled up `scale` times."""
  frames = tile(videos)
  frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
  if frames.shape[-1] == 1:
    frames = frames[..., 0]
  iio.imwrite(path, frames, extension=".gif", duration=1000 / fps, loop=0)


def save_frame_grid(path: str, videos: np.ndarray, *, max_videos: int = 8, title: str = "") -> None:
  """A PNG with one row per video and one column per frame."""
  videos = _check(videos)[:max_videos]
  n, f = videos.shape[:2]
  fig, axes = plt.subplots(n, f, figsize=(f * 0.8, n * 0.8), squeeze=False)
  for i in range(n):
    for j in range(f):
      frame = videos[i, j]
      axes[i, j].imshow(frame[..., 0] if frame.shape[-1] == 1 else frame, cmap="gray", vmin=0, vmax=255)
      axes[i, j].axis("off")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def save_predicted_frames(frames, out_dir: str, step: int, *, title: str = "") -> dict:
  """Frames in [-1, 1] [N, F, H, W, C] (each after the first predicted from the real ones before it) as
  out_dir/step_<step>.png; returns {} (nothing to log)."""
  videos = np.round((np.asarray(frames, np.float32) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
  save_frame_grid(os.path.join(out_dir, f"step_{step:07d}.png"), videos,
                  title=title or f"next-frame predictions, step {step}")
  return {}


def save_loss_panels(path: str, panels: dict[str, tuple[list[dict], tuple[str, ...], str]]) -> None:
  """One panel per stage, side by side: {title: (metrics.jsonl rows, keys plotted, y label)}."""
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
  for ax, (title, (rows, keys, ylabel)) in zip(axes[0], panels.items()):
    for key in keys:
      points = [(r["step"], r[key]) for r in rows if key in r]
      if points:
        ax.plot(*zip(*points), label=key, marker="o" if len(points) < 20 else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def save_loss_plot(path: str, rows: list[dict], keys=("loss", "eval/loss")) -> None:
  """Loss curves from metrics.jsonl rows."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for key in keys:
    points = [(r["step"], r[key]) for r in rows if key in r]
    if points:
      ax.plot(*zip(*points), label=key, marker="o" if len(points) < 20 else None)
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def save_curves(path: str, curves: dict[str, tuple[list[float], list[float], list[float]]], *, xlabel: str,
                ylabel: str, title: str = "", floor: float | None = None, log_x: bool = True) -> None:
  """One line per curve, {label: (x, mean, sd)} with sd as error bars; `floor` a dashed line (e.g. real vs real)."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, (x, mean, sd) in curves.items():
    ax.errorbar(x, mean, yerr=sd, label=label, marker="o", capsize=3)
  if floor is not None:
    ax.axhline(floor, color="grey", linestyle="--", label="real vs real (floor)")
  if log_x:
    ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  ax.legend()
  ax.grid(alpha=0.3, which="both")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def save_pareto(path: str, points: list[tuple[float, float, float, str]], *, xlabel: str, ylabel: str,
                floor: float | None = None) -> None:
  """One marker per (cost x, mean y, sd y, label), lower y better, x on a log scale; the Pareto front (no point
  both cheaper and better) joined by a dashed line; `floor` a grey dashed line (e.g. real vs real)."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for x, y, sd, label in points:
    ax.errorbar(x, y, yerr=sd, fmt="o", capsize=3, label=label)
  front, best = [], float("inf")
  for x, y, _, _ in sorted(points):
    if y < best:
      front.append((x, y))
      best = y
  if front:
    ax.plot(*zip(*front), "k--", lw=1, label="Pareto front")
  if floor is not None:
    ax.axhline(floor, color="grey", linestyle=":", label="real vs real (floor)")
  ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3, which="both")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
