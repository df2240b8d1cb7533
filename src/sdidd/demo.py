"""`sdidd demo`: the incremental story on the built-in synthetic defects, offline, on CPU.

Base step learns 2 defect classes; the incremental step adds 2 more from new-class labels only, with
fine-tuning (forgets) and SD-IDD (remembers), from the same teacher. ERD joins them in
`sdidd benchmark --dataset synthetic --methods finetune,erd,sdidd` (it does not fit the demo's 10 minutes).
"""
from __future__ import annotations

import logging

from pathlib import Path
from typing import Optional

from .config import config_from_dict, merge_dicts

log = logging.getLogger(__name__)

DEMO_CONFIG = {
    "name": "demo",
    "data": {"dataset": "synthetic", "train_sizes": [160], "test_size": 160, "max_size": 160,
             "num_train_images": 240, "num_test_images": 80, "check": False},
    "model": {"backbone": "tf_efficientnet_lite0", "pretrained": True, "fpn_channels": 64, "head_channels": 64, "head_convs": 2},
    "train": {"epochs": 12, "batch_size": 8, "lr": 0.02, "warmup_iters": 50, "milestones": [9, 11],
              "log_every": 10, "grad_clip": 35.0},
    # Distillation slows the learning of new classes: 12 epochs (decay at 9, 11) let SD-IDD learn them and keep the old.
    "incremental": {"protocol": "2+2", "epochs": 12, "lr": 0.003, "milestones": [9, 11]},
}
QUICK = {"data": {"num_train_images": 48, "num_test_images": 16, "train_sizes": [96], "test_size": 96, "max_size": 96},
         "model": {"pretrained": False, "fpn_channels": 32, "head_channels": 32, "head_convs": 1},
         "train": {"epochs": 1, "warmup_iters": 5, "milestones": [], "progress": False},
         "incremental": {"epochs": 1}}


def format_per_class_table(report: dict) -> str:
    """Plain-text table: one row per method, one column per class (blank where the class was not trained)."""
    classes = report["classes_old"] + report["classes_new"]
    width = max(10, *(len(c) + 1 for c in classes))
    lines = ["method".ljust(16) + "".join(c.rjust(width) for c in classes)]
    lines.append("-" * len(lines[0]))
    for name, v in report["methods"].items():
        ap = v["ap50_per_class"]
        lines.append(name.ljust(16) + "".join((f"{ap[c]:.1f}" if c in ap else "").rjust(width) for c in classes))
    return "\n".join(lines)


def run_demo(out_dir: str = "runs/demo", quick: bool = False, threads: Optional[int] = None) -> dict:
    """Train the teacher, then finetune and SD-IDD from it; print and write old/new/all and per-class AP50."""
    from .benchmark import format_report_table, run_benchmark
    data = merge_dicts(DEMO_CONFIG, QUICK) if quick else dict(DEMO_CONFIG)
    data = merge_dicts(data, {"train": {"out_dir": out_dir, **({"threads": threads} if threads else {})}})
    cfg = config_from_dict(data)
    report = run_benchmark(cfg, ["finetune", "sdidd"], Path(out_dir), Path(out_dir) / "results", "demo",
                           command="sdidd demo" + (" --quick" if quick else ""), tag="demo")
    log.info("")
    log.info("Synthetic defects, 2+2 protocol: old = " + ", ".join(report["classes_old"]) + "; new = " + ", ".join(report["classes_new"]))
    log.info("mAP50 (%) on the test split, last epoch:")
    log.info(format_report_table(report))
    log.info("\nAP50 (%) per class:")
    log.info(format_per_class_table(report))
    log.info(f"\nReport: {Path(out_dir) / 'results' / 'demo.md'}")
    return report
