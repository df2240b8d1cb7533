"""Wall time of a whole benchmark run, two versions of sdidd side by side: the speed-up a change brings, data loading,
evaluation and every stage included, with the metrics of both versions to show nothing was lost.

Each seed runs `sdidd benchmark` once per version, interleaved (before s0, after s0, before s1, ...), one job at a
time, each version from its own source tree (a git worktree of `--before` / `--after`, or the current checkout).

    python benchmarks/before_after.py --before f219074 --after acaccd6 --seeds 0,1 --work /tmp/bench \\
        --out docs/results/cpu_speedup_neu-det.md
    python benchmarks/before_after.py ... --report-only      # the report from a finished --work folder
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
import time
from pathlib import Path

from sdidd.benchmark import mean_std_text
from timing import command_line  # benchmarks/timing.py (this script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
VERSIONS = ("before", "after")


def source_tree(rev: str | None, work: Path, name: str) -> Path:
    """The `src` folder of revision `rev` (a git worktree under `work`), or of this checkout when `rev` is None."""
    if rev is None:
        return REPO / "src"
    tree = work / f"tree_{name}"
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=REPO, check=True, capture_output=True)
    return tree / "src"


def run_one(src: Path, version: str, seed: int, a: argparse.Namespace) -> float:
    """One `sdidd benchmark` of `version` for `seed`; returns its wall-clock seconds (its log goes to the work folder)."""
    tag = f"{version}_s{seed}"
    cmd = [sys.executable, "-m", "sdidd.cli", "benchmark", "--dataset", a.dataset, "--protocol", a.protocol, "--profile",
           a.profile, "--methods", a.methods, "--seeds", str(seed), "--out", str(a.work / tag), "--results-dir",
           str(a.work / "res"), "--tag", tag, "train.progress=false", *a.overrides]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    with open(a.work / f"{tag}.log", "w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"{tag}: benchmark failed (exit {rc}), see {a.work / (tag + '.log')}")
    return wall


def report(a: argparse.Namespace, walls: dict[str, float], command: str) -> str:
    """The Markdown report: wall per seed and version, stage train seconds, metrics, the speed-up."""
    seeds = [int(s) for s in a.seeds.split(",")]
    res = {(v, s): json.loads((a.work / "res" / f"{v}_s{s}.json").read_text()) for v in VERSIONS for s in seeds}
    stages = ["teacher", *a.methods.split(",")]
    first = res[(VERSIONS[0], seeds[0])]
    lines = [f"# Whole-run speed on {a.dataset} {a.protocol} ({a.profile}): before and after", "",
             f"- Command: `{command}`",
             f"- Versions: before = `{a.before}`, after = `{a.after or 'this checkout'}`",
             f"- Machine: {first.get('machine', platform.machine())}; one job at a time, versions interleaved per seed",
             f"- Date: {dt.date.today().isoformat()}",
             f"- Settings: {json.dumps(first.get('settings', {}))}",
             "- Wall: the whole `sdidd benchmark` process (data loading and checking, every stage's training and "
             "evaluation, reports); train s: the training loops alone, from each stage's stats.",
             "- Budget: both versions run the same recipe, so every stage has the same epochs and iterations in both "
             "(columns `epochs / iterations`, from each stage's stats).", "",
             "| seed | version | wall s | " + " | ".join(f"{m} train s | {m} epochs / iterations" for m in stages) + " |",
             "|---|---|---|" + "---|---|" * len(stages)]
    for s in seeds:
        for v in VERSIONS:
            ms = res[(v, s)]["methods"]
            lines.append(f"| {s} | {v} | {walls[f'{v}_s{s}']:.0f} | "
                         + " | ".join(f"{ms[m].get('train_seconds', float('nan')):.0f} | "
                                      f"{ms[m].get('epochs', 0):.0f} / {ms[m].get('iterations', 0):.0f}" for m in stages) + " |")
    total = {v: sum(walls[f"{v}_s{s}"] for s in seeds) for v in VERSIONS}
    lines += ["", f"Whole-run speed-up (before wall / after wall, all seeds): **{total['before'] / total['after']:.2f}×** "
              f"({total['before']:.0f} s → {total['after']:.0f} s); per seed: "
              + ", ".join(f"{walls[f'before_s{s}'] / walls[f'after_s{s}']:.2f}×" for s in seeds) + "."]
    if "finetune" in stages and len(stages) > 2:
        for v in VERSIONS:
            ratios = []
            for s in seeds:
                ms = res[(v, s)]["methods"]
                per_img = {m: ms[m]["train_seconds"] / max(ms[m]["images"] * ms[m]["epochs"], 1) for m in stages[1:]}
                ratios += [per_img[m] / per_img["finetune"] for m in stages[1:] if m != "finetune"]
            lines.append(f"Distillation over fine-tune (train s per image), {v}: {statistics.mean(ratios):.2f} "
                         f"({', '.join(f'{r:.2f}' for r in ratios)}).")
    lines += ["", "## Metrics (mAP50 old / new / all, last epoch, test split; mean ± std over the seeds)", "",
              "| method | version | old | new | all |", "|---|---|---|---|---|"]
    for m in stages:
        for v in VERSIONS:
            ms = [res[(v, s)]["methods"][m] for s in seeds]
            if m == "teacher":
                lines.append(f"| teacher | {v} | {mean_std_text([x['map50_old'] for x in ms])} | | |")
            else:
                lines.append(f"| {m} | {v} | " + " | ".join(mean_std_text([x[k] for x in ms]) for k in
                                                             ("map50_old", "map50_new", "map50_all")) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run (or only report) the before/after comparison."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="git revision of the 'before' version")
    p.add_argument("--after", default=None, help="git revision of the 'after' version (default: this checkout)")
    p.add_argument("--dataset", default="neu-det")
    p.add_argument("--protocol", default="3+3")
    p.add_argument("--profile", default="quick")
    p.add_argument("--methods", default="finetune,sdidd")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--work", type=Path, default=Path("runs/before_after"))
    p.add_argument("--out", type=Path, default=Path("docs/results/before_after.md"))
    p.add_argument("--report-only", action="store_true", help="write the report from a finished --work folder")
    p.add_argument("overrides", nargs="*", help="key=value passed to every benchmark")
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    walls_file = a.work / "walls.json"
    walls: dict[str, float] = json.loads(walls_file.read_text()) if walls_file.is_file() else {}
    if not a.report_only:
        trees = {"before": source_tree(a.before, a.work, "before"), "after": source_tree(a.after, a.work, "after")}
        for seed in (int(s) for s in a.seeds.split(",")):
            for v in VERSIONS:
                if f"{v}_s{seed}" not in walls:
                    walls[f"{v}_s{seed}"] = run_one(trees[v], v, seed, a)
                    walls_file.write_text(json.dumps(walls, indent=2))
                    print(f"{v} seed {seed}: {walls[f'{v}_s{seed}']:.0f} s", flush=True)
    command = command_line(__file__, argv)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(report(a, walls, command))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
