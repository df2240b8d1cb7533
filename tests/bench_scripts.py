"""Run the scripts under benchmarks/ inside the test process: a new interpreter spends ~6 s importing torch."""
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str) -> ModuleType:
    """Import benchmarks/<name>.py as a module (its folder on sys.path, as when it runs as a script)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))  # the scripts import their siblings (timing.py, train_speed.py)
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[f"_bench_{name}"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def run_script(name: str, *args: str) -> int:
    """benchmarks/<name>.py's main(args); torch's thread count is restored after (a script may set its own)."""
    threads = torch.get_num_threads()
    try:
        return load_script(name).main(list(args))
    finally:
        torch.set_num_threads(threads)
