"""`sdidd predict` as a user runs it, two versions side by side: images/s of the whole command at each size.

Each run is one `sdidd predict CHECKPOINT FOLDER --size S` process (start-up, reading, resizing, network,
post-processing, writing the detections), timed by its wall clock; versions interleave per round so neither
always runs first. Each version runs from its own source tree (a git worktree of `--before` / `--after`, or this
checkout), like `before_after.py`.

    python benchmarks/predict_speed.py --before f219074 --checkpoint runs/.../last.pth --images some/folder \\
        --sizes 160 320 --rounds 2 --work /tmp/predict_speed --out docs/results/predict_speed_cpu.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from before_after import source_tree  # benchmarks/before_after.py, timing.py (this script's folder is on sys.path)
from timing import command_line, write_report

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


def run_predict(src: Path, checkpoint: str, images: str, size: int, out: Path) -> float:
    """Wall seconds of one `sdidd predict` from source tree `src`."""
    cmd = [sys.executable, "-m", "sdidd.cli", "predict", checkpoint, images, "--size", str(size), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Time both versions at every size, write the Markdown report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="git revision of the 'before' version")
    p.add_argument("--after", default=None, help="git revision of the 'after' version (default: this checkout)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", required=True, help="a folder of images")
    p.add_argument("--sizes", type=int, nargs="+", default=[160, 320])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/predict_speed"))
    p.add_argument("--out", default="docs/results/predict_speed_cpu.md")
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    trees = {"before": source_tree(a.before, a.work, "before"), "after": source_tree(a.after, a.work, "after")}
    n = sum(1 for f in Path(a.images).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    state = torch.load(a.checkpoint, map_location="cpu", weights_only=False)  # only for the budget line of the report
    trained = (f"{state.get('epoch', '?')} epochs / {state.get('iteration', '?')} iterations, seed "
               f"{dict(state.get('config', {}).get('train', {})).get('seed', '?')}")
    seconds: dict[tuple[str, int], list[float]] = {}
    for r in range(a.rounds):
        for size in a.sizes:
            for version in (("before", "after") if r % 2 == 0 else ("after", "before")):
                s = run_predict(trees[version], a.checkpoint, a.images, size, a.work / f"{version}_{size}_{r}")
                seconds.setdefault((version, size), []).append(s)
                print(f"round {r + 1}, {size} px, {version}: {s:.1f} s ({n / s:.1f} images/s)", flush=True)
    lines = ["# `sdidd predict` on CPU: images/s before and after", "",
             f"- Command: `{command_line(__file__, argv)}`",
             f"- Versions: before = `{a.before}`, after = `{a.after or 'this checkout'}`",
             f"- Machine: CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores; Python {platform.python_version()}",
             f"- Date: {dt.date.today().isoformat()}",
             f"- {n} images of `{a.images}`, checkpoint `{a.checkpoint}`; the whole command's wall clock (start-up, reading, "
             f"resizing, network, post-processing, writing), median of {a.rounds} interleaved rounds (each round's value in "
             "brackets).",
             f"- Budget: nothing is trained here; every row (both versions, every size and round) runs the same checkpoint "
             f"(trained {trained}) on the same {n} images, and every run predicts each image once.",
             "", "| size | before images/s | after images/s | after / before |", "|---|---|---|---|"]
    for size in a.sizes:
        b, f = (statistics.median(seconds[(v, size)]) for v in ("before", "after"))
        each = lambda v: ", ".join(f"{n / s:.1f}" for s in seconds[(v, size)])  # noqa: E731
        lines.append(f"| {size} | {n / b:.1f} ({each('before')}) | {n / f:.1f} ({each('after')}) | {b / f:.2f} |")
    write_report(a.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
