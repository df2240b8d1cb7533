"""Inference speed: images/s of predict-style inference (forward + the detector's post-processing) at batch 1 and 16.

Times `GFL.predict` (normalisation, backbone, FPN, head, decoding, score filter, NMS) on a fixed batch of
random 0-255 images after warm-up; image reading and resizing are not included. Either a checkpoint or
freshly built models of the default config (``sdidd.config.ModelConfig``) with each given backbone:

    python benchmarks/inference_speed.py --device cpu --size 320
    python benchmarks/inference_speed.py --device cuda --size 800 --iters 50
    python benchmarks/inference_speed.py --checkpoint runs/neu_det_quick/step1_sdidd/last.pth --device cuda

A fresh (random-init) head scores every anchor near its 0.01 prior, so almost no box passes the 0.05
score threshold and NMS costs next to nothing: give a trained checkpoint to time NMS realistically.
Writes docs/results/inference_speed_<device>.md (command, machine, date, torch version, table).
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
from pathlib import Path

import torch

from sdidd.config import ModelConfig
from sdidd.engine.checkpoint import load_checkpoint
from sdidd.engine.checkpoint import model_from_checkpoint
from sdidd.engine.precision import amp_enabled
from sdidd.model.detector import GFL, DetectorConfig, build_detector
from timing import command_line, seconds_per_call  # benchmarks/timing.py (this script's folder is on sys.path)

_BACKBONES = {"lite0": "tf_efficientnet_lite0", "lite1": "tf_efficientnet_lite1", "lite2": "tf_efficientnet_lite2",
              "resnet50": "resnet50"}


def _models(a: argparse.Namespace) -> list[tuple[str, GFL]]:
    """(description, model) pairs: the checkpoint's, or one fresh default-config model per backbone."""
    if a.checkpoint:
        state = load_checkpoint(a.checkpoint)
        d = state["detector"]
        return [(f"{a.checkpoint} ({d['backbone']}, {d['fpn_channels']}-ch FPN, {d['head_convs']}-conv head)", model_from_checkpoint(state))]
    m = ModelConfig()
    out = []
    for name in a.backbones.split(","):
        cfg = DetectorConfig(num_classes=a.num_classes, backbone=_BACKBONES.get(name, name), pretrained=False,
                             fpn_channels=m.fpn_channels, head_channels=m.head_channels, head_convs=m.head_convs)
        torch.manual_seed(0)
        out.append((f"{cfg.backbone} random init, {cfg.fpn_channels}-ch FPN, {cfg.head_convs}-conv head", build_detector(cfg)))
    return out


def _images_per_second(model: GFL, batch: int, size: int, iters: int, warmup: int, device: torch.device, amp: bool,
                       channels_last: bool = False) -> float:
    """Mean images/s of `model.predict` on one fixed batch, after `warmup` calls."""
    images = (torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    sizes = [(size, size)] * batch

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            model.predict(images, sizes)

    return batch / seconds_per_call(step, iters, warmup, device)


def main(argv: list[str] | None = None) -> int:
    """Time each model at each batch size and write the Markdown report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="time this checkpoint instead of fresh models")
    p.add_argument("--backbones", default="lite0,lite2", help="fresh models: comma-separated lite0/lite1/lite2/resnet50")
    p.add_argument("--num-classes", type=int, default=6)
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=320, help="square input side (a multiple of 32 avoids padding)")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA, and CPUs with native bf16)")
    p.add_argument("--channels-last", action="store_true", help="NHWC images and conv weights")
    p.add_argument("--out", default=None, help="Markdown path (default docs/results/inference_speed_<device>.md)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shape: let cuDNN pick its fastest kernels
    batches = [int(b) for b in a.batches.split(",")]
    rows = []
    for desc, model in _models(a):
        model = model.to(device).eval()
        if a.channels_last:
            model = model.to(memory_format=torch.channels_last)
        for b in batches:
            ips = _images_per_second(model, b, a.size, a.iters, a.warmup, device, amp_enabled(a.amp, device),
                                     a.channels_last)
            rows.append((desc, b, ips))
            print(f"{desc}, batch {b}: {ips:.2f} img/s ({1000 * b / ips:.1f} ms/batch)")
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    out = Path(a.out or f"docs/results/inference_speed_{device.type}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# Inference speed ({device.type})", "",
             f"- Command: `{command_line(__file__, argv)}`",
             f"- Machine: {machine}; torch {torch.__version__}; Python {platform.python_version()}",
             f"- Date: {dt.date.today().isoformat()}",
             f"- Setting: {a.size}x{a.size} px, `GFL.predict` (forward + decoding + score filter + class-aware NMS), "
             f"{'bf16 autocast' if amp_enabled(a.amp, device) else 'fp32'}{', channels_last' if a.channels_last else ''}, mean of {a.iters} calls after {a.warmup} warm-up; "
             "no image decoding or resizing",
             "", "| model | batch | images/s | ms/batch |", "|---|---|---|---|"]
    lines += [f"| {d} | {b} | {v:.2f} | {1000 * b / v:.1f} |" for d, b, v in rows]
    if not a.checkpoint:
        lines += ["", "Random-init heads pass almost no box to NMS; a trained checkpoint (`--checkpoint`) times NMS realistically."]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
