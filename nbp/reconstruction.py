"""What the autoencoder families share (the video tokenizer, the KL VAE): PSNR, uint8 output, the GAN term.

The adversarial term. A model with a `discriminate` method and a parameter
subtree "discriminator" trains as two parameter groups (`param_labels`, each
with its own optimizer, `config.param_groups.discriminator`), and the loss
returns one objective per group: the loop differentiates each only with
respect to its own group, so no stop_gradient keeps the two sides apart.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

DISCRIMINATOR = "discriminator"  # the parameter group (and subtree) of the discriminator


def psnr(target: jax.Array, reconstruction: jax.Array) -> jax.Array:
  """Mean over examples [B, ...] of the PSNR (dB) on the [0, 1] scale; both inputs in [-1, 1]."""
  x = (target.astype(jnp.float32) + 1) / 2
  y = jnp.clip((reconstruction.astype(jnp.float32) + 1) / 2, 0.0, 1.0)
  mse = jnp.mean(jnp.square(x - y), axis=tuple(range(1, x.ndim)))  # [B]
  return jnp.mean(10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10)))


def to_uint8(x) -> np.ndarray:
  """Values in [-1, 1] -> uint8 0..255, rounded and clipped."""
  return np.clip(np.round((np.asarray(x, np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)


def with_adversarial_term(value, metrics, *, discriminate, real, reconstruction, weight: float):
  """({"model": value + weight * generator term, "discriminator": hinge loss}, metrics with the GAN's).

  `discriminate(x)` gives the discriminator's logits; the generator term
  raises them on the reconstruction, the hinge loss separates real from it.
  """
  real_logits, fake_logits = discriminate(real), discriminate(reconstruction)
  d_loss = jnp.mean(nn.relu(1.0 - real_logits)) + jnp.mean(nn.relu(1.0 + fake_logits))
  g_adv = -jnp.mean(fake_logits)
  metrics = dict(metrics, discriminator_loss=d_loss, generator_adversarial=g_adv,
                 real_accuracy=jnp.mean((real_logits > 0).astype(jnp.float32)),
                 fake_accuracy=jnp.mean((fake_logits < 0).astype(jnp.float32)))
  return {"model": value + weight * g_adv, DISCRIMINATOR: d_loss}, metrics


def param_labels(params):
  """"discriminator" for the discriminator's subtree, "model" for the rest."""
  return {k: jax.tree.map(lambda _: DISCRIMINATOR if k == DISCRIMINATOR else "model", v)
          for k, v in params.items()}
