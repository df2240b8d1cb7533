"""Hostile and broken inputs: each gives one line on stderr and an exit code, and loses nothing already written.

Catalogue (counted in docs/results/reliability.md): SIGTERM, YAML aliases, huge values in messages, 16-bit
and float images, EXIF-rotated photos, unknown method names.
"""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdidd.config import config_from_dict, load_config
from sdidd.methods import resolved_distill
from sdidd.data.records import read_image
from sdidd.engine.build import StepSpec, build_step
from sdidd.engine.run_data import load_run_data
from sdidd.errors import MAX_MESSAGE, SdiddError
from test_reliability import TINY, _env, _sdidd, one_line_error, run_cli, sha, write_cfg

torch.set_num_threads(1)


# ---------------------------------------------------------------- signals

def test_sigterm_stops_a_run_like_ctrl_c_and_keeps_its_checkpoint(tmp_path: Path) -> None:
    """What a job scheduler, `docker stop` or systemd sends: one line saying how to resume, exit 143, last.pth intact."""
    cfg = write_cfg(tmp_path / "cfg.yaml", data={"num_train_images": 24}, train={"epochs": 30})
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_sdidd(["train", str(cfg), f"train.out_dir={run_dir}"]), env=_env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "last.pth").is_file():  # epoch 1 is saved: there is something to lose
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the run never saved an epoch"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "terminated" in lines[0] and "train.resume=true" in lines[0], err
    torch.load(run_dir / "last.pth", weights_only=False)  # still a whole checkpoint


# ---------------------------------------------------------------- hostile YAML and huge values

def _billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(lines) + f"\ntrain: {{epochs: *a{levels - 1}}}\n"


def test_yaml_aliases_are_refused_in_one_short_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_billion_laughs())
    assert len(bomb.read_bytes()) < 1000
    rc, _, err = run_cli(["train", str(bomb)], capsys)
    line = one_line_error(err)
    assert rc == 2 and "aliases are not supported" in line and str(bomb) in line and len(line) < 300


def test_a_dataset_description_with_aliases_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    desc = tmp_path / "data.yaml"
    desc.write_text("path: &p .\ntrain: *p\ntest: images\nnames: [a]\n")
    rc, _, err = run_cli(["check-data", str(desc)], capsys)
    assert rc == 2 and "aliases are not supported" in one_line_error(err)


def test_a_huge_value_is_shortened_in_the_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = write_cfg(tmp_path / "cfg.yaml")
    rc, _, err = run_cli(["train", str(cfg), "train.epochs=" + "[" * 100 + "x" * 200 + "]" * 100], capsys)
    assert rc == 2 and len(one_line_error(err)) < 400
    with pytest.raises(SdiddError) as e:  # any message, however built, is capped
        raise SdiddError("x" * 10**6)
    assert len(str(e.value)) == MAX_MESSAGE


# ---------------------------------------------------------------- images as cameras write them

def test_16_bit_grayscale_png_is_scaled_to_8_bits(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
    path = tmp_path / "cam16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    img = read_image(path)
    assert img.shape == (3, 16, 64) and img.dtype == torch.uint8
    row = img[0, 0].numpy().astype(int)
    assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row) >= 0)  # convert("RGB") alone: 99 % at 255
    assert (img == 255).float().mean() < 0.05


def test_float_image_in_0_1_is_scaled(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(path)
    assert int(read_image(path)[0, 0, 0]) == 128


def test_exif_rotated_jpeg_is_read_as_displayed_in_loading_and_checking(tmp_path: Path) -> None:
    """A phone or camera photo stored landscape with 'rotate 90' in EXIF is portrait on screen, and boxes are drawn there."""
    from sdidd.data.check import inspect_image
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :10] = 255  # a white band on the stored image's left
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise
    path = tmp_path / "photo.jpg"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)
    img = read_image(path)
    assert img.shape == (3, 40, 20)  # as displayed
    assert img[0, :10].float().mean() > 200 and img[0, -10:].float().mean() < 50  # the band is on top after the turn
    _, size, error, pixels = inspect_image(str(path), keep_pixels=True)
    assert error is None and size == (20, 40) and pixels.shape == (3, 40, 20)


# ---------------------------------------------------------------- unknown method names in the Python API

def test_an_unknown_method_name_is_refused_not_trained_as_joint(tmp_path: Path) -> None:
    cfg = config_from_dict({**TINY, "train": {**TINY["train"], "out_dir": str(tmp_path / "run")}})
    with pytest.raises(SdiddError, match="unknown method 'sdid'"):
        resolved_distill(cfg, "sdid")
    data = load_run_data(cfg.data)
    classes = list(data.train.classes)
    with pytest.raises(SdiddError, match="unknown method 'sdid'"):
        build_step(cfg, StepSpec(classes, classes, "sdid", 0), data, tmp_path / "run", None)
    assert not (tmp_path / "run").exists()


def test_yaml_without_aliases_still_loads(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path / "cfg.yaml")
    before = sha(cfg)
    assert load_config(cfg).train.epochs == 1 and sha(cfg) == before


# ---------------------------------------------------------------- full disk, one folder, re-runs

def test_a_report_that_cannot_be_written_names_its_file_and_keeps_the_old_one(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import sdidd.run_files as run_files
    path = tmp_path / "metrics.json"
    run_files.write_json(path, {"map50": 50.0})
    before = sha(path)

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(run_files.os, "fsync", full)
    with pytest.raises(SdiddError, match=r"metrics.json: cannot write \(No space left on device\); the previous file is intact"):
        run_files.write_json(path, {"map50": 60.0})
    assert sha(path) == before and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_torchs_wrapped_write_error_is_one_line_naming_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's zip writer turns a full disk into RuntimeError('... PytorchStreamWriter failed writing file ...')."""
    import sdidd.engine.checkpoint as ckpt
    path = tmp_path / "last.pth"
    state = {"model": {"w": torch.ones(2)}, "detector": {"backbone": "x", "num_classes": 1}, "classes": ["a"]}
    ckpt.save_checkpoint(state, path)
    before = sha(path)

    def wrapped(*a, **k) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: "
                           "file write failed")
    monkeypatch.setattr(ckpt.torch, "save", wrapped)
    with pytest.raises(SdiddError, match="last.pth: cannot write checkpoint .*the previous checkpoint is intact"):
        ckpt.save_checkpoint(state, path)
    assert sha(path) == before


def test_a_file_size_limit_mid_run_is_one_line_and_keeps_the_last_checkpoint(tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    """`ulimit -f` as a real full disk: the epoch-2 checkpoint cannot be written, epoch 1's stays loadable."""
    import resource
    cfg = write_cfg(tmp_path / "cfg.yaml", train={"epochs": 1})
    run = tmp_path / "run"
    rc, _, err = run_cli(["train", str(cfg), f"train.out_dir={run}"], capsys)  # epoch 1 here; the limit needs a process
    assert rc == 0, err
    before = sha(run / "last.pth")
    limit = (run / "last.pth").stat().st_size // 2

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    res = subprocess.run(_sdidd(["train", str(cfg), f"train.out_dir={run}", "train.resume=true", "train.epochs=2"]),
                         env=_env(), cwd=tmp_path, capture_output=True, text=True, preexec_fn=small_disk)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "last.pth: cannot write checkpoint" in lines[0], res.stderr
    assert sha(run / "last.pth") == before


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from sdidd.run_files import FolderLock
    cfg = write_cfg(tmp_path / "cfg.yaml")
    run = tmp_path / "run"
    with FolderLock(run):  # another run holds the folder
        rc, _, err = run_cli(["train", str(cfg), f"train.out_dir={run}"], capsys)
    line = one_line_error(err)
    assert rc == 2 and "in use by another sdidd run (PID" in line and str(run) in line
    assert sorted(p.name for p in run.iterdir()) == [".sdidd.lock"]  # nothing of the refused run was written


def test_a_finished_folder_is_not_silently_replaced(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = write_cfg(tmp_path / "cfg.yaml", train={"epochs": 2, "keep_checkpoints": 3})
    run = tmp_path / "run"
    assert run_cli(["train", str(cfg), f"train.out_dir={run}"], capsys)[0] == 0
    before = {p.name: sha(p) for p in run.iterdir()}
    rc, _, err = run_cli(["train", str(cfg), f"train.out_dir={run}", "train.epochs=1"], capsys)
    line = one_line_error(err)
    assert rc == 2 and "holds a run already" in line and "train.resume=true" in line and "train.overwrite=true" in line
    assert {p.name: sha(p) for p in run.iterdir()} == before
    # An explicit overwrite clears the old run first: no epoch_2.pth of the old run beside the new one's epoch_1.pth.
    rc, _, err = run_cli(["train", str(cfg), f"train.out_dir={run}", "train.epochs=1", "train.overwrite=true"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in run.glob("epoch_*.pth")) == ["epoch_1.pth"]
    assert torch.load(run / "last.pth", weights_only=False)["epoch"] == 1


# ---------------------------------------------------------------- settings that must not leak between steps

def test_add_classes_takes_the_teachers_recipe_but_not_how_its_step_was_run() -> None:
    """A teacher trained with a small-data cut, no pseudo-labels, the L2 HCCD and a validation hold-out passes on its
    image sizes and schedule only: the next step runs its own method's defaults (and stores those)."""
    from sdidd.cli import _recipe_of
    from sdidd.config import DATASET_KEYS, config_from_dict
    teacher_cfg = config_from_dict({
        "data": {"dataset": "synthetic", "train_sizes": [96], "test_size": 96, "max_size": 96, "val_fraction": 0.25},
        "train": {"epochs": 5, "resume": True, "out_dir": "runs/x"},
        "distill": {"pseudo_labels": False, "hccd_form": "l2", "new_teacher": "finetune"},
        "incremental": {"new_images": 3, "method": "sdidd", "epochs": 4, "lr": 0.002, "protocol": "2+2"},
    }).to_dict()
    recipe = _recipe_of(teacher_cfg, DATASET_KEYS)
    cfg = config_from_dict(recipe)
    assert cfg.data.train_sizes == [96] and cfg.train.epochs == 5 and (cfg.incremental.epochs, cfg.incremental.lr) == (4, 0.002)
    assert cfg.data.val_fraction == 0 and cfg.incremental.new_images is None and not cfg.train.resume
    assert cfg.distill.pseudo_labels is None and cfg.distill.hccd_form is None and cfg.distill.new_teacher is None
    assert cfg.incremental.protocol is None and cfg.data.dataset == "synthetic"  # the dataset keys come from the new data
    assert "dataset" not in recipe["data"]


def test_a_finished_step_is_not_continued_under_another_min_iters(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """min_iters stretches the schedule (epochs and decay points): changing it changes what is trained."""
    cfg = write_cfg(tmp_path / "cfg.yaml")
    run = tmp_path / "run"
    assert run_cli(["train", str(cfg), f"train.out_dir={run}"], capsys)[0] == 0
    before = sha(run / "last.pth")
    rc, _, err = run_cli(["train", str(cfg), f"train.out_dir={run}", "train.resume=true", "train.min_iters=40"], capsys)
    line = one_line_error(err)
    assert rc == 2 and "cannot resume" in line and "train.min_iters" in line
    assert sha(run / "last.pth") == before


# ---------------------------------------------------------------- prediction inputs

def test_predict_reads_sub_folders_and_refuses_a_fifo(tmp_path: Path) -> None:
    import os
    from sdidd.predict import _find, _out_names
    (tmp_path / "imgs" / "line2").mkdir(parents=True)
    for rel in ("a.png", "line2/a.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / rel)
    found = _find([tmp_path / "imgs"])
    assert [n for _, n in found] == ["a.png", "line2/a.png"]  # nested images found, and their names do not collide
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(SdiddError, match="not a regular file"):
        _find([tmp_path / "pipe.png"])
    # Names from a dataset never leave the output folder and never collide.
    assert _out_names(["../../outside/secret.png", "/abs/secret.png", "secret.png"]) == [
        "outside/secret.png", "abs/secret.png", "secret.png"]
    assert _out_names(["../x/a.png", "x/a.png"]) == ["x/a.png", "x/a_1.png"]


def test_sizes_beyond_any_machine_are_refused_up_front(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = write_cfg(tmp_path / "cfg.yaml")
    rc, _, err = run_cli(["train", str(cfg), "data.train_sizes=[20000]", "data.max_size=20000"], capsys)
    assert rc == 2 and "32..8192" in one_line_error(err)


def test_out_of_memory_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import sdidd.engine.trainer as trainer
    cfg = write_cfg(tmp_path / "cfg.yaml")

    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1717986918400 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(trainer, "step_loss", oom)
    rc, _, err = run_cli(["train", str(cfg), f"train.out_dir={tmp_path / 'run'}"], capsys)
    assert rc == 2 and "out of memory" in one_line_error(err)
    monkeypatch.setattr(trainer, "step_loss", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # any other RuntimeError stays a bug with its traceback
        run_cli(["train", str(cfg), f"train.out_dir={tmp_path / 'run2'}"], capsys)


def test_coco_paths_outside_the_images_folder_are_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import json
    from sdidd.data.coco_json import load_coco_json
    (tmp_path / "images").mkdir()
    (tmp_path / "outside").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "outside" / "secret.png")
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "../outside/secret.png", "width": 8, "height": 8}],
        "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    import logging
    logger = logging.getLogger("sdidd")  # the CLI's logger does not propagate to the root that caplog watches
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING"):
            ds = load_coco_json(tmp_path / "images", tmp_path / "ann.json")
    finally:
        logger.removeHandler(caplog.handler)
    assert len(ds) == 1 and "point outside the images folder" in caplog.text and "secret.png" in caplog.text
