"""The autoregressive energy-based transformer (EBT): a scalar energy per (context, candidate next state).

Dimension letters: B batch, L observed tokens, C candidates, V vocabulary
(text), F features per frame (continuous), E width, N layers.

One pass runs the sequence [s_k, x_0 .. x_{L-1}, p_0 .. p_{L-1}]:
- s_k, a learned step-embedding token (row k of a table of
  `num_step_embeddings`, one per optimisation step of the recipe), first and
  seen by every position;
- the observed stream x (token embeddings for text, a linear map of each
  frame for continuous data) under plain causal attention;
- the candidates p_i, guesses of x_{i+1}: for text a distribution over the
  vocabulary embedded by its own linear map (not the token embedding), for
  frames the frame vector through the observed stream's map. Candidate p_i
  attends to s_k, x_0 .. x_i and itself (layers/two_stream.py) and carries
  the rotary position of its target.
The energy head (a final RMSNorm, then a linear map to one scalar, no bias)
reads the candidate positions: one energy per position, and the energy of
p_i depends on no other candidate. Llama-style blocks of the shared stack:
RMSNorm (eps 1e-5), SwiGLU of hidden width `mlp_dim` (default E), RoPE
(theta 1e4), no biases.

Prediction is optimisation of the candidates against this energy; that
procedure (steps, step size alpha, Langevin noise, best-of-N) is
nbp/samplers/ebt.py's. The step size alpha is the model's: a fixed field, or
a learned scalar parameter "alpha" (`learn_alpha`), which the task puts in a
parameter group of its own.

Decoding (decode=True) keeps a KV cache of the observed stream for one step
embedding: the first call (`prefill=True`) writes s_k and the prompt, later
calls write one observed token each, and a call with candidates only reads
the cache (their energies, nothing written). The observed stream depends on
s_k, so a recipe with several step embeddings keeps one cache per embedding.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from layers import linear
from layers import transformer as transformer_lib
from nbp.models import sizes

# variant: (layers, width, heads). The official sizes, then small CPU settings.
SIZES = {
    "xxs": (6, 384, 6),
    "xs": (12, 384, 6),
    "small": (12, 768, 12),
    "medium": (24, 1024, 16),
    "large": (24, 1536, 16),
    "xl": (24, 2048, 32),
    "tiny": (2, 64, 4),
    "S": (4, 128, 4),
    "M": (6, 256, 8),
}


class EBT(sizes.SizedByTable, nn.Module):
  """(observed, candidates, step) -> energies float32 [B, C]; see the module docstring."""

  vocab_size: int = 0  # V: text (candidates are distributions over V); 0: continuous frames of input_dim
  input_dim: int = 0  # F: features per frame (continuous data; the task fills it)
  num_step_embeddings: int = 1  # rows of the step-embedding table (steps beyond it reuse the last)
  variant: str | None = "tiny"  # a key of SIZES; the three fields below override it when set
  num_layers: int | None = None  # N
  width: int | None = None  # E
  num_heads: int | None = None  # H (head dim E / H)
  mlp_dim: int | None = None  # SwiGLU hidden width; None: E (the official)
  max_len: int = 512  # decoding cache slots (step token + prompt + generated tokens)
  num_classes: int = 0  # > 0: a class token (the null class at index num_classes) follows the step token
  alpha: float = 5.0  # optimisation step size (its initial value when learned)
  learn_alpha: bool = False  # alpha a trained parameter ("alpha")
  attention_impl: str = "xla"  # the observed stream's attention; "xla" is the only twice-differentiable path
  scan_layers: bool = False  # stacked layers under nn.scan
  dtype: Any = "float32"  # computation dtype; parameters stay float32

  SIZES = SIZES

  @property
  def continuous(self) -> bool:
    return self.vocab_size == 0

  @property
  def candidate_dim(self) -> int:
    """Size of one candidate: V for text, F for frames."""
    return self.input_dim if self.continuous else self.vocab_size

  def check(self) -> None:
    """Raises ValueError naming the first inconsistent field (config.model.<field>)."""
    if self.continuous and self.input_dim < 1:
      raise ValueError("config.model: set vocab_size (text) or input_dim (frames, filled by the task)")
    if not self.continuous and self.input_dim:
      raise ValueError(f"config.model.input_dim={self.input_dim} with vocab_size={self.vocab_size}: text "
                       "candidates are distributions over the vocabulary; leave input_dim 0")
    if self.num_step_embeddings < 1:
      raise ValueError(f"config.model.num_step_embeddings={self.num_step_embeddings}: must be >= 1")
    if self.embed_dim % self.heads or (self.embed_dim // self.heads) % 2:
      raise ValueError(f"config.model.width={self.embed_dim} must split into num_heads={self.heads} heads of "
                       "an even size (RoPE)")
    if self.alpha < 1e-4:
      raise ValueError(f"config.model.alpha={self.alpha}: the step size is clamped to at least 1e-4")

  def _embedders(self, dtype):
    """(observed stream's embedding, candidates' embedding): for frames one shared linear map."""
    if self.continuous:
      frame = linear.DenseGeneral(self.embed_dim, kernel_axes=(None, "embed"), dtype=dtype, name="frame_embed")
      embed = lambda x: frame(jnp.asarray(x, dtype))
      return embed, embed
    table = nn.Embed(self.vocab_size, self.embed_dim, dtype=dtype,
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                     name="token_embed")
    candidate = linear.DenseGeneral(self.embed_dim, kernel_axes=("vocab", "embed"), dtype=dtype,
                                    name="candidate_embed")
    return table, lambda p: candidate(jnp.asarray(p, dtype))

  @nn.compact
  def __call__(self, observed, candidates, step=0, *, labels=None, decode: bool = False, prefill: bool = False):
    """observed int [B, L] (text) or [B, L, F], or None; candidates [B, C, V|F] or None -> energies [B, C].

    Uncached: both given, C = L (candidate i guesses observed i + 1). Decoding:
    see the module docstring. `step`: the step-embedding row (int, may be traced).
    With `num_classes`, labels int [B] (default the null class) become a class
    token after the step token, the first of the observed stream: then C = L + 1,
    and candidate 0 guesses the first frame from the class alone.
    """
    self.check()
    dtype = jnp.dtype(self.dtype)
    width = self.embed_dim
    if self.learn_alpha:
      self.param("alpha", nn.initializers.constant(self.alpha), (), jnp.float32)
    step_table = self.param("step_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                           (None, "embed")),
                            (self.num_step_embeddings, width), jnp.float32)
    embed_observed, embed_candidates = self._embedders(dtype)
    parts = []
    if not decode or prefill:
      batch = (observed if observed is not None else candidates).shape[0]
      row = jnp.take(step_table, jnp.minimum(step, self.num_step_embeddings - 1), axis=0)
      parts.append(jnp.broadcast_to(row.astype(dtype), (batch, 1, width)))
      if self.num_classes:
        labels = jnp.full((batch,), self.num_classes, jnp.int32) if labels is None else labels
        classes = nn.Embed(self.num_classes + 1, width, dtype=dtype, name="class_embed",
                           embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")))
        parts.append(classes(labels)[:, None])
    if observed is not None:
      parts.append(embed_observed(observed))
    num_observed = sum(p.shape[1] for p in parts)
    if candidates is not None:
      parts.append(embed_candidates(candidates))
    h = jnp.concatenate(parts, axis=1)  # [B, O + C, E]
    h = nn.with_logical_constraint(h, transformer_lib.ACTIVATION_AXES)
    h = transformer_lib.DecoderStack(
        num_layers=self.depth,
        block=dict(num_heads=self.heads, head_dim=width // self.heads, mlp_dim=self.mlp_dim or width,
                   activation="swiglu", norm="rmsnorm", attention="two_stream", num_observed=num_observed,
                   impl=self.attention_impl, dtype=dtype, max_decode_len=self.max_len),
        scan_layers=self.scan_layers, name="decoder",
    )(h, decode=decode)
    h = h[:, num_observed:]  # the candidates [B, C, E]
    h = nn.RMSNorm(epsilon=1e-5, dtype=jnp.float32,
                   scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                   name="final_norm")(h.astype(jnp.float32))
    energy = linear.DenseGeneral(1, kernel_axes=("embed", None), dtype=jnp.float32, name="energy_head")(h)
    return energy[..., 0]  # [B, C]


Model = EBT
