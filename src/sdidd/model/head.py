"""GFLv1 head: two conv towers, a class-score conv and a box-distribution conv shared over levels."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Scale(nn.Module):
    """A learnable scalar multiplying a level's box logits."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _num_groups(ch: int) -> int:
    """GFL's 32 groups; narrow heads keep >= 2 channels a group (a 1x1 P7 map needs > 1 value a group)."""
    g = min(32, max(ch // 2, 1))
    while ch % g:
        g -= 1
    return g


def _tower(in_ch: int, ch: int, num_convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(num_convs):
        layers += [nn.Conv2d(in_ch if i == 0 else ch, ch, 3, padding=1, bias=False), nn.GroupNorm(_num_groups(ch), ch), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class GFLHead(nn.Module):
    """Per level: cls tower -> C logits; reg tower -> 4 x (reg_max + 1) distribution logits."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 256,
        channels: int = 256,
        num_convs: int = 4,
        reg_max: int = 16,
        num_levels: int = 5,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.prior_prob = prior_prob
        self.cls_tower = _tower(in_channels, channels, num_convs)
        self.reg_tower = _tower(in_channels, channels, num_convs)
        self.gfl_cls = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.gfl_reg = nn.Conv2d(channels, 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.gfl_cls.bias, self.prior_bias)

    @property
    def prior_bias(self) -> float:
        """Bias so every class starts at sigmoid = prior_prob (-4.595 for 0.01)."""
        return -math.log((1 - self.prior_prob) / self.prior_prob)

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Return flattened cls logits [B, A, C] and box logits [B, A, 4, reg_max + 1]."""
        cls_out, reg_out = [], []
        for feat, scale in zip(feats, self.scales):
            b = feat.shape[0]
            cls = self.gfl_cls(self.cls_tower(feat))
            reg = scale(self.gfl_reg(self.reg_tower(feat)))
            cls_out.append(cls.flatten(2).transpose(1, 2))
            reg_out.append(reg.flatten(2).transpose(1, 2).reshape(b, -1, 4, self.reg_max + 1))
        return torch.cat(cls_out, 1), torch.cat(reg_out, 1)


def integral(reg_logits: Tensor) -> Tensor:
    """Expected distance of each side: softmax over bins 0..reg_max, in stride units. [..., 4, R+1] -> [..., 4]."""
    bins = torch.arange(reg_logits.shape[-1], device=reg_logits.device, dtype=reg_logits.dtype)
    return (reg_logits.softmax(-1) * bins).sum(-1)


def distance2bbox(points: Tensor, distances: Tensor) -> Tensor:
    """(l, t, r, b) distances from points -> xyxy boxes."""
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)


def bbox2distance(points: Tensor, boxes: Tensor, max_dist: float) -> Tensor:
    """xyxy boxes -> (l, t, r, b) distances from points, clamped to [0, max_dist]."""
    d = torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1)
    return d.clamp(min=0, max=max_dist)
