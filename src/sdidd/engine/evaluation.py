"""Running a model over a dataset for its metrics: the test loader (sharded under torchrun), fp32 detection, the
gathered detections scored by `evaluate.py` (pycocotools)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import torch

from ..evaluate import EvalResult, evaluate_detections
from . import distributed as dist
from .run_data import test_loader

__all__ = ["detect", "evaluate_model"]


def detect(model: Any, dataset: Any, data_cfg: Any, device: Any, batch_size: int = 8,
           workers: Optional[int] = None, amp: bool = False,
           postprocess: Optional[Mapping[str, Any]] = None) -> dict[int, dict[str, np.ndarray]]:
    """`model`'s detections on every image of `dataset` in fp32: image_id -> boxes (xyxy, original pixels), scores, labels.

    Under torchrun each rank detects its share of the images and every rank gets them all. `amp` runs the network in
    bf16 (measured against fp32 by benchmarks/eval_modes.py; the engine evaluates in fp32). `postprocess`: settings of
    `GFL.postprocess` other than its defaults (model/postprocess_settings.py).
    """
    was_training = model.training
    model.eval()
    detections: dict[int, dict[str, np.ndarray]] = {}
    # fp32 by default, even inside a caller's autocast region (docs/results/eval_modes_cpu.md measures bf16's effect).
    with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
        for batch in test_loader(dataset, data_cfg, batch_size, workers):
            results = model.predict(batch["images"].to(device, non_blocking=True), batch["image_sizes"], batch["scales"],
                                    **dict(postprocess or {}))
            for image_id, r in zip(batch["image_ids"], results):
                detections[int(image_id)] = {k: v.cpu().numpy() for k, v in r.items()}
    model.train(was_training)
    return dist.gather_dict(detections)


def evaluate_model(model: Any, dataset: Any, data_cfg: Any, device: Any, groups: Optional[Mapping[str, list[int]]] = None,
                   batch_size: int = 8, workers: Optional[int] = None,
                   detections_out: Optional[dict[int, dict[str, np.ndarray]]] = None, amp: bool = False,
                   postprocess: Optional[Mapping[str, Any]] = None) -> EvalResult:
    """Detect on every image of `dataset` (labels = model channels) in fp32 and score with pycocotools.

    Under torchrun each rank detects its share of the images and the detections are gathered first.
    `detections_out`, if given, receives them (image_id -> boxes xyxy original pixels, scores, labels).
    """
    detections = detect(model, dataset, data_cfg, device, batch_size, workers, amp, postprocess)
    if detections_out is not None:
        detections_out.update(detections)
    return evaluate_detections(dataset.records, dataset.classes, detections, groups=groups)
