"""Image denoising on the digits: a bidirectional EBT against a flow transformer of the same size.

Dimension letters: B batch, S image side, C channels, T patches, P values
per patch, K step counts reported.

Data: sklearn's digit scans resized to S x S (`config.data.name` "digits",
nbp.data.images), pixels in [-1, 1]. The corruption is additive Gaussian
noise at one fixed level, x_noisy = x + sigma * eps (`config.loss.sigma`);
the task is to recover x. Training draws eps afresh every step; every
evaluation of a split uses the same eps per image (`split_arrays`, a fixed
seed per split), so both models denoise the very same noisy images.

`config.model.kind` picks the network (nbp/models/bidirectional_ebt.py):

  ebt   The candidate is the whole image, flattened to one candidate [B, 1,
        T * P]; its energy is the mean of the per-patch energies. It STARTS
        AT THE NOISY IMAGE and takes gradient steps y <- y - alpha * dE/dy
        (nbp.samplers.ebt.think). Training (the official System 2 recipe for
        denoising): no detach, truncated (only the last step's dE/dy is
        differentiated through: a second-order gradient), alpha randomised
        per image in [alpha / s, alpha * s] (`alpha_scale`), the step count
        drawn per batch in [num_steps, num_steps_max], no Langevin noise, no
        replay; the loss is the smooth L1 (Huber, delta 1) distance of the
        last step's image to the clean one. Denoising at inference: k steps
        at the model's alpha, each one forward and one backward pass.
  flow  Rectified flow from data (t = 0) to noise (t = 1):
        x_t = (1 - t) x + t eps, and the network regresses the velocity
        eps - x (MSE), at t uniform in [0, max_t]; max_t 0 means t* below,
        the noise levels denoising visits (the official diffusion baseline
        likewise trains only on the timesteps up to its denoising level).
        Denoising: x + sigma * eps = x_{t*} / (1 - t*) at
        t* = sigma / (1 + sigma), so (1 - t*) x_noisy lies on the path of x
        at t*; from there N Euler steps of equal size to t = 0, N forward
        passes.

Evaluation (`score`, run over a whole split by the split_metrics
evaluator): the PSNR (dB on the [0, 1] scale, nbp.reconstruction.psnr per
image, averaged over images) of the noisy input (`psnr_noisy`, the floor)
and of the output after each step count k of `config.sampler.steps`
(`psnr_<k>_steps`), with its forward and backward passes per image beside it
(`forward_<k>_steps`, `backward_<k>_steps`). One thinking run of max(steps)
steps gives the EBT's every k; the flow runs each N from t*. The samples
evaluator writes, for the first validation images, clean, noisy and the
denoised image at each step count as one row of a PNG.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nbp import reconstruction
from nbp import tasks
from nbp import visualization
from nbp.data import images as images_lib
from nbp.data import pipeline
from nbp.data import splits
from nbp.models import bidirectional_ebt
from nbp.models.bidirectional_ebt import DenoisingTransformer as Model
from nbp.samplers import ebt as thinking

DATASETS = ("digits",)
SIGMA = 0.46  # the default noise level (experiments/configs/ebt_denoising.py says how it matches the official)
EVAL_NOISE_SEED = 1234  # eps of split i of nbp.data.splits.SPLITS is drawn with seed EVAL_NOISE_SEED + i


def flow_start_time(sigma: float) -> float:
  """t* = sigma / (1 + sigma): the time at which (1 - t*) (x + sigma eps) lies on the flow path of x."""
  return sigma / (1.0 + sigma)


def psnr_per_image(target, output):
  """PSNR float32 [B] of each image (nbp.reconstruction.psnr's rule: [0, 1] scale, output clipped)."""
  return jax.vmap(lambda a, b: reconstruction.psnr(a[None], b[None]))(target, output)


def smooth_l1(y, target):
  """Mean smooth L1 (Huber, delta 1) distance of images y to target (any equal shapes)."""
  return jnp.mean(optax.huber_loss(y.astype(jnp.float32), target, delta=1.0))


# ---------------------------------------------------------------------------
# The EBT: the image's energy and thinking from the noisy image.


def image_energy(model: Model, params) -> thinking.Energy:
  """(y [B, 1, T * P], step) -> [B, 1]: the mean energy of the patches of each candidate image."""
  def energy(y, step):
    del step  # one energy landscape for every step (the official denoiser has no step embedding)
    patches = y.reshape(y.shape[0], model.num_patches, model.patch_dim)
    return jnp.mean(model.apply({"params": params}, patches), axis=-1, keepdims=True)
  return energy


def think_from(model: Model, params, noisy_images, *, num_steps: int, alpha, detach: bool = False,
               truncate: bool = False) -> thinking.Thought:
  """`num_steps` optimisation steps starting at the noisy images [B, S, S, C]; alpha scalar or [B, 1, 1]."""
  y0 = model.patchify(noisy_images).reshape(noisy_images.shape[0], 1, -1)  # [B, 1, T * P]
  return thinking.think(model, image_energy(model, params), y0, num_steps=num_steps, alpha=alpha, detach=detach,
                        truncate=truncate)


def ebt_loss(model: Model, params, clean, noisy, rng, *, num_steps: int, num_steps_max: int, alpha_scale: float,
             detach: bool, truncate: bool):
  """Smooth L1 of the last step's image (module docstring), the step count drawn per batch."""
  alpha_rng, count_rng = jax.random.split(rng)
  alpha = thinking.randomized_alpha(alpha_rng, thinking.step_size(model, params), (clean.shape[0], 1, 1),
                                    alpha_scale)

  def run(steps: int):
    thought = think_from(model, params, noisy, num_steps=steps, alpha=alpha, detach=detach, truncate=truncate)
    outputs = [model.unpatchify(y.reshape(y.shape[0], model.num_patches, model.patch_dim)) for y in thought.ys]
    value = smooth_l1(outputs[-1], clean)
    return value, {"initial_step_loss": smooth_l1(outputs[0], clean), "final_step_loss": value,
                   "mse": jnp.mean((outputs[-1] - clean) ** 2),
                   "energy_gap": jnp.mean(thought.energies[0] - thought.energies[-1])}

  counts = list(range(num_steps, max(num_steps, num_steps_max) + 1))
  if len(counts) == 1:
    value, metrics = run(num_steps)
  else:
    which = jax.random.randint(count_rng, (), 0, len(counts))
    value, metrics = jax.lax.switch(which, [functools.partial(run, n) for n in counts])
    metrics["num_steps"] = jnp.asarray(counts, jnp.float32)[which]
  return value, dict(metrics, alpha=thinking.step_size(model, params))


# ---------------------------------------------------------------------------
# The flow: velocity regression, and denoising by Euler steps from t*.


def flow_loss(model: Model, params, clean, rng, *, max_t: float):
  """MSE of the velocity eps - x at x_t = (1 - t) x + t eps, t uniform in [0, max_t] per image."""
  t_rng, eps_rng = jax.random.split(rng)
  b = clean.shape[0]
  t = jax.random.uniform(t_rng, (b,)) * max_t
  x = model.patchify(clean)
  eps = jax.random.normal(eps_rng, x.shape)
  x_t = (1.0 - t[:, None, None]) * x + t[:, None, None] * eps
  v = model.apply({"params": params}, x_t, t)
  value = jnp.mean((v - (eps - x)) ** 2)
  return value, {"mse": value}


def flow_denoise(model: Model, params, noisy_images, *, sigma: float, num_steps: int):
  """Images [B, S, S, C] denoised by `num_steps` Euler steps of the flow from t* to 0 (module docstring)."""
  t_star = flow_start_time(sigma)
  times = jnp.linspace(t_star, 0.0, num_steps + 1)
  b = noisy_images.shape[0]

  def step(i, x):
    t, t_next = times[i], times[i + 1]
    v = model.apply({"params": params}, x, jnp.full((b,), t))
    return x + (t_next - t) * v

  x = jax.lax.fori_loop(0, num_steps, step, (1.0 - t_star) * model.patchify(noisy_images))
  return model.unpatchify(x)


# ---------------------------------------------------------------------------
# The loss, denoising at several step counts, and the per-image score.


def check_loss(*, sigma: float = SIGMA, num_steps: int = 2, num_steps_max: int = 0, alpha_scale: float = 1.0,
               max_t: float = 0.0, **_) -> None:
  """Raises ValueError naming the first bad config.loss key."""
  if not sigma > 0:
    raise ValueError(f"config.loss.sigma={sigma}: the noise level must be > 0")
  if num_steps < 1:
    raise ValueError(f"config.loss.num_steps={num_steps}: thinking takes at least one step")
  if num_steps_max and num_steps_max < num_steps:
    raise ValueError(f"config.loss.num_steps_max={num_steps_max} is below num_steps={num_steps} (0: no draw)")
  if alpha_scale < 1.0:
    raise ValueError(f"config.loss.alpha_scale={alpha_scale}: alpha is drawn in [alpha / s, alpha * s], s >= 1")
  if not 0.0 <= max_t <= 1.0:
    raise ValueError(f"config.loss.max_t={max_t}: the flow's training times lie in [0, 1] (0: t* of sigma)")


def loss(model: Model, params, batch, rng, *, sigma: float = SIGMA, num_steps: int = 2, num_steps_max: int = 0,
         alpha_scale: float = 1.0, detach: bool = False, truncate: bool = True, max_t: float = 0.0):
  """The training loss of `model.kind` on clean images {"image": [B, S, S, C]} (module docstring).

  sigma: the noise level (both kinds; the flow's denoising starts at its t*).
  EBT: num_steps (to num_steps_max, drawn per batch), alpha_scale, detach,
  truncate. Flow: max_t (0: t*).
  """
  clean = jnp.asarray(batch["image"], jnp.float32)
  noise_rng, rng = jax.random.split(rng)
  if model.kind == "flow":
    value, metrics = flow_loss(model, params, clean, rng, max_t=max_t or flow_start_time(sigma))
  else:
    noisy = clean + sigma * jax.random.normal(noise_rng, clean.shape)
    value, metrics = ebt_loss(model, params, clean, noisy, rng, num_steps=num_steps, num_steps_max=num_steps_max,
                              alpha_scale=alpha_scale, detach=detach, truncate=truncate)
  return value, dict(metrics, num_targets=jnp.asarray(clean.size, jnp.float32))


def passes(model: Model, steps: int) -> tuple[int, int]:
  """(forward, backward) passes per image of `steps` denoising steps: an EBT step is one of each."""
  return (steps, steps) if model.kind == "ebt" else (steps, 0)


def denoise(model: Model, params, noisy_images, *, sigma: float, steps, alpha: float | None = None) -> dict:
  """{k: the images [B, S, S, C] denoised in k steps} for each k of `steps` (one thinking run for the EBT)."""
  steps = sorted(set(int(k) for k in steps))
  if model.kind == "flow":
    return {k: flow_denoise(model, params, noisy_images, sigma=sigma, num_steps=k) for k in steps}
  thought = think_from(model, params, noisy_images, num_steps=steps[-1],
                       alpha=thinking.step_size(model, params, alpha))
  return {k: model.unpatchify(thought.ys[k - 1].reshape(-1, model.num_patches, model.patch_dim)) for k in steps}


def score(model: Model, params, batch, *, sigma: float, steps, alpha: float | None = None) -> dict:
  """{metric: (value [B], count [B])}: PSNR of the noisy input and after each step count, with the passes."""
  clean = jnp.asarray(batch["image"], jnp.float32)
  noisy = clean + sigma * jnp.asarray(batch["noise"], jnp.float32)
  ones = jnp.ones((clean.shape[0],), jnp.float32)
  out = {"psnr_noisy": (psnr_per_image(clean, noisy), ones)}
  for k, images in denoise(model, params, noisy, sigma=sigma, steps=steps, alpha=alpha).items():
    forward, backward = passes(model, k)
    out[f"psnr_{k}_steps"] = (psnr_per_image(clean, images), ones)
    out[f"forward_{k}_steps"] = (forward * ones, ones)
    out[f"backward_{k}_steps"] = (backward * ones, ones)
  return out


def sample(model: Model, params, rng, *, num_samples: int = 8, steps=(1, 2, 4), alpha: float | None = None,
           sigma: float = SIGMA, images=None, noise=None):
  """Frames [n, 2 + K, S, S, C] in [-1, 1]: per image, clean, noisy, then denoised at each step count of `steps`.

  images, noise: [>= n, S, S, C] (the task passes the first validation images and their evaluation noise).
  """
  del rng
  clean, noise = images[:num_samples], noise[:num_samples]
  noisy = clean + sigma * noise
  outputs = denoise(model, params, noisy, sigma=sigma, steps=steps, alpha=alpha)
  frames = [clean, noisy, *(outputs[k] for k in sorted(outputs))]
  return jnp.clip(jnp.stack(frames, axis=1), -1.0, 1.0)


def write_samples(frames, out_dir: str, step: int) -> dict:
  return visualization.save_predicted_frames(
      frames, out_dir, step, title=f"clean, noisy, denoised at each step count; step {step}")


# ---------------------------------------------------------------------------
# Data and the task.


def _normalize(example):
  return {"image": np.asarray(example["image"], np.float32) / 127.5 - 1.0}


def make_data(data_cfg, split: str, *, seed: int, process_index: int, process_count: int, batch_size: int):
  """A checkpointable grain iterator of {"image": float32 [b, S, S, C] in [-1, 1]}."""
  return pipeline.make_iterator(
      images_lib.image_source(data_cfg, split), global_batch_size=batch_size * process_count, seed=seed,
      shuffle=True, transforms=(_normalize,), process_index=process_index, process_count=process_count,
      worker_count=data_cfg.worker_count)


@functools.cache
def _split_arrays(data_json: str, split: str) -> dict[str, np.ndarray]:
  data_cfg = ml_collections.ConfigDict(json.loads(data_json))
  source = images_lib.image_source(data_cfg, split)
  images = np.stack([_normalize(source[i])["image"] for i in range(len(source))])
  rng = np.random.default_rng(EVAL_NOISE_SEED + splits.SPLITS.index(split))
  return {"image": images, "noise": rng.standard_normal(images.shape).astype(np.float32)}


def split_arrays(data_cfg, split: str) -> dict[str, np.ndarray]:
  """The whole split: {"image": float32 [N, S, S, C] in [-1, 1], "noise": its fixed eps [N, S, S, C]}."""
  return _split_arrays(data_cfg.to_json(), split)


def _param_labels(params):
  """"alpha" for the learned step size (its own optimizer group), "model" for everything else."""
  return {k: jax.tree.map(lambda _: "alpha" if k == "alpha" else "model", v) for k, v in params.items()}


def make_task(config) -> tasks.Task:
  kind = config.model.get("kind", "ebt")
  if kind not in bidirectional_ebt.MODELS:
    raise ValueError(f"config.model.kind={kind!r}: choose one of {tuple(bidirectional_ebt.MODELS)}")
  model = tasks.build_model(bidirectional_ebt.MODELS[kind], config.model)
  side = int(config.data.image_size)
  if model.image_size == 0:
    model = model.clone(image_size=side)
  if model.image_size != side:
    raise ValueError(f"config.model.image_size={model.image_size}: the images are {side}x{side} "
                     "(config.data.image_size; leave 0 to fill it)")
  model.check()
  loss_cfg = dict(config.get("loss", {}))
  check_loss(**loss_cfg)
  thinking.check_alpha_group(model, config)
  sampler = dict(config.get("sampler", {}))
  sigma = float(loss_cfg.get("sigma", SIGMA))
  steps = tuple(int(k) for k in sampler.get("steps", (1, 2, 4)))
  if not steps or min(steps) < 1:
    raise ValueError(f"config.sampler.steps={steps}: step counts must be >= 1")
  alpha = sampler.get("alpha")
  num_samples = int(sampler.get("num_samples", 8))
  p, t = model.patch_dim, model.num_patches

  def init_inputs():
    inputs = {"patches": jnp.zeros((1, t, p))}
    return dict(inputs, t=jnp.zeros((1,))) if kind == "flow" else inputs

  def sample_fn(params, rng):
    first = split_arrays(config.data, "validation")
    return sample(model, params, rng, num_samples=num_samples, steps=steps, alpha=alpha, sigma=sigma,
                  images=jnp.asarray(first["image"][:num_samples]), noise=jnp.asarray(first["noise"][:num_samples]))

  return tasks.Task(
      model=model,
      init_inputs=init_inputs,
      loss=functools.partial(loss, model, **loss_cfg),
      data=functools.partial(make_data, config.data),
      param_labels=_param_labels if model.learn_alpha else None,
      predict_fns={
          "score": functools.partial(score, model, sigma=sigma, steps=steps, alpha=alpha),
          "split_arrays": functools.partial(split_arrays, config.data),
          "sample": sample_fn,
          "write_samples": write_samples,
      },
  )
