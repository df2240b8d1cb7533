"""torch.distributed helpers for runs launched with torchrun (one process per GPU, or gloo on CPU)."""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn
from torch.utils.data import Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler


def is_dist() -> bool:
    """True inside an initialised process group."""
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    return tdist.get_world_size() if is_dist() else 1


def rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def is_main() -> bool:
    """Only rank 0 prints, logs and writes checkpoints."""
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment; no-op for a single process."""
    if is_dist() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_dist()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tdist.init_process_group(backend)
    return True


def device_for_rank(name: str) -> str:
    """Each rank uses its own GPU."""
    if is_dist() and torch.cuda.is_available() and name in ("auto", "cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return name


class _ShardedEpochSampler(DistributedSampler):
    """DistributedSampler whose shuffle seed also follows the run seed (resumable like the single-process one)."""


def train_sampler(dataset: Dataset, seed: int) -> Sampler | None:
    """A DistributedSampler under torchrun, else None (the caller's own sampler)."""
    if not is_dist():
        return None
    return _ShardedEpochSampler(dataset, shuffle=True, seed=seed, drop_last=False)


def eval_sampler(dataset: Dataset) -> Sampler | None:
    """Each rank evaluates a disjoint, ordered shard."""
    if not is_dist():
        return None
    n, r, w = len(dataset), rank(), world_size()
    return list(range(r, n, w))  # type: ignore[return-value]


def gather_dict(d: dict[Any, Any]) -> dict[Any, Any]:
    """Union of every rank's dict (detections by image id)."""
    if not is_dist():
        return d
    parts: list[dict] = [None] * world_size()  # type: ignore[list-item]
    tdist.all_gather_object(parts, d)
    out: dict[Any, Any] = {}
    for p in parts:
        out.update(p)
    return out


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP-wrap for training under torchrun; frozen BN needs no SyncBN."""
    if not is_dist():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def barrier() -> None:
    if is_dist():
        tdist.barrier()
