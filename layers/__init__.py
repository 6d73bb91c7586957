"""Flax linen building blocks shared by every model family.

attention: masks (block-causal and friends), dot-product attention with a
  registry of implementations, MultiHeadAttention with a KV cache.
position: RoPE (1d/2d/3d), token grids, learned position tables.
transformer: norms, Mlp, adaLN, TransformerBlock, DecoderStack.
"""
