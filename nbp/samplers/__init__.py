"""Samplers of the model families that need more than a decoding loop: one module per family.

A sampler is a pure function of (model, params, rng, *, <config.sampler keys>)
that the caller jits whole. It lives apart from its family's loss and data
(nbp/tasks/<family>.py), which import it. The KV-cache machinery every
autoregressive sampler shares is nbp.decoding; token sampling rules are
nbp.sampling.

  xar   entity by entity, an ODE or SDE solver per entity over the KV cache of
        the finished ones; what the cache holds as context is a switch.
"""
