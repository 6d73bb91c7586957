"""A dense layer whose kernel keeps its full shape and logical axis names.

flax's `nn.DenseGeneral` initialises multi-axis kernels at a flattened 2D shape
and reshapes afterwards; under a mesh, the logical sharding constraint then
meets the flat kernel and fails. This layer creates the kernel at its real shape
(e.g. [E, H, D]), so `nn.with_logical_partitioning` names every axis.

Dimensions: I the contracted input axes, O the output features.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class DenseGeneral(nn.Module):
  """x [..., *I] -> [..., *O] with kernel [*I, *O] and optional bias [*O]."""

  features: int | Sequence[int]  # O, the output axes
  kernel_axes: Sequence[str | None]  # logical names of the kernel's axes (I then O)
  axis: int | Sequence[int] = -1  # the input axes contracted (trailing ones)
  use_bias: bool = False  # a bias over the output axes
  dtype: Any = jnp.float32  # computation dtype
  param_dtype: Any = jnp.float32  # parameter storage dtype
  kernel_init: Callable | None = None  # None: fan-in scaled truncated normal over I
  bias_init: Callable = nn.initializers.zeros  # bias initializer

  @nn.compact
  def __call__(self, x):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    axis = tuple(a % x.ndim for a in axis)
    in_shape = tuple(x.shape[a] for a in axis)
    if len(self.kernel_axes) != len(in_shape) + len(features):
      raise ValueError(f"kernel_axes {tuple(self.kernel_axes)} do not name a kernel of shape {in_shape + features}")
    n_in = len(in_shape)
    init = self.kernel_init or nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)),
        out_axis=tuple(range(n_in, n_in + len(features))))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.kernel_axes)),
                        in_shape + features, self.param_dtype)
    x, kernel = x.astype(self.dtype), jnp.asarray(kernel, self.dtype)
    y = jax.lax.dot_general(x, kernel, ((axis, tuple(range(n_in))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, tuple(self.kernel_axes[n_in:])),
                        features, self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    return y

