"""Modules called as functions (``core.model.layers.direct_calls``) and the gated cross-attention
that calls its block's modules so: the same bits as the modules, or the module itself where it is
not plain."""

from __future__ import annotations

import pytest
import torch
from open_flamingo.src.helpers import GatedCrossAttentionBlock
from torch import nn
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from core.model.layers.direct_calls import direct
from core.model.layers.flamingo_layer import gated_cross_attention, media_keys_values


def _with_values(module: nn.Module) -> nn.Module:
    """Non-trivial weights (norms start at ones and zeros)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter))
    return module


@pytest.mark.parametrize(
    "module",
    [
        nn.Linear(16, 8, bias=False),
        nn.Linear(16, 8),
        nn.LayerNorm(16),
        nn.LayerNorm(16, bias=False),
        LlamaRMSNorm(16, eps=1e-5),
        nn.GELU(),
        nn.GELU(approximate="tanh"),
        nn.SiLU(),
        SiLUActivation(),
    ],
    ids=lambda module: repr(module),
)
def test_a_plain_module_becomes_its_function_with_the_same_bits(module):
    module = _with_values(module)
    function = direct(module)
    assert function is not module
    hidden = torch.randn(2, 3, 16)
    assert torch.equal(function(hidden), module(hidden))


def test_an_embedding_becomes_its_lookup():
    embedding = _with_values(nn.Embedding(10, 4, padding_idx=0))
    tokens = torch.tensor([[0, 3, 9]])
    assert direct(embedding) is not embedding
    assert torch.equal(direct(embedding)(tokens), embedding(tokens))


def test_modules_that_are_not_plain_are_called_as_themselves():
    class Quantized(nn.Linear):  # a subclass may compute otherwise (as bitsandbytes' linears do)
        pass

    hooked = nn.Linear(4, 4)
    hooked.register_forward_hook(lambda module, inputs, output: output * 2)
    pre_hooked = nn.LayerNorm(4)
    pre_hooked.register_forward_pre_hook(lambda module, inputs: None)
    for module in (
        Quantized(4, 4),
        hooked,
        pre_hooked,
        nn.SiLU(inplace=True),  # changes its input
        nn.Embedding(10, 4, max_norm=1.0),  # a lookup renormalises the weights it reads
        nn.ReLU(),  # not one of the listed kinds
    ):
        assert direct(module) is module


def _block() -> GatedCrossAttentionBlock:
    return _with_values(GatedCrossAttentionBlock(dim=32, dim_visual=24, dim_head=8, heads=4))


def _ours_and_upstreams(block: GatedCrossAttentionBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """One token reading one image without media locations (a decode step): our gated cross-attention
    on the image's keys and values, and upstream's block computing them itself."""
    torch.manual_seed(2)
    media, hidden = torch.randn(1, 1, 5, 24), torch.randn(1, 1, 32)
    with torch.inference_mode():
        ours = gated_cross_attention(block, hidden, media_keys_values(block, media), 1, 5, None)
        theirs = block(hidden, media, media_locations=None, use_cached_media=True)
    return ours, theirs


def test_the_gated_block_of_a_decode_step_is_upstreams_to_the_bit():
    ours, theirs = _ours_and_upstreams(_block())
    assert torch.equal(ours, theirs)


def test_a_gate_changed_after_its_first_use_is_read_again():
    """The gates' tanh is kept between forwards: a gate changed in place (a state dict loaded into
    the model later) must not leave the old value in use."""
    block = _block()
    _ours_and_upstreams(block)
    with torch.no_grad():
        block.attn_gate.fill_(0.7)
        block.ff_gate.fill_(-0.2)
    ours, theirs = _ours_and_upstreams(block)
    assert torch.equal(ours, theirs)


def test_a_hooked_module_of_the_block_keeps_its_hook():
    block = _block()
    block.ff[1].register_forward_hook(lambda module, inputs, output: output * 3)
    ours, theirs = _ours_and_upstreams(block)
    assert torch.equal(ours, theirs)
