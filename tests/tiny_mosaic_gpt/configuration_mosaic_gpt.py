"""MosaicGPT's configuration, as far as the stand-in model uses it."""

from __future__ import annotations

from transformers import PretrainedConfig


class MosaicGPTConfig(PretrainedConfig):
    model_type = "mosaic_gpt"

    def __init__(
        self,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 4,
        mlp_ratio: int = 4,
        max_seq_len: int = 512,
        vocab_size: int = 400,
        alibi_bias_max: int = 8,
        **kwargs: object,
    ) -> None:
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_layers = n_layers
        self.mlp_ratio = mlp_ratio
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.alibi_bias_max = alibi_bias_max
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)
