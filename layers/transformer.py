"""Transformer pieces: norms, MLP, adaLN modulation, the pre-norm block, the stack.

Dimension letters: B batch, T tokens, E width, F mlp hidden width,
C condition width, N number of layers.

A block is pre-norm: x + Attn(Norm(x)), then x + Mlp(Norm(x)). Its attention
is softmax multi-head attention or, with `attention="aaren"`, Aaren's
learned-query prefix-scan attention (layers/aaren.py), everything else
unchanged: any causal model built on the stack switches by that one field.
`attention="two_stream"` (layers/two_stream.py) serves the energy-based
transformer: observed tokens and candidates in one sequence.
With adaLN
(DiT-style, used by xAR) a condition c [B, C] or per token [B, T, C] gives a
shift, scale and gate per sub-block; by default the gates start at zero so a
fresh block is the identity (`adaln_init` picks another initializer). A block
may add biases to its attention projections (`attention_bias`) and dropout on
its two sub-block outputs in training (`dropout_rate`, `deterministic=False`).
The stack (DecoderStack) runs N blocks, either scanned over one
set of stacked weights (fast to compile, the "layers" axis shards) or as a Python
loop of blocks layer_0..layer_{N-1} (fast decoding on CPU, where a matrix-vector
product against a slice of a stacked weight is slow). The final norm belongs to
the model, not to the stack.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from kernels.masks import MaskSpec
from layers import linear
from layers.aaren import AarenAttention
from layers.attention import MultiHeadAttention
from layers.two_stream import TwoStreamAttention

ACTIVATION_AXES = ("batch", "length", "embed")


def constrain(x):
  """Logical sharding constraint of an activation [B, T, E] (no-op without rules)."""
  return nn.with_logical_constraint(x, ACTIVATION_AXES)


# ----------------------------------------------------------------------------
# Norms: computed in float32, output in the input dtype, scale named "norm".


class LayerNorm(nn.Module):
  """nn.LayerNorm in float32 with a logically partitioned scale and bias."""

  epsilon: float = 1e-6  # added to the variance
  use_scale: bool = True  # learned scale (off under adaLN, which supplies one)
  use_bias: bool = True  # learned bias
  param_dtype: jnp.dtype = jnp.float32  # storage dtype of scale and bias

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(
        epsilon=self.epsilon, use_scale=self.use_scale, use_bias=self.use_bias,
        dtype=jnp.float32, param_dtype=self.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        name="norm")(x.astype(jnp.float32))
    return y.astype(x.dtype)


class RMSNorm(nn.Module):
  """nn.RMSNorm in float32 with a logically partitioned scale."""

  epsilon: float = 1e-6  # added to the mean square
  use_scale: bool = True  # learned scale
  param_dtype: jnp.dtype = jnp.float32  # storage dtype of the scale

  @nn.compact
  def __call__(self, x):
    y = nn.RMSNorm(
        epsilon=self.epsilon, use_scale=self.use_scale, dtype=jnp.float32,
        param_dtype=self.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        name="norm")(x.astype(jnp.float32))
    return y.astype(x.dtype)


NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}


def make_norm(kind: str, **kwargs) -> nn.Module:
  """A norm module of `kind` ("layernorm" or "rmsnorm"), built with kwargs."""
  if kind not in NORMS:
    raise ValueError(f"norm={kind!r}: expected one of {sorted(NORMS)}")
  if kind == "rmsnorm":
    kwargs.pop("use_bias", None)  # RMSNorm has no bias
  return NORMS[kind](**kwargs)


# ----------------------------------------------------------------------------
# MLP and adaLN.

ACTIVATIONS = ("gelu", "swiglu")


class Mlp(nn.Module):
  """Feed-forward x [B, T, E] -> [B, T, E] through a hidden width F."""

  hidden_dim: int  # F
  activation: str = "gelu"  # "gelu": wo(gelu(wi x)); "swiglu": wo(silu(wi_gate x) * wi_up x)
  dtype: jnp.dtype = jnp.float32  # computation dtype
  param_dtype: jnp.dtype = jnp.float32  # parameter storage dtype
  kernel_init: Callable = nn.initializers.lecun_normal()  # initializer of every kernel

  def _dense(self, features, names, name):
    return nn.Dense(
        features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(self.kernel_init, names), name=name)

  @nn.compact
  def __call__(self, x):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r}: expected one of {ACTIVATIONS}")
    *lead, width = x.shape
    # Rows [B*T, E]: XLA's CPU backend ran the MLP's forward and backward 1.2-1.5x faster on one row axis
    # than on [B, T] (its weight gradients otherwise contract two axes through a transposing fusion).
    x = x.astype(self.dtype).reshape(-1, width)
    if self.activation == "swiglu":
      gate = self._dense(self.hidden_dim, ("embed", "mlp"), "wi_gate")(x)  # [B*T, F]
      up = self._dense(self.hidden_dim, ("embed", "mlp"), "wi_up")(x)  # [B*T, F]
      h = nn.silu(gate) * up
    else:
      h = nn.gelu(self._dense(self.hidden_dim, ("embed", "mlp"), "wi")(x))  # [B*T, F]
    h = nn.with_logical_constraint(h, ("batch", "mlp"))  # B*T rows, split as the batch is
    return self._dense(width, ("mlp", "embed"), "wo")(h).reshape(*lead, width)  # [B, T, E]


def modulate(x, shift, scale):
  """adaLN modulation of a normalised activation."""
  return x * (1 + scale) + shift


class AdaLNModulation(nn.Module):
  """Condition c [B, C] or [B, T, C] -> 6 tensors [B, 1|T, E], zero at init.

  Order: shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp.
  """

  features: int  # E, width of the modulated activations
  num_chunks: int = 6  # shift/scale/gate for attention and for the mlp
  dtype: jnp.dtype = jnp.float32  # computation dtype
  param_dtype: jnp.dtype = jnp.float32  # parameter storage dtype
  kernel_init: Callable = nn.initializers.zeros  # of the kernel [C, num_chunks, E]; zeros: no modulation at init

  @nn.compact
  def __call__(self, c):
    if c.ndim == 2:
      c = c[:, None, :]  # [B, C] -> [B, 1, C], broadcast over tokens
    mods = linear.DenseGeneral(
        features=(self.num_chunks, self.features), kernel_axes=(None, None, "embed"), use_bias=True,
        dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init,
        name="proj")(nn.silu(c.astype(self.dtype)))  # [B, 1|T, 6, E]
    return tuple(mods[..., i, :] for i in range(self.num_chunks))


# ----------------------------------------------------------------------------
# Block and stack.


ATTENTIONS = ("softmax", "aaren", "two_stream")


def is_causal(mask: MaskSpec) -> bool:
  """True iff `mask` is plain causal attention (what Aaren computes): causal, or block-causal of 1-token blocks."""
  if mask.kind not in ("causal", "block_causal") or not mask.tiled:
    return False
  block_len, prefix_len = mask.block_causal_numbers(kv_len=1)
  return block_len == 1 and prefix_len <= 1  # a prefix of one token is the causal mask


class TransformerBlock(nn.Module):
  """Pre-norm transformer block x [B, T, E] -> [B, T, E], optionally adaLN-conditioned."""

  num_heads: int  # H
  head_dim: int  # D
  mlp_dim: int  # F
  num_kv_heads: int | None = None  # K; None: K = H
  activation: str = "gelu"  # "gelu" or "swiglu"
  norm: str = "layernorm"  # "layernorm" or "rmsnorm"
  mask: MaskSpec = MaskSpec("causal")  # attention mask
  rope: str | None = None  # None, "1d", "2d", "3d"
  rope_base: float = 10000.0  # RoPE frequency base
  impl: str = "xla"  # attention implementation
  dtype: jnp.dtype = jnp.float32  # computation dtype
  param_dtype: jnp.dtype = jnp.float32  # parameter storage dtype
  max_decode_len: int | None = None  # KV cache length; None: T of the init input
  adaln: bool = False  # condition every sub-block on `cond` through adaLN
  adaln_init: Callable = nn.initializers.zeros  # the adaLN modulation kernel's initializer
  attention_bias: bool = False  # biases on the q/k/v/out projections of softmax attention
  dropout_rate: float = 0.0  # dropout on the attention and MLP outputs before each residual add (training only)
  # "softmax" (MultiHeadAttention), "aaren" (AarenAttention; causal masks only) or "two_stream"
  # (layers/two_stream.py: `num_observed` observed tokens first, then candidates; `mask` and `rope` unused).
  attention: str = "softmax"
  num_observed: int = 0  # two_stream: how many of the tokens are the observed stream
  scan_impl: str = "auto"  # Aaren's scan implementation (kernels.scan_attention.IMPLS)

  def _attention(self):
    if self.attention not in ATTENTIONS:
      raise ValueError(f"config.model.attention={self.attention!r}: expected one of {ATTENTIONS}")
    if self.attention == "softmax":
      return MultiHeadAttention(
          num_heads=self.num_heads, head_dim=self.head_dim, num_kv_heads=self.num_kv_heads,
          mask=self.mask, rope=self.rope, rope_base=self.rope_base, impl=self.impl,
          dtype=self.dtype, param_dtype=self.param_dtype, max_decode_len=self.max_decode_len,
          use_bias=self.attention_bias, name="attention")
    if self.attention == "two_stream":
      return TwoStreamAttention(
          num_heads=self.num_heads, head_dim=self.head_dim, num_observed=self.num_observed,
          num_kv_heads=self.num_kv_heads, rope_base=self.rope_base, impl=self.impl, dtype=self.dtype,
          param_dtype=self.param_dtype, max_decode_len=self.max_decode_len, name="attention")
    if not is_causal(self.mask):
      raise ValueError(f"config.model.attention='aaren' computes causal attention; this model's mask is "
                       f"{self.mask} (blocks, a prefix or full attention): use attention='softmax'")
    return AarenAttention(num_heads=self.num_heads, head_dim=self.head_dim, scan_impl=self.scan_impl,
                          dtype=self.dtype, param_dtype=self.param_dtype, name="attention")

  @nn.compact
  def __call__(self, x, cond=None, *, positions=None, kv_valid_len=None, decode=False, deterministic=True):
    """deterministic=False applies dropout_rate (the apply then needs a "dropout" rng)."""
    if self.adaln != (cond is not None):
      raise ValueError(f"adaln={self.adaln} but cond is {'missing' if cond is None else 'given'}")
    width = x.shape[-1]
    x = constrain(x)
    norm_kwargs = dict(use_scale=not self.adaln, use_bias=not self.adaln, param_dtype=self.param_dtype)
    if self.adaln:
      shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = AdaLNModulation(
          width, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.adaln_init, name="adaln")(cond)
    dropout = nn.Dropout(self.dropout_rate, deterministic=deterministic or not self.dropout_rate)

    h = make_norm(self.norm, name="attention_norm", **norm_kwargs)(x)
    if self.adaln:
      h = modulate(h, shift_a, scale_a)
    h = dropout(self._attention()(h, positions=positions, kv_valid_len=kv_valid_len, decode=decode))
    if self.adaln:
      h = gate_a * h
    x = constrain(x + h.astype(x.dtype))

    h = make_norm(self.norm, name="mlp_norm", **norm_kwargs)(x)
    if self.adaln:
      h = modulate(h, shift_m, scale_m)
    h = dropout(Mlp(self.mlp_dim, self.activation, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(h))
    if self.adaln:
      h = gate_m * h
    return constrain(x + h.astype(x.dtype))


# "none": no rematerialisation; "full": recompute everything (save only the
# block inputs); the rest name policies of jax.checkpoint_policies.
REMAT_POLICIES = (
    "none", "full", "nothing_saveable", "everything_saveable", "dots_saveable",
    "dots_with_no_batch_dims_saveable", "checkpoint_dots", "checkpoint_dots_with_no_batch_dims")


def remat_policy(name: str):
  """The jax.checkpoint policy of `name`; "full" (save nothing) is None."""
  if name not in REMAT_POLICIES or name == "none":
    raise ValueError(f"remat_policy={name!r}: expected one of {REMAT_POLICIES}")
  return None if name == "full" else getattr(jax.checkpoint_policies, name)


class DecoderStack(nn.Module):
  """N transformer blocks x [B, T, E] -> [B, T, E] (no final norm).

  `block` holds the TransformerBlock fields (a dict such as
  {"num_heads": 8, "head_dim": 64, "mlp_dim": 2048, "mask": MaskSpec(...)}).
  """

  num_layers: int  # N
  block: Mapping[str, Any]  # keyword arguments of every TransformerBlock
  scan_layers: bool = False  # one nn.scan over stacked weights (axis "layers") vs a loop
  remat_policy: str = "none"  # "none", "full" or a jax.checkpoint_policies name

  def __post_init__(self):
    self.block = flax.core.FrozenDict(self.block)  # hashable, so the module can be a static arg
    super().__post_init__()

  @nn.compact
  def __call__(self, x, cond=None, *, positions=None, kv_valid_len=None, decode=False, deterministic=True):
    def body(block, carry, cond, positions, kv_valid_len):
      out = block(carry, cond, positions=positions, kv_valid_len=kv_valid_len, decode=decode,
                  deterministic=deterministic)
      return out, None

    if self.remat_policy != "none" and not decode:  # no gradients while decoding
      body = nn.remat(body, policy=remat_policy(self.remat_policy), prevent_cse=not self.scan_layers)
    elif self.remat_policy != "none":
      remat_policy(self.remat_policy)  # still reject unknown names

    if self.scan_layers:
      scanned = nn.scan(
          body, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=self.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(TransformerBlock(**self.block, name="layers"), x, cond, positions, kv_valid_len)
      return x
    for i in range(self.num_layers):
      x, _ = body(TransformerBlock(**self.block, name=f"layer_{i}"), x, cond, positions, kv_valid_len)
    return x
