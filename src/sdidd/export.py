"""`sdidd export`: the detector as ONNX with box decoding in the graph; NMS outside (`postprocess_onnx_outputs`).

Input contract of the ONNX model (input ``images``):

- float32 tensor ``[N, 3, S, S]``, channel order **RGB**, layout NCHW, pixel values **0-255**
  (not normalised: the backbone's mean/std, (x - 127.5) / 127.5 for EfficientNet-Lite and ImageNet's
  for resnet50, is applied inside the graph). S is fixed at export (default: the checkpoint's test
  size rounded up to a multiple of 32); the batch dimension N is dynamic.
- Resize each image keeping its aspect ratio so its long side is S (``scale = S / max(h, w)``,
  antialiased bilinear), put it at the top-left corner and zero-pad bottom/right to S x S
  (:func:`letterbox` does this with numpy + Pillow and returns what post-processing needs). For square images resized to the checkpoint's
  test size this is exactly the pre-processing of `sdidd eval` / `sdidd predict`.

Outputs: ``boxes`` ``[N, A, 4]`` xyxy in input (S x S) pixels, decoded from the 17-bin distributions
(integral x level stride around each anchor point), and ``scores`` ``[N, A, C]`` (sigmoid). A is the
number of anchor points of levels P3-P7 (strides 8..128). NMS is not in the graph:
:func:`postprocess_onnx_outputs` reproduces the detector's post-processing (the settings of
``model/postprocess_settings.py``, which both read) with torchvision when torch is installed, else numpy,
and maps boxes back to original pixels when given each image's scale.
The model's metadata (``custom_metadata_map``) lists the classes, S, strides and anchors per level.
"""
from __future__ import annotations

import logging

import inspect
import json
import math
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .errors import SdiddError
from .model.postprocess_settings import ACROSS_GROUPS_BLOCK, POSTPROCESS, STRIDES

log = logging.getLogger(__name__)

__all__ = ["export_onnx", "postprocess_onnx_outputs", "letterbox", "level_counts", "POSTPROCESS", "STRIDES"]

_ONNX_HINT = 'ONNX export needs onnx and onnxruntime: pip install "sdidd[onnx]"'


def level_counts(size: int) -> list[int]:
    """Anchor points per level (P3-P7) of an S x S input: each stride-2 step rounds up."""
    return [math.ceil(size / s) ** 2 for s in STRIDES]


def _size_from_anchors(num_anchors: int) -> int:
    """The input side S (a multiple of 32) whose levels hold `num_anchors` points."""
    for size in range(32, 32 * 1024 + 1, 32):
        n = sum(level_counts(size))
        if n == num_anchors:
            return size
        if n > num_anchors:
            break
    raise ValueError(f"{num_anchors} anchors match no square input of a multiple of 32; pass num_per_level")


def letterbox(image: Any, size: int) -> tuple[np.ndarray, tuple[int, int], tuple[float, float]]:
    """HxWx3 uint8 RGB (array or PIL image) -> ([3, S, S] float32 0-255, resized (h, w), per-axis scale (sx, sy)).

    Pass the (h, w) as `image_sizes` and the scales as `scales` to :func:`postprocess_onnx_outputs`.
    """
    from PIL import Image
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    pil = pil.convert("RGB")
    w, h = pil.size
    scale = size / max(h, w)
    nw, nh = min(size, max(1, round(w * scale))), min(size, max(1, round(h * scale)))
    out = np.zeros((3, size, size), np.float32)
    out[:, :nh, :nw] = np.asarray(pil.resize((nw, nh), Image.BILINEAR), np.float32).transpose(2, 0, 1)
    # Per-axis factors of the whole-pixel size: dividing by them maps the image edge exactly back to w and h.
    return out, (nh, nw), (nw / w, nh / h)


def _box_iou_numpy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU [len(a), len(b)] of xyxy boxes (torchvision.ops.box_iou in numpy, float64)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def _nms_numpy(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_thr: float) -> np.ndarray:
    """Class-aware greedy NMS (torchvision's batched_nms semantics: offset boxes per class, IoU > thr suppresses)."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    b = boxes.astype(np.float64) + (labels.astype(np.float64) * (boxes.max() + 1))[:, None]
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        order = rest[_box_iou_numpy(b[i:i + 1], b[rest])[0] <= iou_thr]
    return np.asarray(keep, np.int64)


def _suppress_across_groups_numpy(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, iou_thr: float) -> np.ndarray:
    """`model.detector.suppress_across_groups` in numpy: keep-mask of boxes no higher-scored earlier-group box overlaps."""
    b = boxes.astype(np.float64)
    keep = np.ones(len(b), bool)
    for lo in range(0, len(b), ACROSS_GROUPS_BLOCK):  # bounded memory, as the torch version
        hi = lo + ACROSS_GROUPS_BLOCK
        beaten = ((_box_iou_numpy(b[lo:hi], b) > iou_thr) & (groups[None, :] < groups[lo:hi, None])
                  & (scores[None, :] > scores[lo:hi, None]))
        keep[lo:hi] = ~beaten.any(axis=1)
    return keep


def _nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_thr: float, backend: str) -> np.ndarray:
    if backend != "numpy":
        try:
            import torch
            from torchvision.ops import batched_nms
        except ImportError:
            if backend == "torch":
                raise
        else:
            return batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), iou_thr).numpy()
    return _nms_numpy(boxes, scores, labels, iou_thr)


def postprocess_onnx_outputs(boxes: Any, scores: Any, image_sizes: Optional[Sequence[tuple[int, int]]] = None,
                             scales: Optional[Sequence[Any]] = None, num_per_level: Optional[Sequence[int]] = None,
                             score_thr: float = POSTPROCESS["score_thr"], nms_pre: int = POSTPROCESS["nms_pre"],
                             iou_thr: float = POSTPROCESS["iou_thr"], max_per_img: int = POSTPROCESS["max_per_img"],
                             agnostic: bool = POSTPROCESS["agnostic"],
                             class_groups: Optional[Sequence[int]] = POSTPROCESS["class_groups"],
                             backend: str = "auto") -> list[dict[str, np.ndarray]]:
    """The detector's post-processing on ONNX outputs: per image {'boxes' xyxy, 'scores', 'labels' (model channel)}.

    `image_sizes`: (h, w) of each resized image inside the S x S input (boxes are clamped to it; default S x S).
    `scales`: each image's resize factor (a float, or (sx, sy)); boxes are divided by it to give original pixels.
    `backend`: 'auto' (torchvision NMS when importable, else numpy), 'torch' or 'numpy'.
    """
    boxes = np.asarray(boxes.detach().cpu() if hasattr(boxes, "detach") else boxes, np.float32)
    scores = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores, np.float32)
    n, num_anchors, num_classes = scores.shape
    counts = list(num_per_level or level_counts(_size_from_anchors(num_anchors)))
    if sum(counts) != num_anchors:
        raise ValueError(f"num_per_level {counts} sums to {sum(counts)}, outputs hold {num_anchors} anchors")
    starts = np.cumsum([0] + counts)
    results = []
    for b in range(n):
        h, w = image_sizes[b] if image_sizes is not None else (None, None)
        kept_boxes, kept_scores, kept_labels = [], [], []
        for lo, hi in zip(starts[:-1], starts[1:]):
            flat = scores[b, lo:hi].reshape(-1)
            keep = np.nonzero(flat > score_thr)[0]
            if keep.size > nms_pre:  # the nms_pre best of this level, as GFL.postprocess's topk
                keep = keep[np.argsort(-flat[keep], kind="stable")[:nms_pre]]
            bx = boxes[b, lo + keep // num_classes].copy()
            if h is not None:
                bx[:, 0::2] = bx[:, 0::2].clip(0, w)
                bx[:, 1::2] = bx[:, 1::2].clip(0, h)
            kept_boxes.append(bx)
            kept_scores.append(flat[keep])
            kept_labels.append(keep % num_classes)
        bx, sc, lab = np.concatenate(kept_boxes), np.concatenate(kept_scores), np.concatenate(kept_labels).astype(np.int64)
        valid = (bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1])
        bx, sc, lab = bx[valid], sc[valid], lab[valid]
        keep = _nms(bx, sc, np.zeros_like(lab) if agnostic else lab, iou_thr, backend)
        if class_groups is not None:
            keep = keep[_suppress_across_groups_numpy(bx[keep], sc[keep], np.asarray(class_groups)[lab[keep]], iou_thr)]
        keep = keep[:max_per_img]
        bx, sc, lab = bx[keep], sc[keep], lab[keep]
        if scales is not None:
            s = np.broadcast_to(np.asarray(scales[b], np.float32).reshape(-1), (2,))
            bx = bx / np.array([s[0], s[1], s[0], s[1]], np.float32)
        results.append({"boxes": bx, "scores": sc, "labels": lab})
    return results


def _export_module(model: Any, size: int) -> Any:
    """The detector with decoding, as a module whose forward maps images to (boxes, scores).

    A two-models checkpoint (model/stack.py) exports every member's anchors one after the other, as the stack's
    own output: A is then the anchors of one member times the members, and the metadata's num_per_level says so.
    """
    import torch
    from torch import nn

    from .model.anchors import make_anchor_grid
    from .model.head import distance2bbox, integral
    from .model.stack import ModelStack, stack_scores

    members = list(model.members) if isinstance(model, ModelStack) else [model]
    ends = list(model.ends) if isinstance(model, ModelStack) else None

    class DecodedGFL(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.members = nn.ModuleList(members)
            self.damp, self.blend = getattr(model, "damp", 0.0), getattr(model, "blend", 0.0)
            with torch.no_grad():
                feats = members[0].features(torch.zeros(1, 3, size, size))
            grid = make_anchor_grid([tuple(f.shape[-2:]) for f in feats], list(STRIDES), torch.device("cpu"))
            if grid.num_per_level != level_counts(size):  # the level layout postprocess_onnx_outputs assumes
                raise RuntimeError(f"levels {grid.num_per_level} of a {size}px input differ from {level_counts(size)}")
            # Constants of the fixed input size: traced into the graph as initializers.
            self.register_buffer("points", grid.points, persistent=False)
            self.register_buffer("strides", grid.strides[:, None], persistent=False)

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            outs = [m.head(m.features(images)) for m in self.members]
            boxes = [distance2bbox(self.points, integral(reg) * self.strides) for _, reg in outs]
            scores = [cls.sigmoid() for cls, _ in outs]
            if ends is not None:
                scores = stack_scores(scores, ends, self.damp, self.blend)
            return torch.cat(boxes, 1), torch.cat(scores, 1)

    return DecodedGFL().eval()


def export_onnx(checkpoint: str | Path, out: Optional[str | Path] = None, size: Optional[int] = None,
                opset: int = 17, verify: bool = True, damp: Optional[float] = None,
                blend: Optional[float] = None) -> Path:
    """Export a checkpoint to ONNX (decoded boxes + sigmoid scores, NMS outside); `verify` compares onnxruntime to PyTorch.

    `damp`, `blend`: a two-models checkpoint's new-class damping exponent and old-score blending instead of its own
    (both are part of the graph)."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise SdiddError(_ONNX_HINT) from None
    import torch

    from .engine.checkpoint import load_checkpoint
    from .engine.checkpoint import model_from_checkpoint
    from .predict import checkpoint_postprocess

    state = load_checkpoint(checkpoint)
    if size is None:
        size = int(dict(state.get("config", {}).get("data", {})).get("test_size", 160))
    if size < 32:
        raise SdiddError(f"--size {size}: must be >= 32")
    if size % 32:
        log.info(f"note: input size {size} rounded up to {math.ceil(size / 32) * 32}, a multiple of the coarsest backbone stride")
        size = math.ceil(size / 32) * 32
    out = Path(out) if out else Path(checkpoint).with_suffix(".onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model_from_checkpoint(state, "cpu", damp=damp, blend=blend).eval()
    module = _export_module(model, size)
    dummy = torch.rand(2, 3, size, size) * 255
    # torch >= 2.9 defaults to the dynamo exporter, which needs onnxscript; the TorchScript exporter does not.
    kw = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices; the result is checked below
        torch.onnx.export(module, (dummy,), str(out), input_names=["images"], output_names=["boxes", "scores"],
                          dynamic_axes={"images": {0: "batch"}, "boxes": {0: "batch"}, "scores": {0: "batch"}},
                          opset_version=opset, do_constant_folding=True, **kw)
    proto = onnx.load(str(out))
    levels = level_counts(size) * len(getattr(model, "members", [model]))  # a two-models stack: each member's levels
    meta = {"classes": json.dumps(list(state["classes"])), "input_size": str(size), "strides": json.dumps(list(STRIDES)),
            "num_per_level": json.dumps(levels),
            # the checkpoint's own settings (class_groups where its step evaluated with incremental.old_new_nms), and
            # the anchor layout, so `postprocess_onnx_outputs(boxes, scores, ..., **postprocess)` fits any checkpoint
            "postprocess": json.dumps({**POSTPROCESS, **checkpoint_postprocess(state, str(checkpoint)),
                                       "num_per_level": levels}),
            "input": "float32 NCHW RGB 0-255, keep-ratio resize long side to input_size, zero-pad bottom/right",
            "backbone": str(state["detector"]["backbone"])}
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    if verify:
        with torch.no_grad():
            ref = [t.numpy() for t in module(dummy)]
        got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": dummy.numpy()})
        err = max(float(np.abs(r - g).max()) for r, g in zip(ref, got))
        if not err < 0.05:  # a broken graph differs by whole pixels; float reordering by far less
            raise RuntimeError(f"{out}: onnxruntime differs from PyTorch by {err:g}")
    return out
