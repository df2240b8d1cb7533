"""The README's add-classes story, run as a user runs it, with the JSON behind its table.

Runs the commands of the README's "Add defect classes to a deployed model" section through the console script:
export the built-in defects as two datasets, train the deployed (base) model once, then `sdidd add-classes` with
each method and seed from that one base model. Writes a Markdown report and the JSON it is made from:

    python benchmarks/add_classes_story.py --out runs/story --methods sdidd+,sdidd,finetune --seeds 0,1,2 \
        --report docs/results/add_classes_story

The step's seed is `train.seed=S` (the base model keeps seed 0). Every number is the last iteration's, on the
exported test splits: `defects/base`'s for the old classes, `defects/new`'s for the new ones (the story has no
validation split: it is the README's example, not a place to choose settings).
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sdidd.benchmark import machine_description, mean_std_text


def _run(cmd: list[str]) -> float:
    """Run one console command (its output to the terminal); its wall seconds; exit on failure."""
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        sys.exit(f"command failed (exit {rc}): {shlex.join(cmd)}")
    return time.perf_counter() - t0


def _commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parent).stdout.strip()
    return (r.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty else "")


def main() -> None:
    """Run the story and write REPORT.json and REPORT.md."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="a new folder for the datasets and runs")
    ap.add_argument("--methods", default="sdidd+,sdidd,finetune")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--report", required=True, help="path without suffix for the .json and .md")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for the base model and every step (e.g. train.min_iters=20 for a smoke run)")
    ap.add_argument("--extend", action="store_true",
                    help="add methods or seeds to the story in --out: its datasets and base model are reused, the runs "
                         "the --report JSON holds are kept, only the missing ones run")
    a = ap.parse_args()
    out = Path(a.out)
    methods, seeds = a.methods.split(","), [int(s) for s in a.seeds.split(",")]
    data = out / "defects"
    report = Path(a.report)
    rows, earlier = [], None
    if a.extend:
        if not report.with_suffix(".json").is_file() or not (out / "base" / "last.pth").is_file():
            sys.exit(f"--extend needs the story's base model ({out}/base/last.pth) and its report JSON "
                     f"({report.with_suffix('.json')})")
        earlier = json.loads(report.with_suffix(".json").read_text())
        if earlier.get("set", []) != a.set:
            sys.exit(f"--extend: the story ran with --set {earlier.get('set', [])}, not {a.set}")
        rows = [r for r in earlier["runs"] if r["method"] in methods and r["seed"] in seeds]
        started = datetime.datetime.fromisoformat(earlier["date"])
        base_s = earlier["base"]["seconds"]
    elif out.exists():
        sys.exit(f"{out}: exists; give a new folder (a story run never reuses another's files), or --extend it")
    else:
        started = datetime.datetime.now(datetime.timezone.utc)
        _run(["sdidd", "demo", "--export", str(data)])
        base_s = _run(["sdidd", "train", "synthetic_quick", f"data={data}/base/data.yaml", f"train.out_dir={out}/base", *a.set])
    base = json.loads((out / "base" / "metrics.json").read_text())
    done = {(r["method"], r["seed"]) for r in rows}
    for m in methods:
        for s in seeds:
            if (m, s) in done:
                continue
            run = out / f"{m}_s{s}"
            secs = _run(["sdidd", "add-classes", f"{out}/base/last.pth", f"{data}/new/data.yaml", "--old-test",
                         f"{data}/base/data.yaml", "--out", str(run), "--method", m, f"train.seed={s}", *a.set])
            res = json.loads((run / "add_classes.json").read_text())
            steps = json.loads((run / "metrics.json").read_text())
            rows.append({"method": m, "seed": s, "seconds": round(secs, 1), "groups": res["groups"], "rows": res["rows"],
                         "iterations": steps["stats"]["iterations"], "images": steps["stats"]["images"]})
    rows.sort(key=lambda r: (methods.index(r["method"]), seeds.index(r["seed"])))
    cmd = shlex.join(["python", "benchmarks/add_classes_story.py", *sys.argv[1:]])  # quoted: the report's command runs as written
    commit = _commit()
    if earlier is not None:  # the story's own command and code first, then what extended it
        cmd, commit = f"{earlier['command']}`, extended by `{cmd}", f"{earlier['commit']}`, extended at `{commit}"
    record = {"command": cmd, "commit": commit, "machine": machine_description(), "date": started.isoformat(),
              "set": a.set, "base": {"seconds": round(base_s, 1), "metrics": base}, "runs": rows}
    report.parent.mkdir(parents=True, exist_ok=True)
    report.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str) + "\n")

    lines = [f"# The README's add-classes story ({started.date()})", "",
             f"- Command: `{cmd}` (code `{record['commit']}`)",
             f"- Machine: {record['machine']}; one job at a time.",
             "- What runs: `sdidd demo --export`, `sdidd train synthetic_quick` (the base model, seed 0), then "
             "`sdidd add-classes BASE NEW.yaml --old-test BASE.yaml --method M train.seed=S` from that one base model.",
             "- Old classes on the base dataset's test split, new classes on the new dataset's; last iteration; mAP50.",
             f"- Base model: {base['stats']['iterations']:.0f} iterations on {base['stats']['images']:.0f} images, "
             f"{base_s:.0f} s.", "",
             "| method | " + " | ".join(f"seed {s} old / new / all" for s in seeds)
             + " | old | new | all | iterations (images) | s per step |",
             "|---|" + "---|" * (len(seeds) + 5)]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        cells = [f"{r['groups']['old']:.1f} / {r['groups']['new']:.1f} / {r['groups']['all']:.1f}" for r in mine]
        cols = [mean_std_text([r["groups"][g] for r in mine]) for g in ("old", "new", "all")]
        lines.append(f"| `{m}` | " + " | ".join(cells) + " | " + " | ".join(cols)
                     + f" | {mine[0]['iterations']:.0f} ({mine[0]['images']:.0f})"
                     + f" | {statistics.mean(r['seconds'] for r in mine):.0f} |")
    teacher = rows[0]["groups"]["teacher_old"] if rows else float("nan")
    lines += ["", f"Teacher (base model) old-class mAP50 on the same test split: {teacher:.1f}. Mean ± sample std over "
              "seeds; each step's seconds include loading, training and both evaluations.", ""]
    report.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
