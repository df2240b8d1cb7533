"""What a run leaves on disk: files written whole or not at all, and one run per output folder at a time.

* :func:`write_text_atomic` / :func:`write_json`: temp file in the same folder, fsync, rename. A full disk or a
  kill part way leaves the previous file as it was, and the error names the file.
* :class:`FolderLock`: an exclusive lock (``.sdidd.lock``, holding the PID) on a run's output folder for the life
  of the run, so a second run started on the same folder stops at once instead of mixing its files in. The
  operating system drops the lock when the process ends, however it ends.
* :func:`claim_folder`: a folder that already holds a finished or interrupted run is continued
  (``train.resume=true``), cleared first (``train.overwrite=true``), or refused.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from .errors import SdiddError

LOCK_NAME = ".sdidd.lock"
# What one training run writes into its folder; train.overwrite removes these and nothing else.
RUN_FILES = ("last.pth", "best.pth", "epoch_*.pth", "config.json", "metrics.json", "log.csv", "results.csv", "losses.png",
             "results.png", "add_classes.json", "tb", "new_teacher")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` whole or not at all; one SdiddError line naming `path` when the disk refuses."""
    path = Path(path)
    tmp: Optional[str] = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        kept = "the previous file is intact" if path.is_file() else "nothing was written"
        raise SdiddError(f"{path}: cannot write ({e.strerror or e}); {kept}") from None


def write_json(path: str | Path, obj: Any, **kw: Any) -> None:
    """`obj` as JSON at `path`, atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, **kw))


def append_result_row(path: str | Path, row: dict[str, Any]) -> None:
    """Add `row` to the CSV `path` (rewritten whole), dropping rows of its epoch and later (a resumed run redoes them)."""
    import csv
    import io
    path = Path(path)
    rows: list[dict[str, Any]] = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r.get("epoch") or 0) < int(row["epoch"])]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(row))
    writer.writeheader()
    writer.writerows([{k: r.get(k, "") for k in row} for r in rows] + [row])
    write_text_atomic(path, out.getvalue())


class FolderLock:
    """An exclusive, non-blocking lock on `folder` held until :meth:`release` (or the process's end)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._file = None

    def acquire(self) -> "FolderLock":
        """Take the lock, or raise one SdiddError line naming the folder and the process that holds it."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            f = open(self.folder / LOCK_NAME, "a+")
        except OSError as e:
            raise SdiddError(f"{self.folder}: cannot use as output folder ({e.strerror or e})") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise SdiddError(f"{self.folder}: in use by another sdidd run (PID {holder}); wait for it to finish or "
                             "choose another output folder (train.out_dir / --out)") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race with a run waiting to take it)."""
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_folder(folder: str | Path, resume: bool, overwrite: bool) -> None:
    """Make `folder` ready for a new run: refuse one that holds a run unless it is resumed or overwritten."""
    folder = Path(folder)
    last = folder / "last.pth"
    if resume or not last.is_file():
        return
    if not overwrite:
        raise SdiddError(f"{folder}: holds a run already ({last.name}); continue it with train.resume=true, replace it "
                         "with train.overwrite=true, or choose another output folder (train.out_dir / --out)")
    for pattern in RUN_FILES:
        for p in folder.glob(pattern):
            try:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            except OSError as e:
                raise SdiddError(f"{p}: cannot remove the old run's file ({e.strerror or e})") from None
