"""One run, one table: the base teacher trained once, then joint / finetune / ERD / SD-IDD (+ ablations) from it."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import platform
import shlex
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .config import Config
from .engine import distributed as dist
from .config import protocol_groups, replaced
from .engine.build import StepSpec
from .engine.protocol import run_steps, step_specs
from .engine.run_data import RunData, channel_view, load_run_data
from .engine.schedule import step_schedule
from .engine.trainer import StepResult, train_step
from .errors import SdiddError
from .methods import METHODS, VARIANT_GROUPS, variant_config
from .run_files import write_json, write_text_atomic

log = logging.getLogger(__name__)

METHOD_ORDER = list(METHODS)  # the report's row order: the table's


def parse_methods(text: str) -> list[str]:
    """'joint,finetune,erd,sdidd,ablations' -> method names (a group name expands to its variants)."""
    out: list[str] = []
    for m in (x.strip() for x in text.split(",") if x.strip()):
        names = VARIANT_GROUPS.get(m, [m])
        for n in names:
            if n not in METHODS:
                raise SdiddError(f"unknown method {n!r} (valid: {', '.join(METHODS)}, {', '.join(VARIANT_GROUPS)})")
            if n not in out:
                out.append(n)
    return out


def machine_description() -> str:
    """CPU/GPU of this machine in words."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}"
    import os
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def method_config(cfg: Config, method: str) -> tuple[Config, str]:
    """The config of one method (a variant sets its distill switches) and the engine method it runs as."""
    return variant_config(cfg, method)


def method_entry(result: StepResult, num_old: int, classes: list[str]) -> dict[str, Any]:
    """The report row of one method: old / new / all mAP50, per-class AP50, time and size of its step."""
    per = result.metrics.per_class
    ap50 = {c: round(per[c]["ap50"], 2) for c in classes}
    def mean(names: list[str]) -> float:
        return round(sum(ap50[c] for c in names) / max(len(names), 1), 2)
    return {
        "map50_old": mean(classes[:num_old]), "map50_new": mean(classes[num_old:]), "map50_all": mean(classes),
        "map_all": round(result.metrics.map, 2), "ap50_per_class": ap50,
        "train_seconds": round(result.stats.get("train_seconds", 0.0), 1),
        "images_per_second": round(result.stats.get("images_per_second", 0.0), 2),
        "peak_memory_mb": round(result.stats.get("peak_memory_mb", 0.0), 1),
        **{k: int(result.stats[k]) for k in ("images", "iterations") if k in result.stats},
        **({"epochs": round(result.stats["epochs"], 2)} if "epochs" in result.stats else {}),
        # the extra training run of a fine-tuned new-class teacher (its per-iteration forward is in train_seconds)
        **({"new_teacher_seconds": round(result.stats["new_teacher_seconds"], 1)} if "new_teacher_seconds" in result.stats else {}),
    }


def run_benchmark(cfg: Config, methods: list[str], out_dir: str | Path, results_dir: str | Path, profile: str,
                  command: Optional[str] = None, tag: Optional[str] = None, seeds: Optional[list[int]] = None) -> dict[str, Any]:
    """Train the base teacher once per seed, run every method from it, write JSON + Markdown + plots; stages resume.

    With several `seeds` each seed runs the whole protocol (its own teacher) in `<out_dir>/seed<N>` and the
    report gives mean ± sample standard deviation over the seeds, with every seed's numbers in `per_seed`.
    """
    out_dir, results_dir = Path(out_dir), Path(results_dir)
    data = load_run_data(cfg.data)  # parsed, checked and decoded once for every seed, teacher and method
    cfg = replaced(data.sized(cfg), {"train.resume": True})  # finished stages are reused, interrupted ones continue
    groups = protocol_groups(cfg, data.classes)
    protocol = cfg.incremental.protocol or "+".join(str(len(g)) for g in groups)
    small = f"_new{cfg.incremental.new_images}" if cfg.incremental.new_images else ""
    tag = tag or f"{cfg.data.dataset}_{protocol}_{profile}{small}"
    command = command or " ".join(shlex.quote(a) for a in sys.argv)
    seeds = list(seeds) if seeds else [cfg.train.seed]
    if len(seeds) == 1:
        cfg = replaced(cfg, {"train.seed": seeds[0]})
        return _run_seed(cfg, methods, data, groups, protocol, profile, command, out_dir, results_dir, tag)
    reports: list[dict[str, Any]] = []
    for seed in seeds:
        scfg = replaced(cfg, {"train.seed": seed})
        seed_dir = out_dir / f"seed{seed}"
        reports.append(_run_seed(scfg, methods, data, groups, protocol, profile, command, seed_dir, seed_dir, tag))
        if dist.is_main():
            _write(aggregate_seeds(reports), results_dir, tag)
    report = aggregate_seeds(reports)
    if dist.is_main():
        _write(report, results_dir, tag, plots=True, out_dir=out_dir / f"seed{seeds[0]}")
        log.info(format_report_table(report))
    return report


def _run_seed(cfg: Config, methods: list[str], data: RunData, groups: list[list[str]], protocol: str, profile: str,
              command: str, out_dir: Path, results_dir: Path, tag: str) -> dict[str, Any]:
    """Teacher, then every method from it, for the seed in `cfg.train.seed`; writes its report as it goes."""
    all_classes = [c for g in groups for c in g]
    num_old = len(all_classes) - len(groups[-1])
    base_spec = StepSpec(list(groups[0]), list(groups[0]), "base", 0)
    teacher_res = train_step(cfg, base_spec, out_dir / "teacher", data)
    report = report_header(cfg, groups, protocol, profile, command, methods)
    t_ap = {c: round(teacher_res.metrics.per_class[c]["ap50"], 2) for c in groups[0]}
    report["methods"]["teacher"] = {"map50_old": round(sum(t_ap.values()) / len(t_ap), 2), "ap50_per_class": t_ap,
                                    **{k: v for k, v in method_entry(teacher_res, 0, list(t_ap)).items()
                                       if k in ("train_seconds", "images_per_second", "peak_memory_mb", "images", "epochs", "iterations")}}
    if len(groups) > 2:  # teacher of a multi-step protocol only knows group 0; 'old' spans all but the last group
        report["methods"]["teacher"]["note"] = "base step only (group 0)"
    final_models: dict[str, torch.nn.Module] = {}
    for method in methods:
        mcfg, base = method_config(cfg, method)
        if reuses_finetune(cfg, method):
            reuse_finetune(out_dir / "finetune", out_dir / method, len(groups) - 1)
        # Step 1's new-class teacher (distill.new_teacher=finetune) is the finetune method's step 1: same teacher, data, seed.
        results = run_steps(mcfg, data, step_specs(groups, base, mcfg.incremental.old_labels)[1:], lambda s, m=method: out_dir / m / f"step{s.step}",
                            teacher=teacher_res.model,
                            new_teacher_dir=lambda s: out_dir / "finetune" / f"step{s.step}" if s.step == 1 else None)
        result = results[-1]
        final_models[method] = result.model
        report["methods"][method] = method_entry(result, num_old, all_classes)
        for k, r in enumerate(results[:-1], start=1):  # multi-step protocols: every class seen so far, after step k
            report["methods"][method][f"map50_all_step{k}"] = round(r.metrics.map50, 2)
        if len(results) > 1:  # the time table is the last step's; this is the whole chain's
            report["methods"][method]["train_seconds_all_steps"] = round(sum(r.stats.get("train_seconds", 0.0) for r in results), 1)
        if dist.is_main():
            _write(report, results_dir, tag)
            log.info(format_report_table(report))
    if dist.is_main():
        _write(report, results_dir, tag, plots=True, out_dir=out_dir)
        _prediction_grids(final_models, cfg, data, all_classes, out_dir)
    return report


def reuses_finetune(cfg: Config, method: str) -> bool:
    """Whether `method`'s trained detector is the finetune row's: a two-models row with the finetune's `incremental`
    settings and lr (a replay or other data variant trains on other images, so it trains its own)."""
    mcfg, base = method_config(cfg, method)
    ft_cfg = method_config(cfg, "finetune")[0]
    same_step = dataclasses.replace(mcfg.incremental, method="finetune") == ft_cfg.incremental
    return base == "two-models" and same_step and step_schedule(mcfg, True).lr == step_schedule(ft_cfg, True).lr


def reuse_finetune(finetune_dir: Path, two_models_dir: Path, steps: int) -> None:
    """Start a two-models row from the finetune row's finished steps: its trained detector is that very fine-tune
    (same teacher, data, seed and schedule), so only the joined model is evaluated again."""
    for k in range(1, steps + 1):
        src, dst = finetune_dir / f"step{k}" / "last.pth", two_models_dir / f"step{k}" / "last.pth"
        if src.is_file() and not dst.parent.exists() and dist.is_main():
            dst.parent.mkdir(parents=True)
            shutil.copyfile(src, dst)
            log.info(f"two-models step {k}: the finetune row's training reused ({src})")
    dist.barrier()


def report_header(cfg: Config, groups: list[list[str]], protocol: str, profile: str, command: str,
                  methods: Sequence[str] = ()) -> dict[str, Any]:
    """A benchmark report's fields before any result: what ran, where, when, and the recipe's settings (`methods` empty)."""
    flat = [c for g in groups for c in g]
    num_old = len(flat) - len(groups[-1])
    base, inc = step_schedule(cfg, with_teacher=False), step_schedule(cfg, with_teacher=True)
    stack_lr = step_schedule(method_config(cfg, "two-models")[0], with_teacher=True).lr
    stacked = any((METHODS[m].variant_of or m) == "two-models" for m in methods if m in METHODS)
    return {
        "dataset": cfg.data.dataset, "protocol": protocol, "profile": profile, "machine": machine_description(),
        "date": _dt.date.today().isoformat(), "command": command, "classes_old": flat[:num_old], "classes_new": flat[num_old:],
        "settings": {"image_size": cfg.data.test_size, "train_sizes": cfg.data.train_sizes, "backbone": cfg.model.backbone,
                     "head": f"{cfg.model.head_channels}ch x {cfg.model.head_convs} convs", "epochs": base.epochs,
                     "incremental_epochs": inc.epochs, "batch_size": cfg.train.batch_size,
                     "lr": base.lr, "incremental_lr": inc.lr, **({"two_models_lr": stack_lr} if stacked else {}),
                     "min_iters": cfg.train.min_iters,
                     "new_images": cfg.incremental.new_images, "seed": cfg.train.seed,
                     **({"val_fraction": cfg.data.val_fraction} if cfg.data.val_fraction else {})},
        "methods": {},
    }


def forgetting(teacher: dict[str, Any], entry: dict[str, Any]) -> float:
    """The teacher's mean AP50 on its own classes minus the model's on the same classes (2+2+2: group 0 only)."""
    own = list(teacher["ap50_per_class"])
    return round(statistics.fmean(teacher["ap50_per_class"][c] - entry["ap50_per_class"][c] for c in own), 2)


def mean_std_text(values: list[float], empty: str = "–") -> str:
    """'56.3' for one value, '56.3 ± 1.2' for several (sample std), `empty` for none: the reports' one format."""
    if len(values) < 2:
        return f"{values[0]:.1f}" if values else empty
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return round(statistics.fmean(values), 2), round(statistics.stdev(values), 2) if len(values) > 1 else 0.0


def aggregate_seeds(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several seeds' reports: every number is the mean over seeds, its sample std under `std`."""
    first = reports[0]
    seeds = [r["settings"]["seed"] for r in reports]
    out = {k: v for k, v in first.items() if k != "methods"}
    out["settings"] = {**first["settings"], "seed": seeds}
    out["seeds"] = seeds
    out["per_seed"] = {str(s): r["methods"] for s, r in zip(seeds, reports)}
    out["methods"] = {}
    for name in first["methods"]:
        runs = [r["methods"] for r in reports if name in r["methods"]]
        entry: dict[str, Any] = {"n_seeds": len(runs)}
        std: dict[str, Any] = {}
        for key, value in runs[0][name].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                entry[key], std[key] = _mean_std([m[name][key] for m in runs])
            elif key == "ap50_per_class":
                pairs = {c: _mean_std([m[name][key][c] for m in runs]) for c in value}
                entry[key], std[key] = {c: p[0] for c, p in pairs.items()}, {c: p[1] for c, p in pairs.items()}
            else:
                entry[key] = value
        if name != "teacher" and all("teacher" in m for m in runs):  # forgetting per seed, against that seed's teacher
            entry["forgetting"], std["forgetting"] = _mean_std([forgetting(m["teacher"], m[name]) for m in runs])
        entry["std"] = std
        out["methods"][name] = entry
    return out


REPORT_KEYS = ("dataset", "protocol", "profile", "classes_old", "classes_new", "settings", "methods")


def _seed_reports(path: Path) -> list[dict[str, Any]]:
    """The single-seed reports in one benchmark JSON (a multi-seed report is split back into its seeds)."""
    if not path.is_file():
        raise SdiddError(f"{path}: no such file")
    try:
        report = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SdiddError(f"{path}: not a JSON file ({e})") from None
    missing = [k for k in REPORT_KEYS if not isinstance(report, dict) or k not in report]
    if missing:
        raise SdiddError(f"{path}: not a benchmark report (no {', '.join(missing)})")
    if "per_seed" not in report:
        if not isinstance(report["settings"], dict) or not isinstance(report["settings"].get("seed"), int):
            raise SdiddError(f"{path}: not a benchmark report (no settings.seed)")
        return [report]
    per_seed = report["per_seed"]
    if not isinstance(per_seed, dict) or not all(str(s).isdigit() and isinstance(m, dict) for s, m in per_seed.items()):
        raise SdiddError(f"{path}: per_seed is not a table of seed -> rows")
    head = {k: v for k, v in report.items() if k not in ("methods", "per_seed", "seeds")}
    return [{**head, "settings": {**report["settings"], "seed": int(s)}, "methods": m} for s, m in per_seed.items()]


def merge_reports(paths: list[str | Path], command: str) -> dict[str, Any]:
    """One multi-seed report from benchmark JSONs of one protocol and recipe that ran apart (e.g. a seed per machine).

    Every file must hold the same dataset, protocol, profile, classes and settings (the seed aside) and seeds no other
    file holds; the table keeps the methods every seed ran, and `per_seed` keeps all of each seed's rows.
    """
    reports: list[dict[str, Any]] = []
    origin: dict[int, Path] = {}
    sources: list[dict[str, Any]] = []
    for path in map(Path, paths):
        runs = _seed_reports(path)
        for r in runs:
            ref = reports[0] if reports else r  # every seed is checked against the first one read
            ref_file = origin.get(ref["settings"]["seed"], path)
            for key in ("dataset", "protocol", "profile", "classes_old", "classes_new"):
                if r[key] != ref[key]:
                    raise SdiddError(f"{path}: {key} {r[key]!r} differs from {ref_file}'s {ref[key]!r}; "
                                     "only reports of one protocol and recipe merge")
            a, b = ({k: v for k, v in x["settings"].items() if k != "seed"} for x in (r, ref))
            if a != b:
                diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
                raise SdiddError(f"{path}: settings differ from {ref_file}'s in {', '.join(diff)}; "
                                 "only reports of one protocol and recipe merge")
            seed = r["settings"]["seed"]
            if seed in origin:
                raise SdiddError(f"{path}: seed {seed} is also in {origin[seed]}; give each seed once")
            origin[seed] = path
            reports.append(r)
        sources.append({"file": path.name, "seeds": [r["settings"]["seed"] for r in runs],
                        **{k: runs[0].get(k) for k in ("command", "date", "machine")}})
    if len(reports) < 2:
        raise SdiddError(f"{paths[0]}: merging needs at least two seeds; these files hold {len(reports)}")
    reports.sort(key=lambda r: r["settings"]["seed"])
    common = [m for m in reports[0]["methods"] if all(m in r["methods"] for r in reports)]
    dropped = sorted({m for r in reports for m in r["methods"]} - set(common))
    if dropped:
        log.warning(f"left out of the table (not run for every seed; kept in per_seed): {', '.join(dropped)}")
    try:
        merged = aggregate_seeds([{**r, "methods": {m: r["methods"][m] for m in common}} for r in reports])
    except (KeyError, TypeError) as e:  # rows written by different versions, or edited by hand
        raise SdiddError(f"{', '.join(map(str, paths))}: the reports' rows do not line up (one lacks or mistypes {e}); "
                         "merge reports written by one sdidd version") from None
    merged["per_seed"] = {str(r["settings"]["seed"]): r["methods"] for r in reports}  # every row, dropped ones too
    machines = sorted({str(r.get("machine")) for r in reports})
    merged.update(command=command, date=_dt.date.today().isoformat(), merged_from=sources,
                  machine=machines[0] if len(machines) == 1 else "several (see merged_from): " + "; ".join(machines))
    return merged


def write_merged(paths: list[str | Path], results_dir: str | Path, tag: str, command: str) -> dict[str, Any]:
    """`merge_reports`, then JSON + Markdown + per-class plot as `<results_dir>/<tag>.*`; refuses to overwrite a report."""
    results_dir = Path(results_dir)
    target = results_dir / f"{tag}.json"
    if target.exists():
        raise SdiddError(f"{target}: exists; give the merged report another --tag (nothing was written)")
    report = merge_reports(paths, command)
    _write(report, results_dir, tag, plots=True)
    log.info(format_report_table(report))
    return report


def _prediction_grids(models: dict[str, torch.nn.Module], cfg: Config, data: RunData, classes: list[str], out_dir: Path,
                      num_images: int = 8) -> None:
    """`<out_dir>/predictions_<method>.png`: the same test images (with GT dashed) for finetune, erd and sdidd.

    They go to the run folder, not to the results folder: they show dataset images, which stay out of the repository.
    """
    from .data.transforms import EvalTransform
    from .plots import plot_model_predictions
    chosen = {m: models[m] for m in ("finetune", "erd", "sdidd") if m in models}
    if not chosen:
        return
    test = channel_view(data.test, classes)  # images holding a box of some class
    test.transform = EvalTransform(cfg.data.test_size, cfg.data.max_size)
    for name, model in chosen.items():
        plot_model_predictions(model, test, classes, out_dir / f"predictions_{name}.png", num_images)


def _write(report: dict[str, Any], results_dir: Path, tag: str, plots: bool = False, out_dir: Optional[Path] = None) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json(results_dir / f"{tag}.json", report, indent=2)
    write_text_atomic(results_dir / f"{tag}.md", markdown_report(report, tag if plots else None, out_dir))
    if plots:
        from .plots import plot_per_class_ap, plot_training_curves
        methods = {m: v["ap50_per_class"] for m, v in report["methods"].items()}
        errors = {m: v["std"]["ap50_per_class"] for m, v in report["methods"].items() if "std" in v}
        seeds = f", mean ± std over seeds {', '.join(map(str, report['seeds']))}" if "seeds" in report else ""
        plot_per_class_ap(methods, report["classes_old"], report["classes_new"], results_dir / f"{tag}_per_class.png",
                          title=f"{report['dataset']} {report['protocol']} ({report['profile']}{seeds}): AP50 per class",
                          errors=errors or None)
        if (log_csv := _sdidd_log(out_dir)) is not None:
            plot_training_curves(log_csv, results_dir / f"{tag}_sdidd_losses.png")


def _sdidd_log(out_dir: Optional[Path]) -> Optional[Path]:
    """The sdidd row's step-1 training log in a run folder, if there is one (a merged report has none)."""
    path = out_dir / "sdidd" / "step1" / "log.csv" if out_dir is not None else None
    return path if path is not None and path.exists() else None


def _pm(v: dict[str, Any], key: str, per_class: Optional[str] = None) -> str:
    """'56.3' for one seed, '56.3 ± 1.2' for several (sample std over seeds)."""
    value = v[key][per_class] if per_class else v[key]
    std = v.get("std", {}).get(key)
    if std is None:
        return f"{value:.1f}"
    return f"{value:.1f} ± {(std[per_class] if per_class else std):.1f}"


def format_report_table(report: dict[str, Any]) -> str:
    """The paper-style table as plain text (mean ± std with several seeds)."""
    w = 16 if "seeds" in report else 8
    lines = [f"{'method':<18}{'old':>{w}}{'new':>{w}}{'all':>{w}}", "-" * (18 + 3 * w)]
    for m, v in report["methods"].items():
        if m == "teacher":
            lines.append(f"{m:<18}{_pm(v, 'map50_old'):>{w}}")
        else:
            lines.append(f"{m:<18}{_pm(v, 'map50_old'):>{w}}{_pm(v, 'map50_new'):>{w}}{_pm(v, 'map50_all'):>{w}}")
    return "\n".join(lines)


def _steps_table(m: dict[str, Any]) -> list[str]:
    """Markdown rows of a multi-step protocol (2+2+2): mAP50 over every class seen so far after each step."""
    steps = sorted({int(k[len("map50_all_step"):]) for v in m.values() for k in v if k.startswith("map50_all_step")})
    if not steps:
        return []
    head = ["step 0 (teacher)", *(f"step {k}" for k in steps), f"step {steps[-1] + 1} (final, all)"]
    out = ["", "## After each step: mAP50 over every class seen so far", "", "| method | " + " | ".join(head) + " |",
           "|---" * (len(head) + 1) + "|"]
    if "teacher" in m:
        out.append(f"| teacher | {_pm(m['teacher'], 'map50_old')} |" + " |" * (len(head) - 1))
    for name, v in m.items():
        if name != "teacher":
            cells = [_pm(v, f"map50_all_step{k}") if f"map50_all_step{k}" in v else "" for k in steps]
            out.append(f"| {name} | | " + " | ".join(cells) + f" | {_pm(v, 'map50_all')} |")
    return out


def _paired_comparison(report: dict[str, Any]) -> list[str]:
    """Markdown rows: each method's all-class mAP50 minus SD-IDD's, and over joint's, taken per seed (same teacher).

    Seeds share a teacher between methods, so the per-seed difference is the fairer test of "beats SD-IDD" than
    two means with their separate spreads; both are shown, and each seed's value after them.
    """
    runs = list(report["per_seed"].values()) if "per_seed" in report else [report["methods"]]
    refs = [r for r in ("sdidd", "joint") if all(r in m for m in runs)]
    if not refs:
        return []
    head = ["method"] + [f"all − {r}'s all" if r == "sdidd" else "all / joint's all" for r in refs]
    out = ["", "## Against SD-IDD and joint training" + (" (taken per seed: mean ± std, then each seed in brackets)" if "per_seed" in report else ""), "",
           "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name in report["methods"]:
        if name in ("teacher", "joint") or not all(name in m for m in runs):
            continue
        cells = []
        for r in refs:
            if r == name or (r == "joint" and any(m[r]["map50_all"] <= 0 for m in runs)):  # no ratio to a joint at 0
                cells.append("–")
                continue
            vals = [m[name]["map50_all"] - m[r]["map50_all"] if r == "sdidd" else m[name]["map50_all"] / m[r]["map50_all"]
                    for m in runs]
            digits = 1 if r == "sdidd" else 3
            spec = f"+.{digits}f" if r == "sdidd" else f".{digits}f"
            cell = format(statistics.fmean(vals), spec)
            if len(vals) > 1:  # each seed's own value too: one collapsed seed of a reference shows as an outlier, not a mean
                cell += f" ± {statistics.stdev(vals):.{digits}f} ({', '.join(format(v, spec) for v in vals)})"
            cells.append(cell)
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def markdown_report(report: dict[str, Any], tag: Optional[str] = None, out_dir: Optional[Path] = None) -> str:
    """Markdown: main table, ablations, per-class AP50, forgetting, time, command/machine/date."""
    m = report["methods"]
    old, new = report["classes_old"], report["classes_new"]
    teacher = m.get("teacher")
    out = [f"# {report['dataset']} {report['protocol']} — profile `{report['profile']}`", "",
           f"- Command: `{report['command']}`", f"- Machine: {report['machine']}", f"- Date: {report['date']}",
           f"- Settings: {json.dumps(report.get('settings', {}))} (the recipe's epochs; a step whose recipe comes to "
           "fewer than min_iters iterations trains exactly min_iters: the Time table gives each row's epochs and iterations)",
           "- Metric: COCO AP@0.5 (pycocotools) per class on the test split, last epoch (no model selection)."]
    val = report.get("settings", {}).get("val_fraction")
    if val:  # a hyper-parameter study: nothing here was measured on the test split
        out[-1] = (f"- Metric: COCO AP@0.5 (pycocotools) per class on a **validation split**: {val:.0%} of the training "
                   "images held out (`data.val_fraction`), not the test split; last epoch.")
    if "seeds" in report:
        out.append(f"- Seeds {', '.join(map(str, report['seeds']))}: every number is the mean ± sample standard deviation over "
                   "the seeds; each seed trains its own teacher; `per_seed` in the JSON holds each seed's numbers.")
    for src in report.get("merged_from", []):  # a merged report: where each seed ran
        out.append(f"- Merged: `{src['file']}` (seeds {', '.join(map(str, src['seeds']))}; {src.get('date')}; "
                   f"{src.get('machine')}): `{src.get('command')}`")
    n_new = report.get("settings", {}).get("new_images")
    if n_new:
        out.append(f"- Small-data protocol: each incremental step (and joint's new classes) trains on {n_new} seeded images "
                   "holding a new-class box; the old classes keep all their images for the teacher and joint.")
    out += ["", "## mAP50 (%)", "", "| method | old | new | all | mAP (.5:.95) all | forgetting (teacher − model on the teacher's classes) |",
            "|---|---|---|---|---|---|"]
    for name, v in m.items():
        if name == "teacher" or name.startswith("sdidd-no"):
            continue
        if "forgetting" in v:
            forget = _pm(v, "forgetting")
        else:
            forget = f"{forgetting(teacher, v):.1f}" if teacher else ""
        out.append(f"| {name} | {_pm(v, 'map50_old')} | {_pm(v, 'map50_new')} | {_pm(v, 'map50_all')} | {_pm(v, 'map_all')} | {forget} |")
    if teacher:
        out.append(f"| teacher (base step) | {_pm(teacher, 'map50_old')} | | | | |")
    abl = [n for n in m if n.startswith("sdidd-no")]
    if abl:
        out += ["", "## Ablations (one SD-IDD strategy removed)", "", "| variant | old | new | all |", "|---|---|---|---|"]
        for n in (["sdidd"] if "sdidd" in m else []) + abl:
            v = m[n]
            out.append(f"| {n} | {_pm(v, 'map50_old')} | {_pm(v, 'map50_new')} | {_pm(v, 'map50_all')} |")
    out += _steps_table(m)
    out += _paired_comparison(report)
    names = [n for n in m if n != "teacher"]
    out += ["", "## AP50 per class (%)", "", "| method | " + " | ".join(old + new) + " |", "|---" * (len(old + new) + 1) + "|"]
    if teacher:
        out.append("| teacher | " + " | ".join(_pm(teacher, "ap50_per_class", c) if c in teacher["ap50_per_class"] else ""
                                             for c in old + new) + " |")
    for n in names:
        out.append(f"| {n} | " + " | ".join(_pm(m[n], "ap50_per_class", c) for c in old + new) + " |")
    out += ["", "## Time" + (" (means over seeds)" if "seeds" in report else ""), "",
            "| method | training images | epochs | iterations | train s | images/s | peak memory MB |", "|---|---|---|---|---|---|---|"]
    def cell(v: dict, key: str, fmt: str) -> str:
        return format(v[key], fmt) if v.get(key) else "–"  # e.g. a step resumed from a checkpoint has no speed
    for n, v in m.items():
        out.append(f"| {n} | {cell(v, 'images', '.0f')} | {cell(v, 'epochs', 'g')} | {cell(v, 'iterations', '.0f')} "
                   f"| {cell(v, 'train_seconds', '.0f')} | {cell(v, 'images_per_second', '.2f')} | {cell(v, 'peak_memory_mb', '.0f')} |")
    if "finetune" in m and "sdidd" in m and m["finetune"].get("images_per_second") and m["sdidd"].get("images_per_second"):
        ratio = m["finetune"]["images_per_second"] / m["sdidd"]["images_per_second"]
        out += ["", f"Distillation overhead (SD-IDD time per image / fine-tune time per image): **{ratio:.2f}** (goal ≤ 1.25). "
                "Whole-run wall clock: data loading, evaluation and other jobs on the machine blur it; "
                "`benchmarks/train_speed.py` times the train step alone."]
    chained = [n for n, v in m.items() if v.get("train_seconds_all_steps")]
    if chained:
        out += ["", "The rows above are the last step's; train s of all incremental steps together: "
                + ", ".join(f"{n} {m[n]['train_seconds_all_steps']:.0f} s" for n in chained) + "."]
    dual = [n for n, v in m.items() if v.get("new_teacher_seconds")]
    if dual:  # the second teacher's own training run is not in the method's train s
        out += ["", "A new-class teacher's own training (the fine-tune of the step, shared with `finetune` when both run): "
                + ", ".join(f"{n} {m[n]['new_teacher_seconds']:.0f} s" for n in dual)
                + "; its forward pass per iteration is in the method's train s."]
    stacks = [n for n in m if METHODS.get(n) and (METHODS[n].variant_of or n) == "two-models"]
    if stacks:  # its training is a fine-tune's; the price is paid at inference
        out += ["", f"{', '.join(stacks)}: the trained detector is a fine-tune of the step at `incremental.two_models_lr` "
                "(default: the base lr; the `finetune` row's own run is reused when both run at one lr, and its train s "
                "are then that run's); inference runs one detector per step, the old model and the new one (twice a "
                "single model's forward time after one step)."]
    if tag:
        out += ["", f"![AP50 per class]({tag}_per_class.png)"]
        if "sdidd" in m and _sdidd_log(out_dir) is not None:  # the curves _write draws from the sdidd run's log
            out += ["", f"Training curves of SD-IDD's incremental step: `{tag}_sdidd_losses.png`."]
        if out_dir is not None:
            split = "validation" if val else "test"
            out += ["", f"Predictions on {split} images (score ≥ 0.3, ground truth dashed) are written to the run folder, "
                        f"`{out_dir}/predictions_<method>.png`, and not committed: they show dataset images."]
    return "\n".join(out) + "\n"
