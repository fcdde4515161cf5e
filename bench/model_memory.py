"""Weight memory of each released model per precision, from exact parameter counts.

The architectures are built on PyTorch's meta device (no weights, no download) with the published
shapes (``core/model/footprint.py``, which replicas also use to decide what fits), so the counts are
exact. This is weight memory on a GPU only: activations and the KV cache come on top.

Usage: ``python bench/model_memory.py``
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core.model.footprint import parameter_counts
from core.model.loading import plan_precision
from core.model.registry import REGISTRY

PRECISIONS = ("fp32", "bf16", "int8", "nf4")


def main() -> None:
    gpu = torch.device("cuda")  # only names the plan (nf4 computes in bf16 there); nothing is allocated
    print(f"{'model':<54} {'params':>7} " + " ".join(f"{p:>7}" for p in PRECISIONS) + "  (GiB of weights)")
    for name, spec in REGISTRY.items():
        counts = parameter_counts(spec)
        sizes = [counts.weight_bytes(plan_precision(p, gpu)) / 2**30 for p in PRECISIONS]
        print(f"{name:<54} {counts.total / 1e9:6.2f}B " + " ".join(f"{size:7.1f}" for size in sizes))


if __name__ == "__main__":
    main()
