"""Block-bidirectional flash attention: a Pallas kernel beside its jnp reference.

The mask is `kernels.masks.block_causal_mask(T, S, block_len=L, prefix_len=P)`
(keys 0..P-1 are a prefix that every query sees; after it, query i sees key j
iff (i - P) // L >= (j - P) // L; L = 1 is causal attention, L >= T full
attention), and-ed with key padding: key j of example b is visible iff
j < kv_valid_len[b]. Scale 1 / sqrt(D), softmax in float32, output in q.dtype.
The reference is `kernels.reference.block_causal_attention`.

The keys a query i sees are always a contiguous range [0, end(i)), end(i) =
`masks.visible_key_end(i)`, and end(i) grows with i. So the key tiles a query
tile needs are the tiles 0..n(i)-1, and the query tiles that need a key tile
are the tiles first(j)..last (`masks.first_seeing_query`); both bounds are
computed in the kernels (`_num_key_tiles`, `_query_tile_range`) and are the
bounds of their loops: tiles above the block diagonal (outside the prefix
columns) or beyond kv_valid_len are never loaded nor multiplied, in the forward
pass and in both backward kernels. The mask of a tile is
`k < min(end(i), kv_valid_len)` from the same formula. `visited_tiles`
evaluates the very same functions in numpy, and `visible_tile_fraction` is the
share of tiles visited (the benchmark counts FLOPs with it).

Kernels (GPU through the Triton lowering, CPU with interpret=True):
  forward  grid (B, H, T/bq): online softmax over the key tiles of one query
           tile; saves the log-sum-exp lse [B, H, T] float32.
  dq       grid (B, H, T/bq): the same key loop, P = exp(s - lse) recomputed.
  dk, dv   grid (B, K, S/bk): one key tile against the query tiles that see
           it, for the G = H / K query heads of its kv head (grouped-query:
           k and v are never repeated; the index maps pick head h // G).
delta = rowsum(dO * O) is computed in jnp between the two. Nothing of size
T x S is ever materialised.

Lengths that are not a multiple of the tile are padded up; padded keys are
invisible (the kernels use min(kv_valid_len, S)), padded query rows are sliced
off. Masked logits are the large finite masks.MASK_VALUE, never -inf, and the
probabilities of invisible pairs are set to exactly 0, so a row without any
visible key (only possible with kv_valid_len 0) gives a zero output and zero
gradients. (The dense reference gives such a row the mean of v instead.)

Triton on GPU: tiles must be powers of two >= 16, and the head dimension is
zero-padded to one (this changes no logit). Default tiles: 64 x 64 (smaller
for short sequences) on GPU and on CPU, 128 x 128 on TPU. T != S is supported
(queries and keys both start at position 0); decoding with a query offset is
not.

TPU route: jax's own splash attention (`jax.experimental.pallas.ops.tpu.
splash_attention`), tuned for TPU by its authors and already block-sparse: a
`_ComputableMask` subclass (`BlockCausalMask`) evaluates the block-causal +
prefix mask in the kernel from positions, so no dense T x S mask exists even
on the host, and splash skips the empty tiles from it. Rewriting a Mosaic TPU
flash kernel here would duplicate that work. Heads are moved to splash's
[H, T, D] layout and the batch is vmapped; key padding is splash's segment ids
(queries 1, valid keys 1, padded keys 0). The scale is folded into q, as
splash does not scale. Sequences are padded to multiples of 128 (splash needs
key tiles of 128 lanes). This route was written against the installed jax
0.10.2 sources and is UNTESTED ON TPU HARDWARE in this session (its test is
marked `tpu`); rows without any visible key are set to zero after the call.

Dimension letters: B batch, T query length, S key length, H query heads,
K kv heads, G = H / K, D head dim, L tokens per block, P prefix length,
bq / bk query / key tile.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask

from kernels import masks

# Default tiles (rows of q x rows of k) per backend.
DEFAULT_BLOCK = {"gpu": 64, "cpu": 64, "tpu": 128}
# Splash attention needs key tiles that are a multiple of 128 lanes.
TPU_LANES = 128
GPU_BACKENDS = ("gpu", "cuda", "rocm")


# ----------------------------------------------------------------------------
# Which tiles are visited: the formulas of kernels/masks.py, in numpy (tests,
# benchmark) and on traced scalars inside the kernels.


def _num_key_tiles(q_tile, kv_len, *, block_q, block_k, block_len, prefix_len):
  """Key tiles 0..n-1 hold every key that some query of tile q_tile sees."""
  xp = masks.array_module(q_tile)
  last_query = q_tile * block_q + block_q - 1
  end = masks.visible_key_end(last_query, block_len=block_len, prefix_len=prefix_len)
  return masks.index_div(xp.minimum(end, kv_len) + block_k - 1, block_k)


def _query_tile_range(k_tile, kv_len, num_q_tiles, *, block_q, block_k, block_len, prefix_len):
  """Query tiles [lo, hi) hold every query that sees some key of tile k_tile."""
  xp = masks.array_module(k_tile)
  first_key = k_tile * block_k
  first_query = masks.first_seeing_query(first_key, block_len=block_len, prefix_len=prefix_len)
  lo = masks.index_div(first_query, block_q)
  hi = xp.where(first_key < kv_len, num_q_tiles, lo)
  return lo, hi


def visited_tiles(q_len, kv_len, block_len, prefix_len, block_q, block_k, *, by="query",
                  kv_valid_len=None):
  """Bool [ceil(T/bq), ceil(S/bk)]: the tiles the kernels visit.

  by="query": the key loop of the forward and dq kernels; by="key": the query
  loop of the dk/dv kernel. kv_valid_len: one example's valid key count
  (default S). Both give the same set: the tiles with at least one visible pair.
  """
  nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
  valid = kv_len if kv_valid_len is None else min(kv_valid_len, kv_len)
  kw = dict(block_q=block_q, block_k=block_k, block_len=block_len, prefix_len=prefix_len)
  tiles = np.zeros((nq, nk), dtype=bool)
  if by == "query":
    for i in range(nq):
      tiles[i, :int(_num_key_tiles(i, valid, **kw))] = True
  elif by == "key":
    for j in range(nk):
      lo, hi = _query_tile_range(j, valid, nq, **kw)
      tiles[int(lo):int(hi), j] = True
  else:
    raise ValueError(f"by={by!r}: expected 'query' or 'key'")
  return tiles


def visible_tile_fraction(q_len, kv_len, block_len, prefix_len, block_q, block_k):
  """Share of the (T/bq) x (S/bk) tiles the kernels visit (FLOPs of visited tiles)."""
  return float(visited_tiles(q_len, kv_len, block_len, prefix_len, block_q, block_k).mean())


# ----------------------------------------------------------------------------
# Pallas kernels (Triton on GPU, interpreted on CPU).


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static numbers of one kernel call."""

  block_len: int  # L
  prefix_len: int  # P
  block_q: int  # bq, query rows per tile
  block_k: int  # bk, key rows per tile
  scale: float  # 1 / sqrt(D) of the unpadded head dim
  interpret: bool  # run the kernels in the Pallas interpreter
  num_warps: int | None  # Triton only; None: interpret mode
  num_stages: int | None  # Triton only

  @property
  def tiles(self):
    return dict(block_q=self.block_q, block_k=self.block_k, block_len=self.block_len,
                prefix_len=self.prefix_len)

  def call(self, kernel, **kwargs):
    params = None
    if self.num_warps is not None:
      params = plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)
    return pl.pallas_call(kernel, interpret=self.interpret, compiler_params=params, **kwargs)


def _visible(q_pos, k_pos, kv_len, cfg):
  """Bool [bq, bk] from q_pos [bq, 1] and k_pos [1, bk]: the mask of a tile."""
  end = masks.visible_key_end(q_pos, block_len=cfg.block_len, prefix_len=cfg.prefix_len)  # [bq, 1]
  return k_pos < jnp.minimum(end, kv_len)


def _positions(start, size, axis):
  shape = (size, 1) if axis == 0 else (1, size)
  return start + lax.broadcasted_iota(jnp.int32, shape, axis)


_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a, b, dims):
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _forward_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg):
  """One query tile: online softmax over the key tiles it needs."""
  b, i = pl.program_id(0), pl.program_id(2)
  bq, bk = cfg.block_q, cfg.block_k
  kv_len = len_ref[b]
  q = q_ref[...]  # [bq, D]
  q_pos = _positions(i * bq, bq, 0)

  def body(j, carry):
    acc, m, l = carry
    k = k_ref[pl.ds(j * bk, bk), :]  # [bk, D]
    v = v_ref[pl.ds(j * bk, bk), :]
    visible = _visible(q_pos, _positions(j * bk, bk, 1), kv_len, cfg)
    s = jnp.where(visible, _dot(q, k, _NT) * cfg.scale, masks.MASK_VALUE)  # [bq, bk]
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    correction = jnp.exp(m - m_new)
    p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
    l = l * correction + jnp.sum(p, axis=1)
    acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v, _NN)
    return acc, m_new, l

  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), masks.MASK_VALUE, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  num_k = _num_key_tiles(i, kv_len, **cfg.tiles)
  acc, m, l = lax.fori_loop(0, num_k, body, init)
  l = jnp.where(l > 0.0, l, 1.0)  # rows without a visible key: acc is 0
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _probs(q, k, q_pos, k_pos, lse, kv_len, cfg):
  """Softmax probabilities [bq, bk] of a tile recomputed from the saved lse."""
  visible = _visible(q_pos, k_pos, kv_len, cfg)
  s = jnp.where(visible, _dot(q, k, _NT) * cfg.scale, masks.MASK_VALUE)
  return jnp.where(visible, jnp.exp(s - lse[:, None]), 0.0)


def _dq_kernel(len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg):
  """dq of one query tile, over the same key tiles as the forward pass."""
  b, i = pl.program_id(0), pl.program_id(2)
  bq, bk = cfg.block_q, cfg.block_k
  kv_len = len_ref[b]
  q, do = q_ref[...], do_ref[...]  # [bq, D]
  lse, delta = lse_ref[...], delta_ref[...]  # [bq]
  q_pos = _positions(i * bq, bq, 0)

  def body(j, dq):
    k = k_ref[pl.ds(j * bk, bk), :]
    v = v_ref[pl.ds(j * bk, bk), :]
    p = _probs(q, k, q_pos, _positions(j * bk, bk, 1), lse, kv_len, cfg)
    dp = _dot(do, v, _NT)  # [bq, bk]
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k, _NN)

  num_k = _num_key_tiles(i, kv_len, **cfg.tiles)
  dq = lax.fori_loop(0, num_k, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                cfg, groups, num_q_tiles):
  """dk, dv of one key tile of kv head h: the query tiles that see it, G heads each."""
  b, j = pl.program_id(0), pl.program_id(2)
  bq, bk = cfg.block_q, cfg.block_k
  kv_len = len_ref[b]
  k, v = k_ref[...], v_ref[...]  # [bk, D]
  k_pos = _positions(j * bk, bk, 1)
  lo, hi = _query_tile_range(j, kv_len, num_q_tiles, **cfg.tiles)
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for g in range(groups):  # the query heads of this kv head (static, usually few)

    def body(i, carry, g=g):
      dk, dv = carry
      rows = pl.ds(i * bq, bq)
      q = q_ref[rows, g, :]  # [bq, D]
      do = do_ref[rows, g, :]
      lse, delta = lse_ref[g, rows], delta_ref[g, rows]  # [bq]
      p = _probs(q, k, _positions(i * bq, bq, 0), k_pos, lse, kv_len, cfg)  # [bq, bk]
      dv = dv + _dot(p.astype(do.dtype), do, _TN)
      ds = p * (_dot(do, v, _NT) - delta[:, None])
      dk = dk + _dot(ds.astype(q.dtype), q, _TN)
      return dk, dv

    dk, dv = lax.fori_loop(lo, hi, body, (dk, dv))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _forward(q, k, v, kv_len, cfg):
  """q [B, T, H, D], k, v [B, S, K, D] (T, S multiples of the tiles) -> o, lse [B, H, T]."""
  b, t, h, d = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  groups = h // kv_heads
  bq = cfg.block_q
  row = lambda bi, hi, i: (bi, i, hi, 0)
  whole_kv = lambda bi, hi, i: (bi, 0, hi // groups, 0)
  return cfg.call(
      functools.partial(_forward_kernel, cfg=cfg),
      grid=(b, h, t // bq),
      in_specs=[
          pl.BlockSpec((b,), lambda *_: (0,)),
          pl.BlockSpec((None, bq, None, d), row),
          pl.BlockSpec((None, s, None, d), whole_kv),
          pl.BlockSpec((None, s, None, d), whole_kv),
      ],
      out_specs=[
          pl.BlockSpec((None, bq, None, d), row),
          pl.BlockSpec((None, None, bq), lambda bi, hi, i: (bi, hi, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
      name="block_attention_fwd",
  )(kv_len, q, k, v)


def _backward(q, k, v, kv_len, o, lse, do, cfg):
  b, t, h, d = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  groups = h // kv_heads
  bq, bk = cfg.block_q, cfg.block_k
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))  # [B, H, T]
  lens = pl.BlockSpec((b,), lambda *_: (0,))

  row = lambda bi, hi, i: (bi, i, hi, 0)
  whole_kv = lambda bi, hi, i: (bi, 0, hi // groups, 0)
  row_stat = pl.BlockSpec((None, None, bq), lambda bi, hi, i: (bi, hi, i))
  dq = cfg.call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(b, h, t // bq),
      in_specs=[lens, pl.BlockSpec((None, bq, None, d), row),
                pl.BlockSpec((None, s, None, d), whole_kv), pl.BlockSpec((None, s, None, d), whole_kv),
                pl.BlockSpec((None, bq, None, d), row), row_stat, row_stat],
      out_specs=pl.BlockSpec((None, bq, None, d), row),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      name="block_attention_dq",
  )(kv_len, q, k, v, do, lse, delta)

  # Grid over kv heads: block index hk of size G on the head axis = heads hk*G..hk*G+G-1.
  key_row = lambda bi, hk, j: (bi, j, hk, 0)
  group_rows = pl.BlockSpec((None, t, groups, d), lambda bi, hk, j: (bi, 0, hk, 0))
  group_stat = pl.BlockSpec((None, groups, t), lambda bi, hk, j: (bi, hk, 0))
  dk, dv = cfg.call(
      functools.partial(_dkv_kernel, cfg=cfg, groups=groups, num_q_tiles=t // bq),
      grid=(b, kv_heads, s // bk),
      in_specs=[lens, group_rows, pl.BlockSpec((None, bk, None, d), key_row),
                pl.BlockSpec((None, bk, None, d), key_row), group_rows, group_stat, group_stat],
      out_specs=[pl.BlockSpec((None, bk, None, d), key_row),
                 pl.BlockSpec((None, bk, None, d), key_row)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      name="block_attention_dkv",
  )(kv_len, q, k, v, do, lse, delta)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, kv_len, cfg):
  return _forward(q, k, v, kv_len, cfg)[0]


def _flash_fwd(q, k, v, kv_len, cfg):
  o, lse = _forward(q, k, v, kv_len, cfg)
  return o, (q, k, v, kv_len, o, lse)


def _flash_bwd(cfg, residuals, do):
  q, k, v, kv_len, o, lse = residuals
  dq, dk, dv = _backward(q, k, v, kv_len, o, lse, do, cfg)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------
# TPU: splash attention with a computable block-causal + prefix mask.


class BlockCausalMask(splash_attention_mask._ComputableMask):  # pylint: disable=protected-access
  """Splash mask of `masks.block_causal_mask`, computed from positions in the kernel."""

  def __init__(self, shape, block_len, prefix_len):
    self.block_len, self.prefix_len = block_len, prefix_len

    def mask_function(q_ids, kv_ids):  # numpy on the host, jnp in the kernel
      return kv_ids < masks.visible_key_end(q_ids, block_len=block_len, prefix_len=prefix_len)

    super().__init__(shape=shape, mask_function=mask_function)

  def __eq__(self, other):
    if not isinstance(other, type(self)):
      return NotImplemented
    return (self.shape, self.block_len, self.prefix_len) == (
        other.shape, other.block_len, other.prefix_len)

  def __hash__(self):
    return hash((type(self), self.shape, self.block_len, self.prefix_len))


@functools.lru_cache(maxsize=64)
def _splash_kernel(q_len, kv_len, heads, block_len, prefix_len, block_q, block_k, interpret):
  mask = BlockCausalMask((q_len, kv_len), block_len, prefix_len)
  sizes = splash.BlockSizes(
      block_q=block_q, block_kv=block_k, block_kv_compute=block_k,
      block_q_dkv=block_q, block_kv_dkv=block_k, block_kv_dkv_compute=block_k,
      block_q_dq=block_q, block_kv_dq=block_k)
  # Concrete mask tables even when first called inside a jit (the kernel is cached).
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(splash.MultiHeadMask([mask] * heads), block_sizes=sizes,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_attention(q, k, v, kv_len, *, block_len, prefix_len, block_q, block_k, interpret):
  """q [B, T, H, D], k, v [B, S, K, D] (T, S multiples of the tiles), kv_len [B] -> [B, T, H, D]."""
  b, t, h, d = q.shape
  s = k.shape[1]
  kernel = _splash_kernel(t, s, h, block_len, prefix_len, block_q, block_k, interpret)
  q = (q.astype(jnp.float32) * (1.0 / math.sqrt(d))).astype(q.dtype)  # splash does not scale
  q_heads = jnp.swapaxes(q, 1, 2)  # [B, H, T, D]
  k_heads, v_heads = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, S, D]
  q_ids = jnp.ones((b, t), jnp.int32)  # every query belongs to segment 1
  kv_ids = (jnp.arange(s)[None, :] < kv_len[:, None]).astype(jnp.int32)  # [B, S]: padding is 0

  def one_example(q, k, v, q_ids, kv_ids):
    return kernel(q, k, v, segment_ids=splash.SegmentIds(q=q_ids, kv=kv_ids))

  out = jax.vmap(one_example)(q_heads, k_heads, v_heads, q_ids, kv_ids)  # [B, H, T, D]
  out = jnp.where((kv_len > 0)[:, None, None, None], out, 0)  # no visible key: zeros
  return jnp.swapaxes(out, 1, 2)


# ----------------------------------------------------------------------------
# Public entry point.


def _pad_axis(x, axis, size):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad) if size != x.shape[axis] else x


def _default_block(backend, length):
  base = DEFAULT_BLOCK[backend]
  if backend == "tpu":
    return base
  return min(base, max(16, pl.next_power_of_2(length)))


def block_attention(q, k, v, *, block_len, prefix_len=0, kv_valid_len=None, block_q=None,
                    block_k=None, interpret=False, backend=None):
  """Block-causal flash attention q [B, T, H, D], k, v [B, S, K, D] -> [B, T, H, D].

  Same values as `kernels.reference.block_causal_attention`, differentiable (custom VJP with
  Pallas backward kernels). block_len L >= 1 and prefix_len P >= 0 are static;
  kv_valid_len int [B] (None: all S keys valid). block_q / block_k: tile rows
  (None: the backend's default). backend: "gpu", "tpu" or "cpu" (None: the
  default backend); "cpu" needs interpret=True.
  """
  backend = jax.default_backend() if backend is None else backend
  if backend in GPU_BACKENDS:
    backend = "gpu"
  if backend not in DEFAULT_BLOCK:
    raise ValueError(f"backend={backend!r}: expected 'gpu', 'tpu' or 'cpu'")
  if backend == "cpu" and not interpret:
    raise ValueError(
        "Pallas runs on CPU only in interpret mode; use impl='xla' or 'xla_blocksparse' "
        "(or pass interpret=True)")
  if block_len < 1 or prefix_len < 0:
    raise ValueError(f"need block_len >= 1 and prefix_len >= 0, got {block_len}, {prefix_len}")
  b, t, h, d = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"shapes do not match: q {q.shape}, k {k.shape}, v {v.shape}")
  if h % kv_heads:
    raise ValueError(f"{h} query heads are not a multiple of {kv_heads} kv heads")
  block_q = _default_block(backend, t) if block_q is None else block_q
  block_k = _default_block(backend, s) if block_k is None else block_k
  if backend == "gpu" and not interpret:
    for name, size in (("block_q", block_q), ("block_k", block_k)):
      if size < 16 or size & (size - 1):
        raise ValueError(f"Triton needs {name} a power of two >= 16, got {size}")
  if backend == "tpu" and block_k % TPU_LANES:
    raise ValueError(f"splash attention needs block_k a multiple of {TPU_LANES}, got {block_k}")

  kv_len = jnp.full((b,), s, jnp.int32)
  if kv_valid_len is not None:
    kv_len = jnp.minimum(jnp.asarray(kv_valid_len, jnp.int32).reshape(b), s)
  t_pad, s_pad = -(-t // block_q) * block_q, -(-s // block_k) * block_k
  q_p = _pad_axis(q, 1, t_pad)
  k_p, v_p = _pad_axis(k, 1, s_pad), _pad_axis(v, 1, s_pad)

  if backend == "tpu":
    out = _splash_attention(q_p, k_p, v_p, kv_len, block_len=block_len, prefix_len=prefix_len,
                            block_q=block_q, block_k=block_k, interpret=interpret)
    return out[:, :t]

  num_warps = num_stages = None
  if backend == "gpu" and not interpret:
    d_pad = max(16, pl.next_power_of_2(d))  # Triton tiles are powers of two; zeros change no logit
    q_p, k_p, v_p = (_pad_axis(x, 3, d_pad) for x in (q_p, k_p, v_p))
    num_warps, num_stages = (4 if d_pad <= 64 else 8), 2
  cfg = _Config(block_len=block_len, prefix_len=prefix_len, block_q=block_q, block_k=block_k,
                scale=1.0 / math.sqrt(d), interpret=interpret, num_warps=num_warps,
                num_stages=num_stages)
  out = _flash(q_p, k_p, v_p, kv_len, cfg)
  return out[:, :t, :, :d]
