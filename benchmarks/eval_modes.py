"""Evaluation in bf16 against fp32 on the same checkpoint: the mAP50 each gives and how long each takes.

The engine evaluates in fp32. bf16 would be allowed only if its mAP50 stays within 0.3 of fp32's on the same
checkpoint; this measures it on a checkpoint's own test split (its recipe, sizes and classes), with modes
interleaved over `--rounds` so neither always runs first. Evaluation time includes loading, resizing,
post-processing and pycocotools, as in a training run.

    python benchmarks/eval_modes.py runs/benchmark/neu-det_3+3_quick/seed0/sdidd/step1/last.pth \\
        --out docs/results/eval_modes_cpu.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import time

import torch

from sdidd.config import config_from_dict
from sdidd.engine.checkpoint import load_checkpoint, model_from_checkpoint
from sdidd.engine.evaluation import evaluate_model
from sdidd.engine.precision import amp_enabled
from sdidd.engine.run_data import channel_view, decode_once, load_split
from timing import command_line, write_report  # benchmarks/timing.py (this script's folder is on sys.path)


def main(argv: list[str] | None = None) -> int:
    """Evaluate each checkpoint in fp32 and bf16, write the Markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="docs/results/eval_modes_cpu.md")
    a = p.parse_args(argv)
    device = torch.device("cpu")
    if not amp_enabled(True, device):
        raise SystemExit("this CPU has no native bf16: nothing to compare")
    rows = []
    for ckpt in a.checkpoints:
        state = load_checkpoint(ckpt)
        cfg = config_from_dict(state["config"])
        classes = list(state["classes"])
        test = channel_view(decode_once(load_split(cfg.data, cfg.data.test_split), cfg.data), classes, keep_empty=True)
        model = model_from_checkpoint(state).to(device).eval()
        seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
        maps: dict[str, float] = {}
        for r in range(a.rounds):
            for mode in (["fp32", "bf16"] if r % 2 == 0 else ["bf16", "fp32"]):
                t = time.perf_counter()
                res = evaluate_model(model, test, cfg.data, device, workers=0, amp=mode == "bf16")
                seconds[mode].append(time.perf_counter() - t)
                maps[mode] = res.map50  # the same every round: detection is deterministic
                print(f"{ckpt} {mode}: mAP50 {res.map50:.2f} in {seconds[mode][-1]:.1f} s", flush=True)
        trained = f"{state.get('epoch', '?')} / {state.get('iteration', '?')}, seed {cfg.train.seed}"
        rows.append((ckpt, len(test), cfg.data.test_size, trained, maps,
                     {m: statistics.median(v) for m, v in seconds.items()}))
    lines = ["# Evaluation in bf16 against fp32 (CPU)", "",
             f"- Command: `{command_line(__file__, argv)}`",
             f"- Machine: CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
             f"torch {torch.__version__}; Python {platform.python_version()}",
             f"- Date: {dt.date.today().isoformat()}",
             f"- Each checkpoint on its own test split at its recipe's size; seconds: median of {a.rounds} rounds "
             "(loading, resizing, network, post-processing, pycocotools); the rule: bf16 only if within 0.3 mAP50 of fp32.",
             "- Seeds and budget: nothing is trained here; both modes evaluate the same checkpoint on the same images, and "
             "detection is deterministic, so one evaluation per mode gives its mAP50. Each checkpoint is one training run "
             "(its epochs / iterations and seed in the table); a difference is about that checkpoint, not a method.",
             "", "| checkpoint | trained (epochs / iterations) | images | size | mAP50 fp32 | mAP50 bf16 | difference | s fp32 "
             "| s bf16 | speed-up |", "|---|---|---|---|---|---|---|---|---|---|"]
    for ckpt, n, size, trained, m, s in rows:
        lines.append(f"| `{ckpt}` | {trained} | {n} | {size} | {m['fp32']:.2f} | {m['bf16']:.2f} | {m['bf16'] - m['fp32']:+.2f} | "
                     f"{s['fp32']:.1f} | {s['bf16']:.1f} | {s['fp32'] / s['bf16']:.2f}x |")
    write_report(a.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
