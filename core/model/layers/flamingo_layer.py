"""Upstream's Flamingo decoder layer, able to reuse the images' keys and values across tokens.

Upstream's cross-attention projects the image latents to keys and values on every forward, so a
decode loop recomputes the same projection for every new token (on the benchmark's model it was
most of a step's arithmetic). This layer accepts them precomputed. The arithmetic is upstream's
``MaskedCrossAttention`` and ``GatedCrossAttentionBlock`` op for op, so results are identical;
without precomputed values it is upstream's layer unchanged, which keeps ``Flamingo.generate``
(the benchmark's reference) working on the loaded model.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import torch
from einops import rearrange, repeat
from einops_exts import rearrange_many
from open_flamingo.src.flamingo_lm import FlamingoLayer
from open_flamingo.src.helpers import GatedCrossAttentionBlock
from torch import nn

from core.model.layers.direct_calls import direct


def media_keys_values(block: GatedCrossAttentionBlock, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of (batch, images, latents, dim) media, shaped (batch, heads, images*latents, dim_head)."""
    attn = block.attn
    k, v = attn.to_kv(rearrange(media, "b t n d -> b (t n) d")).chunk(2, dim=-1)
    return tuple(rearrange_many((k, v), "b n (h d) -> b h n d", h=attn.heads))


class _Gate:
    """A gate's tanh, computed again only when the gate's parameter has changed (its version)."""

    def __init__(self, gate: nn.Parameter) -> None:
        self.gate = gate
        self.version = -1
        self.value: torch.Tensor = gate

    def __call__(self) -> torch.Tensor:
        if self.gate._version != self.version:
            with torch.inference_mode(False), torch.no_grad():
                self.value = self.gate.tanh()
            self.version = self.gate._version
        return self.value


class _BlockSteps:
    """What a forward calls of a gated block, held once: its modules as functions
    (``core.model.layers.direct_calls``) and its gates' tanh. At batch 1 on a CPU a step's
    cross-attention is a few small products and a dozen small operations, and the six module calls
    and two tanh cost about as much again."""

    def __init__(self, block: GatedCrossAttentionBlock) -> None:
        attn = block.attn
        self.norm, self.to_q, self.to_out = direct(attn.norm), direct(attn.to_q), direct(attn.to_out)
        self.ff = [direct(module) for module in block.ff]
        self.attn_gate, self.ff_gate = _Gate(block.attn_gate), _Gate(block.ff_gate)


# Where a block keeps its ``_BlockSteps``, so that it is made once and goes with the model.
_STEPS = "_flamingo_block_steps"


def _block_steps(block: GatedCrossAttentionBlock) -> _BlockSteps:
    steps: _BlockSteps | None = getattr(block, _STEPS, None)
    if steps is None:
        steps = _BlockSteps(block)
        object.__setattr__(block, _STEPS, steps)  # not a submodule: its modules are the block's own
    return steps


def gated_cross_attention(
    block: GatedCrossAttentionBlock,
    x: torch.Tensor,
    keys_values: tuple[torch.Tensor, torch.Tensor],
    images: int,
    latents: int,
    media_locations: torch.Tensor | None,
) -> torch.Tensor:
    """Upstream's gated block with only-immediate-media masking, given the media's keys and values.

    ``media_locations`` None: every token reads the only image, as in a decode step. Both of
    upstream's masks then change nothing, so they are not built: a dozen small operations less
    per layer and token, the same numbers; and the block's modules are called as functions.
    """
    attn = block.attn
    k, v = keys_values
    residual = x
    rows, tokens = x.shape[:2]
    steps = _block_steps(block)
    q = steps.to_q(steps.norm(x))
    q = q.view(rows, tokens, attn.heads, -1).transpose(1, 2) * attn.scale  # as einops' rearrange lays it out
    sim = q @ k.transpose(-1, -2)  # upstream's einsum, as the same batched product without its parsing
    if media_locations is None:
        if images != 1:
            raise ValueError(f"tokens without media locations read one image, not {images}")
        weights = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
    else:
        media_time = torch.arange(images, device=x.device) + 1
        text_time = media_locations.cumsum(dim=-1)
        text_to_media_mask = torch.eq(
            rearrange(text_time, "b i -> b 1 i 1"), repeat(media_time, "j -> 1 1 1 (j n)", n=latents)
        )
        sim = sim.masked_fill(~text_to_media_mask, -torch.finfo(sim.dtype).max)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        weights = sim.softmax(dim=-1)
        weights = weights.masked_fill(rearrange(text_time == 0, "b i -> b 1 i 1"), 0.0)
    out = (weights @ v).transpose(1, 2).reshape(rows, tokens, -1)
    x = steps.to_out(out) * steps.attn_gate() + residual
    norm, project_in, activation, project_out = steps.ff
    return project_out(activation(project_in(norm(x)))) * steps.ff_gate() + x


# What a forward's conditioning sets on a layer (upstream's and ours), and clears after it: plain
# values, never parameters, buffers or modules.
_CONDITIONING = frozenset({"vis_x", "media_locations", "use_cached_media", "media_kv", "media_shape"})


class ReusableMediaLayer(FlamingoLayer):
    """A FlamingoLayer whose image keys and values can be set once for many forwards."""

    def __setattr__(self, name: str, value: Any) -> None:
        """The conditioning is set and cleared on every layer around every decode step: past
        ``nn.Module``'s checks for parameters, buffers and modules, which it never is (reading a
        step's images took 83 µs with them, 26 µs without)."""
        if name in _CONDITIONING:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __init__(self, layer: FlamingoLayer) -> None:
        super().__init__(layer.gated_cross_attn_layer, layer.decoder_layer)
        self.media_kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self.media_shape: tuple[int, int] = (0, 0)

    def use_media(self, media: torch.Tensor | None) -> None:
        """Precompute for (batch, images, latents, dim) media; None forgets them."""
        if media is None or self.gated_cross_attn_layer is None:
            self.media_kv = None
            return
        self.media_kv = media_keys_values(self.gated_cross_attn_layer, media)
        self.media_shape = (media.shape[1], media.shape[2])

    def use_keys_values(self, keys_values: tuple[torch.Tensor, torch.Tensor] | None, images: int, latents: int) -> None:
        """Use keys and values computed earlier (for example by a previous forward on the same images)."""
        self.media_kv = keys_values if self.gated_cross_attn_layer is not None else None
        self.media_shape = (images, latents)

    def latest_image_keys_values(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The keys and values of the last image only: what the tokens after it read."""
        if self.media_kv is None:
            return None
        latents = self.media_shape[1]
        keys, values = self.media_kv
        return keys[:, :, -latents:], values[:, :, -latents:]

    def cross_attend(self, lang_x: torch.Tensor) -> torch.Tensor:
        """The gated cross-attention on the keys and values set for this forward; unchanged without a block."""
        if self.gated_cross_attn_layer is None:
            return lang_x
        if self.media_kv is None:
            raise ValueError("a cross-attention layer's images must be set before its forward")
        return gated_cross_attention(
            self.gated_cross_attn_layer, lang_x, self.media_kv, *self.media_shape, self.media_locations
        )

    def forward(self, lang_x: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if self.media_kv is None or self.gated_cross_attn_layer is None:
            return super().forward(lang_x, attention_mask=attention_mask, **kwargs)
        return self.decoder_layer(self.cross_attend(lang_x), attention_mask=attention_mask, **kwargs)


class _FlamingoLM(Protocol):
    """The decoder list accessors that upstream's (untyped) ``FlamingoLMMixin`` adds to the LM."""

    def _get_decoder_layers(self) -> nn.ModuleList: ...

    def _set_decoder_layers(self, value: nn.ModuleList) -> None: ...


def install(lm: nn.Module) -> list[ReusableMediaLayer]:
    """Put reusable-media layers in the LM's decoder list; parameter names stay the same."""
    flamingo_lm = cast(_FlamingoLM, lm)  # FlamingoLMMixin, mixed into the LM's class by assemble_flamingo
    layers = [ReusableMediaLayer(layer) for layer in flamingo_lm._get_decoder_layers()]
    flamingo_lm._set_decoder_layers(nn.ModuleList(layers))
    return layers
