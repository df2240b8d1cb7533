"""Check every training image before the first step: refuse, or skip and report bad ones, by setting."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from ..config import DataConfig
from ..data import DetectionDataset
from ..errors import SdiddError


def guard_dataset(dataset: DetectionDataset, cfg: DataConfig) -> DetectionDataset:
    """Decode every image once (unreadable, truncated, wrong size); synthetic data needs no check."""
    if not cfg.check or cfg.dataset == "synthetic":
        return dataset
    from ..data.check import inspect_image
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = list(pool.map(inspect_image, [r.file for r in dataset.records]))
    bad: dict[int, str] = {}
    for r, (_, size, err) in zip(dataset.records, results):
        if err is not None:
            bad[r.image_id] = f"{r.file}: {err}"
        elif size != (r.width, r.height):
            bad[r.image_id] = f"{r.file}: image is {size[0]}x{size[1]} but the annotation says {r.width}x{r.height}"
    if not bad:
        return dataset
    first = next(iter(bad.values()))
    if cfg.on_bad_data == "error":
        more = f" (and {len(bad) - 1} more bad images)" if len(bad) > 1 else ""
        raise SdiddError(f"{first}{more}; run `sdidd check-data` for the full list, or set data.on_bad_data=skip")
    print(f"warning: skipping {len(bad)} unreadable or mis-sized images (data.on_bad_data=skip), e.g. {first}")
    return dataset.with_records([r for r in dataset.records if r.image_id not in bad])
