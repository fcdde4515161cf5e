"""Modules called as the function their forward is, without ``nn.Module``'s call machinery.

Why: at batch 1 on a CPU a decode step of the benchmark model is about fifty matrix-vector products
and a few hundred small operations, and each ``nn.Module`` call (its hooks' checks, its keyword
handling) costs about as much as one of those operations, dozens of times a step. Where a module
is a plain one whose forward is one function of its own tensors, that function is called on them:
the same arithmetic, so the same bits. Any other module (quantized, hooked, of another type, or
one whose forward changes its weights) is called as itself.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaRMSNorm

Forward = Callable[[torch.Tensor], torch.Tensor]


def rms_norm(weight: torch.Tensor, epsilon: float, hidden: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm.forward``: in float32, then back to the hidden states' dtype."""
    dtype = hidden.dtype
    if dtype != torch.float32:
        hidden = hidden.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + epsilon)
    return weight * (hidden if dtype == torch.float32 else hidden.to(dtype))


def direct(module: nn.Module) -> Forward:
    """The module's forward as a function of its input, or the module itself where it is not plain."""
    if module._forward_hooks or module._forward_pre_hooks:
        return module
    if type(module) is nn.Linear:
        return partial(F.linear, weight=module.weight, bias=module.bias)
    if type(module) is nn.LayerNorm:
        shape, weight, bias, eps = module.normalized_shape, module.weight, module.bias, module.eps
        return partial(F.layer_norm, normalized_shape=shape, weight=weight, bias=bias, eps=eps)
    if type(module) is LlamaRMSNorm:
        return partial(rms_norm, module.weight, module.variance_epsilon)
    if type(module) is nn.GELU:
        return partial(F.gelu, approximate=module.approximate)
    if type(module) is SiLUActivation or (type(module) is nn.SiLU and not module.inplace):
        return F.silu
    if type(module) is nn.Embedding and module.max_norm is None:  # with max_norm, a lookup renormalises weights
        return partial(F.embedding, weight=module.weight, padding_idx=module.padding_idx)
    return module
