"""Training speed: our GFL train step vs torchvision's FCOS, and the cost of ERD / SD-IDD distillation.

Both detectors share one backbone + FPN implementation (sdidd's timm backbone and FPN, P3-P7), so the
difference is the head, the target assignment and the loss. A full train step is timed: forward, loss,
backward and SGD step, on random images with 1-4 random boxes each, after warm-up iterations.
The incremental rows add what a distillation step adds: a frozen teacher's forward pass (old classes =
the first half) and the ERD or SD-IDD losses; their ratio to the fine-tune step (which runs no teacher)
is the distillation overhead, and the teacher's forward is timed alone to split it into forward and terms.

    python benchmarks/train_speed.py --device cpu --size 160 --batch 8 --iters 10 --rounds 7
    python benchmarks/train_speed.py --device cuda --size 800 --batch 16 --iters 30 --backbone tf_efficientnet_lite2 --head-channels 256 --head-convs 4

Writes docs/results/train_speed_<device>.md (command, machine, date, images/s of both).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import platform
import statistics
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.fcos import FCOSHead

from sdidd.config import LossConfig, config_from_dict
from sdidd.methods import qfl_weight, resolved_distill
from sdidd.engine import precision
from sdidd.engine.objective import step_loss
from sdidd.engine.incremental import extend_student, freeze_teacher
from sdidd.model.detector import DetectorConfig, build_detector
from timing import command_line, matmul_gflops, seconds_per_call, step_flops  # benchmarks/timing.py (this script's folder is on sys.path)


class _FeatureExtractor(nn.Module):
    """sdidd backbone + FPN behind torchvision's backbone interface (OrderedDict of maps, `out_channels`)."""

    def __init__(self, gfl: nn.Module) -> None:
        super().__init__()
        self.backbone, self.fpn = gfl.backbone, gfl.fpn
        self.out_channels = gfl.cfg.fpn_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return OrderedDict((str(i), f) for i, f in enumerate(self.fpn(self.backbone(x))))


def _batch(n: int, size: int, num_classes: int, gen: torch.Generator) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Random images (0-255) with 1-4 random boxes of 16-50% of the side per image."""
    images = torch.rand(n, 3, size, size, generator=gen) * 255
    boxes, labels = [], []
    for _ in range(n):
        k = int(torch.randint(1, 5, (1,), generator=gen))
        wh = (torch.rand(k, 2, generator=gen) * 0.34 + 0.16) * size
        xy = torch.rand(k, 2, generator=gen) * (size - wh)
        boxes.append(torch.cat([xy, xy + wh], 1))
        labels.append(torch.randint(0, num_classes, (k,), generator=gen))
    return images, boxes, labels


def _pad(boxes: list[Tensor], labels: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The loader's padded form: [B, G, 4] boxes, [B, G] labels (-1 = padding)."""
    g, device = max(len(b) for b in boxes), boxes[0].device
    pad_boxes = torch.zeros(len(boxes), g, 4, device=device)
    pad_labels = torch.full((len(boxes), g), -1, dtype=torch.long, device=device)
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        pad_boxes[i, : len(b)], pad_labels[i, : len(lab)] = b, lab
    return pad_boxes, pad_labels


def padded_batch(n: int, size: int, num_classes: int, gen: torch.Generator,
                 device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(images, boxes [B,G,4], labels [B,G], sizes [B,2]) of :func:`_batch` in the engine's padded form on `device`."""
    images, boxes, labels = _batch(n, size, num_classes, gen)
    pad_boxes, pad_labels = _pad(boxes, labels)
    sizes = torch.tensor([[size, size]] * n)
    return images.to(device), pad_boxes.to(device), pad_labels.to(device), sizes.to(device)


def main(argv: list[str] | None = None) -> int:
    """Time both detectors and write the Markdown report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--fpn-channels", type=int, default=128)
    p.add_argument("--head-channels", type=int, default=128)
    p.add_argument("--head-convs", type=int, default=2)
    p.add_argument("--num-classes", type=int, default=6)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median round is reported")
    p.add_argument("--amp", action="store_true", help="bf16 autocast of the forward (CUDA, and CPUs with native bf16)")
    p.add_argument("--channels-last", action="store_true", help="NHWC images and weights (every model alike)")
    p.add_argument("--out", default=None, help="Markdown path (default docs/results/train_speed_<device>.md)")
    a = p.parse_args(argv)
    if a.head_channels != a.fpn_channels:
        p.error("torchvision's FCOS head works at the FPN width: use --head-channels equal to --fpn-channels")
    device = torch.device(a.device)
    use_amp = precision.amp_enabled(a.amp, device)
    gen = torch.Generator().manual_seed(0)
    images, boxes, labels = _batch(a.batch, a.size, a.num_classes, gen)
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    images = images.to(device).contiguous(memory_format=fmt)
    boxes = [b.to(device) for b in boxes]
    labels = [lab.to(device) for lab in labels]
    pad_boxes, pad_labels = _pad(boxes, labels)
    sizes = torch.tensor([[a.size, a.size]] * a.batch, device=device)
    all_channels = torch.ones(a.num_classes, dtype=torch.bool, device=device)
    cfg = DetectorConfig(num_classes=a.num_classes, backbone=a.backbone, pretrained=False, fpn_channels=a.fpn_channels,
                         head_channels=a.head_channels, head_convs=a.head_convs)

    gfl = build_detector(cfg).to(device, memory_format=fmt).train()
    opt = torch.optim.SGD([q for q in gfl.parameters() if q.requires_grad], lr=1e-3, momentum=0.9)
    loss_cfg = LossConfig()

    def gfl_step() -> None:
        with precision.autocast(device, use_amp):
            out = gfl(images)
        loss, _ = step_loss(precision.float_output(out), None, pad_boxes, pad_labels, sizes, all_channels, loss_cfg, 1.0, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    fcos_base = build_detector(cfg)
    fcos = FCOS(_FeatureExtractor(fcos_base), num_classes=a.num_classes, min_size=a.size, max_size=a.size,
                image_mean=[m / 255 for m in fcos_base.backbone.mean], image_std=[s / 255 for s in fcos_base.backbone.std],
                head=FCOSHead(a.fpn_channels, 1, a.num_classes, num_convs=a.head_convs)).to(device, memory_format=fmt).train()
    fopt = torch.optim.SGD([q for q in fcos.parameters() if q.requires_grad], lr=1e-3, momentum=0.9)
    fimages = [im / 255 for im in images]  # torchvision detectors take 0-1 images
    ftargets = [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]

    def fcos_step() -> None:
        with precision.autocast(device, use_amp):  # torchvision's FCOS computes its losses inside its forward
            loss = sum(fcos(fimages, ftargets).values())
        fopt.zero_grad(set_to_none=True)
        loss.backward()
        fopt.step()

    # Incremental step: old = first half of the classes; the student learns the rest from GT + distillation.
    num_old = a.num_classes // 2
    teacher = freeze_teacher(build_detector(dataclasses.replace(cfg, num_classes=num_old)).to(device, memory_format=fmt))
    full_cfg = config_from_dict({})
    # New-class channels num_old.. get the GT boxes (labels folded onto them), old channels only distillation.
    new_labels = torch.where(pad_labels >= 0, num_old + pad_labels % (a.num_classes - num_old), pad_labels)
    trained = torch.arange(a.num_classes, device=device) >= num_old

    def teacher_forward() -> None:
        with torch.no_grad(), precision.autocast(device, use_amp):
            teacher(images)

    with torch.no_grad(), precision.autocast(device, use_amp):
        cached = teacher(images)  # what a warm teacher cache hands the step (engine/teacher_cache.py)

    def incremental_step(method: str, teacher_cached: bool = False):
        student = extend_student(teacher, a.num_classes).to(device, memory_format=fmt).train()
        sopt = torch.optim.SGD([q for q in student.parameters() if q.requires_grad], lr=1e-3, momentum=0.9)
        distill = None if method == "finetune" else resolved_distill(full_cfg, method)
        weight = qfl_weight(full_cfg, method)

        def step() -> None:
            with precision.autocast(device, use_amp):
                out = student(images)
                t_out = None
                if distill is not None:  # fine-tune runs no teacher, as in the engine
                    with torch.no_grad():
                        t_out = cached if teacher_cached else teacher(images)
            t_out = precision.float_output(t_out) if t_out is not None else None
            loss, _ = step_loss(precision.float_output(out), t_out, pad_boxes, new_labels, sizes, trained, loss_cfg, weight, distill)
            sopt.zero_grad(set_to_none=True)
            loss.backward()
            sopt.step()
        return step

    # The loss alone (forward + backward from fixed network outputs), with and without SD-IDD's terms:
    # their difference is what the distillation terms cost, free of the network's run-to-run noise.
    probe = extend_student(teacher, a.num_classes).to(device).train()
    with torch.no_grad():
        s_fix, t_fix = probe(images), teacher(images)

    def loss_only(method: str):
        distill = None if method == "finetune" else resolved_distill(full_cfg, method)

        def step() -> None:
            cls, reg = s_fix.cls.clone().requires_grad_(), s_fix.reg.clone().requires_grad_()
            feats = [f.clone().requires_grad_() for f in s_fix.feats]
            out = dataclasses.replace(s_fix, cls=cls, reg=reg, feats=feats)
            loss, _ = step_loss(out, t_fix if distill else None, pad_boxes, new_labels, sizes, trained, loss_cfg,
                                qfl_weight(full_cfg, method), distill)
            loss.backward()
        return step

    steps = {"sdidd GFL": gfl_step, "torchvision FCOS": fcos_step,
             "incremental: fine-tune": incremental_step("finetune"),
             "incremental: ERD": incremental_step("erd"), "incremental: SD-IDD": incremental_step("sdidd"),
             "incremental: SD-IDD, teacher cached": incremental_step("sdidd", teacher_cached=True),
             "teacher forward alone": teacher_forward,
             "loss alone: GFL": loss_only("finetune"), "loss alone: GFL + SD-IDD terms": loss_only("sdidd")}
    # Rounds interleave the steps, so a slow spell of a shared machine hits all of them; the median is reported.
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(a.rounds):
        for name, step in steps.items():
            seconds[name].append(seconds_per_call(step, a.iters, a.warmup if r == 0 else 1, device))
            print(f"round {r + 1}/{a.rounds} {name}: {a.batch / seconds[name][-1]:.2f} img/s")
    rows = [(name, a.batch / statistics.median(sec)) for name, sec in seconds.items()]
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    out = Path(a.out or f"docs/results/train_speed_{device.type}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# Training speed: sdidd GFL vs torchvision FCOS ({device.type})", "",
             f"- Command: `{command_line(__file__, argv)}`",
             f"- Machine: {machine}; torch {torch.__version__}", f"- Date: {dt.date.today().isoformat()}",
             f"- Setting: {a.backbone} (random init), FPN P3-P7 {a.fpn_channels} ch, head {a.head_convs} convs, "
             f"{a.size}x{a.size} px, batch {a.batch}, {a.num_classes} classes, precision: {precision.describe(a.amp, device)}"
             f"{', channels_last' if a.channels_last else ''}; "
             f"full train step (forward + loss + backward + SGD), mean of {a.iters} steps, median of {a.rounds} interleaved rounds "
             f"after {a.warmup} warm-up steps",
             f"- Budget: every row runs the same iterations on the same batch: {a.warmup} warm-up + {a.iters} timed steps in the "
             f"first round and 1 + {a.iters} in each of the other {a.rounds - 1}, i.e. {a.warmup + a.iters + (a.rounds - 1) * (1 + a.iters)} "
             "iterations per row (one fixed random batch, no dataset, so no epochs); no training to convergence, no metric.",
             "- Seeds: one process, one random initialisation (seed 0), timed as the median of interleaved rounds; no seed "
             "repetition. The images/s and the ratios between rows are one run's and move by about ±0.1 (ratio) between runs "
             "on a shared machine; they say what a step costs, not that one method is better than another.",
             "", "| detector | train images/s |", "|---|---|"]
    lines += [f"| {n} | {v:.2f} |" for n, v in rows]
    speed = dict(rows)
    lines += ["", f"Ratio GFL / FCOS: **{speed['sdidd GFL'] / speed['torchvision FCOS']:.2f}** (goal ≥ 1.0).",
              f"Distillation overhead, time per image vs fine-tune: ERD **{speed['incremental: fine-tune'] / speed['incremental: ERD']:.2f}**, "
              f"SD-IDD **{speed['incremental: fine-tune'] / speed['incremental: SD-IDD']:.2f}** (goal ≤ 1.25)."]
    t_ft, t_teacher = 1 / speed["incremental: fine-tune"], 1 / speed["teacher forward alone"]
    terms = 1 / speed["loss alone: GFL + SD-IDD terms"] - 1 / speed["loss alone: GFL"]
    lines += [f"SD-IDD step split (per image): fine-tune step {t_ft * 1e3:.1f} ms; the teacher's forward {t_teacher * 1e3:.1f} ms "
              f"({100 * t_teacher / t_ft:.1f} % of it); SD-IDD's distillation terms (forward + backward, timed on fixed network "
              f"outputs) {terms * 1e3:.2f} ms = **{100 * terms / t_ft:.1f} %** of a fine-tune step (goal ≤ 5 %)."]
    if device.type == "cpu":  # the distance to the machine's limit, as a number
        kind = "bf16" if use_amp else "fp32"
        peak = matmul_gflops(torch.bfloat16 if use_amp else torch.float32)
        achieved = step_flops(a.size, a.batch, cfg) / (a.batch / speed["sdidd GFL"]) / 1e9
        lines += [f"Machine limit: the GFL train step does {achieved:.0f} GFLOP/s (3 x the forward's counted FLOPs per step "
                  f"time); a 2048³ {kind} matmul on the same threads does {peak:.0f} GFLOP/s: the step reaches "
                  f"**{100 * achieved / peak:.0f} %** of it (depthwise convolutions, small feature maps and the loss are "
                  "memory-bound, not matmul-bound)."]
    cached = speed["incremental: SD-IDD, teacher cached"]
    lines += [f"With the teacher's outputs cached (`train.teacher_cache_gb`, a warm cache), SD-IDD's time per image vs "
              f"fine-tune: **{speed['incremental: fine-tune'] / cached:.2f}**."]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
