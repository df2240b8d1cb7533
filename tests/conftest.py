"""Shared test settings: where the real data lives, and a CPU-friendly torch."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def real_data_root() -> Path:
    """SDIDD_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get("SDIDD_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = real_data_root()
    if not (root / "NEU-DET").is_dir():
        pytest.skip(f"real data not found at {root} (set SDIDD_DATA to a folder holding NEU-DET/ and DeepPCB/)")
    return root
