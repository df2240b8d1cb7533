"""Precision and memory format measured where they matter: the training loop of a real recipe, data loading included.

`precision_modes.py` times the train step alone on one random batch; this runs `sdidd train RECIPE` for a few epochs
per mode (fp32 / bf16 x NCHW / channels_last), one process per mode (nothing shared between modes), and reads the
images/s of the training loop from each run's metrics.json. Modes are run in `--rounds` rotated orders, and each
mode's median is reported.

    python benchmarks/train_modes.py --recipe neu_det_quick --batches 8 16 --epochs 1 --rounds 2 \\
        --out docs/results/train_modes_cpu_neu-det.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from timing import command_line  # benchmarks/timing.py (this script's folder is on sys.path)

MODES = {"fp32": ("false", "false"), "bf16": ("true", "false"), "channels_last fp32": ("false", "true"),
         "channels_last bf16": ("true", "true")}


def run_mode(recipe: str, batch: int, mode: str, epochs: int, extra: list[str], work: Path) -> tuple[float, int]:
    """(images/s of the training loop, iterations trained) of one `sdidd train` run in `mode`."""
    amp, cl = MODES[mode]
    out = work / f"{mode.replace(' ', '_')}_b{batch}_{len(list(work.iterdir()))}"
    cmd = [sys.executable, "-m", "sdidd.cli", "train", recipe, f"train.out_dir={out}", f"train.epochs={epochs}",
           f"train.milestones=[{epochs}]", "train.min_iters=0", f"train.batch_size={batch}", f"train.amp={amp}",
           f"train.channels_last={cl}", "train.progress=false", "train.keep_checkpoints=0", *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    stats = json.loads((out / "metrics.json").read_text())["stats"]
    return float(stats["images_per_second"]), int(stats["iterations"])


def main(argv: list[str] | None = None) -> int:
    """Run every mode and batch size, write the Markdown report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="neu_det_quick")
    p.add_argument("--batches", type=int, nargs="+", default=[8])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of: {', '.join(MODES)}")
    p.add_argument("--out", default="docs/results/train_modes_cpu.md")
    p.add_argument("overrides", nargs="*", help="key=value for every run (e.g. data.train_sizes=[320])")
    a = p.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes) or "fp32" not in modes:
        p.error(f"--modes {a.modes!r}: a comma-separated subset of {', '.join(MODES)}, with fp32 (the ratios' base)")
    speed: dict[tuple[int, str], list[float]] = {}
    iters: dict[tuple[int, str], int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            order = modes[r % len(modes):] + modes[:r % len(modes)]  # rotate: no mode always runs first
            for batch in a.batches:
                for mode in order:
                    v, iters[(batch, mode)] = run_mode(a.recipe, batch, mode, a.epochs, a.overrides, Path(tmp))
                    speed.setdefault((batch, mode), []).append(v)
                    print(f"round {r + 1}, batch {batch}, {mode}: {v:.2f} img/s", flush=True)
    lines = [f"# Training loop speed per precision and memory format: `{a.recipe}`", "",
             f"- Command: `{command_line(__file__, argv)}`",
             f"- Machine: CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}",
             f"- Date: {dt.date.today().isoformat()}",
             f"- Setting: `sdidd train {a.recipe}` for {a.epochs} epoch(s) per run (data loading, augmentation, loss, "
             f"backward, SGD; evaluation excluded), one process per run, {a.rounds} rounds in rotated mode order; "
             "images/s of the training loop from metrics.json, median over rounds (each round's value in brackets).",
             "- Seeds and budget: every run uses the recipe's seed (train.seed) and trains the same epochs on the same "
             "images, so every mode of a batch size runs the same iterations (in the table); this measures speed, not "
             "accuracy, and no metric of these short runs is compared.", ""]
    for batch in a.batches:
        base = statistics.median(speed[(batch, "fp32")])
        lines += [f"## batch {batch}", "", "| mode | epochs / iterations per run | train images/s | speed vs fp32 |",
                  "|---|---|---|---|"]
        for mode in modes:
            v = speed[(batch, mode)]
            lines.append(f"| {mode} | {a.epochs} / {iters[(batch, mode)]} | {statistics.median(v):.2f} "
                         f"({', '.join(f'{x:.1f}' for x in v)}) | {statistics.median(v) / base:.2f} |")
        lines.append("")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
