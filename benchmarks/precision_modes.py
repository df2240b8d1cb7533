"""Which precision and memory format trains fastest here: fp32 / bf16 autocast x NCHW / channels_last.

Times the GFL train step of the engine (forward under `sdidd.engine.precision`'s autocast, losses in fp32,
backward, SGD) for every combination at each image size and batch size, in interleaved rounds (a slow spell
of a shared machine hits every mode alike; the median round is reported). Also measures the machine's
limit, so the distance to it is a number: the step's FLOPs (torch's FlopCounterMode, forward + backward)
over its time against a large fp32 and bf16 matmul on the same threads. `--compile` adds torch.compile's
compile time and steady-state speed for the first size and batch.

    python benchmarks/precision_modes.py --sizes 160 320 --batches 8 16 --out docs/results/precision_modes_cpu.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import platform
import statistics
import time
from pathlib import Path

import torch

from sdidd.config import LossConfig
from sdidd.engine import precision
from sdidd.engine.objective import step_loss
from sdidd.model.detector import build_detector
from timing import QUICK, command_line, matmul_gflops, seconds_per_call, step_flops  # benchmarks/timing.py (this folder is on sys.path)
from train_speed import padded_batch  # the same random images and boxes as the speed benchmark

MODES = {"fp32": (False, False), "bf16": (True, False), "channels_last fp32": (False, True), "channels_last bf16": (True, True)}


def make_step(size: int, batch: int, amp: bool, channels_last: bool, compile_: bool = False, with_optimizer: bool = False):
    """A fresh detector and its train step (the engine's precision path) on one fixed random batch (and its SGD)."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = build_detector(QUICK).train()
    images, boxes, labels, sizes = padded_batch(batch, size, 6, torch.Generator().manual_seed(0), device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile_ else model
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=1e-3, momentum=0.9)
    trained, loss_cfg = torch.ones(6, dtype=torch.bool), LossConfig()
    use_amp = precision.amp_enabled(amp, device)

    def step() -> None:
        with precision.autocast(device, use_amp):
            out = forward(images)
        loss, _ = step_loss(precision.float_output(out), None, boxes, labels, sizes, trained, loss_cfg, 1.0, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (step, opt) if with_optimizer else step


def main(argv: list[str] | None = None) -> int:
    """Time every mode and write the Markdown report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[160, 320])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 16])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (compile time and steady speed)")
    p.add_argument("--compile-iters", type=int, default=500, help="the step length the compile time is weighed against")
    p.add_argument("--out", default="docs/results/precision_modes_cpu.md")
    a = p.parse_args(argv)
    native_bf16 = precision.cpu_has_bf16()
    # Without native bf16 a bf16 matmul is emulated (minutes at 2048³) and no row is compared with it.
    peak = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16) if native_bf16 else float("nan")}
    bf16_peak = f"{peak['bf16']:.0f} GFLOP/s in bf16" if native_bf16 else "bf16 not measured (no native bf16: emulated)"
    print(f"matmul peak: fp32 {peak['fp32']:.0f} GFLOP/s, {bf16_peak}")
    lines = ["# Training precision and memory format on this CPU", "",
             f"- Command: `{command_line(__file__, argv)}`",
             f"- Machine: CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"native bf16: {native_bf16}; torch {torch.__version__}",
             f"- Date: {dt.date.today().isoformat()}",
             "- Setting: the engine's train step (forward under autocast where on, losses fp32, backward, SGD) of the quick "
             "recipes' detector (tf_efficientnet_lite0, random init, FPN 128 ch, head 2 convs, 6 classes) on one random "
             f"batch; mean of {a.iters} steps, median of {a.rounds} interleaved rounds after 2 warm-up steps. One process, "
             "seed 0; ratios between rows move by about ±0.05 between runs.",
             f"- Budget: every row (mode) of a size and batch runs the same iterations: {a.iters} timed steps per round "
             f"over {a.rounds} rounds after 2 warm-up steps in the first round and 1 in the others, i.e. "
             f"{a.rounds * a.iters + 2 + (a.rounds - 1)} iterations per row (one fixed random batch, no dataset, so no "
             "epochs); no training to convergence and no metric compared.",
             "- Seeds: one process, seed 0 (random init and batch); it measures speed, not accuracy.",
             f"- Machine limit: a 2048³ matmul on the same threads reaches {peak['fp32']:.0f} GFLOP/s in fp32, "
             f"{bf16_peak}.", ""]
    for size, batch in itertools.product(a.sizes, a.batches):
        steps = {name: make_step(size, batch, amp, cl) for name, (amp, cl) in MODES.items()}
        seconds: dict[str, list[float]] = {name: [] for name in steps}
        for r in range(a.rounds):
            for name, step in steps.items():
                seconds[name].append(seconds_per_call(step, a.iters, 2 if r == 0 else 1, torch.device("cpu")))
                print(f"{size} px, batch {batch}, round {r + 1}: {name} {batch / seconds[name][-1]:.2f} img/s", flush=True)
        flops = step_flops(size, batch)
        base = statistics.median(seconds["fp32"])
        lines += [f"## {size} px, batch {batch}", "",
                  f"One step: {flops / 1e9:.1f} GFLOP (3 x the counted forward).", "",
                  "| mode | train images/s | speed vs fp32 | achieved GFLOP/s | of the matmul peak |", "|---|---|---|---|---|"]
        for name, sec in seconds.items():
            s = statistics.median(sec)
            achieved = flops / s / 1e9
            kind = "bf16" if MODES[name][0] and native_bf16 else "fp32"
            lines.append(f"| {name} | {batch / s:.2f} | {base / s:.2f} | {achieved:.0f} | {100 * achieved / peak[kind]:.0f} % ({kind}) |")
        lines.append("")
    if a.compile:
        size, batch = a.sizes[0], a.batches[0]
        lines += [f"## torch.compile ({size} px, batch {batch}, bf16, NCHW)", ""]
        eager = make_step(size, batch, True, False)
        compiled = make_step(size, batch, True, False, compile_=True)
        t0 = time.perf_counter()
        compiled()
        compiled()  # the first two calls compile (the second one for the backward's recompile, if any)
        compile_s = time.perf_counter() - t0
        e = min(seconds_per_call(eager, a.iters, 1, torch.device("cpu")) for _ in range(a.rounds))
        c = min(seconds_per_call(compiled, a.iters, 1, torch.device("cpu")) for _ in range(a.rounds))
        gain_s = (e - c) * a.compile_iters
        lines += [f"Compile (first two steps): {compile_s:.0f} s. Steady step: eager {e * 1e3:.0f} ms, compiled {c * 1e3:.0f} ms "
                  f"({e / c:.2f}x). Over a {a.compile_iters}-iteration step compiling saves {gain_s:.0f} s against "
                  f"{compile_s:.0f} s of compiling: **{'pays' if gain_s > compile_s else 'does not pay'}** inside one step.", ""]
        print(lines[-2])
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
