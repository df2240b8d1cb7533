"""Command line: `sdidd train|incremental|eval|demo|benchmark|check-data|predict|export`."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import typing
from pathlib import Path
from typing import Callable, Optional

from .errors import SdiddError, is_out_of_memory, shown
from .methods import ADD_CLASSES_METHODS, METHODS, VARIANT_GROUPS

if typing.TYPE_CHECKING:
    from .config import Config, DataConfig


DEFAULT_RECIPE = "defects"  # what `sdidd train data=FILE` trains with when no recipe is named


def _run_config(a: argparse.Namespace) -> "Config":
    """Load CONFIG + overrides and join torchrun's process group when launched by it."""
    from .config import load_config
    from .device import select_device
    if "=" in a.config:  # `sdidd train data=FILE ...`: no recipe named, the packaged one for one's own defects
        a.overrides, a.config = [a.config, *a.overrides], DEFAULT_RECIPE
    cfg = load_config(a.config, a.overrides)
    select_device(cfg.train.device)  # an unavailable device is said now, not after the data has loaded
    return _join_torchrun(cfg)


def _cmd_train(a: argparse.Namespace) -> int:
    from .engine.protocol import run_train
    if a.device:
        a.overrides = [*a.overrides, f"train.device={a.device}"]
    run_train(_run_config(a))
    return 0


def _cmd_incremental(a: argparse.Namespace) -> int:
    from .engine.protocol import run_incremental
    run_incremental(_run_config(a))
    return 0


def _checkpoint_config(state: dict, overrides: list[str], command: str) -> "Config":
    """The checkpoint's config with `key=value` overrides of the data and train sections (`data=FILE`: a dataset description)."""
    from .config import resolve
    return resolve(dict(state.get("config") or {}), overrides, sections=("data", "train"), command=command)


def _join_torchrun(cfg: "Config") -> "Config":
    """Join torchrun's process group when launched by it; returns the config of this rank (its own device)."""
    from .config import replaced
    from .engine import distributed as dist
    dist.init_from_env(cfg.train.device)
    device = dist.device_for_rank(cfg.train.device)
    return cfg if device == cfg.train.device else replaced(cfg, {"train.device": device})


def _eval_data(cfg: "Config", dataset: Optional[str], root: Optional[str], overrides: list[str]) -> "Config":
    """The checkpoint's config with `--data` / `--root`; another dataset than the run's drops its held-out split."""
    from .config import replaced
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    other = bool(dataset or root or {"data", "data.dataset", "data.root"} & set(keys))
    if other and cfg.data.val_fraction and "data.val_fraction" not in keys:
        # The run's held-out images belong to its own dataset: another dataset is read by its own splits.
        cfg = replaced(cfg, {"data.val_fraction": 0.0})
    if dataset or root:
        cfg = replaced(cfg, {**({"data.dataset": dataset} if dataset else {}), **({"data.root": root} if root else {})})
    return cfg


def _cmd_eval(a: argparse.Namespace) -> int:
    from .device import select_device
    from .engine.build import StepSpec
    from .engine.checkpoint import load_checkpoint, model_from_checkpoint
    from .engine.precision import for_inference
    from .engine.run_data import channel_view, default_eval_split, load_eval_split
    from .engine.trainer import log_result
    from .engine.evaluation import evaluate_model
    from .predict import checkpoint_postprocess
    from .evaluate import coco_results, save_coco_results, save_result_json
    state = load_checkpoint(a.checkpoint)
    cfg = _checkpoint_config(state, a.overrides, "eval")
    cfg = _eval_data(cfg, a.data, a.root, a.overrides)
    split_name = a.split or default_eval_split(cfg.data)
    device = select_device(a.device if a.device != "auto" else cfg.train.device, "--device")
    model = for_inference(model_from_checkpoint(state, device, damp=a.new_score_damp, blend=a.old_score_blend), device)
    classes = list(state["classes"])
    split = load_eval_split(cfg.data, split_name)
    test = channel_view(split, classes, keep_empty=True)
    spec = StepSpec(classes, list(state.get("new_classes", classes)))
    groups = spec.groups
    detections: dict = {}
    post = checkpoint_postprocess(state, a.checkpoint, a.old_new)
    result = evaluate_model(model, test, cfg.data, device, groups=groups, workers=cfg.train.workers, detections_out=detections,
                            postprocess=post)
    log_result(result, f"{a.checkpoint}: {cfg.data.dataset} {split_name}")
    out = Path(a.out) if a.out else Path(a.checkpoint).with_name("eval.json")
    save_result_json(result, out)
    # Every detection as a COCO results list: the dataset's own image ids and category ids, for other tools.
    results = Path(a.results) if a.results else out.with_name(out.stem + "_detections.json")
    save_coco_results(coco_results(test.records, classes, detections, split.category_ids, cfg.data.root), results)
    from .data.transforms import EvalTransform
    from .plots import plot_model_predictions, plot_per_class_ap, plot_training_curves
    old = [classes[i] for i in groups.get("old", [])]
    new = [classes[i] for i in groups.get("new", groups["all"])]
    written = [plot_per_class_ap({Path(a.checkpoint).stem: {c: result.per_class[c]["ap50"] for c in classes}}, old, new,
                                 out.with_suffix(".png"), title=f"AP50 per class: {a.checkpoint}")]
    shown = channel_view(split, classes)  # images holding a box of some class
    if len(shown):
        shown.transform = EvalTransform(cfg.data.test_size, cfg.data.max_size)
        written.append(plot_model_predictions(model, shown, classes, out.with_name(out.stem + "_predictions.png")))
    log = Path(a.checkpoint).with_name("log.csv")  # the run's training log, when the checkpoint sits in its run folder
    if log.is_file():
        written.append(plot_training_curves(log, out.with_name(out.stem + "_losses.png")))
    print(f"wrote {out}, {results} (COCO results) and " + ", ".join(str(w) for w in written))
    return 0


def _cmd_add_classes(a: argparse.Namespace) -> int:
    from .config import DATASET_KEYS, resolve
    from .engine.add_classes import run_add_classes
    from .engine.checkpoint import load_checkpoint
    if a.replay_images is not None and a.replay is None:
        raise SdiddError("--replay-images needs --replay OLD.yaml: the description of the kept old images")
    state = load_checkpoint(a.teacher)
    base = _recipe_of(dict(state.get("config", {})), DATASET_KEYS)
    overrides = list(a.overrides)  # the options are overrides too: the config is built once, from all of them
    if a.out or not any(o.split("=", 1)[0].strip() == "train.out_dir" for o in overrides):
        overrides.append(f"train.out_dir={a.out or f'runs/add_classes/{Path(a.data).resolve().parent.name}_{a.method}'}")
    given = any(o.split("=", 1)[0].strip() == "incremental.replay_images" for o in overrides)
    if a.replay_images is not None or (a.replay is not None and not given):
        overrides.append(f"incremental.replay_images={20 if a.replay_images is None else a.replay_images}")
    cfg = resolve(base, overrides, description=a.data)
    cfg = _join_torchrun(cfg)

    def described(path: Optional[str]) -> Optional["DataConfig"]:
        return None if path is None else resolve({"data": base["data"]}, description=path).data
    run_add_classes(a.teacher, cfg, cfg.train.out_dir, a.method, test=described(a.test), old_test=described(a.old_test),
                    replay=described(a.replay))
    return 0


# What a teacher's run config passes on to the step that adds classes: its recipe (image sizes, model, schedule).
# How the teacher's own step was run does not carry over: its method and distillation settings, a small-data cut,
# a validation hold-out, its protocol and resume/overwrite choices all take their defaults unless given again.
_STEP_ONLY = {"data": ("val_fraction",), "train": ("resume", "overwrite", "out_dir"),
              "incremental": ("protocol", "groups", "method", "teacher", "start_step", "new_images", "old_labels",
                              "replay_images", "replay_repeat")}


def _recipe_of(config: dict, dataset_keys: tuple[str, ...]) -> dict:
    """The recipe part of a checkpoint's run config: dataset, distillation and step-specific keys removed."""
    recipe = {k: dict(v) for k, v in config.items() if isinstance(v, dict) and k != "distill"}
    recipe["data"] = {k: v for k, v in recipe.get("data", {}).items() if k not in dataset_keys}
    for section, keys in _STEP_ONLY.items():
        recipe[section] = {k: v for k, v in recipe.get(section, {}).items() if k not in keys}
    return recipe


def _cmd_demo(a: argparse.Namespace) -> int:
    from .demo import EXPORT_FORMATS, export_defects, run_demo
    if a.export:
        export_defects(a.export, formats=list(EXPORT_FORMATS) if a.format == "all" else [a.format])
        return 0
    run_demo(out_dir=a.out, quick=a.quick, threads=a.threads, seed=a.seed)
    return 0


def _cmd_benchmark(a: argparse.Namespace) -> int:
    from .benchmark import parse_methods, run_benchmark, write_merged
    if a.merge:  # one table from reports that ran apart; trains nothing
        if not a.tag:
            raise SdiddError("benchmark --merge: give --tag, the merged report's file name")
        if a.overrides or a.seeds or a.out or a.config:
            raise SdiddError("benchmark --merge trains nothing: drop --seeds, --out, --config and overrides")
        write_merged(a.merge, a.results_dir, a.tag, "sdidd " + " ".join(sys.argv[1:]))
        return 0
    from .config import load_config
    config = a.config or _profile_config(a.dataset, a.profile)
    overrides = list(a.overrides)
    if a.protocol:
        overrides.append(f"incremental.protocol={a.protocol}")
    if a.dataset not in ("neu-det", "deeppcb", "synthetic"):
        overrides += ["data.dataset=coco"]
    cfg = load_config(config, overrides)
    cfg = _join_torchrun(cfg)
    command = "sdidd " + " ".join(sys.argv[1:])
    small = f"_new{cfg.incremental.new_images}" if cfg.incremental.new_images else ""  # the small-data protocol's own runs
    run_benchmark(cfg, parse_methods(a.methods), a.out or f"runs/benchmark/{a.dataset}_{a.protocol}_{a.profile}{small}",
                  a.results_dir, a.profile, command=command, tag=a.tag, seeds=_seeds(a.seeds))
    return 0


def _seeds(text: Optional[str]) -> Optional[list[int]]:
    """'0,1,2' -> [0, 1, 2]; one line naming the option when malformed."""
    if text is None:
        return None
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SdiddError(f"--seeds {shown(text)}: expected integers separated by commas, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SdiddError(f"--seeds {shown(text)}: expected distinct integers separated by commas, e.g. 0,1,2")
    return seeds


def _profile_config(dataset: str, profile: str) -> str:
    name = {"neu-det": "neu_det", "deeppcb": "deeppcb", "synthetic": "synthetic"}.get(dataset)
    if name is None:
        raise SdiddError(f"benchmark --dataset {dataset}: give --config for a custom dataset")
    from .config import packaged_config
    return str(packaged_config(f"{name}_{profile}"))


def _cmd_check_data(a: argparse.Namespace) -> int:
    from .data.check import check_dataset
    report = check_dataset(a.dataset, root=a.root, split=a.split, images_dir=a.images_dir)
    print(report.format())
    if report.ok:
        return 0
    # One line on stderr as for every other failure, so scripts that only keep stderr still see why.
    kind = next(iter(report.errors))
    total = sum(report.errors.values())
    print(f"error: {report.dataset} at {report.root}: {total} error(s), first {kind}: {report.examples[kind][0]}", file=sys.stderr)
    return 1


_PREDICT_KEYS = {"data": {"test_size", "max_size"}, "train": {"batch_size", "device"}}


def _cmd_predict(a: argparse.Namespace) -> int:
    from .config import parse_overrides
    from .predict import run_predict
    # key=value items (that are no file) are overrides, as for train: data=FILE, data.test_size, data.max_size, train.*
    items = list(a.inputs) + list(getattr(a, "overrides", []))
    overrides = [i for i in items if "=" in i and not Path(i).exists()]
    inputs = [i for i in items if i not in overrides]
    files = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].strip() == "data"]
    extra = parse_overrides([o for o in overrides if o.split("=", 1)[0].strip() != "data"])
    described = files[-1] if files else None
    for section, keys in extra.items():
        bad = sorted(set(keys) - _PREDICT_KEYS.get(section, set())) if isinstance(keys, dict) else [""]
        if section not in _PREDICT_KEYS or bad:
            raise SdiddError(f"override '{section}{'.' + bad[0] if bad and bad[0] else ''}': predict takes data=FILE (a dataset "
                             "description: its test split), data.test_size, data.max_size, train.batch_size, train.device")
    data = extra.get("data", {})
    train = extra.get("train", {})
    for key, v in [(f"data.{k}", v) for k, v in data.items()] + [("train.batch_size", train.get("batch_size", 1))]:
        if isinstance(v, bool) or not isinstance(v, int):
            raise SdiddError(f"config key '{key}': expected an integer, got {shown(v)}")
    kw: dict = {}
    if described is not None:
        if inputs:
            raise SdiddError(f"predict data={described}: give either images / folders or a dataset description, not both")
        kw = _described_inputs(described)
        inputs = kw.pop("files")
    if not inputs:
        raise SdiddError("predict needs images or folders (or data=FILE, a dataset description)")
    skipped: list[dict[str, str]] = []
    run_predict(a.checkpoint, inputs, a.out, score_thr=a.score, batch_size=int(train.get("batch_size", a.batch_size)),
                device=str(train.get("device", a.device)), size=data.get("test_size", a.size), skipped=skipped,
                max_size_arg=data.get("max_size"), agnostic=a.agnostic, old_new=a.old_new,
                new_score_damp=a.new_score_damp, old_score_blend=a.old_score_blend, **kw)
    return 2 if skipped else 0  # the good images were written; a non-zero exit still tells scripts some were not


def _described_inputs(path: str) -> dict:
    """Files, image ids, file names (relative to the dataset folder) and category ids of a description's test split
    (else its val split, else train)."""
    from .data.description import load_description
    from .data.formats import described_splits, load_described_split
    from .data.records import Problems
    section = load_description(path)
    have = described_splits(section)
    ds = load_described_split(section, next(s for s in ("test", "val", "train") if s in have), Problems(strict=True))
    root = Path(section["root"])
    names = []
    for r in ds.records:
        try:
            names.append(Path(r.file).resolve().relative_to(root).as_posix())
        except ValueError:
            names.append(Path(r.file).name)
    return {"files": [r.file for r in ds.records], "image_ids": [r.image_id for r in ds.records], "file_names": names,
            "category_ids": dict(ds.category_ids)}


def _cmd_export(a: argparse.Namespace) -> int:
    from .export import export_onnx
    if a.format != "onnx":
        raise SdiddError(f"export format {shown(a.format)} is not supported (onnx)")
    out = export_onnx(a.checkpoint, a.out, size=a.size, damp=a.new_score_damp, blend=a.old_score_blend)
    print(f"wrote {out}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line `error: ...` (exit 2) instead of a usage block."""

    def error(self, message: str) -> typing.NoReturn:
        """Print one line naming the problem and where to read the usage, then exit 2."""
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def _add_damp_flag(s: argparse.ArgumentParser) -> None:
    """--new-score-damp and --old-score-blend of eval, predict and export: read a two-models checkpoint otherwise."""
    s.add_argument("--new-score-damp", type=float, default=None, metavar="G",
                   help="two-models checkpoints: new-class scores x (1 - the old model's best score)^G instead of the "
                        "checkpoint's G (incremental.new_score_damp; 0: no damping)")
    s.add_argument("--old-score-blend", type=float, default=None, metavar="B",
                   help="two-models checkpoints: old-class scores s^(1-B) x (the newest model's score)^B instead of the "
                        "checkpoint's B (incremental.old_score_blend, used by steps with replay; 0: no blending)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `sdidd` command."""
    p = _Parser(prog="sdidd", description="Class-incremental defect detection (SD-IDD, ERD) on GFLv1.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("train", help="train a detector on all (or data.classes) classes")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="key=value, e.g. train.epochs=2")
    s.add_argument("--device", help="auto, cpu, cuda or cuda:N (same as train.device=...)")
    s.set_defaults(fn=_cmd_train)

    s = sub.add_parser("incremental", help="run the class-incremental protocol (base step, then new classes)")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=_cmd_incremental)

    s = sub.add_parser("eval", help="evaluate a checkpoint on a test split")
    s.add_argument("checkpoint")
    s.add_argument("--data", help="dataset name (default: the checkpoint's)")
    s.add_argument("--root", help="dataset root folder")
    s.add_argument("--split", help="split (default: the checkpoint's test split; for a run with data.val_fraction, the "
                                   "images it held out, 'val')")
    s.add_argument("--device", default="auto")
    s.add_argument("--out", help="JSON path (default: eval.json beside the checkpoint)")
    s.add_argument("--results", help="COCO results JSON of the detections (default: <out>_detections.json)")
    s.add_argument("--old-new", action=argparse.BooleanOptionalAction, default=None,
                   help="NMS across old and added classes on or off (default: as the checkpoint's step was evaluated)")
    _add_damp_flag(s)
    s.add_argument("overrides", nargs="*", help="data=FILE (a dataset description) and data.* / train.* key=value, as for train")
    s.set_defaults(fn=_cmd_eval)

    s = sub.add_parser("add-classes", help="add the classes of a new dataset (new-class labels only) to a trained model")
    s.add_argument("teacher", help="checkpoint of the deployed model (last.pth)")
    s.add_argument("data", help="dataset description (.yaml) of the new-class images")
    s.add_argument("--method", default="sdidd+", choices=ADD_CLASSES_METHODS,
                   help="sdidd+ (default): SD-IDD with score-space HCCD and old-class pseudo-labels; sdidd: as in the paper")
    s.add_argument("--test", help="dataset description whose test split is labelled with every class")
    s.add_argument("--old-test", help="dataset description whose test split is labelled with the old classes")
    s.add_argument("--out", help="run folder (default: runs/add_classes/<data folder>_<method>)")
    s.add_argument("--replay", metavar="OLD.yaml", help="dataset description of kept old images (its train split, labelled "
                   "with old classes): a few of them train with the new images")
    s.add_argument("--replay-images", type=int, metavar="N", help="replayed images per old class (default 20 with --replay)")
    s.add_argument("overrides", nargs="*", help="key=value, e.g. incremental.epochs=24")
    s.set_defaults(fn=_cmd_add_classes)

    s = sub.add_parser("demo", help="the incremental story on the built-in synthetic data (CPU, offline)")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--quick", action="store_true", help="an even smaller run (for tests)")
    s.add_argument("--export", metavar="DIR", help="write the built-in defects as datasets (base/, new/, all_test/) and stop")
    s.add_argument("--format", default="coco", choices=["coco", "voc", "yolo", "all"],
                   help="--export's format (all: DIR/coco/, DIR/voc/, DIR/yolo/)")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--seed", type=int, default=0, help="train.seed of every step (the story is checked on seeds 0-2)")
    s.set_defaults(fn=_cmd_demo)

    s = sub.add_parser("benchmark", help="teacher + joint/finetune/erd/sdidd(+ablations) in one run, written to docs/results")
    s.add_argument("--dataset", default="neu-det")
    s.add_argument("--protocol", default="3+3")
    s.add_argument("--profile", default="quick", choices=["quick", "paper", "tiny"])
    s.add_argument("--methods", default="joint,finetune,erd,sdidd",
                   help=f"comma-separated, from: {', '.join(METHODS)}; or a group: {', '.join(VARIANT_GROUPS)}")
    s.add_argument("--config", help="config file (default: configs/<dataset>_<profile>.yaml)")
    s.add_argument("--out", help="run folder (default: runs/benchmark/<dataset>_<protocol>_<profile>)")
    s.add_argument("--results-dir", default="docs/results")
    s.add_argument("--seeds", help="run the protocol once per seed (e.g. 0,1,2) and report mean ± std (default: train.seed)")
    s.add_argument("--tag", help="report file name (default: <dataset>_<protocol>_<profile>[_new<N>])")
    s.add_argument("--merge", nargs="+", metavar="JSON", help="train nothing: merge these benchmark reports of one "
                   "protocol and recipe, run apart (e.g. a seed per machine), into one mean ± std report named --tag")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=_cmd_benchmark)

    s = sub.add_parser("check-data", help="validate a dataset before a long run")
    s.add_argument("dataset", help="a dataset description (.yaml: coco, voc or yolo) or a folder holding data.yaml; "
                   "neu-det, deeppcb, synthetic; a dataset folder (NEU-DET, DeepPCB, VOC) or a COCO .json")
    s.add_argument("--root")
    s.add_argument("--split", default="all", help="all, train, val or test")
    s.add_argument("--images-dir", help="COCO only: folder of the json's file names (default: images/ beside the json, else its folder)")
    s.set_defaults(fn=_cmd_check_data)

    s = sub.add_parser("predict", help="draw detections on images and write COCO-results JSON")
    s.add_argument("checkpoint")
    s.add_argument("inputs", nargs="*", help="images or folders; or data=FILE (a dataset description: its test split, "
                   "keeping its image ids and file names); data.test_size=, data.max_size=, train.batch_size=, train.device= overrides")
    s.add_argument("--out", default="predictions")
    s.add_argument("--score", type=float, default=0.3)
    s.add_argument("--agnostic", action="store_true", help="NMS across classes: one box per place, the best-scored "
                   "class's (ultralytics' agnostic_nms)")
    s.add_argument("--old-new", action=argparse.BooleanOptionalAction, default=None,
                   help="incremental checkpoints: drop a box of a class the step added where a higher-scored old-class box "
                   "overlaps it (the new classes never saw an old defect); default: as the step was evaluated "
                   "(incremental.old_new_nms)")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--size", type=int, default=None, help="short side (default: the checkpoint's test size)")
    _add_damp_flag(s)
    s.add_argument("--device", default="auto")
    s.set_defaults(fn=_cmd_predict, overrides=[])

    s = sub.add_parser("export", help="export a checkpoint (ONNX)")
    s.add_argument("checkpoint")
    s.add_argument("--format", default="onnx")
    s.add_argument("--out", default=None)
    _add_damp_flag(s)
    s.add_argument("--size", type=int, default=None, help="input side (square, default: the checkpoint's test size rounded to 32)")
    s.set_defaults(fn=_cmd_export)
    return p


class _StdoutHandler(logging.StreamHandler):
    """Library logs to the current sys.stdout (so pytest's capture and redirections see them), rank 0 only."""

    def emit(self, record: logging.LogRecord) -> None:
        from .engine import distributed as dist
        if dist.is_main():
            self.stream = sys.stdout
            super().emit(record)


def setup_logging() -> None:
    """The CLI decides what prints: sdidd's INFO and above, as plain lines on stdout."""
    logger = logging.getLogger("sdidd")
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: user errors print one line and exit 2."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow options (`add-classes T D --out X train.epochs=2`).
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging()
    restore = _terminate_as_interrupt()
    try:
        return int(args.fn(args) or 0)
    except SdiddError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable out_dir, full disk, a file where a folder should be: fixable by the user
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # the allocator, not a bug: say what to lower; anything else is a bug
        if not is_out_of_memory(e):
            raise
        print("error: out of memory; lower data.train_sizes / data.max_size, train.batch_size or predict's --size and "
              "--batch-size (the last checkpoint, if any, is intact)", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        what, code = ("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        print(f"{what}; a training run continues from its last epoch with train.resume=true", file=sys.stderr)
        return code
    finally:
        restore()


class Terminated(Exception):
    """SIGTERM (a job scheduler, `docker stop`, systemd) arrived: handled as Ctrl-C is."""


def _terminate_as_interrupt() -> Callable[[], None]:
    """Turn SIGTERM into a Terminated exception in the main thread; returns what puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
