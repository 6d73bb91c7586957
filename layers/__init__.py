"""Flax linen building blocks shared by every model family.

attention: MultiHeadAttention with a KV cache (decode_attention, resize_cache);
  its masks and attention kernels come from kernels/ (kernels/masks.py,
  kernels/dispatch.py), which never imports layers/.
position: RoPE (1d/2d/3d), token grids, learned position tables.
transformer: norms, Mlp, adaLN, TransformerBlock, DecoderStack.
"""
