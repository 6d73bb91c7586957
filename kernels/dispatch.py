"""One entry point per kernel family: it picks the implementation per backend.

`attention(q, k, v, mask=MaskSpec(...), ...)` serves every model's attention:

  impl              what runs                                      serves
  "xla"             kernels.reference.xla_attention, dense mask    everything (decode, 2nd order)
  "xla_blocksparse" kernels.blocksparse: only the visible keys     self-attention (q_offset 0, T == S)
  "pallas"          kernels.block_attention.block_attention        q_offset 0; interpret mode on CPU
  "cudnn"           jax.nn.dot_product_attention(cudnn), dense mask GPU only
  "auto"            resolve_impl: Pallas on GPU/TPU, on CPU xla_blocksparse for long
                    self-attention and xla otherwise (short sequences, decoding)

`scan(s, v, valid)` forwards to kernels.scan_attention.scan_attention_auto
(Aaren's prefix-scan attention), so both kernels have this one module.

Every kernel module is imported here: they are part of the package, and a
kernel that fails to import is an error at import time, not a silent fallback.
The masks come from kernels.masks (MaskSpec).

Dimension letters: B batch, T queries, S keys, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels import block_attention
from kernels import blocksparse
from kernels import masks
from kernels import reference
from kernels import scan_attention

IMPLS = ("auto", "xla", "xla_blocksparse", "pallas", "cudnn")

# "auto" on CPU switches from dense xla to xla_blocksparse at this self-attention
# length. Measured on the 2-core CPU (float32, H=4, forward + backward,
# dense/blocksparse time, medians of interleaved runs):
#   B=1, D=64, L=16: 1.02 at T=128, 0.95 at 256, 1.02 at 336, 1.63 at 512
#     (1.9 at 1024, 3.4 at 4096, 4.8 at 8192: experiments/benchmark_kernels.py);
#   B=1, D=32, L=8:  0.98 at 128, 1.17 at 256, 1.22 at 336, 1.93 at 512;
#   B=8, D=32, L=8:  1.04 at 128, 1.04 at 256, 1.12 at 336, 1.45 at 512.
# The demo's NBP training step (XS, 332 tokens, batch 8, 8-token rows) runs in
# 0.82-0.87x the time with it. Below about 320 tokens the two are even and the dense
# path compiles to fewer ops.
AUTO_BLOCKSPARSE_MIN_LEN = 320

ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


class AttentionImplError(NotImplementedError, ValueError):
  """An attention implementation cannot serve a request (or does not exist)."""


def _is_static_zero(q_offset) -> bool:
  """True iff q_offset is known at trace time to be 0 (a traced cache index is not)."""
  if isinstance(q_offset, jax.core.Tracer):
    return False
  try:
    return int(np.asarray(q_offset)) == 0
  except (TypeError, ValueError):
    return False


def _is_self_attention(q_len, kv_len, q_offset) -> bool:
  return q_len == kv_len and _is_static_zero(q_offset)


def check_impl(impl: str) -> None:
  """Raises AttentionImplError naming impl and the choices unless impl is one of IMPLS."""
  if impl not in IMPLS:
    raise AttentionImplError(f"attention impl {impl!r} is unknown; choose one of {IMPLS}")


def resolve_impl(impl: str, backend: str, q_len: int, kv_len: int, q_offset=0, tiled: bool = True) -> str:
  """The implementation that `impl` means for this backend and these shapes.

  "auto": on GPU and TPU "pallas" for self-attention (q_offset 0, T == S), "xla"
  for decoding; on CPU "xla_blocksparse" for self-attention of at least
  AUTO_BLOCKSPARSE_MIN_LEN tokens, "xla" otherwise. A mask that is not `tiled`
  (blocks of several sizes, teacher forcing) is dense "xla" under "auto" and
  refused by the block kernels. An explicit impl is returned as is once
  checked: AttentionImplError says why it cannot serve the request.
  """
  check_impl(impl)
  self_attention = _is_self_attention(q_len, kv_len, q_offset)
  if not tiled:
    if impl in ("pallas", "xla_blocksparse"):
      raise AttentionImplError(f"attention impl {impl!r} takes block-causal masks of one block length; this "
                               "mask has blocks of several sizes: use impl 'xla', 'cudnn' or 'auto'")
    return "xla" if impl == "auto" else impl
  if impl == "auto":
    if backend in ACCELERATORS:
      return "pallas" if self_attention else "xla"
    return "xla_blocksparse" if self_attention and q_len >= AUTO_BLOCKSPARSE_MIN_LEN else "xla"
  if impl == "xla_blocksparse" and not self_attention:
    raise AttentionImplError(
        f"attention impl 'xla_blocksparse' serves self-attention only (q_offset 0 and as many keys "
        f"as queries); got {q_len} queries, {kv_len} keys, q_offset={q_offset!r} (a KV-cache decode "
        f"step?): use impl 'xla' or 'auto'")
  if impl == "pallas" and not _is_static_zero(q_offset):
    raise AttentionImplError(
        f"attention impl 'pallas' needs queries starting at position 0; got q_offset={q_offset!r} "
        f"(a KV-cache decode step?): use impl 'xla' or 'auto'")
  if impl == "cudnn" and backend not in ("gpu", "cuda"):
    raise AttentionImplError(f"attention impl 'cudnn' needs an NVIDIA GPU; the backend is {backend!r}")
  return impl


def attention(q, k, v, *, mask: masks.MaskSpec, kv_valid_len=None, q_offset=0, impl="auto"):
  """Softmax attention q [B, T, H, D], k and v [B, S, K, D] -> [B, T, H, D] (H % K == 0).

  mask: a MaskSpec (full, causal, block-causal with a prefix or with blocks of
  several sizes, teacher forcing); query t sits at
  absolute position q_offset + t (q_offset may be traced: the cache index while
  decoding). kv_valid_len: None or int [B] (a scalar is broadcast), keys at
  s >= kv_valid_len[b] are hidden. Scale 1/sqrt(D), float32 softmax, masked
  logits a large finite negative, output in q.dtype.

  impl: one of IMPLS (see the module docstring and `resolve_impl`). "pallas"
  runs the Pallas kernel with interpret=True when the default backend is the
  CPU, so it can be tested there (slowly). An implementation that cannot serve
  the request raises AttentionImplError naming it and the reason.
  """
  b, t = q.shape[:2]
  s = k.shape[1]
  if not isinstance(mask, masks.MaskSpec):
    raise TypeError(f"mask must be a kernels.masks.MaskSpec, got {type(mask).__name__}")
  backend = jax.default_backend()
  chosen = resolve_impl(impl, backend, t, s, q_offset, tiled=mask.tiled)
  if kv_valid_len is not None:
    kv_valid_len = jnp.broadcast_to(jnp.asarray(kv_valid_len, jnp.int32), (b,))

  if chosen == "xla":
    dense = masks.dense_mask(mask, t, s, kv_valid_len=kv_valid_len, q_offset=q_offset)
    return reference.xla_attention(q, k, v, dense)

  if chosen == "cudnn":
    if q.dtype not in (jnp.bfloat16, jnp.float16):
      raise AttentionImplError(f"attention impl 'cudnn' needs bfloat16 or float16 inputs, got {q.dtype}")
    # [1|B, 1, T, S]: broadcast over heads by cuDNN; grouped-query k/v go in as they are.
    dense = masks.dense_mask(mask, t, s, kv_valid_len=kv_valid_len, q_offset=q_offset)
    return jax.nn.dot_product_attention(q, k, v, mask=dense, implementation="cudnn").astype(q.dtype)

  block_len, prefix_len = mask.block_causal_numbers(s)
  if chosen == "xla_blocksparse":
    return blocksparse.block_attention_blocksparse(
        q, k, v, block_len=block_len, prefix_len=prefix_len, kv_valid_len=kv_valid_len)

  assert chosen == "pallas", chosen
  return block_attention.block_attention(
      q, k, v, block_len=block_len, prefix_len=prefix_len, kv_valid_len=kv_valid_len,
      interpret=backend == "cpu")


def scan(s, v, valid=None, *, impl="auto"):
  """Aaren's prefix-scan attention: kernels.scan_attention.scan_attention_auto(s, v, valid, impl=impl).

  s [B, T, H] scores, v [B, T, H, D] values, valid bool [B, T] (None: all) ->
  o [B, T, H, D]. impl: one of kernels.scan_attention.IMPLS, passed through;
  "auto" is the Pallas kernel on GPU/TPU and the chunked XLA scan on CPU.
  """
  return scan_attention.scan_attention_auto(s, v, valid, impl=impl)
