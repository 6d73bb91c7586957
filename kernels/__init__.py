"""Attention kernels, each beside a pure-jnp reference, and one dispatcher.

dispatch: `attention(q, k, v, mask=MaskSpec, ...)` and `scan(s, v, valid)`, the
  entry points models call; `resolve_impl` says which implementation runs.
block_attention: block-causal (block-bidirectional) flash attention in Pallas,
  skipping tiles above the block diagonal.
blocksparse: the same mask in plain XLA, computing only the visible keys chunk
  by chunk (the fast CPU path).
scan_attention: Aaren's prefix-scan attention (Pallas kernel, chunked XLA scan).

Nothing is imported here: `from kernels import dispatch` loads only what it needs.
"""
