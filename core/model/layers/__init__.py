"""The language model's layers, driven directly: upstream's Flamingo layer and the decoder stack."""
