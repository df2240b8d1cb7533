"""`sdidd predict`: detect on image files or folders, draw the boxes, write COCO-results JSON.

Pre-processing is evaluation's (``EvalTransform``: keep-ratio resize to the checkpoint's test size,
long side capped, zero-pad to a multiple of 32; the detector normalises itself) and post-processing
is the detector's own (``GFL.postprocess``). Boxes are mapped back to the original image pixels.

``DIR/predictions.json`` holds::

    {"categories": [{"id": 1, "name": ...}, ...],          # category_id = model channel + 1, as in `sdidd eval`
     "images": [{"id": 1, "file_name": ..., "path": ..., "width": W, "height": H}, ...],
     "detections": [{"image_id": 1, "file_name": ..., "category_id": 1, "bbox": [x, y, w, h], "score": s}, ...],
     "skipped": [{"path": ..., "error": ...}, ...]}         # inputs that could not be decoded

``detections`` is a COCO results list (``COCO.loadRes`` accepts it as is); bbox is in original pixels;
``DIR/results.json`` holds the same list alone, the form other tools read. Predicting on a dataset
(``sdidd predict CKPT data=FILE``: its test split) keeps the dataset's own image ids, file names (relative
to its folder, drawn images in the same sub-folders) and, for COCO, category ids.
An image that cannot be decoded is skipped with one line on stderr; the others are still detected and
written, and the command then exits 2 so that scripts notice.
"""
from __future__ import annotations

import logging

import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .data.records import read_image
from .data.transforms import EvalTransform, collate
from .device import select_device
from .errors import SdiddError
from .run_files import write_json
from .config import MAX_SIDE
from .errors import is_out_of_memory

log = logging.getLogger(__name__)

__all__ = ["run_predict", "find_images", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand image files and folders (their images, sorted, sub-folders included) into a list of regular files."""
    return [f for f, _ in _find(inputs)]


def _find(inputs: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(file, output name) of every input image: a folder's images keep their path below it as output name."""
    found: list[tuple[Path, str]] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise SdiddError(f"{p}: input not found")
        if p.is_dir():
            inside = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not inside:
                raise SdiddError(f"{p}: folder holds no images ({', '.join(s[1:] for s in IMAGE_SUFFIXES)}), sub-folders included")
            found += [(f, f.relative_to(p).as_posix()) for f in inside]
        elif not p.is_file():  # a FIFO or device would block the read forever
            raise SdiddError(f"{p}: not a regular file")
        else:
            found.append((p, p.name))  # an explicitly named file is tried whatever its suffix; decoding says if it is no image
    return found


def _out_names(names: Sequence[str]) -> list[str]:
    """Output paths below the output folder: `names` with '..' and absolute parts removed, made unique."""
    out, seen = [], set()
    for raw in names:
        parts = [q for q in Path(str(raw)).parts if q not in ("..", ".", "/") and not Path(q).anchor]
        name = Path(*parts) if parts else Path("image")
        candidate, k = name.as_posix(), 1
        while candidate.lower() in seen:
            candidate, k = name.with_name(f"{name.stem}_{k}{name.suffix}").as_posix(), k + 1
        seen.add(candidate.lower())
        out.append(candidate)
    return out


def run_predict(checkpoint: str | Path, inputs: Sequence[str | Path], out: str | Path = "predictions",
                score_thr: float = 0.3, batch_size: int = 8, device: str = "auto", size: Optional[int] = None,
                skipped: Optional[list[dict[str, str]]] = None, image_ids: Optional[Sequence[int]] = None,
                file_names: Optional[Sequence[str]] = None, category_ids: Optional[Mapping[str, int]] = None,
                max_size_arg: Optional[int] = None, agnostic: bool = False,
                old_new: Optional[bool] = None, new_score_damp: Optional[float] = None,
                old_score_blend: Optional[float] = None) -> list[dict[str, Any]]:
    """Detect on `inputs`, write drawn images, predictions.json and results.json to `out`; return per-image results.

    Undecodable images are reported on stderr and appended to `skipped` (if given) as {"path", "error"}.
    With `image_ids` and `file_names` (one per input file: a dataset's records) the results keep them, and
    `category_ids` (class name -> id) replaces channel + 1 as the category id. `max_size_arg` overrides the long-side cap.
    `agnostic`: NMS across classes (one box per place, the best-scored class's) instead of per class.
    `old_new`: NMS across the classes the checkpoint's step added and those it knew before (`class_groups`); None:
    as the checkpoint's step was evaluated (`incremental.old_new_nms`). `new_score_damp`, `old_score_blend`: a
    two-models checkpoint's new-class damping exponent and old-score blending instead of its own.
    """
    from .engine.checkpoint import load_checkpoint
    from .engine.checkpoint import model_from_checkpoint
    from .engine.precision import for_inference
    from .plots import draw_detections

    if batch_size < 1:
        raise SdiddError(f"--batch-size {batch_size}: must be >= 1")
    if not 0 <= score_thr <= 1:
        raise SdiddError(f"--score {score_thr}: must be within 0..1")
    if image_ids is not None and file_names is not None:  # a dataset's records: files as given, with their ids and names
        files = [Path(f) for f in inputs]
        if not (len(files) == len(image_ids) == len(file_names)):
            raise SdiddError(f"{len(files)} files, {len(image_ids)} image ids and {len(file_names)} names")
    else:
        found = _find(inputs)  # before loading the model: input mistakes are reported at once
        files, file_names = [f for f, _ in found], [n for _, n in found]
    dev = select_device(device, "--device")
    state = load_checkpoint(checkpoint)
    model = for_inference(model_from_checkpoint(state, dev, damp=new_score_damp, blend=old_score_blend).eval(), dev)
    classes = list(state["classes"])
    class_groups = checkpoint_postprocess(state, str(checkpoint), old_new).get("class_groups")
    data = dict(state.get("config", {}).get("data", {}))
    test_size, max_size = int(data.get("test_size") or 160), int(data.get("max_size") or 267)
    if size is not None:
        if not 32 <= size <= MAX_SIDE:
            raise SdiddError(f"--size {size}: must be within 32..{MAX_SIDE}")
        max_size = max(size, round(size * max_size / test_size))  # keep the checkpoint's long/short cap ratio
        test_size = size
    if max_size_arg is not None:
        if max_size_arg < test_size:
            raise SdiddError(f"data.max_size {max_size_arg}: must be >= the short side {test_size}")
        max_size = max_size_arg
    transform = EvalTransform(test_size, max_size)

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _out_names(file_names)  # never outside out_dir, whatever a dataset's file names say
    ids = list(image_ids) if image_ids is not None else list(range(1, len(files) + 1))
    results: list[dict[str, Any]] = []
    bad: list[dict[str, str]] = [] if skipped is None else skipped
    for idx, chunk, originals in _readable_batches(files, batch_size, bad):
        try:
            batch = collate([transform(im, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0), "image_id": 0}) for im in originals])
            with torch.no_grad():
                dets = model.predict(batch["images"].to(dev), batch["image_sizes"], score_thr=score_thr, agnostic=agnostic,
                                     class_groups=class_groups)
        except (MemoryError, RuntimeError) as e:  # one huge image must not cost the others their detections
            if not is_out_of_memory(e):
                raise
            for f in chunk:
                print(f"error: {f}: out of memory at --size {test_size} (batch of {len(chunk)}); skipped, try a smaller "
                      "--size or --batch-size", file=sys.stderr)
                bad.append({"path": str(f), "error": "out of memory"})
            continue
        for k, f, im, det, tgt in zip(idx, chunk, originals, dets, batch["targets"]):
            h, w = tgt["orig_size"]
            sx, sy = tgt["scale_xy"]  # exact per-axis factors of the whole-pixel resize
            boxes = det["boxes"].float().cpu() / torch.tensor([sx, sy, sx, sy])
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            r = {"image_id": int(ids[k]), "file": str(f), "file_name": names[k], "width": w, "height": h,
                 "boxes": boxes.numpy(), "scores": det["scores"].float().cpu().numpy(), "labels": det["labels"].cpu().numpy()}
            drawn = draw_detections(im.permute(1, 2, 0).numpy(), r["boxes"], r["scores"], r["labels"], classes, score_thr)
            (out_dir / r["file_name"]).parent.mkdir(parents=True, exist_ok=True)
            _save_image(drawn, out_dir / r["file_name"])
            results.append(r)
    json_path = out_dir / "predictions.json"
    doc = _to_json(results, classes, category_ids or {})
    write_json(json_path, {**doc, "skipped": bad})
    write_json(out_dir / "results.json", doc["detections"])  # the bare COCO results list
    n = sum(len(r["scores"]) for r in results)
    note = f" ({len(bad)} unreadable image(s) skipped, listed there)" if bad else ""
    log.info(f"{len(results)} image(s), {n} detection(s) with score >= {score_thr:g} on {dev.type}: wrote {out_dir}/ and {json_path}{note}")
    return results


def checkpoint_postprocess(state: dict[str, Any], where: str, old_new: Optional[bool] = None) -> dict[str, Any]:
    """`GFL.postprocess` settings for a checkpoint: its step's (`incremental.old_new_nms`), or NMS across old and new
    classes forced on / off by `old_new`; forcing it on for a model without old classes is one error line."""
    from .engine.build import StepSpec
    classes = list(state["classes"])
    spec = StepSpec(classes, list(state.get("new_classes") or classes))
    if old_new is None:
        return spec.postprocess(bool(((state.get("config") or {}).get("incremental") or {}).get("old_new_nms", False)))
    if old_new and not spec.num_old:
        raise SdiddError(f"{where}: NMS across old and new classes needs a checkpoint of an incremental step; "
                         f"this one has no old classes (it learnt {classes} in one step)")
    return spec.postprocess(old_new)


def _readable_batches(files: list[Path], batch_size: int, bad: list[dict[str, str]]) -> Iterator[tuple[list[int], list[Path], list[torch.Tensor]]]:
    """Batches of (index into files, path, pixels) of the files that decode; the others are reported and added to `bad`."""
    batch: list[tuple[int, Path, torch.Tensor]] = []
    for i, f in enumerate(files):
        try:
            batch.append((i, f, read_image(f)))
        except SdiddError as e:  # one bad file must not cost the detections of the others
            print(f"error: {e} (skipped)", file=sys.stderr)
            bad.append({"path": str(f), "error": str(e)})
        if batch and (len(batch) == batch_size or i + 1 == len(files)):
            idx, paths, pixels = zip(*batch)
            yield list(idx), list(paths), list(pixels)
            batch = []


def _save_image(pixels: np.ndarray, path: Path) -> None:
    im = Image.fromarray(pixels)
    # JPEG at high quality so the thin box lines and captions stay legible.
    im.save(path, **({"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}))


def _to_json(results: list[dict[str, Any]], classes: list[str], category_ids: Mapping[str, int]) -> dict[str, Any]:
    """COCO categories/images and a COCO-results detection list (xywh, original pixels)."""
    cid = [int(category_ids.get(c, i + 1)) for i, c in enumerate(classes)]
    dets = []
    for r in results:
        for (x1, y1, x2, y2), s, lab in zip(r["boxes"].tolist(), r["scores"].tolist(), r["labels"].tolist()):
            dets.append({"image_id": r["image_id"], "file_name": r["file_name"], "category_id": cid[int(lab)],
                         "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)], "score": round(s, 5)})
    return {"categories": [{"id": cid[i], "name": c} for i, c in enumerate(classes)],
            "images": [{"id": r["image_id"], "file_name": r["file_name"], "path": r["file"], "width": r["width"],
                        "height": r["height"]} for r in results],
            "detections": dets}
