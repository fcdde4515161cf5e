"""A small stand-in for MPT-1B's hub code (MosaicGPT), which cannot be downloaded in tests.

It keeps what the engine depends on: remote code loaded with ``trust_remote_code``, no embedding
accessors, QK-LayerNorm, ALiBi, and a key/value cache that is a list of ``(keys, values)`` per
layer, each (batch, tokens, heads × dim), which each layer extends and writes back.
"""
