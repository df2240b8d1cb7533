"""Feature pyramid: C3-C5 lateral + top-down, P6/P7 from the P5 output (GFL's 'on_output')."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FPN(nn.Module):
    """FPN producing P3-P7 with `channels` channels each (no norm, nearest upsampling)."""

    def __init__(self, in_channels: list[int], channels: int = 256, num_outs: int = 5) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)
        # Extra levels are stride-2 convs on the previous output, no ReLU in between (as in GFL).
        self.extra = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, stride=2, padding=1) for _ in range(num_outs - len(in_channels))
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        """Map backbone features (strides 8/16/32) to pyramid levels P3..P7."""
        laterals = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.output, laterals)]
        # P6/P7 in fp32 on CPU: oneDNN's bf16 backward of a stride-2 conv over a map one pixel wide returns non-finite
        # weight gradients at random (about one call in five; small inputs make P5/P6 that narrow). The maps are tiny.
        on_cpu = outs[-1].device.type == "cpu"
        with torch.autocast("cpu", enabled=False) if on_cpu else contextlib.nullcontext():
            for conv in self.extra:
                outs.append(conv(outs[-1].float() if on_cpu else outs[-1]))
        return outs
