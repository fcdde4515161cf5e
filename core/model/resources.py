"""Before loading: is the hub there, is there disk for what is still to download, memory for the weights?

A model that cannot fit otherwise fails minutes in, after a download of up to 20 GB, with the disk
full or the machine swapping until the kernel kills the process. Each refusal is one line naming
the numbers and what to do; an operator who knows better skips the size checks (the hub's answer is
still needed to know what to download).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import psutil
import torch
from huggingface_hub import constants

from core.config import ModelSettings
from core.errors import ModelLoadError
from core.model.footprint import ParameterCounts, parameter_counts
from core.model.hub import HubFile, files_to_download
from core.model.loading import LoadedModel, PrecisionPlan, load_model, pick_device, plan_precision, spec_of
from core.model.registry import ModelSpec

log = logging.getLogger(__name__)

GIB = 2**30
GB = 10**9
# Activations and a short prompt's key/value cache, beyond the weights (README: a few GiB for long
# prompts and beams, which a check before loading cannot know).
MEMORY_HEADROOM = 1 * GIB
# The tokenizers and configs, which are not counted, and room for the system to go on.
DISK_SPARE = 1 * GB
OVERRIDE = "--skip-resource-checks (model.skip_resource_checks = true in config.toml) skips this check"
_SMALLER_PRECISIONS = ("bf16", "int8", "nf4")


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def check_memory(spec: ModelSpec, plan: PrecisionPlan, device: torch.device, quantize_cross_attention: bool) -> None:
    """Refuse weights that cannot fit in the device's free memory, naming the precisions that would."""
    try:
        counts = parameter_counts(spec)
    except ModelLoadError as error:  # the loader will say what is wrong with the model
        log.warning("memory not checked: %s", error)
        return
    weights = counts.weight_bytes(plan, quantize_cross_attention)
    available = _available_memory(device)
    if weights + MEMORY_HEADROOM <= available:
        if device.type == "cuda":
            _check_host_memory(spec, counts, plan, device)
        return
    smaller = {
        name: counts.weight_bytes(plan_precision(name, device), quantize_cross_attention)
        for name in _SMALLER_PRECISIONS
    }
    fitting = [
        f"{name} ({size / GIB:.1f} GiB)"
        for name, size in smaller.items()
        if size + MEMORY_HEADROOM <= available and size < weights
    ]
    advice = (
        f"a smaller precision fits: {', '.join(fitting)} (--precision, or model.precision in config.toml)"
        if fitting
        else "choose a smaller model (README: Models), or a GPU with int8 or nf4"
    )
    raise ModelLoadError(
        f"{spec.name} in {plan.name} needs {weights / GIB:.1f} GiB for its weights and about "
        f"{MEMORY_HEADROOM / GIB:.0f} GiB to run, but {device} has {available / GIB:.1f} GiB free; {advice}; {OVERRIDE}"
    )


def _check_host_memory(spec: ModelSpec, counts: ParameterCounts, plan: PrecisionPlan, device: torch.device) -> None:
    """Refuse a GPU load whose way through this machine's memory does not fit: the kernel would kill
    the bot minutes into the load, with nothing in its log to say why."""
    needed = counts.host_bytes(plan)
    available = psutil.virtual_memory().available
    if needed + MEMORY_HEADROOM <= available:
        return
    quantized = counts.host_bytes(plan_precision("int8", device))
    advice = (
        f"int8 and nf4 load the language model straight to the GPU and need about {quantized / GIB:.1f} GiB here "
        "(--precision, or model.precision in config.toml)"
        if plan.quantization is None and quantized + MEMORY_HEADROOM <= available
        else "free memory on this machine (with swap to spare, the load may still go through, slowly)"
    )
    parts = "its vision and cross-attention layers as built, in fp32" + (
        f", and its language model in {plan.name}" if plan.quantization is None else ""
    )
    raise ModelLoadError(
        f"{spec.name} in {plan.name} passes through about {needed / GIB:.1f} GiB of this machine's memory on its "
        f"way to {device} ({parts}) and needs about {MEMORY_HEADROOM / GIB:.0f} GiB more, but {available / GIB:.1f} "
        f"GiB is available; {advice}; {OVERRIDE}"
    )


def _existing(path: Path) -> Path:
    """The cache's folder, or the nearest folder above it that exists, as the first download makes it."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_disk(downloads: Sequence[HubFile]) -> None:
    """Refuse a download that cannot fit in the free space of the hub cache's filesystem."""
    if not downloads:
        return
    cache = Path(constants.HF_HUB_CACHE)
    needed = sum(file.size for file in downloads)
    free = shutil.disk_usage(_existing(cache)).free
    if needed + DISK_SPARE <= free:
        return
    raise ModelLoadError(
        f"the model's files still to download take {needed / GB:.1f} GB (and {DISK_SPARE / GB:.0f} GB to spare), "
        f"but {cache} has {free / GB:.1f} GB free; make room, or point HF_HUB_CACHE (or HF_HOME) at a larger disk; "
        f"{OVERRIDE}"
    )


def load_checked(settings: ModelSettings) -> LoadedModel:
    """``load_model`` after the hub, memory and disk checks (``settings.skip_resource_checks`` leaves
    out the size checks, for an operator who knows better). A ``model.language_model`` is sized and
    downloaded in place of the checkpoint's own; ``load_model`` compares their shapes first thing."""
    spec = spec_of(settings)
    device = pick_device(settings.device)
    plan = plan_precision(settings.precision, device)
    prepare_to_load(spec, plan, device, settings.quantize_cross_attention, settings.skip_resource_checks)
    return load_model(settings)


def prepare_to_load(
    spec: ModelSpec, plan: PrecisionPlan, device: torch.device, quantize_cross_attention: bool, skip_checks: bool
) -> None:
    """The hub first (without it no size is known), then memory, then disk; the downloads to come
    are logged one line each, which is all a log (no terminal, no progress bars) shows of them."""
    downloads = files_to_download(spec)
    if not skip_checks:
        check_memory(spec, plan, device, quantize_cross_attention)
        check_disk(downloads)
    for file in downloads:
        log.info("Downloading %s/%s (%.2f GB)", file.repo, file.name, file.size / GB)
