"""sdidd: class-incremental industrial defect detection (SD-IDD, ERD) on a pure-PyTorch GFLv1 detector.

Python API::

    from sdidd import load_config, build_detector, build_dataset, run_train, run_incremental, evaluate_model
"""
from __future__ import annotations

__version__ = "0.1.0"

from .config import Config, load_config  # noqa: E402
from .errors import SdiddError  # noqa: E402


def __getattr__(name: str):
    # Lazy imports keep `import sdidd` (and the CLI's --help) fast.
    if name in ("build_detector", "GFL", "DetectorConfig"):
        from .model import detector
        return getattr(detector, name)
    if name == "build_dataset":
        from . import data
        return getattr(data, name)
    if name in ("run_train", "run_incremental"):
        from .engine import protocol
        return getattr(protocol, name)
    if name in ("train_step", "StepSpec"):
        from .engine import trainer
        return getattr(trainer, name)
    if name == "evaluate_model":
        from .evaluate import evaluate_model
        return evaluate_model
    if name == "model_from_checkpoint":
        from .engine.checkpoint import model_from_checkpoint
        return model_from_checkpoint
    if name == "run_benchmark":
        from .benchmark import run_benchmark
        return run_benchmark
    raise AttributeError(name)


__all__ = ["Config", "load_config", "SdiddError", "build_detector", "GFL", "DetectorConfig", "build_dataset",
           "run_train", "run_incremental", "train_step", "evaluate_model", "model_from_checkpoint",
           "StepSpec", "run_benchmark"]
