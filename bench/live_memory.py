"""Bytes of live tensors, counted op by op, for memory figures on the CPU.

Why: a CPU has no counterpart of ``torch.cuda.max_memory_allocated``, and the process's RSS says
little (freed blocks stay with the allocator, so it barely falls when tensors are let go). Every
tensor an operation returns is seen here, and its storage counted until the last tensor using it
is gone; the peak is over every operation, so short-lived ones (a prefill's activations, a step's
gathered keys) count as they would on a GPU. Storages that existed before counting began (the
weights) are left out, even when an operation returns a view of them.
"""

from __future__ import annotations

import weakref
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes(exclude=model.parameters()) as live: ...``; then ``live.peak``."""

    def __init__(self, exclude: Any = ()) -> None:
        super().__init__()
        self._excluded = {tensor.untyped_storage().data_ptr() for tensor in exclude}
        self._sizes: dict[int, int] = {}
        self._tensors: Counter[int] = Counter()
        self.current = 0
        self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        result = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(result):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self._count(tensor)
        return result

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self._excluded:
            return
        if key not in self._sizes:
            self._sizes[key] = storage.nbytes()
            self.current += self._sizes[key]
            self.peak = max(self.peak, self.current)
        self._tensors[key] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        self._tensors[key] -= 1
        if self._tensors[key] == 0:
            del self._tensors[key]
            self.current -= self._sizes.pop(key)
