"""Replay: a few kept old images, with their old-class labels, join an incremental step.

Many lines keep some images of the defects a model already knows. `incremental.replay_images=N` draws N of them
per old class and mixes them into the step: on those images the old classes train from their labels (QFL, GIoU,
DFL), and the new classes learn one thing only: an old defect is not a new one (their scores go to 0 on the anchors
of the old boxes; elsewhere they are not supervised, since the old images were not labelled for the new classes).
That is the confusion a new-class-only step cannot learn: its images show no old defect, so its new classes fire
on them. On the new images nothing changes; distillation runs on every image. N = 0 is the data-free default.

The choice rule, seeded by the step (`train.seed + step`), so every method of a benchmark replays the same
images: for each old class in channel order, the images already chosen that hold the class count towards
its N; the rest is drawn at random among the images holding a box of the class, never an image of the step's
own training set. A class with fewer images than N replays all of them. `incremental.replay_repeat=k` puts each
replayed image k times into every epoch (oversampling, so a few kept images weigh more beside hundreds of new ones).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import numpy as np
import torch

from ..data import DetectionDataset
from ..errors import SdiddError

log = logging.getLogger(__name__)


def choose_replay(dataset: DetectionDataset, old_channels: int, n: int, seed: int,
                  exclude: frozenset[int] = frozenset()) -> list[int]:
    """Indices into `dataset` (labels = model channels) of the replayed images: `n` per channel < `old_channels`."""
    rng = np.random.default_rng(seed)
    holds = [set(np.unique(r.labels[r.labels < old_channels]).tolist()) if r.image_id not in exclude else set()
             for r in dataset.records]
    chosen: list[int] = []
    for c in range(old_channels):
        have = sum(c in holds[i] for i in chosen)
        taken = set(chosen)
        candidates = [i for i, h in enumerate(holds) if c in h and i not in taken]
        take = min(max(n - have, 0), len(candidates))
        if take:
            chosen += sorted(rng.choice(candidates, take, replace=False).tolist())
    return chosen


def with_replay(train_set: DetectionDataset, old_data: DetectionDataset, old_channels: int, n: int,
                seed: int, repeat: int = 1) -> tuple[DetectionDataset, frozenset[int]]:
    """`train_set` plus `n` replayed images per old class from `old_data` (both in model channels), each `repeat`
    times; their image ids.

    `old_data` holds old-class boxes only (a `channel_view` keeping the old classes). Its image ids must not clash
    with the training set's unless they are the same images (the teachers' caches are keyed by image id).
    """
    own = frozenset(r.image_id for r in train_set.records)
    picked = [old_data.records[i] for i in choose_replay(old_data, old_channels, n, seed, exclude=own)]
    if not picked:
        raise SdiddError(f"incremental.replay_images={n}: {old_data.name or 'the old data'} holds no image of an old "
                         "class outside the step's own images")
    merged = train_set.with_records(list(train_set.records) + picked * repeat)  # copies share an id: one image
    if old_data.pixels is not train_set.pixels:  # another dataset (add-classes --replay): both pixel caches
        merged.pixels = {**train_set.pixels, **old_data.pixels}
    copies = f", each {repeat} times per epoch" if repeat > 1 else ""
    log.info(f"replay: {len(picked)} old images ({n} per old class, seed {seed}{copies}) with "
             f"{sum(len(r.labels) for r in picked)} old-class boxes join the step's {len(train_set)} images")
    return merged, frozenset(r.image_id for r in picked)


def offset_ids(dataset: DetectionDataset, start: int) -> DetectionDataset:
    """A copy of `dataset` whose image ids (and pixel cache keys) start at `start`: another dataset's ids then cannot clash."""
    base = min((r.image_id for r in dataset.records), default=0)
    shift = start - base
    out = dataset.with_records([dataclasses.replace(r, image_id=r.image_id + shift) for r in dataset.records])
    out.pixels = {k + shift: v for k, v in dataset.pixels.items()}
    return out


def batch_channels(trained: torch.Tensor, replay_channels: Optional[torch.Tensor], replay_ids: frozenset[int],
                   image_ids: list[int]) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per image of a batch: (channels its labels supervise everywhere [B, C], channels supervised on its positive
    anchors only [B, C] or None, which images are replayed [B, 1] or None); all but the first None without replay.

    A replayed image supervises `replay_channels` (the old classes) everywhere and the others at its old boxes' anchors.
    """
    if replay_channels is None or not replay_ids:
        return trained, None, None
    replayed = torch.tensor([i in replay_ids for i in image_ids], device=trained.device)[:, None]
    everywhere = torch.where(replayed, replay_channels[None], trained[None])
    return everywhere, replayed & ~replay_channels[None], replayed
