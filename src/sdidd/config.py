"""Run configuration: plain dataclasses, loaded from YAML plus `key=value` overrides, validated."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import yaml

from .errors import SdiddError, shown
from .methods import ENGINE_METHODS
from .yaml_file import load_yaml, parse_yaml


@dataclass(frozen=True)
class DataConfig:
    """Which images and how they are resized."""

    dataset: str = "synthetic"  # synthetic | neu-det | deeppcb | coco | voc | yolo
    root: Optional[str] = None  # dataset folder; default: $SDIDD_DATA/<NEU-DET|DeepPCB>
    train_split: str = "train"
    test_split: str = "test"
    classes: Optional[list[str]] = None  # restrict a plain training run to these classes
    # Short sides; several = multi-scale. Both unset ([] and 0): from the data (data/image_size.py), else the unset one is 160.
    train_sizes: list[int] = field(default_factory=list)
    test_size: int = 0
    max_size: int = 267  # long-side cap (and the cap of a size from the data)
    flip: float = 0.5
    num_train_images: Optional[int] = None  # synthetic only
    num_test_images: Optional[int] = None  # synthetic only
    seed: int = 0  # synthetic only
    images_dir: Optional[str] = None  # coco only: image folder (of the test split too, unless test_images_dir)
    test_images_dir: Optional[str] = None  # coco only: image folder of the test split
    train_ann: Optional[str] = None  # coco only
    test_ann: Optional[str] = None  # coco only (None: no test split)
    val_ann: Optional[str] = None  # coco only: a validation split (per-epoch evaluation and best.pth; None: none)
    val_images_dir: Optional[str] = None  # coco only: image folder of the val split (default: images_dir)
    names: Optional[list[str]] = None  # the class names the annotations must hold, in order (from a description file)
    # voc / yolo: the train split (VOC list file or folder; YOLO image folder, .txt list of images, or a list of folders)
    train_path: Optional[Union[str, list[str]]] = None
    test_path: Optional[Union[str, list[str]]] = None  # voc / yolo: the test split (None: no test split)
    val_path: Optional[Union[str, list[str]]] = None  # voc / yolo: a validation split (evaluated during training; None: none)
    on_bad_data: str = "error"  # error | skip: what training does when check-data finds problems
    check: bool = True  # decode and check every image before training
    cache_gb: float = 2.0  # keep a split's decoded pixels in memory when they fit in this many GiB (0: never)
    # > 0: hold out this fraction of the training images (a fixed seeded draw, the same for every run) as a validation
    # split; training uses the rest and every evaluation reads the held-out images instead of the test split. This is
    # how hyper-parameters are chosen without touching the test split (engine/run_data.py).
    val_fraction: float = 0.0
    # Resize and flip whole training batches on the training device (engine/gpu_batches.py) instead of per image
    # in the loader: one short size per batch (drawn from train_sizes), a flip per image. False: as before.
    device_transforms: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """Detector architecture."""

    backbone: str = "tf_efficientnet_lite0"
    pretrained: Union[bool, str] = True
    fpn_channels: int = 128
    head_channels: int = 128
    head_convs: int = 2
    frozen_stages: int = 1
    norm_eval: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule and run settings."""

    epochs: int = 12
    batch_size: int = 8
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    warmup_ratio: float = 0.001
    milestones: list[int] = field(default_factory=lambda: [8, 11])
    gamma: float = 0.1
    # A step runs at least this many iterations: small datasets get more epochs, decay epochs scale alike (engine/schedule.py)
    min_iters: int = 500
    grad_clip: Optional[float] = None
    workers: Optional[int] = None  # loader processes; None: 0 when the pixels are in memory, else half the cores (max 4)
    # bf16 autocast of the networks' forward on CUDA and on CPUs with native bf16 (losses and metrics stay fp32), and
    # NHWC images and conv weights. None: the fastest measured on the device (engine/precision.py: train_mode):
    # CUDA bf16 NCHW; CPU fp32 channels_last (faster there than bf16, docs/results/train_modes_cpu_neu-det.md).
    amp: Optional[bool] = None
    channels_last: Optional[bool] = None
    compile: bool = False  # torch.compile the student's forward (pays off only if its compile time does)
    # Memory for the frozen teachers' outputs per (image, flip), reused across epochs when the input size is fixed (0: off)
    teacher_cache_gb: float = 2.0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    deterministic: bool = False
    threads: Optional[int] = None  # torch CPU threads
    log_every: int = 10
    # Evaluate every N epochs (0: only after the last epoch). None: with a val split, about ten times per run (and a
    # best.pth chosen there); without one, only after the last epoch.
    eval_every: Optional[int] = None
    out_dir: str = "runs/default"
    keep_checkpoints: int = 1  # epoch_<n>.pth files kept beside last.pth (the newest ones; 0: only last.pth)
    save_every: int = 1  # write last.pth after every N-th epoch and the last one (short epochs: a save costs more than the epoch)
    resume: bool = False
    overwrite: bool = False  # a new run in a folder that holds one: clear the old run's files first (else refused)
    progress: bool = True


@dataclass(frozen=True)
class LossConfig:
    """Detection loss weights (GFL)."""

    qfl: Optional[float] = None  # None: 1.0, or 2.0 for the sdidd method (as released)
    giou: float = 2.0
    dfl: float = 0.25


@dataclass(frozen=True)
class DistillConfig:
    """Distillation switches and weights. A switch left at None takes the method's default."""

    hccd: Optional[bool] = None  # (1) high-confidence classification distillation (= ERD cls)
    hccd_weight: float = 1.0
    hccd_form: Optional[str] = None  # l2: raw-logit L2 (paper, release; erd, sdidd) | bce: cross-entropy on scores (sdidd+)
    # HCCD anchors also need this absolute teacher score; None: the method's default (sdidd 0.1, erd 0.0 = mu+2sigma only)
    hccd_min_score: Optional[float] = None
    erd_box: Optional[bool] = None  # ERD's box elastic response selection
    erd_box_weight: float = 0.25
    erd_box_stride_fix: bool = True  # False: as released (teacher boxes decoded without the stride)
    erd_box_nms_iou: float = 0.005
    dscrd: Optional[bool] = None  # (2) dual-stage cascade regression distillation (ATSS positives + VLR)
    ld_weight: float = 0.25
    vlr_weight: float = 0.25
    # True: DSCRD's KL at an anchor is also weighted by the IoU of the old teacher's box there with the GT box the anchor
    # is distilled toward: the teacher's boxes of defects it never learnt are copied only as far as they fit them.
    dscrd_teacher_iou: bool = False
    idfd: Optional[bool] = None  # (3) IoU-driven difficulty-aware feature distillation
    idfd_weight: float = 2.0
    idfd_ratio: float = 0.5
    idfd_zero_levels_without_positives: bool = False  # True: as released
    idfd_normalize: bool = True  # MSE relative to the teacher's feature energy; False: plain MSE (as released)
    # sdidd+ (engine/pseudo_labels.py): the teacher's confident old-class detections on the new images become targets
    pseudo_labels: Optional[bool] = None
    pseudo_sigmas: float = 2.0  # per-class threshold: mean + this many std of the teacher's detection scores of the class
    pseudo_overlap_iou: float = 0.5  # a detection overlapping a new-class GT box this much is dropped
    # With pseudo-labels the old channels get QFL supervision, 0 wherever no pseudo-label lies. True: not at the anchors
    # HCCD distils (the teacher is confident there: an old defect that got no pseudo-label), so the two never disagree.
    pseudo_ignore_confident: Optional[bool] = None
    # True: HCCD (and the pseudo-label QFL's skip of HCCD's anchors) leaves out anchors inside a new-class box: the
    # teacher, which never saw the new defects, often calls them old ones there, and the label says they are not.
    hccd_outside_new: Optional[bool] = None
    # New-class teacher (distill/new_teacher.py): a model that knows the step's new classes distils their scores and
    # their boxes at the new positives. A checkpoint path, or "finetune": fine-tune the teacher on the step's data first.
    new_teacher: Optional[str] = None
    new_teacher_weight: float = 1.0  # weight of its classification term (its box term uses ld_weight)
    kd_mismatch: bool = False  # True: the released loss_kd (new-class student vs old-class teacher logits)
    kd_weight: float = 0.25
    # Terms of distill/terms.py without a switch of their own above (a term you add), by name with their weight:
    # e.g. distill.terms={global_feature: 0.5}. The term runs when named here; a method turns it on in METHODS.
    terms: dict[str, float] = field(default_factory=dict)
    temperature: float = 10.0
    # The released code sums ERD-cls/box and LD terms over the images of its batch of 2, so their weight
    # against the (batch-normalised) detection loss grew with the batch size. They are scaled by
    # release_batch / batch so a batch of 16 weighs them as the release's batch of 2 did (0: plain sum).
    release_batch: int = 2


@dataclass(frozen=True)
class IncrementalConfig:
    """Class-incremental protocol: ordered class groups and the method of the incremental steps."""

    protocol: Optional[str] = None  # e.g. "3+3", "2+2+2" (first classes of the dataset order first)
    groups: Optional[list[list[str]]] = None  # explicit class groups (overrides protocol)
    method: str = "sdidd"  # finetune | erd | sdidd | sdidd+ | two-models | joint
    teacher: Optional[str] = None  # checkpoint of the previous step; None: train the base step first
    start_step: Optional[int] = None  # with teacher: the step to run (default: the step after the teacher's)
    new_class_init: str = "prior"  # prior (GFL bias init) | default (PyTorch default, as released)
    epochs: Optional[int] = None  # epochs of incremental steps (None: train.epochs)
    lr: Optional[float] = None  # lr of incremental steps (None: train.lr)
    # lr of a two-models step's fine-tune (None: train.lr). Its old model stays frozen beside it, so it has nothing to
    # forget (NEU-DET 2+2+2 validation split, one seed: all classes 57.3 at 0.01 against 54.6 at incremental.lr 0.003).
    two_models_lr: Optional[float] = None
    milestones: Optional[list[int]] = None  # lr x gamma at these epochs of incremental steps (None: train.milestones)
    # Small-data protocol: each step after the base trains on this many (seeded) images holding a box of its new classes
    new_images: Optional[int] = None
    # The new images keep the labels of the old classes they show (a line that labels every defect it sees): those
    # are trained as ground truth too. False: the paper's protocol, the new images carry new-class labels only.
    old_labels: bool = False
    # Replay: this many kept old images per old class (seeded, engine/replay.py) join each incremental step with their
    # old-class labels. 0: data-free (the default). Drawn from the run's training split, or `sdidd add-classes --replay`.
    replay_images: int = 0
    # Each replayed image appears this many times per epoch of the step (oversampling: a few kept images beside
    # hundreds of new ones; the step's epochs stay, so its iterations grow with the copies). 1: once. Four times was
    # level with once on NEU-DET 2+2+2's validation split (docs/results/replay_oversample_val.md).
    replay_repeat: int = 1
    # Evaluation and prediction of a step's model: a box of a class the step added is dropped where a higher-scored box
    # of an old class overlaps it (IoU > 0.6). The added classes never saw an old defect labelled "not new" and fire
    # on old defects; the distilled old channels score those higher. False: per-class NMS, the paper's protocol.
    old_new_nms: bool = False
    # Method two-models: a later model's class scores x (1 - the earlier models' best score there)^this, so the new
    # classes, trained on new labels only, stay quiet on old defects (chosen on NEU-DET's validation split: 1 or 2).
    new_score_damp: float = 1.0
    # Method two-models with replay: an earlier model's class score s becomes s^(1-b) * q^b, q the step's fine-tune's
    # score for that class: it saw the old classes replayed beside the new defects, so it outvotes an old model firing
    # on a new defect (model/stack.py). Only for a step that replayed old images; chosen on NEU-DET 2+2+2's validation
    # split (docs/results/two_models_replay_blend.md). 0: the earlier models' scores as they are.
    old_score_blend: float = 0.3


@dataclass(frozen=True)
class Config:
    """A whole run."""

    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    incremental: IncrementalConfig = field(default_factory=IncrementalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON/checkpoint friendly)."""
        return asdict(self)


# ---------------------------------------------------------------- loading and validation

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except SdiddError as e:
                errors.append(str(e))
        raise SdiddError(f"config key '{key}': expected {' or '.join(_type_name(a) for a in args)}, got {shown(value)}")
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise SdiddError(f"config key '{key}': expected a mapping, got {shown(value)}")
        return {_coerce(k, key_tp, key): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and typing.get_origin(inner) is None:
            value = [value]  # `data.train_sizes=320` means [320]
        if not isinstance(value, list):
            raise SdiddError(f"config key '{key}': expected a list, got {shown(value)}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-3 and 1e6 as strings: they mean numbers here
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SdiddError(f"config key '{key}': expected a number, got {shown(value)}")
        if not math.isfinite(value):  # YAML reads .inf/.nan as floats; no setting means them
            raise SdiddError(f"config key '{key}': expected a finite number, got {shown(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SdiddError(f"config key '{key}': expected an integer, got {shown(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise SdiddError(f"config key '{key}': expected true or false, got {shown(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise SdiddError(f"config key '{key}': expected a string, got {shown(value)}")
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise SdiddError(f"config section '{prefix.rstrip('.') or 'top level'}': expected a mapping, got {shown(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for k in data:
        if k not in known:
            hint = _elsewhere(k) if not prefix else ""
            raise SdiddError(f"unknown config key '{prefix}{k}'{hint} (valid: {', '.join(sorted(known))})")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name] or {}, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, prefix + f.name)
    return cls(**kwargs)


# ultralytics' names of settings that sdidd spells differently (a top-level `imgsz=640` gets a hint, not a guess).
_ULTRALYTICS = {"imgsz": "data.train_sizes and data.test_size", "batch": "train.batch_size", "lr0": "train.lr",
                "workers": "train.workers", "project": "train.out_dir"}


def _elsewhere(key: str) -> str:
    """', did you mean 'train.resume'?' when a top-level key is a field of a section (a forgotten prefix)."""
    if key in _ULTRALYTICS:
        return f", ultralytics' {key}: in sdidd {_ULTRALYTICS[key]}"
    sections = {f.name: typing.get_type_hints(Config)[f.name] for f in fields(Config)}
    hits = [f"{name}.{key}" for name, cls in sections.items() if dataclasses.is_dataclass(cls) and key in {g.name for g in fields(cls)}]
    return ", did you mean " + " or ".join(f"'{h}'" for h in hits) + "?" if hits else ""


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise SdiddError(f"override '{key}': '{p}' is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`a.b=1 c=[x, y]` -> nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SdiddError(f"override '{item}': expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw) if raw != "" else None
        except yaml.YAMLError:  # not YAML (or an alias): the text as it is
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def merge_dicts(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Nested dict `base` updated by `extra` (sub-dicts merged key by key)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def replaced(cfg: Config, changes: Mapping[str, Any]) -> Config:
    """A new, validated Config: `cfg` with dotted keys changed (`{"train.seed": 1}`); `cfg` itself never changes."""
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if name:
            sections.setdefault(section, {})[name] = value
        else:
            top[key] = value
    new = dataclasses.replace(cfg, **top, **{s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in sections.items()})
    validate(new)
    return new


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict."""
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # the recipes shipped inside the package


def packaged_config(name: str) -> Path:
    """Path of a recipe shipped with sdidd (`neu_det_quick`, `synthetic_quick`, ...); SdiddError naming the known ones."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise SdiddError(f"no packaged config {shown(name)} (known: {known}); pass a config file instead")
    return path


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or defaults when path is None), apply overrides, validate."""
    return resolve(read_recipe(path) if path is not None else {}, overrides)


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The mapping of a recipe: a YAML file, or a recipe shipped with sdidd by name (`neu_det_quick`)."""
    p = Path(path)
    if not p.is_file() and p.suffix == "" and p.name == str(path):  # a recipe shipped with sdidd, by name
        p = packaged_config(str(path))
    if not p.is_file():
        known = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
        raise SdiddError(f"{p}: config file not found (packaged recipes: {known})")
    data = load_yaml(p) or {}
    if not isinstance(data, dict):
        raise SdiddError(f"{p}: expected a mapping of config sections at the top level")
    return data


def resolve(recipe: dict[str, Any], overrides: list[str] | None = None, description: str | Path | None = None,
            sections: tuple[str, ...] | None = None, command: str = "") -> Config:
    """The one way every command builds its Config: a recipe mapping (a file's, or a checkpoint's), then a dataset
    description (`description`, or `data=FILE` among the overrides) replacing its dataset keys, then `key=value`
    overrides; validated. `sections` limits the overrides to those sections (a checkpoint's model is fixed)."""
    items = list(overrides or [])
    files = [i for i in items if i.split("=", 1)[0].strip() == "data"]  # data=FILE, kept apart from data.<key>=...
    extra = parse_overrides([i for i in items if i not in files])
    if sections is not None:
        other = sorted(set(extra) - set(sections))
        if other:
            raise SdiddError(f"override '{other[0]}...': {command} uses the checkpoint's model; only "
                             f"{' and '.join(f'{x}.*' for x in sections)} keys (and data=FILE, a dataset description) apply")
    if "data" in extra and not isinstance(extra["data"], dict):
        raise SdiddError(f"override 'data': give data=FILE once (a dataset description), got also {shown(extra['data'])}")
    path = files[-1].split("=", 1)[1] if files else description
    data = dict(recipe)
    if path is not None:  # a dataset description replaces the recipe's dataset keys; data.<key>=... still apply after it
        from .data.description import load_description
        kept = {k: v for k, v in (data.get("data") or {}).items() if k not in DATASET_KEYS}
        data = {**data, "data": {**kept, **load_description(path)}}
    return config_from_dict(merge_dicts(data, extra))


# The keys that say which dataset a run reads (as opposed to how its images are sized and checked).
DATASET_KEYS = ("dataset", "root", "train_split", "test_split", "classes", "num_train_images", "num_test_images",
                 "images_dir", "test_images_dir", "train_ann", "test_ann", "names", "train_path", "test_path",
                 "val_ann", "val_images_dir", "val_path")


MAX_SIDE = 8192  # pixels: a larger network input does not fit a training machine's memory (and no defect needs it)


def validate(cfg: Config) -> None:
    """Reject impossible values with one line naming the key."""
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise SdiddError(f"config key '{key}': {msg}")

    d, m, t, inc = cfg.data, cfg.model, cfg.train, cfg.incremental
    need(d.dataset in ("synthetic", "neu-det", "deeppcb", "coco", "voc", "yolo"), "data.dataset",
         f"unknown dataset {shown(d.dataset)} (synthetic, neu-det, deeppcb, coco, voc, yolo)")
    need(all(32 <= s <= MAX_SIDE for s in d.train_sizes), "data.train_sizes",
         f"needs sizes within 32..{MAX_SIDE} (or [] with data.test_size 0: from the data)")
    need(d.test_size == 0 or 32 <= d.test_size <= MAX_SIDE, "data.test_size",
         f"must be within 32..{MAX_SIDE} (or 0 with data.train_sizes []: from the data)")
    need(32 <= d.max_size <= MAX_SIDE, "data.max_size", f"must be within 32..{MAX_SIDE}")
    sized = bool(d.train_sizes) or d.test_size > 0  # one set: the other is 160 (data/image_size.py)
    need(not sized or d.max_size >= max((d.train_sizes or [160]) + [d.test_size or 160]), "data.max_size", "must be >= every short-side size")
    need(d.names is None or (len(d.names) > 0 and all(n.strip() for n in d.names)), "data.names", "must be non-empty class names")
    need(0.0 <= d.flip <= 1.0, "data.flip", "must be in [0, 1]")
    need(d.on_bad_data in ("error", "skip"), "data.on_bad_data", "must be 'error' or 'skip'")
    need(d.classes is None or len(d.classes) > 0, "data.classes", "must not be empty")
    need(d.classes is None or len(set(d.classes)) == len(d.classes), "data.classes", "names a class twice")
    need(d.num_train_images is None or d.num_train_images >= 1, "data.num_train_images", "must be >= 1")
    need(d.num_test_images is None or d.num_test_images >= 1, "data.num_test_images", "must be >= 1")
    need(m.fpn_channels > 0, "model.fpn_channels", "must be positive")
    need(m.head_channels > 0, "model.head_channels", "must be positive")
    need(m.head_convs >= 0, "model.head_convs", "must be >= 0")
    need(t.epochs >= 1, "train.epochs", "must be >= 1")
    need(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(t.lr > 0, "train.lr", "must be positive")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(0 <= t.momentum < 1, "train.momentum", "must be in [0, 1)")
    need(t.warmup_iters >= 0, "train.warmup_iters", "must be >= 0")
    need(t.min_iters >= 0, "train.min_iters", "must be >= 0 (0: the recipe's epochs as they are)")
    need(0 < t.warmup_ratio <= 1, "train.warmup_ratio", "must be in (0, 1]")
    need(all(x >= 1 for x in t.milestones) and t.milestones == sorted(t.milestones), "train.milestones", "must be increasing epochs >= 1")
    need(t.workers is None or t.workers >= 0, "train.workers", "must be >= 0 (or null: chosen from the machine)")
    need(t.keep_checkpoints >= 0, "train.keep_checkpoints", "must be >= 0")
    need(t.save_every >= 1, "train.save_every", "must be >= 1 (1: after every epoch)")
    need(d.cache_gb >= 0, "data.cache_gb", "must be >= 0")
    need(0.0 <= d.val_fraction < 1.0, "data.val_fraction", "must be in [0, 1): the fraction of training images held out")
    need(t.gamma > 0, "train.gamma", "must be positive")
    need(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", "must be positive (or null: no clipping)")
    need(t.teacher_cache_gb >= 0, "train.teacher_cache_gb", "must be >= 0 (0: off)")
    need(t.threads is None or t.threads >= 1, "train.threads", "must be >= 1 (or null: torch's default)")
    need(t.log_every >= 1, "train.log_every", "must be >= 1")
    need(t.eval_every is None or t.eval_every >= 0, "train.eval_every", "must be >= 0 (0: only after the last epoch)")
    need(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"), "train.device", "must be auto, cpu or cuda[:N]")
    need(inc.method in ENGINE_METHODS, "incremental.method", f"must be one of {', '.join(ENGINE_METHODS)}")
    need(inc.new_class_init in ("prior", "default"), "incremental.new_class_init", "must be 'prior' or 'default'")
    need(inc.epochs is None or inc.epochs >= 1, "incremental.epochs", "must be >= 1")
    need(inc.lr is None or inc.lr > 0, "incremental.lr", "must be positive")
    need(inc.two_models_lr is None or inc.two_models_lr > 0, "incremental.two_models_lr", "must be positive")
    need(inc.new_images is None or inc.new_images >= 1, "incremental.new_images", "must be >= 1 (or null: every image)")
    need(inc.replay_images >= 0, "incremental.replay_images", "must be >= 0 (0: no replay)")
    need(inc.replay_repeat >= 1, "incremental.replay_repeat", "must be >= 1 (1: each replayed image once per epoch)")
    need(inc.replay_repeat == 1 or inc.replay_images > 0, "incremental.replay_repeat",
         "repeats replayed images: set incremental.replay_images too (0: nothing is replayed)")
    need(inc.new_score_damp >= 0, "incremental.new_score_damp", "must be >= 0 (0: no damping)")
    need(0 <= inc.old_score_blend <= 1, "incremental.old_score_blend", "must be in [0, 1] (0: no blending)")
    need(inc.milestones is None or (all(x >= 1 for x in inc.milestones) and inc.milestones == sorted(inc.milestones)),
         "incremental.milestones", "must be increasing epochs >= 1")
    need(inc.start_step is None or inc.start_step >= 1, "incremental.start_step", "must be >= 1 (step 0 has no teacher)")
    need(inc.start_step is None or bool(inc.teacher), "incremental.start_step", "needs incremental.teacher (the model of the step before)")
    if inc.groups is not None:
        need(len(inc.groups) >= 2, "incremental.groups", "needs at least two class groups")
        need(all(len(g) > 0 for g in inc.groups), "incremental.groups", "a class group is empty")
        flat = [c for g in inc.groups for c in g]
        need(len(flat) == len(set(flat)), "incremental.groups", "a class appears in two groups")
    if inc.protocol is not None:
        parts = inc.protocol.split("+")
        need(len(parts) >= 2 and all(p.strip().isdigit() and int(p) > 0 for p in parts), "incremental.protocol", f"expected sizes like '3+3', got {shown(inc.protocol)}")
    need(cfg.distill.release_batch >= 0, "distill.release_batch", "must be >= 0")
    need(cfg.distill.hccd_min_score is None or 0.0 <= cfg.distill.hccd_min_score < 1.0, "distill.hccd_min_score", "must be in [0, 1)")
    need(cfg.distill.hccd_form in (None, "l2", "bce"), "distill.hccd_form", "must be 'l2' or 'bce' (or null: the method's)")
    need(0.0 < cfg.distill.pseudo_overlap_iou <= 1.0, "distill.pseudo_overlap_iou", "must be in (0, 1]")
    need(cfg.distill.new_teacher is None or (isinstance(cfg.distill.new_teacher, str) and cfg.distill.new_teacher.strip() != ""),
         "distill.new_teacher", "must be 'finetune', a checkpoint path, or null")
    if cfg.distill.terms:  # named terms must exist (the table needs torch: read only when some are named)
        from .distill.terms import TERMS, switched_by_name
        by_name = [n for n, t in TERMS.items() if switched_by_name(t)]
        for name, w in cfg.distill.terms.items():
            need(name not in TERMS or switched_by_name(TERMS[name]), f"distill.terms.{name}",
                 f"has a switch of its own: set distill.{name} (and its weight) instead")
            need(name in TERMS, f"distill.terms.{name}", "is not a term of distill/terms.py switched on by name "
                 f"(known: {', '.join(by_name) or 'none; the built-in terms have switches of their own'})")
            need(w >= 0, f"distill.terms.{name}", "must be >= 0")
    for k in ("hccd_weight", "erd_box_weight", "ld_weight", "vlr_weight", "idfd_weight", "kd_weight", "temperature", "pseudo_sigmas",
              "new_teacher_weight"):
        need(getattr(cfg.distill, k) >= 0, f"distill.{k}", "must be >= 0")


def protocol_groups(cfg: Config, classes: list[str]) -> list[list[str]]:
    """Class groups of the incremental protocol, checked against the dataset's classes."""
    inc = cfg.incremental
    if inc.groups is not None:
        groups = inc.groups
    elif inc.protocol is not None:
        sizes = [int(p) for p in inc.protocol.split("+")]
        if sum(sizes) > len(classes):
            raise SdiddError(f"config key 'incremental.protocol': {inc.protocol} needs {sum(sizes)} classes, the dataset has {len(classes)}")
        groups, start = [], 0
        for s in sizes:
            groups.append(classes[start:start + s])
            start += s
    else:
        raise SdiddError("config key 'incremental.protocol': set a protocol such as '3+3' or incremental.groups")
    if inc.start_step is not None and inc.start_step >= len(groups):
        raise SdiddError(f"config key 'incremental.start_step': {inc.start_step} is past the last step ({len(groups) - 1}) of {len(groups)} class groups")
    for g in groups:
        for c in g:
            if c not in classes:
                raise SdiddError(f"config key 'incremental.groups': class {shown(c)} is not in the dataset ({', '.join(classes)})")
    return [list(g) for g in groups]
