"""`two-models` checkpoints read with several new-class dampings G (and old-score blendings B): mAP50 per setting.

A `two-models` checkpoint keeps the old model(s) beside a fine-tune; at inference every new-class score is multiplied
by (1 - the best score of the earlier models at that anchor)^G (`incremental.new_score_damp`, docs/METHOD_NOTES.md,
"Two models at inference"), and after a step with replay every earlier model's score s becomes s^(1-B) * q^B, q the
fine-tune's score for that class (`incremental.old_score_blend`, "Two models with replay"). Neither changes a weight,
so they are chosen by evaluating the same checkpoints with each setting: on the validation split a run held out
(`data.val_fraction`, the default split of such a checkpoint), never on the test split. Each checkpoint is one run
(one seed); the table gives each setting's old / new / all mAP50 per run, the mean ± std over runs and the setting
with the best mean all-class mAP50.

    python benchmarks/damp_sweep.py --damps 0,0.5,1,2,4 --out docs/results/damp_sweep.md \\
        s0=RUN/seed0/two-models/step2/last.pth s1=RUN/seed1/two-models/step2/last.pth
    python benchmarks/damp_sweep.py --damps 1 --blends 0,0.2,0.3,0.4,0.5 --out SWEEP.md s0=... s1=...
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
from pathlib import Path

import torch

from sdidd.config import resolve
from sdidd.engine.build import StepSpec
from sdidd.engine.checkpoint import load_checkpoint, model_from_checkpoint
from sdidd.engine.evaluation import evaluate_model
from sdidd.engine.run_data import channel_view, load_eval_split
from sdidd.errors import SdiddError
from sdidd.predict import checkpoint_postprocess
from timing import command_line, write_report  # benchmarks/timing.py (this script's folder is on sys.path)


def _mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.1f}" + (f" ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else "")


def main(argv: list[str] | None = None) -> int:
    """Evaluate every NAME=CHECKPOINT with every G; write the Markdown table and its JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="NAME=CHECKPOINT", help="two-models checkpoints, one per run (seed)")
    p.add_argument("--damps", default="0,0.5,1,2,4", help="comma-separated values of G")
    p.add_argument("--blends", help="comma-separated values of B (default: each checkpoint's own)")
    p.add_argument("--split", help="split to read (default: each checkpoint's eval default: its held-out images when "
                                   "it ran with data.val_fraction, else its test split)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True, help="Markdown report (the JSON goes beside it)")
    a = p.parse_args(argv)
    bad = [r for r in a.runs if "=" not in r or not r.split("=", 1)[1]]
    if bad:
        p.error(f"{bad[0]!r}: expected NAME=CHECKPOINT")
    try:
        damps = [float(g) for g in a.damps.split(",") if g.strip()]
        blends = [float(b) for b in a.blends.split(",") if b.strip()] if a.blends else [None]
    except ValueError:
        p.error(f"--damps {a.damps!r} / --blends {a.blends!r}: expected numbers separated by commas")
    if not damps or any(g < 0 for g in damps):
        p.error("--damps: one or more numbers >= 0")
    if not blends or any(b is not None and not 0 <= b <= 1 for b in blends):
        p.error("--blends: one or more numbers in [0, 1]")
    torch.set_num_threads(a.threads)
    from sdidd.engine.run_data import default_eval_split
    settings = [(g, b) for g in damps for b in blends]
    rows: list[dict] = []
    by: dict[tuple, dict] = {}  # (run, G, B as asked, None: the checkpoint's own) -> its row
    where: set[str] = set()
    budgets: dict[str, str] = {}  # each run's training budget: every setting of a run reads that one checkpoint
    for item in a.runs:
        name, path = item.split("=", 1)
        state = load_checkpoint(path)
        if not state.get("kept_models"):
            raise SdiddError(f"{path}: not a two-models checkpoint (no kept models): the damping has nothing to act on")
        cfg = resolve(dict(state.get("config") or {}), [], sections=("data", "train"), command="eval")
        split = load_eval_split(cfg.data, a.split or default_eval_split(cfg.data))
        where.add(split.name or a.split or "test")
        stats = state.get("stats") or {}
        budgets[name] = f"{stats.get('epochs', state.get('epoch', '?')):g} epochs, {int(stats.get('iterations', state.get('iteration', 0)))} iterations"
        classes = list(state["classes"])
        test = channel_view(split, classes, keep_empty=True)
        groups = StepSpec(classes, list(state.get("new_classes") or classes)).groups
        post = checkpoint_postprocess(state, path, None)
        for g, b in settings:
            model = model_from_checkpoint(state, "cpu", damp=g, blend=b).eval()
            r = evaluate_model(model, test, cfg.data, torch.device("cpu"), groups=groups, postprocess=post)
            rows.append({"run": name, "checkpoint": path, "damp": g, "blend": model.blend, "old": r.groups.get("old"),
                         "new": r.groups.get("new"), "all": r.groups["all"],
                         "ap50_per_class": {c: r.per_class[c]["ap50"] for c in classes}})
            by[name, g, b] = rows[-1]
            print(f"{name} G={g:g} B={model.blend:g}: old {rows[-1]['old']:.1f} new {rows[-1]['new']:.1f} "
                  f"all {rows[-1]['all']:.1f}", flush=True)
    names = list(dict.fromkeys(r["run"] for r in rows))
    mean_all = {k: statistics.mean(by[(n, *k)]["all"] for n in names) for k in settings}
    best = max(settings, key=lambda k: mean_all[k])
    ref = (1.0, 0.0) if (1.0, 0.0) in settings else (1.0, None) if (1.0, None) in settings else settings[0]
    label = lambda k: f"G = {k[0]:g}" + ("" if k[1] is None else f", B = {k[1]:g}")  # noqa: E731
    command = command_line(__file__, argv)
    lines = [f"# two-models: the new-class damping G{'' if a.blends is None else ' and the old-score blending B'} on "
             f"{', '.join(sorted(where))}", "",
             f"- Command: `{command}`",
             f"- Machine: CPU {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
             f"- Date: {dt.date.today().isoformat()}",
             "- Each run's checkpoint read with each setting (no training); mAP50 is COCO AP@0.5 (pycocotools), old / new / all.",
             f"- Runs (one seed each): {len(names)}; every setting of a run reads the same checkpoint, so every row has "
             "that run's training budget (its last step): " + "; ".join(f"{n} {budgets[n]}" for n in names) + ".",
             *(["- One run only: the differences between settings are one seed's, no mean ± std; they do not show that "
                "one beats another beyond that seed."] if len(names) == 1 else []),
             f"- Best mean all-class mAP50: **{label(best)}**", "",
             "| setting | " + " | ".join(names) + f" | all, mean ± std | all − {label(ref)}'s, paired |",
             "|---|" + "---|" * (len(names) + 2)]
    for k in settings:
        cells = [f"{by[(n, *k)]['old']:.1f} / {by[(n, *k)]['new']:.1f} / {by[(n, *k)]['all']:.1f}" for n in names]
        diff = [by[(n, *k)]["all"] - by[(n, *ref)]["all"] for n in names]
        lines.append(f"| {label(k)} | " + " | ".join(cells) + f" | {_mean_std([by[(n, *k)]['all'] for n in names])} | "
                     + _mean_std(diff) + " |")
    out = Path(a.out)
    write_report(out, lines)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "date": dt.date.today().isoformat(),
                                                    "split": sorted(where), "best_damp": best[0], "best_blend": best[1],
                                                    "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except SdiddError as e:  # a missing or foreign checkpoint: one line, no traceback
        raise SystemExit(f"error: {e}") from None
