"""A causal sequence model over real-valued steps: Aaren or a Transformer of the same size, by one field.

Dimension letters: B batch, T time steps, F input features per step, E width,
O outputs per step, N layers.

x [B, T, F] -> y [B, T, O]: a linear input embedding plus position
embeddings, N pre-norm blocks of the shared decoder stack under the causal
mask, a final norm and a linear head. `attention` picks the blocks' attention:
"softmax" (multi-head attention) or "aaren" (layers/aaren.py: a learned query
per head and layer attending over every prefix). Everything else, the
parameters of the projections and MLPs included, is the same code and
config, so the Transformer baseline of every Aaren task is this model with
`attention="softmax"`. Aaren has no query projection: it holds H * D query
parameters per layer where softmax attention holds E * H * D.

Two ways to run one set of weights:

- parallel: `model.apply({"params": p}, x, valid=valid)`, the whole sequence
  at once (training; Aaren through kernels.dispatch.scan);
- streaming: `init_state(model, params, B)` then `step(model, params, state,
  x_t)` per time step (decode=True underneath). Aaren's state is (m, u, w) per
  head and layer: constant in the length of the stream. The Transformer's is a
  KV cache of `max_len` slots: it grows with the context it must hold, and a
  stream longer than `max_len` is cut off (the cache has no room; keep
  max_len >= the longest stream). Both give the parallel outputs.

`valid` bool [B, T] marks real steps with any padding at the end (right
padding); padded inputs are zeroed, never attended to, and give finite
outputs, which a loss masks.

Positions ("none" | "sinusoidal" | "learned") are absolute step indices added
to the input embedding; while streaming the model counts steps in its state.
"learned" needs T <= max_len; "sinusoidal" serves any length.

Sizes come from `SIZES` by `variant`; num_layers, width and num_heads set
explicitly override the table.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kernels.masks import MaskSpec
from layers import linear
from layers import position as position_lib
from layers import transformer as transformer_lib
from nbp.models import sizes

# variant: (layers, width, heads); the MLP is mlp_ratio * width wide.
SIZES = {
    "tiny": (2, 64, 4),
    "S": (3, 128, 4),
    "M": (4, 256, 8),
    "B": (6, 512, 8),
}
POSITIONS = ("none", "sinusoidal", "learned")


class SequenceModel(sizes.SizedByTable, nn.Module):
  """x [B, T, F] float -> y [B, T, O], causal over T; softmax attention or Aaren (`attention`)."""

  input_dim: int = 0  # F; tasks fill it from their data when the config leaves 0
  output_dim: int = 0  # O; tasks fill it (classes, horizon x channels, action dim, ...)
  attention: str = "softmax"  # "softmax" or "aaren"
  variant: str | None = "tiny"  # a key of SIZES; the three fields below override it when set
  num_layers: int | None = None  # N
  width: int | None = None  # E
  num_heads: int | None = None  # H (head dim E / H)
  mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * E
  activation: str = "gelu"  # "gelu" or "swiglu"
  norm: str = "layernorm"  # "layernorm" or "rmsnorm"
  position: str = "sinusoidal"  # "none", "sinusoidal" or "learned" (see the module docstring)
  max_len: int = 1024  # longest sequence: the learned table's rows and the streaming KV cache's slots
  attention_impl: str = "auto"  # softmax attention: kernels.dispatch.IMPLS
  scan_impl: str = "auto"  # Aaren: kernels.scan_attention.IMPLS
  scan_layers: bool = False  # stacked layers under nn.scan (faster compiles, slower CPU streaming)
  remat_policy: str = "none"  # see layers.transformer.DecoderStack
  dtype: Any = "float32"  # computation dtype (a name or a jnp dtype); parameters stay float32

  SIZES = SIZES  # depth, embed_dim, heads: nbp.models.sizes.SizedByTable

  def check(self) -> None:
    """Raises ValueError naming the first inconsistent field (config.model.<field>)."""
    for name in ("input_dim", "output_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"config.model.{name}={getattr(self, name)}: must be >= 1 (the task fills it from the "
                         "data when the config leaves 0)")
    if self.attention not in transformer_lib.ATTENTIONS:
      raise ValueError(f"config.model.attention={self.attention!r}: expected one of {transformer_lib.ATTENTIONS}")
    if self.position not in POSITIONS:
      raise ValueError(f"config.model.position={self.position!r}: expected one of {POSITIONS}")
    if min(self.depth, self.embed_dim, self.heads, self.max_len) < 1:
      raise ValueError("config.model: num_layers, width, num_heads and max_len must be >= 1")
    if self.embed_dim % self.heads:
      raise ValueError(f"config.model.width={self.embed_dim} is not a multiple of num_heads={self.heads}")
    if self.position == "sinusoidal" and self.embed_dim % 2:
      raise ValueError(f"config.model.width={self.embed_dim} must be even for sinusoidal positions")

  def _steps(self, batch: int, length: int, decode: bool):
    """Absolute step indices int32 [B, T]; while streaming, from the step counter in the "cache" collection."""
    start = 0
    if decode:
      ready = self.has_variable("cache", "steps_seen")
      counter = self.variable("cache", "steps_seen", lambda: jnp.array(0, jnp.int32))
      start = counter.value
      if ready:
        counter.value = start + length
    return jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))

  @nn.compact
  def __call__(self, x, *, valid=None, decode: bool = False):
    """x [B, T, F], valid bool [B, T] (right padding; None: all real) -> y float32 [B, T, O]."""
    self.check()
    dtype = jnp.dtype(self.dtype)
    width = self.embed_dim
    b, t, f = x.shape
    if f != self.input_dim:
      raise ValueError(f"inputs have {f} features per step but config.model.input_dim={self.input_dim}")
    if self.position == "learned" and not decode and t > self.max_len:
      raise ValueError(f"{t} steps exceed config.model.max_len={self.max_len} (the learned position table)")
    x = jnp.asarray(x, jnp.float32)
    kv_valid_len = None
    if valid is not None:
      x = jnp.where(valid[..., None], x, 0.0)  # padding never carries values (or NaN) into the model
      kv_valid_len = jnp.sum(valid, axis=-1, dtype=jnp.int32)  # [B]
    h = linear.DenseGeneral(width, kernel_axes=(None, "embed"), use_bias=True, dtype=dtype,
                            name="embed")(x.astype(dtype))  # [B, T, E]
    steps = self._steps(b, t, decode)
    if self.position == "learned":
      table = position_lib.LearnedPositionEmbedding(self.max_len, width, name="positions")
      h = h + table(jnp.minimum(steps, self.max_len - 1)).astype(h.dtype)
    elif self.position == "sinusoidal":
      h = h + position_lib.sinusoidal_positions(steps, width).astype(h.dtype)
    h = nn.with_logical_constraint(h, transformer_lib.ACTIVATION_AXES)
    h = transformer_lib.DecoderStack(
        num_layers=self.depth,
        block=dict(num_heads=self.heads, head_dim=width // self.heads, mlp_dim=self.mlp_ratio * width,
                   activation=self.activation, norm=self.norm, mask=MaskSpec("causal"),
                   impl=self.attention_impl, attention=self.attention, scan_impl=self.scan_impl,
                   dtype=dtype, max_decode_len=self.max_len),
        scan_layers=self.scan_layers, remat_policy=self.remat_policy, name="decoder",
    )(h, kv_valid_len=kv_valid_len, decode=decode)
    h = transformer_lib.make_norm(self.norm, name="final_norm")(h)
    return linear.DenseGeneral(self.output_dim, kernel_axes=("embed", None), use_bias=True, dtype=dtype,
                               name="head")(h).astype(jnp.float32)


Model = SequenceModel


def with_data_sizes(model: SequenceModel, *, input_dim: int, output_dim: int, data: str) -> SequenceModel:
  """`model` with input_dim / output_dim as `data` (named in errors) needs them; a config value must be 0 or that."""
  for field, value in (("input_dim", input_dim), ("output_dim", output_dim)):
    given = getattr(model, field)
    if given not in (0, value):
      raise ValueError(f"config.model.{field}={given}, but {data} needs {value} (or 0: filled from the data)")
  return dataclasses.replace(model, input_dim=input_dim, output_dim=output_dim)


# ---------------------------------------------------------------------------
# Streaming.


def init_state(model: SequenceModel, params, batch_size: int):
  """The streaming state of an empty prefix for `batch_size` streams (the "cache" collection)."""
  x = jnp.zeros((batch_size, 1, model.input_dim), jnp.float32)
  _, variables = model.apply({"params": params}, x, decode=True, mutable=["cache"])
  return variables["cache"]


def step(model: SequenceModel, params, state, x_t):
  """One time step of every stream: x_t [B, F] -> (state, y_t [B, O]). Jit it with the model static."""
  y, variables = model.apply({"params": params, "cache": state}, x_t[:, None], decode=True, mutable=["cache"])
  return variables["cache"], y[:, 0]


def stream(model: SequenceModel, params, x):
  """x [B, T, F] fed one step at a time from an empty state (a lax.scan of `step`) -> y [B, T, O]."""
  state = init_state(model, params, x.shape[0])

  def body(state, x_t):
    return step(model, params, state, x_t)

  _, y = jax.lax.scan(body, state, jnp.swapaxes(x, 0, 1))
  return jnp.swapaxes(y, 0, 1)
