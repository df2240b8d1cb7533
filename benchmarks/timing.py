"""Shared by the speed benchmarks: seconds per call of a step (warm-up, CUDA synchronisation), FLOPs and the matmul peak."""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from sdidd.model.detector import DetectorConfig, build_detector


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces a run, `python benchmarks/NAME.py ARGS`, also when main(argv) was called directly."""
    return "python " + shlex.join([f"benchmarks/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)])


def write_report(path: str | Path, lines: list[str]) -> None:
    """Write a benchmark's Markdown report (its folder created) and say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


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


def matmul_gflops(dtype: torch.dtype, n: int = 2048, iters: int = 5) -> float:
    """Achieved GFLOP/s of an n x n x n matmul in `dtype` on this process's threads (the machine's practical peak)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    return 2 * n**3 * iters / (time.perf_counter() - t) / 1e9


QUICK = DetectorConfig(num_classes=6, backbone="tf_efficientnet_lite0", pretrained=False, fpn_channels=128, head_channels=128,
                       head_convs=2)  # the quick recipes' detector


def step_flops(size: int, batch: int, cfg: DetectorConfig = QUICK) -> int:
    """FLOPs of one train step: 3x the counted forward (the usual rule: the backward computes input and weight gradients).

    The forward is counted by torch's FlopCounterMode; its count of `convolution_backward` is not used because it
    comes out 7x the forward on this network's FPN, which no backward can cost.
    """
    model = build_detector(cfg).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(batch, 3, size, size) * 255)
    return 3 * counter.get_total_flops()
