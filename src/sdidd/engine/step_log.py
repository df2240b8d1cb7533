"""A step's training log: `log.csv` rows (and TensorBoard scalars when tensorboard is installed), rank 0 only."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Optional

from . import distributed as dist


class StepLog:
    """Appends one row per logged iteration; a resumed run first drops the rows of the epoch it trains again."""

    def __init__(self, out_dir: Path, resumed_at: int) -> None:
        self.path = out_dir / "log.csv"
        self.main = dist.is_main()
        self.new_file = resumed_at == 0 or not self.path.exists()
        self._file: Optional[Any] = None
        self._writer: Optional[csv.DictWriter] = None
        self._tb: Optional[Any] = None
        if self.main:
            out_dir.mkdir(parents=True, exist_ok=True)
            if not self.new_file:
                _trim(self.path, resumed_at)
            try:  # optional extra: pip install "sdidd[tensorboard]"
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(out_dir / "tb"), purge_step=resumed_at + 1 if resumed_at else None)
            except ImportError:
                self._tb = None

    def write(self, row: dict[str, Any]) -> None:
        """Write one row (floats already on the host)."""
        if not self.main:
            return
        if self._writer is None:
            self._file = open(self.path, "w" if self.new_file else "a", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=list(row), extrasaction="ignore")
            if self.new_file:
                self._writer.writeheader()
        self._writer.writerow(row)
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("epoch", "iter"):
                    self._tb.add_scalar(f"train/{k}", v, row["iter"])

    def close(self) -> None:
        """Close the files."""
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _trim(log_path: Path, iteration: int) -> None:
    """Keep the header and the rows up to `iteration` of a log.csv, so a resumed run appends without duplicates."""
    with open(log_path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "iter" not in rows[0]:
        return
    col = rows[0].index("iter")
    kept = [rows[0]] + [r for r in rows[1:] if len(r) > col and r[col].isdigit() and int(r[col]) <= iteration]
    tmp = log_path.with_name(log_path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(kept)
    os.replace(tmp, log_path)
