"""Attention kernels, each beside a pure-jnp reference, and one dispatcher.

masks: the block-causal mask and its one visible-key formula (`visible_key_end`),
  causal / full / padding masks, MaskSpec (a mask as config data), MASK_VALUE.
reference: dense softmax attention in jnp (`xla_attention`), the reference of
  every kernel and the "xla" implementation.
dispatch: `attention(q, k, v, mask=MaskSpec, ...)` and `scan(s, v, valid)`, the
  entry points models call; `resolve_impl` says which implementation runs.
block_attention: block-causal (block-bidirectional) flash attention in Pallas,
  skipping tiles above the block diagonal.
blocksparse: the same mask in plain XLA, computing only the visible keys chunk
  by chunk (the fast CPU path).
scan_attention: Aaren's prefix-scan attention (Pallas kernel, chunked XLA scan).

Dependencies point one way: layers/ depends on kernels/, never the reverse.
Nothing is imported here.
"""
