"""torch.distributed helpers for runs launched with torchrun (one process per GPU, or gloo on CPU).

Batch semantics: `train.batch_size` is the batch of *one rank* (as mmdetection's samples_per_gpu), so a
run on W processes trains with a global batch of `batch_size x W` and the same number of iterations per
epoch as one process with that global batch. `train.lr` is used as given (no automatic scaling): it is
the lr of the global batch, so keep the global batch when you move a config to more GPUs, or scale the
lr yourself (linear rule). `train.warmup_iters` and `milestones` count the same iterations/epochs.

What a DDP run does, and why it matches a single process with `batch_size x W` up to float rounding:

* Training data: torch's DistributedSampler (a single process is rank 0 of 1): every rank walks the
  *same* seeded epoch permutation, padded to a multiple of W and dealt round-robin, so global batch i
  holds the same images as batch i of one process with `batch_size x W` (`run_data.train_loader`).
* Gradients are averaged over ranks by DDP; the GFL normalisers (positives, summed positive scores)
  are all-reduced in `gfl_loss`, so the averaged gradient is the one-process gradient. Every trainable
  parameter reaches the loss in every step, hence find_unused_parameters=False.
* BatchNorm is frozen (model.norm_eval, the default), so there is no SyncBN; GroupNorm in the head is
  per image. With norm_eval=false each rank would normalise by its own batch's statistics.
* What still differs: augmentation draws are seeded per rank (`rank_seed_offset`), images are padded
  to the largest of the rank's batch rather than of the global batch, the ranks' gradients are summed in
  another order, and the distillation terms of incremental steps are normalised per rank. With one
  train size and flip=0 on equal-size images (tests/test_distributed.py) only the rounding remains.
* Evaluation: rank r detects images r, r + W, r + 2W, ... (DistributedSampler without shuffling; its
  padding repeats an image, which the gather by image id absorbs); `gather_dict` unites the
  detections, then every rank runs pycocotools on all of them.
* Only rank 0 prints results and writes logs, metrics, plots and checkpoints (`is_main`), from the unwrapped
  model (no `module.` prefix); the other ranks wait at a `barrier` until it has written them. Logged
  losses are the mean over ranks (`reduce_log`). Resume: every rank loads the same last.pth.
* Backend: nccl when the run's device is a GPU (each rank on cuda:LOCAL_RANK), gloo on CPU.
"""
from __future__ import annotations

import atexit
import os
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn


def is_dist() -> bool:
    """True inside an initialised process group."""
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    """Number of processes (1 outside torchrun)."""
    return tdist.get_world_size() if is_dist() else 1


def rank() -> int:
    """This process's global rank (0 outside torchrun)."""
    return tdist.get_rank() if is_dist() else 0


def is_main() -> bool:
    """Only rank 0 prints, logs and writes checkpoints."""
    return rank() == 0


def _destroy() -> None:
    """Leave the process group at interpreter exit (silences the 'not destroyed' warning)."""
    if is_dist():
        try:
            tdist.destroy_process_group()
        except Exception:  # pragma: no cover - best effort at exit
            pass


def local_rank() -> int:
    """This process's rank on its node (torchrun's LOCAL_RANK; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device: str = "auto") -> bool:
    """Join the process group torchrun describes in the environment; no-op for a single process.

    `device` is the run's train.device: nccl (one GPU per rank) when it resolves to CUDA, else gloo,
    so device=cpu on a GPU machine still works (nccl cannot reduce CPU tensors).
    """
    if is_dist() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_dist()
    cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if cuda:
        torch.cuda.set_device(local_rank())  # before init: nccl binds the rank to the current device
    tdist.init_process_group("nccl" if cuda else "gloo")
    atexit.register(_destroy)
    return True


def device_for_rank(name: str) -> str:
    """Each rank uses the GPU of its LOCAL_RANK ('auto', 'cuda' and 'cuda:N' alike); 'cpu' stays."""
    if is_dist() and torch.cuda.is_available() and (name == "auto" or name.startswith("cuda")):
        return f"cuda:{local_rank()}"
    return name


def rank_seed_offset() -> int:
    """Added to the per-epoch augmentation seed, so ranks draw different flips/scales (0 on rank 0)."""
    return 1_000_003 * rank()


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


def reduce_log(parts: dict[str, Any]) -> dict[str, float]:
    """Logged values as floats in one device-to-host copy: the mean over ranks (sum for counts 'n_*'); every rank must call it."""
    if not parts:
        return {}
    keys = list(parts)
    dev = next((v.device for v in parts.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    vals = torch.stack([torch.as_tensor(parts[k]).detach().to(dev, torch.float64).reshape(()) for k in keys])
    if is_dist():
        if tdist.get_backend() == "nccl":
            vals = vals.to(torch.device("cuda", torch.cuda.current_device()))
        else:
            vals = vals.cpu()
        tdist.all_reduce(vals)
    w = world_size()
    return {k: (v if k.startswith("n_") else v / w) for k, v in zip(keys, vals.tolist())}


def any_rank(flag: torch.Tensor) -> bool:
    """True if `flag` (a bool scalar) is true on any rank; every rank must call it (single process: the flag)."""
    if not is_dist():
        return bool(flag)
    dev = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")
    t = flag.detach().to(dev, torch.int32).reshape(1)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP-wrap the student under torchrun (identity otherwise); the caller keeps the unwrapped module for eval and saving."""
    if not is_dist():
        return model
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    # find_unused_parameters=False: every trainable parameter gets a gradient in every step (gfl_loss keeps
    # the regression branch in the graph even without positives), and the unused-parameter search costs a
    # graph traversal per step. Frozen BN needs no SyncBN; DDP broadcasts rank 0's weights at wrap time.
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if is_dist():
        if tdist.get_backend() == "nccl":
            tdist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            tdist.barrier()
