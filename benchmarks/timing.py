"""Shared by the speed benchmarks: seconds per call of a step, with warm-up and CUDA synchronisation."""
from __future__ import annotations

import time
from typing import Callable

import torch


def seconds_per_call(step: Callable[[], object], iters: int, warmup: int, device: torch.device) -> float:
    """Mean wall-clock seconds of `step()` over `iters` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()  # kernels are queued asynchronously: wait before reading the clock
    return (time.perf_counter() - t) / iters
