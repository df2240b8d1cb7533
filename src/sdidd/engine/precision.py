"""Mixed precision on CPU and CUDA: which devices run bf16 autocast, and the fp32 view the losses read.

The network's forward (student, teachers) runs under bf16 autocast where the hardware has bf16 arithmetic:
CUDA, and CPUs whose oneDNN reports native bf16 (AVX-512 BF16 / AMX). Elsewhere bf16 would be emulated and
slower than fp32, so autocast stays off. The losses, the mu+2sigma selections and the metric always run
in fp32: :func:`float_output` casts a forward's outputs before they reach the objective (the cast is part
of the autograd graph, so the backward still flows into the bf16 convolutions).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Optional

import torch

from ..model.detector import DenseOutput

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 natively (oneDNN's check: AVX-512 BF16 or AMX); False when it cannot tell."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # older or unusual builds: stay in fp32
        return False


def amp_enabled(amp: bool, device: torch.device) -> bool:
    """Whether a forward on `device` runs under bf16 autocast when the config asks for `amp`."""
    if not amp:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_has_bf16()


@dataclasses.dataclass(frozen=True)
class TrainMode:
    """How a training step's networks run: bf16 autocast or fp32, NHWC (channels_last) or NCHW."""

    amp: bool
    channels_last: bool
    note: str = dataclasses.field(default="", compare=False)  # why a requested bf16 does not run

    def __str__(self) -> str:
        return (("bf16 autocast (losses fp32)" if self.amp else "fp32") + (f" ({self.note})" if self.note else "")
                + (", channels_last" if self.channels_last else ""))


def train_mode(amp: Optional[bool], channels_last: Optional[bool], device: torch.device) -> TrainMode:
    """The config's `train.amp` / `train.channels_last`, each left None taking the fastest measured on `device`.

    On CPU that is fp32 in channels_last: the training loop of NEU-DET quick ran 1.17-1.31x fp32's speed in NHWC at
    160 and 320 px, batch 8 and 16, ahead of bf16 at batch 8 (docs/results/train_modes_cpu_neu-det.md):
    the loop is bound by memory traffic in depthwise convolutions and normalisation, not by matmul throughput.
    On CUDA: bf16 autocast, NCHW (channels_last is the GPU recipe's own choice).
    """
    cpu = device.type == "cpu"
    use_amp = amp_enabled(not cpu if amp is None else amp, device)
    note = "this CPU has no native bf16" if amp and cpu and not use_amp else ""
    return TrainMode(use_amp, cpu if channels_last is None else bool(channels_last), note)


def for_inference(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A loaded model (in place) in the fastest fp32 layout measured for inference on `device`: NHWC on CPU.

    `GFL.predict` of a trained NEU-DET model ran 1.05-1.37x faster in channels_last on CPU, in the same fp32
    (docs/results/inference_speed_cpu_nhwc.md); on CUDA the model stays as loaded.
    """
    if device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast on `device` (a no-op context when not enabled)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def float_output(out: DenseOutput) -> DenseOutput:
    """`out` with its logits and FPN features in fp32 (no copy for tensors already fp32)."""
    if out.cls.dtype == torch.float32 and out.reg.dtype == torch.float32 and all(f.dtype == torch.float32 for f in out.feats):
        return out
    return dataclasses.replace(out, cls=out.cls.float(), reg=out.reg.float(), feats=[f.float() for f in out.feats])


def describe(amp: bool, device: torch.device) -> str:
    """One phrase for reports: the precision a forward on `device` runs in when `amp` is asked for."""
    if amp_enabled(amp, device):
        return "bf16 autocast (losses fp32)"
    if amp and device.type == "cpu":
        return "fp32 (this CPU has no native bf16)"
    return "fp32"
