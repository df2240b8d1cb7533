"""Checkpoints: atomic writes, weights-only loading, checks of what a checkpoint holds, model and RNG state."""
from __future__ import annotations

import math
import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from ..errors import SdiddError

if TYPE_CHECKING:
    from ..model.detector import GFL
    from ..model.stack import ModelStack

FORMAT_VERSION = 1
_TMP_SUFFIX = ".tmp"
# What torch's weights-only unpickler names when it meets a global (class, function) it will not import.
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _temp_files(path: Path) -> list[Path]:
    """Temp files `save_checkpoint` may have left for `path` (a kill between write and rename)."""
    return sorted(path.parent.glob(f".{path.name}.*{_TMP_SUFFIX}"))


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` to `path` atomically: temp file in the same folder, fsync, rename.

    A failure part way (full disk, kill) leaves the previous file at `path` untouched. One writer per
    path is assumed (rank 0 of one run), so temp files of earlier killed writes of `path` are removed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in _temp_files(path):
            stale.unlink(missing_ok=True)
    except OSError as e:
        raise SdiddError(f"{path}: cannot write checkpoint ({e.strerror or e})") from None
    state = {"format_version": FORMAT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        # fsync the folder so the rename itself survives a power cut.
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        # Full disk, quota, permissions: the user can fix these. torch's zip writer reports them as a RuntimeError
        # ("failed writing file", "unexpected pos ..."); the state itself holds only tensors and plain data.
        if isinstance(e, (OSError, RuntimeError)):
            kept = "the previous checkpoint is intact" if path.is_file() else "no earlier checkpoint exists"
            reason = e.strerror if isinstance(e, OSError) and e.strerror else "write failed: disk full, file size limit or I/O error"
            raise SdiddError(f"{path}: cannot write checkpoint ({reason}); {kept}") from None
        raise


def _refusal(path: Path, err: pickle.UnpicklingError) -> SdiddError:
    """One line saying why the weights-only unpickler refused `path`."""
    text = str(err)
    m = _GLOBAL_RE.search(text)
    if m:
        return SdiddError(f"{path}: refused, the checkpoint holds a pickled object ({m.group(1)}) that loading could run as code; "
                          "sdidd only loads tensors and plain data: re-save it as a state_dict from trusted code")
    detail = " ".join(text.split())
    m = re.search(r"WeightsUnpickler error: (.{1,120}?)(?: Check the documentation|$)", detail)
    reason = m.group(1).strip() if m else "unsupported pickle content"
    return SdiddError(f"{path}: refused, not a weights-only torch checkpoint (a plain pickle or foreign object: {reason})")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True` (it cannot run code) and check its format."""
    path = Path(path)
    if not path.exists():
        raise SdiddError(f"{path}: checkpoint not found")
    if not path.is_file():
        raise SdiddError(f"{path}: checkpoint is not a file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt file can fail anywhere in torch.load (KeyError, RuntimeError, EOFError ...)
        first = str(e).strip().splitlines()[0].split(". ")[0][:120] if str(e).strip() else "empty or cut short"
        raise SdiddError(f"{path}: not a readable checkpoint, the file is truncated or corrupt ({type(e).__name__}: {first})") from None
    if not isinstance(state, dict) or "model" not in state or "format_version" not in state:
        raise SdiddError(f"{path}: not an sdidd checkpoint (no model/format_version)")
    version = state["format_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise SdiddError(f"{path}: checkpoint format_version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise SdiddError(f"{path}: checkpoint format {version} is newer than this sdidd reads ({FORMAT_VERSION}); upgrade sdidd")
    if version != FORMAT_VERSION:
        raise SdiddError(f"{path}: checkpoint format {version} is not supported (this sdidd reads format {FORMAT_VERSION}); retrain or convert it")
    _check_contents(path, state)
    return state


def _check_contents(path: Path, state: dict[str, Any]) -> None:
    """The fields every consumer reads, with their types, so later code fails with a message, not a KeyError."""
    for key in ("detector", "classes"):
        if key not in state:
            raise SdiddError(f"{path}: checkpoint lacks '{key}'")
    model, det, classes = state["model"], state["detector"], state["classes"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        raise SdiddError(f"{path}: checkpoint 'model' is not a mapping of parameter names to tensors")
    if not isinstance(classes, (list, tuple)) or not classes or not all(isinstance(c, str) for c in classes):
        raise SdiddError(f"{path}: checkpoint 'classes' is not a non-empty list of class names")
    if not isinstance(det, dict) or not isinstance(det.get("backbone"), str):
        raise SdiddError(f"{path}: checkpoint 'detector' does not name a backbone")
    if det.get("num_classes") != len(classes):
        raise SdiddError(f"{path}: checkpoint detector has {det.get('num_classes')} class outputs but lists {len(classes)} classes")
    kept = state.get("kept_models")
    if kept is not None:  # a two-models checkpoint: the earlier detectors answer for the first classes
        ok = isinstance(kept, list) and kept and all(
            isinstance(k, dict) and isinstance(k.get("model"), dict) and isinstance(k.get("detector"), dict)
            and isinstance(k.get("answers_to"), int) for k in kept)
        ends = [k["answers_to"] for k in kept] if ok else []
        if not ok or ends != sorted(set(ends)) or not 0 < ends[-1] < len(classes) or any(
                k["detector"].get("num_classes", 0) < k["answers_to"] for k in kept):
            raise SdiddError(f"{path}: checkpoint 'kept_models' is not a list of detectors answering for the first "
                             f"classes in order (each with model, detector and answers_to)")


def check_fits(state: dict[str, Any], path: str | Path, purpose: str, classes: list[str], backbone: str,
               step: int | None = None, hint: str = "") -> None:
    """Refuse a loaded checkpoint whose classes, backbone or task step differ from what `purpose` needs, naming each."""
    diffs = []
    if list(state["classes"]) != list(classes):
        diffs.append(f"classes {list(state['classes'])} (needs {list(classes)})")
    if state["detector"]["backbone"] != backbone:
        diffs.append(f"backbone {state['detector']['backbone']} (needs {backbone})")
    if step is not None and "step" in state and state["step"] != step:
        diffs.append(f"task step {state['step']} (needs {step})")
    if diffs:
        raise SdiddError(f"{path}: cannot {purpose}, the checkpoint holds {'; '.join(diffs)}{'; ' + hint if hint else ''}")


# Settings that may change between a run and its resumption without changing what is trained: where things
# are, how fast, how verbose. Epochs are checked on their own (more epochs continue a finished run).
_RUNTIME_KEYS = frozenset({
    "name", "data.root", "data.check", "data.on_bad_data", "data.cache_gb", "model.pretrained", "train.epochs",
    "train.workers", "train.amp", "train.channels_last", "train.compile", "train.device", "train.deterministic", "train.threads", "train.log_every",
    "train.eval_every", "train.out_dir", "train.resume", "train.progress", "train.keep_checkpoints", "train.save_every",
    "train.teacher_cache_gb", "train.overwrite",
    "incremental.teacher", "incremental.start_step", "incremental.epochs",
})


def _effective_settings(cfg: dict[str, Any], with_teacher: bool, distilled: bool = True) -> dict[str, Any]:
    """Flatten a config dict to 'section.key' entries that shape the training of one step."""
    from ..config import config_from_dict
    from .schedule import step_schedule
    flat = {f"{sec}.{k}": v for sec, sub in cfg.items() if isinstance(sub, dict) for k, v in sub.items()}
    flat.setdefault("data.val_fraction", 0.0)  # a checkpoint from before the key trained on every training image
    # The schedule below says what incremental.* change, except the small-data cut, which changes the images.
    flat.setdefault("incremental.old_labels", False)  # a checkpoint from before the key trained on new labels only
    flat.setdefault("incremental.replay_images", 0)
    flat.setdefault("incremental.replay_repeat", 1)
    step_keys = (("incremental.new_images", "incremental.old_labels", "incremental.replay_images",
                  "incremental.replay_repeat") if with_teacher
                 else ("incremental.new_images",))
    flat = {k: v for k, v in flat.items() if not k.startswith("incremental.") or k in step_keys}
    if not (with_teacher and distilled):  # a step without a teacher, or a fine-tune, ignores the distillation
        flat = {k: v for k, v in flat.items() if not k.startswith("distill.")}
    try:
        sched = step_schedule(config_from_dict(cfg), with_teacher)
        flat["train.lr"], flat["train.milestones"] = sched.lr, list(sched.milestones)
    except SdiddError:  # a config of another sdidd version: compare what it holds
        pass
    return {k: v for k, v in flat.items() if k not in _RUNTIME_KEYS}


def settings_changed(saved: dict[str, Any], current: dict[str, Any], with_teacher: bool, distilled: bool = True) -> list[str]:
    """'key old (now new)' for each training setting that differs between a checkpoint's config and this run's."""
    old, new = _effective_settings(saved, with_teacher, distilled), _effective_settings(current, with_teacher, distilled)
    return [f"{k} {old[k]!r} (now {new[k]!r})" for k in sorted(old.keys() & new.keys()) if old[k] != new[k]]


def save_epoch(state: dict[str, Any], out_dir: Path, epoch: int, keep: int) -> Path:
    """Write `last.pth` atomically; keep the newest `keep` epochs as `epoch_<n>.pth` (hard links, no second write)."""
    last = out_dir / "last.pth"
    save_checkpoint(state, last)
    if keep > 0:
        target = out_dir / f"epoch_{epoch}.pth"
        target.unlink(missing_ok=True)
        try:
            os.link(last, target)
        except OSError:  # a file system without hard links
            import shutil
            shutil.copyfile(last, target)
    for old in sorted(out_dir.glob("epoch_*.pth"), key=_epoch_of)[: -keep or None]:
        old.unlink(missing_ok=True)
    return last


def _epoch_of(path: Path) -> int:
    m = re.fullmatch(r"epoch_(\d+)\.pth", path.name)
    return int(m.group(1)) if m else -1


# ---------------------------------------------------------------- model and RNG state

def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """Load `weights` strictly; any missing, unexpected or mis-shaped tensor is one SdiddError line."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    # load_state_dict raises a multi-line RuntimeError on shape mismatches: name the first one instead.
    shapes = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        first = (f", e.g. {shapes[0]} is {tuple(weights[shapes[0]].shape)} in the checkpoint, {tuple(own[shapes[0]].shape)} in the model"
                 if shapes else f", e.g. {(missing or unexpected)[0]}")
        raise SdiddError(f"checkpoint weights do not fit {what} (missing {len(missing)}, unexpected {len(unexpected)}, "
                         f"mis-shaped {len(shapes)} tensors{first})")
    model.load_state_dict(weights)


def _detector(record: dict[str, Any], weights: dict[str, torch.Tensor]) -> "GFL":
    """One detector from its architecture record and weights."""
    from ..model.detector import DetectorConfig, build_detector
    try:
        det = DetectorConfig(**{**record, "pretrained": False})
    except TypeError as e:  # a detector record of another sdidd version (unknown or missing fields)
        raise SdiddError(f"checkpoint detector record does not fit this sdidd ({e})") from None
    model = build_detector(det)
    load_weights(model, weights, f"the {det.backbone} detector it describes ({det.num_classes} classes)")
    return model


def model_from_checkpoint(state: dict[str, Any], device: torch.device | str = "cpu",
                          damp: Optional[float] = None, blend: Optional[float] = None) -> "GFL | ModelStack":
    """Rebuild a checkpoint's model: its detector, or with `kept_models` (method two-models) the stack of detectors.

    `damp` replaces a two-models checkpoint's new-class damping exponent (`incremental.new_score_damp`), `blend` its
    old-score blending (`incremental.old_score_blend`), e.g. to choose them on a validation split without training
    again; for any other checkpoint either is an error.
    """
    for name, value, ok, rule in (("new-class damping", damp, lambda v: 0 <= v < math.inf, "must be >= 0 and finite"),
                                  ("old-score blending", blend, lambda v: 0 <= v <= 1, "must be in [0, 1]")):
        if value is not None and not state.get("kept_models"):
            raise SdiddError(f"{name} {value:g}: applies to a two-models checkpoint only (this one holds one detector)")
        if value is not None and not ok(value):
            raise SdiddError(f"{name} {value:g}: {rule}")
    model = _detector(state["detector"], state["model"])
    if state.get("kept_models"):
        from ..model.stack import ModelStack
        kept = [_detector(k["detector"], k["model"]) for k in state["kept_models"]]
        ends = [int(k["answers_to"]) for k in state["kept_models"]] + [model.num_classes]
        model = ModelStack(kept + [model], ends, float(state.get("stack_damp", 1.0) if damp is None else damp),
                           float(state.get("stack_blend", 0.0) if blend is None else blend))
    return model.to(device)


def kept_models_record(kept: "GFL | ModelStack", damp: float, blend: float = 0.0) -> dict[str, Any]:
    """What a two-models checkpoint stores besides its newest detector: the frozen earlier ones, damping and blending."""
    from ..model.stack import ModelStack
    members, ends = (kept.members, kept.ends) if isinstance(kept, ModelStack) else ([kept], [kept.num_classes])
    return {"kept_models": [{"model": m.state_dict(), "detector": m.cfg.__dict__ | {"num_classes": m.num_classes},
                             "answers_to": int(e)} for m, e in zip(members, ends)], "stack_damp": float(damp),
            "stack_blend": float(blend)}


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain numbers, so weights-only loading can read it back."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved (parts a checkpoint lacks are left as they are)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "python" in state:
        random.setstate((3, tuple(int(v) for v in state["python"]), None))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
