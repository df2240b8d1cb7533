"""The data of a run: each split parsed, checked and decoded once, then viewed per step in model-channel labels.

A run (`train`, `incremental`, `benchmark`) calls :func:`load_run_data` once. Every step then takes a
:func:`channel_view` of the same records: labels become the step's model channels (old classes first),
which is what the loss and the metric read; nothing later re-indexes them.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..config import Config, DataConfig, replaced
from ..data import DetectionDataset, EvalTransform, Problems, TrainTransform, build_dataset, collate
from ..data.check import check_images
from ..data.formats import FORMATS, described_splits, load_described_split
from ..data.image_size import DEFAULT_SIZE, choose_image_size
from ..errors import SdiddError, shown
from . import distributed as dist

log = logging.getLogger(__name__)

_BAD_DATA_HINT = "; run `sdidd check-data` for the full list, or set data.on_bad_data=skip"


@dataclass
class RunData:
    """The splits of the configured dataset, with dataset labels (class order of `classes`).

    `test` is what a run's final numbers are measured on: the test split, else a described dataset's val split;
    `val` (a described dataset's val split, when it has one) is evaluated during training and chooses best.pth.
    """

    classes: list[str]
    train: DetectionDataset
    test: DetectionDataset
    val: Optional[DetectionDataset] = None
    replay: Optional[DetectionDataset] = None  # kept old images to replay (add-classes --replay); None: `train`'s
    # The image sizes of this run: the recipe's, or chosen from the training images when it leaves them unset.
    train_sizes: list[int] = field(default_factory=list)
    test_size: int = 0

    def sized(self, cfg: Config) -> Config:
        """`cfg` with this run's image sizes (a new config when the recipe left them to the data; else `cfg` itself)."""
        d = cfg.data
        if not self.test_size or (list(d.train_sizes) == self.train_sizes and d.test_size == self.test_size):
            return cfg
        return replaced(cfg, {"data.train_sizes": list(self.train_sizes), "data.test_size": self.test_size})


def load_split(cfg: DataConfig, split: str) -> DetectionDataset:
    """Parse one split of the configured dataset (annotations only; dataset labels)."""
    if cfg.dataset == "synthetic":
        n = cfg.num_train_images if split == "train" else cfg.num_test_images
        size = max(cfg.train_sizes + [cfg.test_size]) or DEFAULT_SIZE  # sizes unset: generated at the default size
        return build_dataset("synthetic", split, num_images=n, image_size=size, seed=cfg.seed)
    # In 'skip' mode the loaders collect annotation problems (bad boxes, malformed lines) and drop those items.
    problems = Problems(strict=cfg.on_bad_data == "error", hint=_BAD_DATA_HINT)
    if cfg.dataset in FORMATS:  # coco, voc, yolo: the splits a dataset description names
        ds = load_described_split(vars(cfg), described_name(cfg, split), problems)
    else:
        ds = build_dataset(cfg.dataset, split, root=cfg.root, problems=problems)
    if problems.counts:
        log.warning(f"warning: {split}: skipped annotation problems (data.on_bad_data=skip): "
                    + "; ".join(f"{k} x{n} (e.g. {problems.examples[k][0]})" for k, n in problems.counts.items()))
    return ds


def described_name(cfg: DataConfig, split: str) -> str:
    """'train', 'val' or 'test': which split of a described dataset `split` names; an unknown name is one line."""
    if split in ("train", cfg.train_split):
        return "train"
    if split in ("val", "valid", "validation"):
        return "val"
    if split == "test" or (split == cfg.test_split and split not in ("train", "val")):
        return "test"
    raise SdiddError(f"split {shown(split)}: not a split of this dataset (it has {', '.join(described_splits(vars(cfg)))})")


def decode_once(dataset: DetectionDataset, cfg: DataConfig) -> DetectionDataset:
    """Decode every image once: refuse (or skip, by data.on_bad_data) bad ones, and keep the pixels if they fit.

    The pixels stay in memory when the split's decoded size is within `data.cache_gb`; loader workers
    started afterwards share them. Generated data (synthetic) is in memory already and is not checked.
    """
    if cfg.dataset == "synthetic":
        return dataset
    decoded_bytes = sum(3 * r.width * r.height for r in dataset.records)
    keep = decoded_bytes <= cfg.cache_gb * 2**30
    if not cfg.check and not keep:
        return dataset
    problems = Problems(strict=cfg.on_bad_data == "error", hint=_BAD_DATA_HINT)
    pixels, bad = check_images(dataset, problems, keep_pixels=keep, duplicates=False)
    if bad:  # only reached with data.on_bad_data=skip: strict problems raise on the first one
        first = next(iter(problems.examples.values()))[0]
        log.warning(f"warning: skipping {len(bad)} unreadable or mis-sized images (data.on_bad_data=skip), e.g. {first}")
        dataset = dataset.with_records([r for r in dataset.records if r.image_id not in bad])
    dataset.pixels = pixels
    return dataset


def load_run_data(cfg: DataConfig) -> RunData:
    """Parse, check and (memory permitting) decode both splits once for a whole run."""
    train = decode_once(load_split(cfg, cfg.train_split), cfg)
    sizes = choose_image_size(cfg, train.records)[:2]  # the recipe's sizes, or from the data when it leaves them unset
    return dataclasses.replace(_splits(cfg, train), train_sizes=sizes[0], test_size=sizes[1])


def _splits(cfg: DataConfig, train: DetectionDataset) -> RunData:
    """The run's splits around its (decoded) training split."""
    if cfg.val_fraction > 0:  # choose hyper-parameters here: the test split is not even read
        train, val = hold_out(train, cfg.val_fraction)
        return RunData(list(train.classes), train, val)
    if cfg.dataset in FORMATS:
        have = described_splits(vars(cfg))
        val = decode_once(load_split(cfg, "val"), cfg) if "val" in have else None
        if val is not None:
            val.name = "val split"
        if "test" in have:
            test = decode_once(load_split(cfg, "test"), cfg)
        else:  # measured on the val split then, and the reports say so; without either, add-classes says so
            test = val if val is not None else DetectionDataset(train.classes, [], name="no test split")
        return RunData(list(train.classes), train, test, val)
    # The test images too: an unreadable one would otherwise stop the run at the final evaluation, after training.
    test = decode_once(load_split(cfg, cfg.test_split), cfg)
    return RunData(list(train.classes), train, test)


VAL_SEED = 20260  # one validation split per dataset, whatever train.seed: methods and seeds are compared on the same images


def hold_out(train: DetectionDataset, fraction: float, announce: bool = True) -> tuple[DetectionDataset, DetectionDataset]:
    """Split `train` into (the rest, a validation split of round(fraction * n) seeded-random images)."""
    n = len(train.records)
    k = int(round(fraction * n))
    if k < 1 or k >= n:
        raise SdiddError(f"data.val_fraction={fraction}: holds out {k} of the {n} training images; "
                         "it must leave at least one image on each side")
    chosen = set(np.random.default_rng(VAL_SEED).choice(n, k, replace=False).tolist())
    rest = train.with_records([r for i, r in enumerate(train.records) if i not in chosen])
    val = train.with_records([r for i, r in enumerate(train.records) if i in chosen])
    val.name = f"validation split ({k} of the {n} training images, data.val_fraction={fraction})"
    if announce:
        log.info(f"evaluating on a validation split: {k} of the {n} training images held out (seed {VAL_SEED}), "
                 f"training on the other {n - k}; the test split is not read")
    return rest, val


def default_eval_split(d: DataConfig) -> str:
    """The split an evaluation reads when none is named: a run's held-out images (`data.val_fraction`), else the test
    split, or a described dataset's val split when it has no test split."""
    if d.val_fraction > 0:  # the run chose its settings there; the test split only when asked for (--split test)
        return "val"
    if d.dataset in FORMATS and "test" not in described_splits(vars(d)) and "val" in described_splits(vars(d)):
        return "val"
    return d.test_split


def load_eval_split(cfg: DataConfig, split: str) -> DetectionDataset:
    """One split to evaluate on, decoded; 'val' of a run that held out `data.val_fraction` is its held-out images."""
    if cfg.val_fraction > 0 and split in ("val", "valid", "validation"):
        val = hold_out(load_split(cfg, cfg.train_split), cfg.val_fraction, announce=False)[1]
        return decode_once(val, cfg)
    return decode_once(load_split(cfg, split), cfg)


def channel_view(dataset: DetectionDataset, channels: list[str], keep: list[str] | None = None,
                 keep_empty: bool = False) -> DetectionDataset:
    """The boxes of classes `keep` (default: all of `channels`) labelled with their model channel = index in `channels`.

    Classes are matched by name: a dataset class that is no channel is dropped, and a channel the dataset
    lacks (an old class in a new-class dataset) simply has no box. Background images (no box at all: no defect)
    are kept, since they teach "no defect here"; images whose boxes are all of other classes are dropped unless
    `keep_empty` (test sets keep every image): their defects are not this view's to learn, nor background.
    """
    kept = list(channels if keep is None else keep)
    missing = [c for c in kept if c not in dataset.classes and keep is not None]
    if missing:
        raise SdiddError(f"class {missing[0]!r} is not in the dataset (classes: {', '.join(dataset.classes)})")
    lut = np.full(max(len(dataset.classes), 1), -1, dtype=np.int64)
    for i, c in enumerate(channels):
        if c in kept and c in dataset.classes:
            lut[dataset.classes.index(c)] = i
    records = []
    for r in dataset.records:
        new = lut[r.labels] if len(r.labels) else r.labels
        m = new >= 0
        if m.any() or keep_empty or len(r.labels) == 0:
            records.append(dataclasses.replace(r, boxes=r.boxes[m], labels=new[m]))
    out = dataset.with_records(records)
    out.classes = list(channels)
    return out


def only_images_of(view: DetectionDataset, full: DetectionDataset, allowed: set[str]) -> DetectionDataset:
    """`view`'s images whose every box in `full` (the same images with all their labels) is of a class in `allowed`.

    Used to measure a model on the images without a defect it does not know (or without an old one): `view` may
    have dropped those boxes, so the labels are read from `full`, matched by image id.
    """
    foreign = {r.image_id for r in full.records if any(full.classes[int(c)] not in allowed for c in r.labels)}
    return view.with_records([r for r in view.records if r.image_id not in foreign])


def cut_new_images(dataset: DetectionDataset, classes: list[str], n: int, seed: int,
                   keep_other_boxes: bool = False) -> DetectionDataset:
    """Keep `n` seeded-random images among those holding a box of `classes` (the others stay): the small-data protocol.

    An image not chosen is dropped, or with `keep_other_boxes` (joint training, which also learns the old classes)
    kept with its boxes of other classes only, as the teacher saw it: the old classes keep all their images and
    labels, and only `classes` are cut down to `n` labelled images.
    """
    ids = [dataset.classes.index(c) for c in classes if c in dataset.classes]
    holders = [i for i, r in enumerate(dataset.records) if np.isin(r.labels, ids).any()]
    if n >= len(holders):
        return dataset
    chosen = set(np.asarray(holders)[np.random.default_rng(seed).choice(len(holders), n, replace=False)].tolist())
    holder_set = set(holders)
    records = []
    for i, r in enumerate(dataset.records):
        if i not in holder_set or i in chosen:
            records.append(r)
        elif keep_other_boxes:
            other = ~np.isin(r.labels, ids)
            if other.any():
                records.append(dataclasses.replace(r, boxes=r.boxes[other], labels=r.labels[other]))
    log.info(f"small-data protocol: {n} of the {len(holders)} training images holding a box of {', '.join(classes)} "
             f"(incremental.new_images={n}, seed {seed})"
             + (f"; the other {len(holders) - n} keep their boxes of other classes" if keep_other_boxes else ""))
    return dataset.with_records(records)


def default_workers(cached: bool) -> int:
    """Loader processes when train.workers is unset: none when pixels are in memory (resizing is cheap), else half the cores."""
    return 0 if cached else max(1, min(4, (os.cpu_count() or 2) // 2))


def train_loader(dataset: DetectionDataset, cfg: DataConfig, batch_size: int, workers: int | None, seed: int) -> DataLoader:
    """Shuffled (DistributedSampler: one process is rank 0 of 1), multi-scale + flip augmented, padded batches."""
    dataset.transform = TrainTransform(cfg.train_sizes, cfg.max_size, cfg.flip)
    collate_fn = collate
    if cfg.device_transforms:  # raw images; the trainer resizes / flips each batch on its device (gpu_batches.py)
        from .gpu_batches import DeviceBatches
        dataset.transform, collate_fn = None, DeviceBatches(cfg.train_sizes, cfg.max_size, cfg.flip)
    # Under torchrun every rank walks the same seeded permutation, dealt round-robin, so W ranks x batch b see
    # the images one process sees with batch W x b; set_epoch reseeds it, so a resumed run has the same order.
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=True, seed=seed)
    n = len(sampler)
    workers = default_workers(dataset.in_memory) if workers is None else workers
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                      drop_last=n >= 2 * batch_size, pin_memory=torch.cuda.is_available())


def test_loader(dataset: DetectionDataset, cfg: DataConfig, batch_size: int, workers: int | None) -> DataLoader:
    """Ordered, single-scale batches; under torchrun each rank takes every W-th image."""
    dataset.transform = EvalTransform(cfg.test_size, cfg.max_size)
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=False)
    workers = default_workers(dataset.in_memory) if workers is None else workers
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate)
