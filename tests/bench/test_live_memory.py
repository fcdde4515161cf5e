"""The CPU memory figures' counter: it must see short-lived tensors, views and frees, and skip the weights."""

from __future__ import annotations

import torch

from bench.live_memory import LiveTensorBytes


def test_peak_and_current_follow_tensors_as_they_come_and_go():
    weight = torch.ones(1000, 1000)  # 4 MB, there before counting starts
    with LiveTensorBytes(exclude=[weight]) as live:
        kept = weight @ torch.ones(1000, 10)  # the ones (40 kB) go at once; the product (40 kB) stays
        assert live.current == 40_000 and live.peak == 80_000  # both were live while it multiplied
        short = torch.zeros(250_000)  # 1 MB
        assert live.current == 1_040_000
        del short
        assert live.current == 40_000 and live.peak == 1_040_000
        rows = kept[:5]  # a view: the same storage, not counted twice
        assert live.current == 40_000
        del kept
        assert live.current == 40_000  # the view keeps the storage alive
        del rows
        assert live.current == 0
        transposed = weight.t()  # a view of the weights is still the weights
        assert live.current == 0
        live.reset_peak()
        transposed.add_(0)  # in place: nothing new
        assert live.peak == 0


def test_inference_mode_tensors_are_counted():
    with torch.inference_mode(), LiveTensorBytes() as live:
        cache = torch.empty(2, 3, 100, 8).fill_(1.0)
        assert live.current == cache.nelement() * 4
