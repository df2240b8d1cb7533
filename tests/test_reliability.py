"""Reliability of long runs: kill-and-resume equality, atomic checkpoints, safe loading, NaN stops.

Every training here is tiny (synthetic data, 64 px, 16-channel head, 1 CPU thread), so the file runs
in well under a minute on a shared 2-core machine.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml

import sdidd.engine.checkpoint as ckpt_mod
import sdidd.engine.trainer as trainer
from sdidd.cli import main
from sdidd.engine.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from sdidd.errors import SdiddError
from sdidd.model.detector import DetectorConfig, build_detector

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
TINY = {
    "data": {"dataset": "synthetic", "num_train_images": 16, "num_test_images": 8, "train_sizes": [64], "test_size": 64,
             "max_size": 64},
    "model": {"pretrained": False, "fpn_channels": 16, "head_channels": 16, "head_convs": 1},
    "train": {"epochs": 1, "min_iters": 0, "batch_size": 4, "workers": 0, "threads": 1, "device": "cpu", "progress": False, "log_every": 1,
              "warmup_iters": 2, "milestones": [2]},
}


def write_cfg(path: Path, **sections: dict[str, Any]) -> Path:
    """TINY with `sections` merged in, written as YAML."""
    data = {k: dict(v) for k, v in TINY.items()}
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """`sdidd argv` in this process: (exit code, stdout, stderr). An uncaught exception fails the test."""
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> str:
    """The single `error: ...` line of stderr (asserts there is exactly one line and no traceback)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def sha(path: Path) -> str:
    """Digest of a file's bytes (to prove a file was not rewritten)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def log_rows(path: Path) -> list[dict[str, str]]:
    """log.csv rows without the wall-clock column (img_s differs between runs by nature)."""
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "img_s"} for r in csv.DictReader(f)]


# ---------------------------------------------------------------- 1. kill and resume

def _sdidd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "sdidd", *args]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights_metrics_and_log(tmp_path: Path) -> None:
    """SIGKILL in epoch 2 of 3, then train.resume=true: bit-identical to an uninterrupted run.

    Tolerance: exact (torch.equal) on CPU with train.deterministic=true, measured. Resuming restarts the
    interrupted epoch from the last epoch checkpoint (model, optimizer momentum, scheduler, iteration), and
    data order and augmentation are reseeded per epoch, so the same batches meet the same weights. On CUDA,
    deterministic=true only warns about nondeterministic kernels (scatter-add backward, atomics), so expect
    the same difference as between two uninterrupted GPU runs (about 1e-5 relative on the weights after a
    few epochs), not bit equality.
    """
    cfg = write_cfg(tmp_path / "cfg.yaml", data={"num_train_images": 24},
                    train={"epochs": 3, "deterministic": True, "lr": 0.1})
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_sdidd(["train", str(cfg), f"train.out_dir={ref_dir}"]), env=_env(), cwd=tmp_path, check=True,
                   capture_output=True)

    proc = subprocess.Popen(_sdidd(["train", str(cfg), f"train.out_dir={run_dir}"]), env=_env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = run_dir / "log.csv"
    deadline = time.monotonic() + 120
    # A logged epoch-2 row means epoch 1's checkpoints are written and epoch 2 is under way.
    while not (log.is_file() and any(r.startswith("2,") for r in log.read_text().splitlines())):
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "the run never reached epoch 2"
        time.sleep(0.005)
    # Freeze it first, so the files read below are exactly what the kill leaves behind.
    proc.send_signal(signal.SIGSTOP)
    try:
        killed_at = load_checkpoint(run_dir / "last.pth")
        logged = log_rows(log)
        finished = (run_dir / "metrics.json").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not finished, "the run finished before the kill: nothing was interrupted"
    # Mid-epoch: the last logged step belongs to an epoch after the checkpointed one, so that epoch's progress
    # (weights, momentum, log rows) is lost with the process and the resumed run must redo it exactly.
    epoch, last_iter = int(logged[-1]["epoch"]), int(logged[-1]["iter"])
    assert epoch == killed_at["epoch"] + 1 and last_iter > killed_at["iteration"], (killed_at["epoch"], logged[-1])
    assert killed_at["epoch"] < 3 and killed_at["format_version"] == FORMAT_VERSION

    res = subprocess.run(_sdidd(["train", str(cfg), f"train.out_dir={run_dir}", "train.resume=true"]), env=_env(),
                         cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"resumed {run_dir / 'last.pth'} at epoch {killed_at['epoch']}/3" in res.stdout

    a, b = load_checkpoint(ref_dir / "last.pth"), load_checkpoint(run_dir / "last.pth")
    assert a["model"].keys() == b["model"].keys()
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    assert a["iteration"] == b["iteration"] == 18 and a["epoch"] == b["epoch"] == 3
    assert a["scheduler"] == b["scheduler"]
    assert a["metrics"] == b["metrics"]
    assert json.loads((ref_dir / "metrics.json").read_text())["per_class"] == json.loads((run_dir / "metrics.json").read_text())["per_class"]
    # Same losses at every iteration (so the same batches), and no duplicate rows from the redone epoch.
    assert log_rows(run_dir / "log.csv") == log_rows(ref_dir / "log.csv")
    assert not list(run_dir.glob(".*.tmp"))


@pytest.mark.slow
def test_interrupted_incremental_run_resumes_to_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    """Ctrl-C mid-epoch in step 1 of a 2+2 run, then train.resume=true: step 0 is reused, step 1 ends as uninterrupted.

    Bit for bit without the teacher cache: a resumed step refills the cache from batches of another make-up, and on
    some CPUs (AVX2-only) a convolution's last bits depend on the batch, so cached teacher outputs differ slightly.
    """
    cfg = write_cfg(tmp_path / "cfg.yaml", data={"num_test_images": 4}, train={"epochs": 2, "deterministic": True, "teacher_cache_gb": 0},
                    incremental={"protocol": "2+2", "method": "sdidd"})
    ref, run = tmp_path / "ref", tmp_path / "run"
    try:
        assert main(["incremental", str(cfg), f"train.out_dir={ref}"]) == 0
        # Step 0 of the interrupted run is the reference's (saves its training time): resuming reuses a finished step.
        shutil.copytree(ref / "step0_base", run / "step0_base")
        per_epoch = max(int(r["iter"]) for r in log_rows(ref / "step1_sdidd" / "log.csv") if r["epoch"] == "1")
        orig, calls = trainer.step_loss, {"n": 0}

        def interrupt(*a: Any, **k: Any) -> Any:
            if a[1] is not None:  # a teacher output: the incremental step
                calls["n"] += 1
                if calls["n"] == per_epoch + 2:  # second step of epoch 2
                    raise KeyboardInterrupt
            return orig(*a, **k)
        monkeypatch.setattr(trainer, "step_loss", interrupt)
        capsys.readouterr()
        rc, out, err = run_cli(["incremental", str(cfg), f"train.out_dir={run}", "train.resume=true"], capsys)
        assert rc == 130 and "train.resume=true" in err
        assert f"resumed {run / 'step0_base' / 'last.pth'} at epoch 2/2" in out
        assert load_checkpoint(run / "step1_sdidd" / "last.pth")["epoch"] == 1
        monkeypatch.undo()
        rc, out, err = run_cli(["incremental", str(cfg), f"train.out_dir={run}", "train.resume=true"], capsys)
    finally:
        torch.use_deterministic_algorithms(False)  # the runs set it process-wide
    assert rc == 0, err
    assert f"resumed {run / 'step1_sdidd' / 'last.pth'} at epoch 1/2" in out
    a, b = load_checkpoint(ref / "step1_sdidd" / "last.pth"), load_checkpoint(run / "step1_sdidd" / "last.pth")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["iteration"] == b["iteration"] == 2 * per_epoch and a["metrics"] == b["metrics"]
    assert log_rows(ref / "step1_sdidd" / "log.csv") == log_rows(run / "step1_sdidd" / "log.csv")


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path: Path) -> None:
    """torch, python and numpy RNG states saved by the trainer load back (weights_only) and replay the same draws."""
    import random

    import numpy as np
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    np.random.normal()  # leaves a cached gaussian: part of numpy's state too
    state = {**_valid_state(), "rng": ckpt_mod.rng_state()}
    del state["format_version"]
    save_checkpoint(state, tmp_path / "last.pth")
    expected = (torch.rand(3), random.random(), np.random.normal(), np.random.rand())
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    ckpt_mod.set_rng_state(load_checkpoint(tmp_path / "last.pth")["rng"])
    got = (torch.rand(3), random.random(), np.random.normal(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config, out_dir) of a finished 2-epoch tiny run (in-process; tests copy it before changing it)."""
    root = tmp_path_factory.mktemp("finished")
    cfg = write_cfg(root / "cfg.yaml", train={"epochs": 2})
    assert main(["train", str(cfg), f"train.out_dir={root / 'run'}"]) == 0
    return cfg, root / "run"


def _copy_run(finished: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    cfg, run = finished
    shutil.copytree(run, tmp_path / "run")
    return cfg, tmp_path / "run"


def _fail_if_trained(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("a training step ran")
    monkeypatch.setattr(trainer, "step_loss", boom)


@pytest.mark.slow
def test_resuming_a_finished_run_does_not_retrain(finished_run: tuple[Path, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    cfg, run = _copy_run(finished_run, tmp_path)
    before = {p.name: sha(p) for p in run.iterdir()}
    _fail_if_trained(monkeypatch)
    capsys.readouterr()
    rc, out, err = run_cli(["train", str(cfg), f"train.out_dir={run}", "train.resume=true"], capsys)
    assert rc == 0, err
    assert "resumed" in out and "at epoch 2/2" in out
    assert {p.name: sha(p) for p in run.iterdir()} == before  # nothing rewritten, not even the log
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"{metrics['map50']:.1f}" in out  # the stored result is printed again


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_another_model_in_one_line(finished_run: tuple[Path, Path], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    cfg, run = _copy_run(finished_run, tmp_path)
    _fail_if_trained(monkeypatch)
    capsys.readouterr()
    rc, _, err = run_cli(["train", str(cfg), f"train.out_dir={run}", "train.resume=true", "model.fpn_channels=32"], capsys)
    line = one_line_error(err)
    assert rc == 2 and "do not fit" in line and "mis-shaped" in line and "train.resume=false" in line
    rc, _, err = run_cli(["train", str(cfg), f"train.out_dir={run}", "train.resume=true", "data.classes=[spot, scratch]"], capsys)
    line = one_line_error(err)
    assert rc == 2 and "cannot resume" in line and "'scratch', 'spot', 'patch', 'crack'" in line


@pytest.mark.slow
def test_resume_refuses_other_training_settings_but_not_runtime_ones(finished_run: tuple[Path, Path], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    cfg, run = _copy_run(finished_run, tmp_path)
    _fail_if_trained(monkeypatch)
    capsys.readouterr()
    rc, _, err = run_cli(["train", str(cfg), f"train.out_dir={run}", "train.resume=true", "train.lr=0.123", "data.flip=0"], capsys)
    line = one_line_error(err)
    assert rc == 2 and "cannot resume, it was trained with other settings" in line
    assert "data.flip 0.5 (now 0.0)" in line and "(now 0.123)" in line and "train.lr" in line
    rc, _, err = run_cli(["train", str(cfg), f"train.out_dir={run}", "train.resume=true", "train.epochs=1"], capsys)
    assert rc == 2 and "2 epochs trained (now 1)" in one_line_error(err)
    # Threads, workers and logging do not change what is trained: the finished run is reused as is.
    rc, out, err = run_cli(["train", str(cfg), f"train.out_dir={run}", "train.resume=true", "train.threads=1",
                            "train.workers=0", "train.log_every=3"], capsys)
    assert rc == 0 and "at epoch 2/2" in out, err


def test_save_every_writes_every_nth_epoch_and_the_last_and_resume_continues_from_it(tmp_path: Path,
                                                                                  capsys: pytest.CaptureFixture) -> None:
    """train.save_every=2 over 3 epochs: checkpoints after epochs 2 and 3 only; a longer run resumes from epoch 3."""
    cfg = write_cfg(tmp_path / "cfg.yaml", train={"epochs": 3, "keep_checkpoints": 5, "save_every": 2})
    run = tmp_path / "run"
    rc, _, err = run_cli(["train", str(cfg), f"train.out_dir={run}"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in run.glob("*.pth")) == ["epoch_2.pth", "epoch_3.pth", "last.pth"]
    assert load_checkpoint(run / "epoch_2.pth")["epoch"] == 2 and load_checkpoint(run / "last.pth")["epoch"] == 3
    # save_every only says how often to write: a resume may change it
    rc, out, err = run_cli(["train", str(cfg), f"train.out_dir={run}", "train.resume=true", "train.epochs=4",
                            "train.save_every=1"], capsys)
    assert rc == 0 and "at epoch 3/4" in out, err
    assert load_checkpoint(run / "last.pth")["epoch"] == 4 and (run / "epoch_4.pth").is_file()
    rc, _, err = run_cli(["train", str(cfg), f"train.out_dir={tmp_path / 'x'}", "train.save_every=0"], capsys)
    assert rc == 2 and "train.save_every" in one_line_error(err)


# ---------------------------------------------------------------- 2. interrupted checkpoint writes

def _partial_save(exc: BaseException) -> Callable[..., None]:
    """A torch.save that writes some bytes, then fails like a full disk or a Ctrl-C."""
    def fake(obj: Any, f: Any, *a: Any, **k: Any) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")
        f.flush()
        raise exc
    return fake


@pytest.mark.parametrize("exc, raised", [(OSError(28, "No space left on device"), SdiddError), (KeyboardInterrupt(), KeyboardInterrupt)])
def test_failed_write_leaves_the_previous_checkpoint_loadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              exc: BaseException, raised: type) -> None:
    path = tmp_path / "last.pth"
    old = {"model": {"w": torch.arange(4.0)}, "detector": {"backbone": "tf_efficientnet_lite0", "num_classes": 1}, "classes": ["a"], "epoch": 1}
    save_checkpoint(old, path)
    digest = sha(path)
    monkeypatch.setattr(ckpt_mod.torch, "save", _partial_save(exc))
    with pytest.raises(raised) as info:
        save_checkpoint({**old, "model": {"w": torch.zeros(4)}, "epoch": 2}, path)
    if raised is SdiddError:
        assert "No space left on device" in str(info.value) and "previous checkpoint is intact" in str(info.value)
    monkeypatch.undo()
    assert sha(path) == digest
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temp file left behind


def test_temp_file_of_a_killed_write_is_cleaned_by_the_next_save(tmp_path: Path) -> None:
    """SIGKILL between write and rename leaves `.last.pth.<random>.tmp`; the next save of that path removes it."""
    state = {"model": {"w": torch.ones(2)}, "detector": {"backbone": "tf_efficientnet_lite0", "num_classes": 1}, "classes": ["a"]}
    stale = tmp_path / ".last.pth.abc123.tmp"
    stale.write_bytes(b"x" * 100)
    other = tmp_path / ".epoch_1.pth.abc123.tmp"  # belongs to another path: left alone
    other.write_bytes(b"y")
    save_checkpoint(state, tmp_path / "last.pth")
    assert not stale.exists() and other.exists()
    assert torch.equal(load_checkpoint(tmp_path / "last.pth")["model"]["w"], torch.ones(2))


# ---------------------------------------------------------------- 3. untrusted or broken checkpoints

@dataclasses.dataclass
class Note:
    """A custom class: its pickle names a global that weights-only loading must not import."""

    text: str = "hi"


class RunsShell:
    """Unpickling this would call os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _valid_state() -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "model": {"w": torch.zeros(2)},
            "detector": {"backbone": "tf_efficientnet_lite0", "num_classes": 1}, "classes": ["a"]}


def test_pickled_objects_are_refused_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    torch.save({**_valid_state(), "extra": Note()}, tmp_path / "note.pth")
    torch.save({**_valid_state(), "extra": RunsShell(marker)}, tmp_path / "shell.pth")
    with pytest.raises(SdiddError, match=r"refused.*pickled object \([\w.]*Note\)"):
        load_checkpoint(tmp_path / "note.pth")
    with pytest.raises(SdiddError, match=r"refused.*pickled object \((posix|os|nt)\.system\)") as info:
        load_checkpoint(tmp_path / "shell.pth")
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_broken_files_and_other_formats_give_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = tmp_path / "good.pth"
    save_checkpoint({k: v for k, v in _valid_state().items() if k != "format_version"}, good)
    data = good.read_bytes()
    cases = {
        "truncated.pth": (data[: len(data) // 2], "truncated or corrupt"),
        "garbage.pth": (b"this is no checkpoint at all " * 8, "truncated or corrupt"),
        "empty.pth": (b"", "truncated or corrupt"),
    }
    for name, (content, expect) in cases.items():
        (tmp_path / name).write_bytes(content)
    torch.save({**_valid_state(), "format_version": FORMAT_VERSION + 1}, tmp_path / "newer.pth")
    torch.save({**_valid_state(), "format_version": 0}, tmp_path / "older.pth")
    torch.save({**_valid_state(), "format_version": "1"}, tmp_path / "text.pth")
    torch.save({**_valid_state(), "classes": ["a", "b"]}, tmp_path / "inconsistent.pth")
    cases.update({"newer.pth": (None, "newer than this sdidd"), "older.pth": (None, "format 0 is not supported"),
                  "text.pth": (None, "not an integer"), "inconsistent.pth": (None, "1 class outputs but lists 2")})
    for name, (_, expect) in cases.items():
        with pytest.raises(SdiddError, match=expect):
            load_checkpoint(tmp_path / name)
        # Through the CLI: one line, exit 2.
        rc, _, err = run_cli(["eval", str(tmp_path / name), "--device", "cpu"], capsys)
        assert rc == 2 and name in one_line_error(err) and expect in err


def test_checkpoint_weights_that_do_not_fit_their_record_are_one_line(tmp_path: Path) -> None:
    det = DetectorConfig(num_classes=2, backbone="tf_efficientnet_lite0", pretrained=False, fpn_channels=16,
                                 head_channels=16, head_convs=1)
    model = build_detector(det)
    state = {"model": model.state_dict(), "detector": dataclasses.asdict(det) | {"fpn_channels": 24}, "classes": ["a", "b"]}
    with pytest.raises(SdiddError, match=r"do not fit the tf_efficientnet_lite0 detector.*mis-shaped \d+ tensors, e\.g\. fpn"):
        ckpt_mod.model_from_checkpoint(state)
    state["detector"] = dataclasses.asdict(det) | {"anchor_scale": 8}  # a field this sdidd does not know
    with pytest.raises(SdiddError, match="detector record does not fit"):
        ckpt_mod.model_from_checkpoint(state)


# ---------------------------------------------------------------- 7. non-finite losses and weights

def _patched_loss(monkeypatch: pytest.MonkeyPatch, at_call: int, kind: str) -> None:
    """Make the `at_call`-th training step's loss NaN ('loss') or its gradient NaN with a finite loss ('grad')."""
    orig, calls = trainer.step_loss, {"n": 0}

    def fake(*a: Any, **k: Any) -> Any:
        total, parts = orig(*a, **k)
        calls["n"] += 1
        if calls["n"] == at_call:
            if kind == "loss":
                parts = {**parts, "loss_qfl": torch.tensor(float("nan"))}
                total = total + float("nan")
            else:  # sqrt'(0) = inf times 0: NaN gradients, loss value unchanged
                total = total + torch.sqrt(a[0].cls.sum() * 0.0)
        return total, parts
    monkeypatch.setattr(trainer, "step_loss", fake)


@pytest.mark.slow
def test_nan_loss_stops_naming_part_and_step_and_keeps_the_last_good_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    cfg = write_cfg(tmp_path / "cfg.yaml", train={"epochs": 3})
    run = tmp_path / "run"
    _patched_loss(monkeypatch, at_call=6, kind="loss")  # 4 steps per epoch: epoch 2, iteration 6
    rc, _, err = run_cli(["train", str(cfg), f"train.out_dir={run}"], capsys)
    line = one_line_error(err)
    assert rc == 2
    assert "non-finite loss at epoch 2, iteration 6 (part: loss_qfl)" in line and str(run / "last.pth") in line
    last = load_checkpoint(run / "last.pth")
    assert last["epoch"] == 1 and last["iteration"] == 4
    ep1 = load_checkpoint(run / "epoch_1.pth")
    assert all(torch.equal(last["model"][k], ep1["model"][k]) for k in ep1["model"])
    assert [r["iter"] for r in log_rows(run / "log.csv")][-1] == "5"


@pytest.mark.slow
def test_nan_weights_after_a_finite_loss_never_replace_the_last_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    cfg = write_cfg(tmp_path / "cfg.yaml", train={"epochs": 3})
    run = tmp_path / "run"
    _patched_loss(monkeypatch, at_call=8, kind="grad")  # the last step of epoch 2
    rc, _, err = run_cli(["train", str(cfg), f"train.out_dir={run}"], capsys)
    line = one_line_error(err)
    assert rc == 2 and "non-finite weights after epoch 2" in line and "not saved" in line
    # Every trained tensor is NaN: the message names the first one (the stem and blocks.0 are frozen, so finite).
    assert "(e.g. backbone.body.blocks.1.0.conv_pw.weight)" in line
    last = load_checkpoint(run / "last.pth")
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert not (run / "epoch_2.pth").exists()


@pytest.mark.slow
def test_diverging_lr_through_the_cli_exits_2_with_the_loss_part(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A real blow-up (no patching): train.lr=1e6."""
    cfg = write_cfg(tmp_path / "cfg.yaml", train={"epochs": 2})
    rc, _, err = run_cli(["train", str(cfg), f"train.out_dir={tmp_path / 'run'}", "train.lr=1e6"], capsys)
    line = one_line_error(err)
    assert rc == 2 and "non-finite" in line and "try a lower train.lr" in line
    assert "part: loss_" in line or "weights after epoch" in line


def test_settings_changed_compares_what_each_step_trains_on() -> None:
    from sdidd.engine.checkpoint import settings_changed
    saved = {"train": {"lr": 0.01, "milestones": [8], "threads": 2}, "incremental": {"lr": 0.003, "milestones": None},
             "distill": {"idfd_weight": 2.0}}
    other_base_lr = {"train": {"lr": 0.02, "milestones": [8], "threads": 1}, "incremental": {"lr": 0.003, "milestones": None},
                     "distill": {"idfd_weight": 2.0}}
    assert settings_changed(saved, other_base_lr, with_teacher=True) == []  # the step ran on incremental.lr
    assert settings_changed(saved, other_base_lr, with_teacher=False) == ["train.lr 0.01 (now 0.02)"]
    other_distill = {**saved, "distill": {"idfd_weight": 1.0}}
    assert settings_changed(saved, other_distill, with_teacher=False) == []  # a base step has no distillation
    assert settings_changed(saved, other_distill, with_teacher=True) == ["distill.idfd_weight 2.0 (now 1.0)"]
