"""Where a train step's time goes on this machine: convolutions, normalisation, memory traffic, the rest.

Profiles the GFL train step of the quick recipes' detector (the step `precision_modes.py` times: forward, fp32
losses, backward, SGD) in the engine's default mode for the device (fp32 channels_last on CPU unless `--amp` /
`--nchw`), with torch.profiler, and sums each operator's self time into a few kinds, so the part that faster
code could still remove is a number. Also lists the costliest convolution calls by input shape and times the
optimizer's update alone.

    python benchmarks/step_profile.py --sizes 160 320 --batch 8 --out docs/results/step_profile_cpu.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from sdidd.engine import precision
from timing import command_line, seconds_per_call, write_report  # benchmarks/timing.py (this folder is on sys.path)
from precision_modes import make_step  # the same step, model and random batch as the precision table

# Operator name fragments -> kind; the first match wins, so "convolution_backward" precedes "convolution".
KINDS = [
    ("convolution backward", ("convolution_backward",)),
    ("convolution forward", ("convolution",)),
    ("normalisation (BN, GN; forward + backward)", ("batch_norm", "group_norm")),
    ("activations (forward + backward)", ("hardtanh", "relu", "threshold", "clamp", "sigmoid", "silu")),
    ("memory: copies, padding, fills, allocation", ("copy_", "_to_copy", "fill_", "pad", "empty", "resize_", "zero_", "cat",
                                                     "clone", "stack", "contiguous")),
]
OTHER = "the rest: loss, elementwise, optimizer update, autograd bookkeeping"


def kind_of(name: str) -> str:
    """The kind an operator's self time is counted under."""
    return next((kind for kind, parts in KINDS if any(p in name for p in parts)), OTHER)


def profile_step(size: int, batch: int, amp: bool, channels_last: bool, steps: int, warmup: int) -> dict:
    """Step time unprofiled, optimizer update alone, self time per kind and the top convolution calls (ms per step)."""
    step, opt = make_step(size, batch, amp, channels_last, with_optimizer=True)
    device = torch.device("cpu")
    step_ms = 1000 * seconds_per_call(step, steps, warmup, device)
    opt_ms = 1000 * seconds_per_call(opt.step, 3 * steps, 1, device)  # momentum buffers exist after the steps above
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    kinds: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        kinds[kind_of(e.key)] += e.self_cpu_time_total / 1000 / steps
    convs = [(e.self_cpu_time_total / 1000 / steps, e.key.removeprefix("aten::"), e.count // steps, e.input_shapes[:3])
             for e in prof.key_averages(group_by_input_shape=True) if "convolution" in e.key and e.self_cpu_time_total]
    return {"step_ms": step_ms, "opt_ms": opt_ms, "kinds": dict(kinds), "convs": sorted(convs, reverse=True)}


def main(argv: list[str] | None = None) -> int:
    """Profile the step at each size and write the Markdown report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[160, 320])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="profiled (and timed) steps per size")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (where the CPU has native bf16)")
    p.add_argument("--nchw", action="store_true", help="NCHW instead of the CPU default channels_last")
    p.add_argument("--top", type=int, default=8, help="convolution calls listed per size")
    p.add_argument("--out", default="docs/results/step_profile_cpu.md")
    a = p.parse_args(argv)
    mode = precision.train_mode(a.amp, not a.nchw, torch.device("cpu"))
    lines = ["# Where a train step's time goes (cpu)", "",
             f"- Command: `{command_line(__file__, argv)}`",
             f"- Machine: CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {precision.cpu_has_bf16()}; "
             f"torch {torch.__version__}",
             f"- Date: {dt.date.today().isoformat()}",
             f"- Setting: the quick recipes' detector (tf_efficientnet_lite0, random init, FPN 128 ch, head 2 convs, "
             f"6 classes), one random batch of {a.batch}; mode: {mode}; forward, fp32 losses, backward, SGD.",
             f"- Budget: per size {a.warmup} warm-up + {a.steps} timed steps, then {a.steps} profiled steps, i.e. "
             f"{a.warmup + 2 * a.steps} iterations on one fixed batch (no dataset, no epochs, no metric).",
             "- Seeds: one process, seed 0; it measures where time goes, not accuracy. The profiler adds overhead to "
             "small operators, so the kinds' sum differs from the unprofiled step; shares are of the profiled total.",
             ""]
    for size in a.sizes:
        r = profile_step(size, a.batch, mode.amp, mode.channels_last, a.steps, a.warmup)
        total = sum(r["kinds"].values())
        lines += [f"## {size} px, batch {a.batch}", "",
                  f"Step {r['step_ms']:.0f} ms unprofiled ({1000 * a.batch / r['step_ms']:.1f} images/s), "
                  f"{total:.0f} ms of operator self time profiled; the optimizer's update alone {r['opt_ms']:.1f} ms.", "",
                  "| kind | ms per step | share |", "|---|---|---|"]
        for kind, ms in sorted(r["kinds"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {kind} | {ms:.1f} | {100 * ms / total:.0f} % |")
        lines += ["", "Costliest convolution calls (self time per step; shapes: forward input, weight; backward grad output, input, weight):", "",
                  "| operator | ms per step | calls per step | input shapes |", "|---|---|---|---|"]
        for ms, name, calls, shapes in r["convs"][:a.top]:
            lines.append(f"| {name} | {ms:.1f} | {calls} | {' '.join(str(s) for s in shapes if s)} |")
        lines.append("")
        print(f"{size} px: step {r['step_ms']:.0f} ms; " + ", ".join(f"{k.split(' (')[0].split(':')[0]} {v:.0f}"
                                                                     for k, v in r["kinds"].items()))
    write_report(a.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
