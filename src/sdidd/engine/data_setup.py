"""Build the datasets and loaders of a run from its config: splits, class subsets, label order."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..config import DataConfig
from ..data import DetectionDataset, EvalTransform, Problems, TrainTransform, build_dataset, collate
from ..errors import SdiddError


_BAD_DATA_HINT = "; run `sdidd check-data` for the full list, or set data.on_bad_data=skip"


def load_split(cfg: DataConfig, split: str, report: bool = True) -> DetectionDataset:
    """Load one split of the configured dataset (all classes, global labels); `report`: print what was skipped."""
    if cfg.dataset == "synthetic":
        n = cfg.num_train_images if split == "train" else cfg.num_test_images
        return build_dataset("synthetic", split, num_images=n, image_size=max(cfg.train_sizes + [cfg.test_size]), seed=cfg.seed)
    # In 'skip' mode the loaders collect annotation problems (bad boxes, malformed lines) and drop those items.
    problems = Problems(strict=cfg.on_bad_data == "error", hint=_BAD_DATA_HINT)
    if cfg.dataset == "coco":
        ann = cfg.train_ann if split == cfg.train_split else cfg.test_ann
        if not cfg.images_dir or not ann:
            raise SdiddError("config keys 'data.images_dir', 'data.train_ann' and 'data.test_ann' are needed for a coco dataset")
        ds = build_dataset("coco", split, images_dir=cfg.images_dir, ann_file=ann, problems=problems)
    else:
        ds = build_dataset(cfg.dataset, split, root=cfg.root, problems=problems)
    if problems.counts and report:
        print(f"warning: {split}: skipped annotation problems (data.on_bad_data=skip): "
              + "; ".join(f"{k} x{n} (e.g. {problems.examples[k][0]})" for k, n in problems.counts.items()))
    return ds


def relabel(dataset: DetectionDataset, class_names: list[str], keep_empty: bool = False) -> DetectionDataset:
    """Keep the boxes of `class_names`, with labels re-indexed to their position in that list.

    Images without such boxes are dropped unless `keep_empty` (test sets keep every image).
    """
    unknown = [c for c in class_names if c not in dataset.classes]
    if unknown:
        raise SdiddError(f"class {unknown[0]!r} is not in the dataset (classes: {', '.join(dataset.classes)})")
    lut = np.full(len(dataset.classes), -1, dtype=np.int64)
    for i, c in enumerate(class_names):
        lut[dataset.classes.index(c)] = i
    records = []
    for r in dataset.records:
        new = lut[r.labels] if len(r.labels) else r.labels
        keep = new >= 0
        if keep.any() or keep_empty:
            records.append(dataclasses.replace(r, boxes=r.boxes[keep], labels=new[keep]))
    out = dataset.with_records(records)
    out.classes = list(class_names)
    return out


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with a seed derived from (seed, epoch), so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def train_loader(dataset: DetectionDataset, cfg: DataConfig, batch_size: int, workers: int, seed: int, sampler: Sampler | None = None) -> DataLoader:
    """Shuffled, multi-scale + flip augmented, padded batches."""
    dataset.transform = TrainTransform(cfg.train_sizes, cfg.max_size, cfg.flip)
    sampler = sampler or EpochShuffleSampler(len(dataset), seed)
    # Decided on the images this process draws (a rank's shard under DDP), so W ranks x batch b drop the
    # same tail as one process with batch W x b.
    n = len(sampler)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      drop_last=n >= 2 * batch_size, persistent_workers=False, pin_memory=torch.cuda.is_available())


def test_loader(dataset: DetectionDataset, cfg: DataConfig, batch_size: int, workers: int, sampler: Sampler | None = None) -> DataLoader:
    """Ordered, single-scale batches."""
    dataset.transform = EvalTransform(cfg.test_size, cfg.max_size)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=workers, collate_fn=collate)
