"""The paper's NEU-DET 3+3 table on one GPU in minutes: a smoke stage, then teacher + methods side by side.

Two stages, each a set of jobs run as separate processes on the one device (`--parallel` at a time):
the teacher and joint start together (joint needs no teacher), and fine-tune / ERD / SD-IDD start as soon
as the teacher's checkpoint is written (`two-models` as soon as the fine-tune's: it evaluates that detector
beside the teacher and trains nothing). The **smoke** stage runs every job on a strided subset for one
epoch (bf16, evaluation included, same sizes and switches as the full stage); if any job fails, the run
stops there with the job's error and log tail (exit 2), leaving time to fix and rerun. The **full** stage
follows only when the smoke passed and writes, under `--out`: `<tag>.md`, `<tag>.json`, `<tag>_per_class.png`,
`<tag>_sdidd_losses.png` and `logs.tar.gz` (every job's log, log.csv, metrics.json and config.json).
The report is rewritten after every finished job, so a run stopped by `--budget` still leaves the rows it has.

    python benchmarks/gpu_table.py --dry-run --out /tmp/gpu_dry      # CPU, tiny synthetic data: what CI runs
    bash benchmarks/gpu_table.sh                                      # on the GPU machine (see its header)

Not run on a GPU yet: the recipe's sizes are estimates (src/sdidd/configs/neu_det_gpu.yaml).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from sdidd.benchmark import (METHOD_ORDER, format_report_table, machine_description, markdown_report, method_config, method_entry,
                             parse_methods, report_header, reuse_finetune, reuses_finetune)
from sdidd.config import (Config, TrainConfig, config_from_dict, load_config, parse_overrides, merge_dicts, protocol_groups,
                          replaced)
from sdidd.engine.build import StepSpec
from sdidd.engine.checkpoint import load_checkpoint, model_from_checkpoint
from sdidd.engine.protocol import run_steps, step_specs
from sdidd.engine.run_data import RunData, decode_once, load_split
from sdidd.engine.schedule import step_schedule
from sdidd.engine.trainer import train_step
from sdidd.errors import SdiddError

log = logging.getLogger("sdidd.gpu_table")

PAPER = {"teacher_old": 71.1, "sdidd": {"map50_old": 58.2, "map50_new": 69.0, "map50_all": 63.6}}  # SD-IDD paper, NEU-DET 3+3
TARGETS = "joint mAP50 >= 75; teacher old >= 71; SD-IDD >= the paper on old, new and all; strongest all >= 0.95 x joint; wall <= 540 s"
# The project's strongest method: sdidd+ (old-class pseudo-labels on top of SD-IDD) where this sdidd has it, else sdidd.
STRONGEST = "sdidd+" if "sdidd+" in METHOD_ORDER else "sdidd"
# two-models reuses the finetune job's detector: it adds an evaluation, not a training job.
DEFAULT_METHODS = ",".join(["joint", "finetune", "erd", "sdidd"] + ([STRONGEST] if STRONGEST != "sdidd" else [])
                           + (["two-models"] if "two-models" in METHOD_ORDER else []))
# Tiny CPU settings of --dry-run: synthetic data (4 classes, 2+2), a small untrained model, one epoch.
DRY_RUN = {
    "data": {"dataset": "synthetic", "num_train_images": 16, "num_test_images": 8, "train_sizes": [64, 96],
             "test_size": 64, "max_size": 96, "check": False, "device_transforms": True},
    "model": {"backbone": "tf_efficientnet_lite0", "pretrained": False, "fpn_channels": 16, "head_channels": 16, "head_convs": 1},
    "train": {"epochs": 1, "batch_size": 4, "lr": 0.01, "device": "cpu", "threads": 1, "warmup_iters": 2, "milestones": [],
              "channels_last": True, "compile": False, "progress": False, "log_every": 1},
    "incremental": {"protocol": "2+2", "epochs": 1, "milestones": []},
}


@dataclass
class Job:
    """One training process of a stage: the teacher or one method (which may wait for the teacher)."""

    name: str
    needs: list[str] = field(default_factory=list)
    proc: Optional[subprocess.Popen] = None
    started: float = 0.0
    ended: float = 0.0


class StageFailed(Exception):
    """A job of a stage exited non-zero (or the stage ran out of time)."""


# ------------------------------------------------------------------------------------------- configs

def _no_min_iters(tree: dict[str, Any]) -> dict[str, Any]:
    """Set train.min_iters=0 where the config has that key (one epoch must stay one epoch in smoke/dry runs)."""
    if "min_iters" in TrainConfig.__dataclass_fields__:
        tree = merge_dicts(tree, {"train": {"min_iters": 0}})
    return tree


def full_config(config: str, overrides: list[str], dry_run: bool) -> Config:
    """The recipe with `--set` overrides (and the tiny CPU settings under --dry-run)."""
    base = load_config(config)
    tree = base.to_dict()
    if dry_run:
        tree = _no_min_iters(merge_dicts(tree, DRY_RUN))
    return config_from_dict(merge_dicts(tree, parse_overrides(overrides)))


def smoke_config(cfg: Config) -> Config:
    """Same model, sizes, batch and switches; one epoch, no decay, a short warmup."""
    tree = merge_dicts(cfg.to_dict(), {"train": {"epochs": 1, "milestones": [], "warmup_iters": 2},
                                        "incremental": {"epochs": 1, "milestones": []}})
    return config_from_dict(_no_min_iters(tree))


# ------------------------------------------------------------------------------------------ one job

def load_data(cfg: Config, subset: Optional[dict[str, int]]) -> RunData:
    """Both splits parsed and decoded once; with `subset`, an evenly strided subset of each (decoded alone)."""
    splits = []
    for split, key in ((cfg.data.train_split, "train"), (cfg.data.test_split, "test")):
        ds = load_split(cfg.data, split)
        if subset and subset.get(key) and subset[key] < len(ds):
            step = len(ds) / subset[key]  # records are sorted by class: a stride keeps every class
            ds = ds.with_records([ds.records[int(i * step)] for i in range(subset[key])])
        splits.append(decode_once(ds, cfg.data))
    return RunData(list(splits[0].classes), splits[0], splits[1])


def run_job(plan: dict[str, Any], name: str) -> dict[str, Any]:
    """Train one job of a stage (teacher, or a method from the teacher's checkpoint) and return its report row."""
    cfg, work = config_from_dict(plan["config"]), Path(plan["work"])
    if torch.cuda.is_available() and cfg.train.device != "cpu":
        torch.backends.cudnn.benchmark = True  # fixed shapes per short size: autotuned convolutions pay off
    data = load_data(cfg, plan.get("subset"))
    groups = protocol_groups(cfg, data.classes)
    classes = [c for g in groups for c in g]
    num_old = len(classes) - len(groups[-1])
    if name == "teacher":
        res = train_step(cfg, StepSpec(list(groups[0]), list(groups[0]), "base", 0), work / "teacher", data)
        row = method_entry(res, 0, list(groups[0]))  # the teacher's row: its classes are all "new" to it
        return {"map50_old": row["map50_all"], "ap50_per_class": row["ap50_per_class"]} | {
            k: v for k, v in row.items() if k in ("train_seconds", "images_per_second", "peak_memory_mb", "images", "epochs", "iterations")}
    mcfg, base = method_config(cfg, name)
    # Pinned to the fine-tune's lr (not the base lr a two-models step trains at by default), a two-models job with the
    # finetune job's data has that job's step as its detector: evaluate the joined model only, no second training job.
    pinned = replaced(cfg, {"incremental.two_models_lr": step_schedule(method_config(cfg, "finetune")[0], True).lr})
    if (work / "finetune").is_dir() and reuses_finetune(pinned, name):
        reuse_finetune(work / "finetune", work / name, len(groups) - 1)
        mcfg = replaced(method_config(pinned, name)[0], {"train.resume": True})
    teacher = None if base == "joint" else model_from_checkpoint(load_checkpoint(work / "teacher" / "last.pth"))
    results = run_steps(mcfg, data, step_specs(groups, base)[1:], lambda s: work / name / f"step{s.step}", teacher=teacher)
    return method_entry(results[-1], num_old, classes)


def child_main(plan_path: str, name: str) -> int:
    """Entry of a job process: run it, write results/<name>.json; errors go to the log (exit 1)."""
    _setup_logging()
    plan = json.loads(Path(plan_path).read_text())
    start = time.perf_counter()
    entry = run_job(plan, name)
    out = Path(plan["work"]) / "results" / f"{name}.json"
    out.write_text(json.dumps({"entry": entry, "job_seconds": round(time.perf_counter() - start, 1)}, indent=2))
    return 0


# ------------------------------------------------------------------------------------------- a stage

def run_stage(stage: str, cfg: Config, methods: list[str], work: Path, parallel: int, subset: Optional[dict[str, int]],
              deadline: Optional[float], on_job_done: Any = None) -> dict[str, Any]:
    """Run the teacher and every method as processes (`parallel` at a time); returns {job: result} and timings."""
    if work.exists():
        shutil.rmtree(work)
    (work / "results").mkdir(parents=True)
    (work / "logs").mkdir()
    plan = {"config": cfg.to_dict(), "work": str(work.resolve()), "subset": subset}
    plan_path = (work / "plan.json").resolve()
    plan_path.write_text(json.dumps(plan, indent=2))
    jobs = [Job("teacher")] + [Job(m, needs=_needs(m, methods)) for m in methods]
    jobs.sort(key=lambda j: 0 if j.name in ("teacher", "joint") else 1)  # the two without a teacher start first
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // max(parallel, 1))))
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    done: set[str] = set()
    try:
        while len(done) < len(jobs):
            running = [j for j in jobs if j.proc is not None and j.name not in done]
            for j in running:
                rc = j.proc.poll()
                if rc is None:
                    continue
                j.ended = time.perf_counter() - t0
                if rc != 0:
                    raise StageFailed(f"{stage} stage: job {j.name} failed (exit {rc}) after {j.ended - j.started:.0f} s; "
                                      f"log {work / 'logs' / (j.name + '.log')}:\n{_tail(work / 'logs' / (j.name + '.log'))}")
                done.add(j.name)
                results[j.name] = json.loads((work / "results" / f"{j.name}.json").read_text())
                log.info(f"[{stage}] {j.name} done at {j.ended:.0f} s ({j.ended - j.started:.0f} s, "
                         f"{results[j.name]['entry'].get('images_per_second', 0):.1f} img/s)")
                if on_job_done is not None:
                    on_job_done(results, _timeline(jobs))
            free = parallel - sum(1 for j in jobs if j.proc is not None and j.name not in done)
            for j in jobs:
                if free <= 0:
                    break
                if j.proc is None and all(n in done for n in j.needs):
                    logf = open(work / "logs" / f"{j.name}.log", "w")
                    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", str(plan_path), j.name]
                    j.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
                    logf.close()
                    j.started = time.perf_counter() - t0
                    log.info(f"[{stage}] {j.name} started at {j.started:.0f} s")
                    free -= 1
            if deadline is not None and time.perf_counter() > deadline:
                raise StageFailed(f"{stage} stage: out of time (--budget) with {', '.join(j.name for j in jobs if j.name not in done)} unfinished")
            time.sleep(0.2)
    finally:
        for j in jobs:  # stop what this stage started and is still running (a failure or the budget)
            if j.proc is not None and j.proc.poll() is None:
                j.proc.terminate()
                try:
                    j.proc.wait(10)
                except subprocess.TimeoutExpired:
                    j.proc.kill()
    return {"results": results, "timeline": _timeline(jobs), "wall_seconds": round(time.perf_counter() - t0, 1)}


def _needs(method: str, methods: list[str]) -> list[str]:
    """Jobs a method waits for: none for joint, the teacher for the rest, and two-models also the fine-tune it reuses."""
    if method == "joint":
        return []
    return ["teacher", "finetune"] if method == "two-models" and "finetune" in methods else ["teacher"]


def _timeline(jobs: list[Job]) -> dict[str, list[Optional[float]]]:
    """[start, end] seconds of each started job from the stage's start (end None while it runs)."""
    return {j.name: [round(j.started, 1), round(j.ended, 1) if j.ended else None] for j in jobs if j.proc is not None}


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------------------------------- report

def build_report(cfg: Config, stage_result: dict[str, Any], methods: list[str], profile: str, command: str,
                 extra: dict[str, Any]) -> dict[str, Any]:
    """The `sdidd benchmark` report dict (same keys) plus the GPU run's timings under 'gpu_run'."""
    classes = load_split(cfg.data, cfg.data.train_split).classes
    groups = protocol_groups(cfg, list(classes))
    report = report_header(cfg, groups, "+".join(str(len(g)) for g in groups), profile, command)
    report["settings"].update({"amp_bf16": cfg.train.amp, "channels_last": cfg.train.channels_last,
                               "compile": cfg.train.compile, "device_transforms": cfg.data.device_transforms})
    res = stage_result["results"]
    for name in ["teacher"] + methods:
        if name in res:
            report["methods"][name] = res[name]["entry"]
    images = {n: r["entry"]["images_per_second"] * r["entry"]["train_seconds"] for n, r in res.items()}
    report["gpu_run"] = {"wall_seconds": stage_result.get("wall_seconds"), "timeline": stage_result["timeline"],
                         "job_seconds": {n: r["job_seconds"] for n, r in res.items()},
                         "train_images": round(sum(images.values())), **extra}
    if stage_result.get("wall_seconds"):
        report["gpu_run"]["images_per_second_all_jobs"] = round(sum(images.values()) / stage_result["wall_seconds"], 1)
    return report


def target_lines(report: dict[str, Any], total_wall: Optional[float]) -> list[str]:
    """Issue 15's targets, each with the measured value and met / missed."""
    m = report["methods"]
    rows = []
    def row(what: str, value: Optional[float], goal: float, fmt: str = ".1f") -> None:
        ok = "–" if value is None else ("met" if value >= goal - 1e-9 else "missed")
        rows.append(f"| {what} | {'–' if value is None else format(value, fmt)} | {goal:{fmt}} | {ok} |")
    row("joint mAP50 (all)", m.get("joint", {}).get("map50_all"), 75.0)
    row("teacher mAP50 (old)", m.get("teacher", {}).get("map50_old"), 71.0)
    for k in ("map50_old", "map50_new", "map50_all"):
        row(f"SD-IDD {k} vs paper", m.get("sdidd", {}).get(k), PAPER["sdidd"][k])
    if "joint" in m and STRONGEST in m:
        row(f"{STRONGEST} all / joint all", m[STRONGEST]["map50_all"] / max(m["joint"]["map50_all"], 1e-9), 0.95, ".3f")
    if total_wall is not None:  # lower is better: shown as the margin to 540 s
        rows.append(f"| wall time, whole command (s) | {total_wall:.0f} | ≤ 540 | {'met' if total_wall <= 540 else 'missed'} |")
    return ["| target | measured | goal | |", "|---|---|---|---|"] + rows


def write_outputs(report: dict[str, Any], out: Path, tag: str, work: Optional[Path], final: bool,
                  total_wall: Optional[float] = None) -> None:
    """<tag>.json and <tag>.md (rewritten after every job); plots and logs.tar.gz when `final`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(report, indent=2))
    g = report.get("gpu_run", {})
    md = markdown_report(report, tag if final else None)
    md += "\n## GPU run (benchmarks/gpu_table.py)\n\n"
    md += f"- Stage wall time: {g.get('wall_seconds')} s; whole command: {total_wall if total_wall is not None else '–'} s; " \
          f"jobs side by side: {g.get('parallel')}; all jobs together: {g.get('images_per_second_all_jobs', '–')} train images/s\n"
    md += f"- Smoke stage: {g.get('smoke', '–')}\n"
    md += "- Job timeline (s from the stage start): " + ", ".join(
        f"{n} {a:.0f}–{'…' if b is None else f'{b:.0f}'}" for n, (a, b) in g.get("timeline", {}).items()) + "\n"
    md += f"- Paper (SD-IDD, NEU-DET 3+3): old {PAPER['sdidd']['map50_old']}, new {PAPER['sdidd']['map50_new']}, " \
          f"all {PAPER['sdidd']['map50_all']}, teacher {PAPER['teacher_old']}\n\n" + "\n".join(target_lines(report, total_wall)) + "\n"
    if not final:
        md += "\n*Partial: the run is still going (or was stopped); rows appear as jobs finish.*\n"
    (out / f"{tag}.md").write_text(md)
    if not final:
        return
    from sdidd.plots import plot_per_class_ap, plot_training_curves
    aps = {m: v["ap50_per_class"] for m, v in report["methods"].items()}
    plot_per_class_ap(aps, report["classes_old"], report["classes_new"], out / f"{tag}_per_class.png",
                      title=f"{report['dataset']} {report['protocol']} ({report['profile']}): AP50 per class")
    if work is not None and (work / "sdidd" / "step1" / "log.csv").exists():
        plot_training_curves(work / "sdidd" / "step1" / "log.csv", out / f"{tag}_sdidd_losses.png")


def pack_logs(work_dirs: list[Path], out: Path) -> Path:
    """logs.tar.gz of every job's log, log.csv, metrics.json and config.json (no checkpoints)."""
    path = out / "logs.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for w in work_dirs:
            if not w.exists():
                continue
            for f in sorted(w.rglob("*")):
                if f.is_file() and (f.suffix in (".log", ".csv", ".json")):
                    tar.add(f, arcname=str(Path(w.name) / f.relative_to(w)))
    return path


# ------------------------------------------------------------------------------------------------ main

def _setup_logging() -> None:
    logger = logging.getLogger("sdidd")
    if not logger.handlers:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(h)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options of the driver."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="neu_det_gpu", help="recipe name or YAML file (default: neu_det_gpu)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="config overrides (repeatable)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"methods besides the teacher (default: {DEFAULT_METHODS})")
    p.add_argument("--out", default="outputs/gpu_table", help="report, plots and logs.tar.gz (flat: fits the device's $OUT)")
    p.add_argument("--work", default="runs/gpu_table", help="checkpoints and job logs (<work>/smoke, <work>/full)")
    p.add_argument("--parallel", type=int, default=6, help="jobs side by side on the one device (1: one after another)")
    p.add_argument("--smoke-train", type=int, default=0, help="smoke stage: training images (default 8 x batch)")
    p.add_argument("--smoke-test", type=int, default=48, help="smoke stage: test images")
    p.add_argument("--no-smoke", action="store_true", help="skip the smoke stage")
    p.add_argument("--smoke-only", action="store_true", help="stop after the smoke stage")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole command; unfinished jobs are stopped")
    p.add_argument("--dry-run", action="store_true", help="tiny synthetic CPU run of both stages (CI)")
    p.add_argument("--tag", default=None, help="report file names (default: <dataset>_<protocol>_<profile>)")
    p.add_argument("--command", default=None, help="the command recorded in the report (default: this one)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Smoke stage, then the full table; exit 0, 2 (smoke failed) or 3 (full stage failed or out of time)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        return child_main(argv[1], argv[2])
    _setup_logging()
    args = parse_args(argv)
    t_start = time.perf_counter()
    deadline = t_start + args.budget if args.budget else None
    try:
        cfg = full_config(args.config, args.overrides, args.dry_run)
        methods = [m for m in parse_methods(args.methods) if m != "teacher"]
    except SdiddError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.parallel < 1:
        print("error: --parallel must be >= 1", file=sys.stderr)
        return 2
    profile = "dry-run" if args.dry_run else "gpu"
    out, work = Path(args.out), Path(args.work)
    tag = args.tag or f"{cfg.data.dataset}_{cfg.incremental.protocol or 'protocol'}_{profile}"
    command = args.command or shlex.join(["benchmarks/gpu_table.py", *argv])  # also when main(argv) is called
    device = "cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu"
    log.info(f"gpu_table: {machine_description()}; device {device}; torch {torch.__version__}; "
             f"parallel {args.parallel}; methods {', '.join(methods)}; budget {args.budget or '–'} s")
    extra: dict[str, Any] = {"parallel": args.parallel, "device": device}
    stages = [] if args.no_smoke else ["smoke"]
    stages += [] if args.smoke_only else ["full"]
    for stage in stages:
        scfg = smoke_config(cfg) if stage == "smoke" else cfg
        subset = {"train": args.smoke_train or 8 * cfg.train.batch_size, "test": args.smoke_test} if stage == "smoke" else None
        sdir = work / stage
        def partial(results: dict[str, Any], timeline: dict[str, list[float]], stage: str = stage, sdir: Path = sdir) -> None:
            if stage == "full":
                rep = build_report(cfg, {"results": results, "timeline": timeline}, methods, profile, command, extra)
                write_outputs(rep, out, tag, sdir, final=False)
        try:
            res = run_stage(stage, scfg, methods, sdir, args.parallel, subset, deadline, partial)
        except StageFailed as e:
            log.info(f"FAILED: {e}")
            out.mkdir(parents=True, exist_ok=True)
            pack_logs([work / s for s in stages], out)
            return 2 if stage == "smoke" else 3
        rep = build_report(scfg, res, methods, profile if stage == "full" else "smoke", command, extra)
        log.info(f"[{stage}] {res['wall_seconds']:.0f} s\n{format_report_table(rep)}")
        if stage == "smoke":
            extra["smoke"] = f"passed in {res['wall_seconds']:.0f} s (every job, 1 epoch on {subset['train']} training images, evaluation included)"
            (work / "smoke" / "report.json").write_text(json.dumps(rep, indent=2))
        else:
            total = round(time.perf_counter() - t_start, 1)
            write_outputs(rep, out, tag, sdir, final=True, total_wall=total)
            log.info("\n".join(target_lines(rep, total)))
    out.mkdir(parents=True, exist_ok=True)
    pack_logs([work / s for s in stages], out)
    log.info(f"gpu_table: done in {time.perf_counter() - t_start:.0f} s; outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
