"""The catalogue of bad inputs, through `sdidd.cli.main`: one `error: ` line on stderr, no traceback, and the
documented exit code (2 for an error; 1 when `check-data` finds problems in a dataset).

Datasets are written into a temporary folder in the three on-disk layouts the loaders read: NEU-DET-like VOC
(IMAGES/<class>_<n>.jpg + ANNOTATIONS/<class>_<n>.xml, test split n % 5 == 0), DeepPCB-like txt (PCBData/
trainval.txt and test.txt listing group*/<g>/<id>.jpg -> <id>_test.jpg and group*/<g>_not/<id>.txt), and COCO json.
Every `train` below fails before the first step, except the on_bad_data=skip run (1 epoch, 64 px, random init).
"""
from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sdidd.cli import main
from sdidd.engine.checkpoint import save_checkpoint

torch.set_num_threads(1)
SIZE = 64
TINY = {
    "data": {"train_sizes": [SIZE], "test_size": SIZE, "max_size": SIZE},
    "model": {"pretrained": False, "fpn_channels": 16, "head_channels": 16, "head_convs": 1},
    "train": {"epochs": 1, "min_iters": 0, "batch_size": 4, "workers": 0, "threads": 1, "device": "cpu", "progress": False, "log_every": 1,
              "warmup_iters": 2, "milestones": [2]},
}


# ---------------------------------------------------------------- helpers

def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """`sdidd argv` in this process: (exit code, stdout, stderr). argparse's exit counts as a return."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except Exception:  # noqa: BLE001 - an uncaught exception is exactly what these tests forbid
        pytest.fail(f"sdidd {' '.join(argv)} raised instead of printing one line:\n{traceback.format_exc()}")
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(err: str) -> str:
    """The single `error: ` line of stderr; fails on more lines or a traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def expect_error(argv: list[str], capsys: pytest.CaptureFixture, *parts: str, rc: int = 2) -> str:
    """Run the CLI, check the exit code and that the one error line holds every part; return the line."""
    code, _, err = run_cli(argv, capsys)
    line = error_line(err)
    assert code == rc, (code, line)
    for p in parts:
        assert p in line, f"{p!r} not in {line!r}"
    return line


def write_cfg(path: Path, **sections: dict[str, Any]) -> Path:
    """TINY with `sections` merged in, written as YAML (out_dir beside the config)."""
    data = {k: dict(v) for k, v in TINY.items()}
    data["train"]["out_dir"] = str(path.parent / "run")
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    path.write_text(yaml.safe_dump(data))
    return path


def synthetic_cfg(tmp_path: Path) -> Path:
    """A tiny config on the built-in synthetic data (classes scratch, spot, patch, crack)."""
    return write_cfg(tmp_path / "cfg.yaml", data={"dataset": "synthetic", "num_train_images": 8, "num_test_images": 4})


def _image(path: Path, seed: int, size: tuple[int, int] = (SIZE, SIZE)) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8)).save(path)


def voc_xml(objects: list[tuple[str, tuple[float, float, float, float]]], size: int = SIZE) -> str:
    """A Pascal VOC annotation (1-based inclusive boxes) as NEU-DET ships them."""
    objs = "".join(f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
                   f"<ymax>{b[3]}</ymax></bndbox></object>" for n, b in objects)
    return f"<annotation><size><width>{size}</width><height>{size}</height><depth>1</depth></size>{objs}</annotation>"


def make_neu(root: Path, n: int = 10) -> Path:
    """NEU-DET-like folder: crazing_1..n (64 px, one box each); n % 5 == 0 are test images."""
    (root / "IMAGES").mkdir(parents=True)
    (root / "ANNOTATIONS").mkdir()
    for i in range(1, n + 1):
        cls = "crazing" if i % 2 else "inclusion"
        _image(root / "IMAGES" / f"{cls}_{i}.jpg", i)
        (root / "ANNOTATIONS" / f"{cls}_{i}.xml").write_text(voc_xml([(cls, (5, 5, 40, 40))]))
    return root


def make_deeppcb(root: Path, n: int = 6) -> Path:
    """DeepPCB-like folder: PCBData/group00041/00041/<id>_test.jpg, .../00041_not/<id>.txt, split files."""
    g = root / "PCBData" / "group00041"
    (g / "00041").mkdir(parents=True)
    (g / "00041_not").mkdir()
    lines = []
    for k in range(n):
        pid = f"000410{k:02d}"
        _image(g / "00041" / f"{pid}_test.jpg", 100 + k)
        (g / "00041_not" / f"{pid}.txt").write_text(f"4 4 30 30 {k % 6 + 1}\n10 12 50 40 2\n")
        lines.append(f"group00041/00041/{pid}.jpg group00041/00041_not/{pid}.txt")
    (root / "PCBData" / "trainval.txt").write_text("\n".join(lines[:-2]) + "\n")
    (root / "PCBData" / "test.txt").write_text("\n".join(lines[-2:]) + "\n")
    return root


def make_coco(root: Path) -> Path:
    """COCO json folder: train.json / test.json over images/ (30x20 px); returns the train json."""
    (root / "images").mkdir(parents=True)
    for split, ids in (("train", range(1, 5)), ("test", range(5, 7))):
        images, anns = [], []
        for i in ids:
            _image(root / "images" / f"{i}.png", i, size=(30, 20))
            images.append({"id": i, "file_name": f"{i}.png", "width": 30, "height": 20})
            anns.append({"id": i, "image_id": i, "category_id": 1 + i % 2, "bbox": [2, 2, 10, 8], "iscrowd": 0})
        data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "dent"}, {"id": 2, "name": "stain"}]}
        (root / f"{split}.json").write_text(json.dumps(data))
    return root / "train.json"


def neu_cfg(tmp_path: Path, root: Path, **data: Any) -> Path:
    """Tiny training config on a NEU-DET-like folder."""
    return write_cfg(tmp_path / "neu.yaml", data={"dataset": "neu-det", "root": str(root), **data})


def pcb_cfg(tmp_path: Path, root: Path) -> Path:
    """Tiny training config on a DeepPCB-like folder."""
    return write_cfg(tmp_path / "pcb.yaml", data={"dataset": "deeppcb", "root": str(root)})


def coco_cfg(tmp_path: Path, ann: Path) -> Path:
    """Tiny training config on a COCO json folder."""
    return write_cfg(tmp_path / "coco.yaml", data={"dataset": "coco", "images_dir": str(ann.parent / "images"),
                                                   "train_ann": str(ann), "test_ann": str(ann.parent / "test.json")})


# ---------------------------------------------------------------- configuration

def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    expect_error(["train", str(tmp_path / "nope.yaml")], capsys, "nope.yaml: config file not found")


def test_yaml_syntax_error_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("data:\n  dataset: synthetic\ntrain: {epochs: [1,\n")
    expect_error(["train", str(cfg)], capsys, "bad.yaml: not valid YAML (line ")


def test_unknown_key_in_file_and_override(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = synthetic_cfg(tmp_path)
    text = yaml.safe_load(cfg.read_text())
    text["train"]["epoch"] = 3  # typo of epochs
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(text))
    expect_error(["train", str(bad)], capsys, "unknown config key 'train.epoch'", "epochs")
    expect_error(["train", str(cfg), "data.on_bad=skip"], capsys, "unknown config key 'data.on_bad'", "on_bad_data")
    # A forgotten section prefix is pointed at the key it most likely means.
    expect_error(["train", str(cfg), "resume=true"], capsys, "unknown config key 'resume', did you mean 'train.resume'?")


@pytest.mark.parametrize("override, parts", [
    ("train.epochs=two", ("config key 'train.epochs'", "expected an integer", "'two'")),
    ("train.lr=fast", ("config key 'train.lr'", "expected a number")),
    ("train.resume=maybe", ("config key 'train.resume'", "expected true or false")),
    ("data.train_sizes={a: 1}", ("config key 'data.train_sizes'", "expected a list")),  # a single size is one: 64 = [64]
])
def test_wrong_type(tmp_path: Path, capsys: pytest.CaptureFixture, override: str, parts: tuple[str, ...]) -> None:
    expect_error(["train", str(synthetic_cfg(tmp_path)), override], capsys, *parts)


@pytest.mark.parametrize("override, parts", [
    ("train.lr=-0.01", ("config key 'train.lr'", "must be positive")),
    ("train.epochs=0", ("config key 'train.epochs'", "must be >= 1")),
    ("data.on_bad_data=ignore", ("config key 'data.on_bad_data'", "'error' or 'skip'")),
    ("data.classes=[]", ("config key 'data.classes'", "must not be empty")),
])
def test_impossible_value(tmp_path: Path, capsys: pytest.CaptureFixture, override: str, parts: tuple[str, ...]) -> None:
    expect_error(["train", str(synthetic_cfg(tmp_path)), override], capsys, *parts)


def test_class_not_in_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = synthetic_cfg(tmp_path)
    expect_error(["train", str(cfg), "data.classes=[scratch, dent]"], capsys,
                 "config key 'data.classes'", "'dent' is not a class of synthetic", "scratch, spot, patch, crack")
    expect_error(["incremental", str(cfg), "incremental.groups=[[scratch], [dent]]"], capsys,
                 "config key 'incremental.groups'", "class 'dent' is not in the dataset")
    expect_error(["incremental", str(cfg), "incremental.protocol=3+3"], capsys,
                 "config key 'incremental.protocol'", "needs 6 classes, the dataset has 4")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_empty_class_group(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    expect_error(["incremental", str(synthetic_cfg(tmp_path)), "incremental.groups=[[scratch, spot], []]"], capsys,
                 "config key 'incremental.groups'", "a class group is empty")


def test_argparse_errors_are_one_line_exit_2(capsys: pytest.CaptureFixture) -> None:
    expect_error(["check-data"], capsys, "the following arguments are required: dataset", "sdidd")
    expect_error(["train", "cfg.yaml", "--epochs", "3"], capsys, "unrecognized arguments: --epochs 3")


# ---------------------------------------------------------------- missing dataset root

@pytest.mark.parametrize("dataset, folder, layout", [
    ("neu-det", "NEU-DET", ("IMAGES/*.jpg", "ANNOTATIONS/*.xml")),
    ("deeppcb", "DeepPCB", ("PCBData/trainval.txt", "PCBData/test.txt")),
])
def test_missing_dataset_root_says_where_and_what(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  dataset: str, folder: str, layout: tuple[str, str]) -> None:
    where = tmp_path / "nowhere"
    parts = (f"{folder} not found at {where / folder}", *(f"{where / folder}/{x}" for x in layout), "SDIDD_DATA or data.root")
    cfg = write_cfg(tmp_path / "cfg.yaml", data={"dataset": dataset, "root": str(where)})
    expect_error(["train", str(cfg)], capsys, *parts)
    expect_error(["check-data", dataset, "--root", str(where)], capsys, *parts)


def test_check_data_of_a_path_that_is_no_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    expect_error(["check-data", str(tmp_path / "gone")], capsys, "gone: no such file or folder")
    (tmp_path / "empty").mkdir()
    expect_error(["check-data", str(tmp_path / "empty")], capsys, "cannot tell the dataset format", "IMAGES/", "PCBData/", ".json")
    expect_error(["check-data", "voc2007"], capsys, "unknown dataset 'voc2007'")


# ---------------------------------------------------------------- bad data: check-data exits 1, train exits 2

def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])


def _neu_set_xml(name: str, xml: str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        (root / "ANNOTATIONS" / f"{name}.xml").write_text(xml)
    return mutate


# (layout, mutation of a clean dataset, problem kind check-data reports, text both commands must show)
CATALOGUE: dict[str, tuple[str, Callable[[Path], None], str, str]] = {
    "unreadable image": ("neu", lambda r: (r / "IMAGES" / "crazing_3.jpg").write_bytes(b"not a jpeg at all"),
                         "unreadable_image", "crazing_3.jpg: cannot read image"),
    "truncated image": ("neu", lambda r: _truncate(r / "IMAGES" / "inclusion_4.jpg"),
                        "unreadable_image", "inclusion_4.jpg: cannot read image"),
    "malformed xml": ("neu", _neu_set_xml("crazing_1", "<annotation><size><width>64</width>"),
                      "malformed_annotation", "crazing_1.xml: malformed XML"),
    "box outside the image (voc)": ("neu", _neu_set_xml("crazing_7", voc_xml([("crazing", (5, 5, 200, 40))])),
                                    "bad_box", "crazing_7.xml: object 0 (crazing): box xmin=5 ymin=5 xmax=200 ymax=40 is outside the 64x64 image"),
    "zero-size box (voc)": ("neu", _neu_set_xml("crazing_9", voc_xml([("crazing", (30, 5, 28, 40))])),
                            "bad_box", "crazing_9.xml: object 0 (crazing): box xmin=30 ymin=5 xmax=28 ymax=40 has non-positive size"),
    "unknown class name (voc)": ("neu", _neu_set_xml("inclusion_2", voc_xml([("dent", (5, 5, 40, 40))])),
                                 "unknown_class", "inclusion_2.xml: object 0 has unknown class name 'dent'"),
    "annotation without image (voc)": ("neu", lambda r: (r / "IMAGES" / "crazing_1.jpg").unlink(),
                                       "missing_image", "crazing_1.xml: image"),
    "malformed txt line": ("pcb", lambda r: (r / "PCBData/group00041/00041_not/00041001.txt").write_text("4 4 30 30 1\n4 4 thirty 30 2\n"),
                           "malformed_annotation", "00041001.txt:2: expected 'x1 y1 x2 y2 type', got '4 4 thirty 30 2'"),
    "zero-size box (txt)": ("pcb", lambda r: (r / "PCBData/group00041/00041_not/00041000.txt").write_text("20 4 20 30 1\n"),
                            "bad_box", "00041000.txt:1: box [20, 4, 20, 30] has non-positive size"),
    "unknown defect type (txt)": ("pcb", lambda r: (r / "PCBData/group00041/00041_not/00041002.txt").write_text("4 4 30 30 9\n"),
                                  "unknown_class", "00041002.txt:1: unknown defect type 9"),
    "image listed in split but missing": ("pcb", lambda r: (r / "PCBData/group00041/00041/00041003_test.jpg").unlink(),
                                          "missing_image", "trainval.txt:4: listed image"),
    "malformed json": ("coco", lambda r: (r / "train.json").write_text('{"images": [{"id": 1,'),
                       "malformed_annotation", "train.json: malformed json"),
    "box outside the image (json)": ("coco", lambda r: _coco_edit(r, bbox=[25, 2, 10, 8]),
                                     "bad_box", "(1.png): bbox [25, 2, 10, 8] is outside the 30x20 image"),
    "unknown category (json)": ("coco", lambda r: _coco_edit(r, category_id=7),
                                "unknown_class", "(1.png) has unknown category id 7"),
    "image listed in json but missing": ("coco", lambda r: (r / "images" / "2.png").unlink(),
                                         "missing_image", "2.png not found"),
}


def _coco_edit(root: Path, **ann: Any) -> None:
    """Change the first annotation of train.json."""
    data = json.loads((root / "train.json").read_text())
    data["annotations"][0].update(ann)
    (root / "train.json").write_text(json.dumps(data))


def _make(layout: str, tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """(dataset root, train config, check-data arguments) of a clean dataset in `layout`."""
    if layout == "neu":
        root = make_neu(tmp_path / "NEU-DET")
        return root, neu_cfg(tmp_path, root), [str(root)]
    if layout == "pcb":
        root = make_deeppcb(tmp_path / "DeepPCB")
        return root, pcb_cfg(tmp_path, root), [str(root)]
    ann = make_coco(tmp_path / "coco")
    return ann.parent, coco_cfg(tmp_path, ann), [str(ann)]


@pytest.mark.parametrize("layout", ["neu", "pcb", "coco"])
def test_clean_datasets_pass_check_data(tmp_path: Path, capsys: pytest.CaptureFixture, layout: str) -> None:
    """The baseline every catalogue case starts from is clean, so each case's failure is its own."""
    _, _, args = _make(layout, tmp_path)
    rc, out, err = run_cli(["check-data", *args], capsys)
    assert rc == 0 and err == "" and "OK: 0 error(s), 0 warning(s)" in out, out + err


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_bad_input_catalogue(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    layout, mutate, kind, text = CATALOGUE[case]
    root, cfg, args = _make(layout, tmp_path)
    mutate(root)

    rc, out, err = run_cli(["check-data", *args], capsys)
    line = error_line(err)
    assert rc == 1, out + err
    assert f"error: {kind}: 1" in out and "FAILED: 1 error(s)" in out, out
    assert f"first {kind}: " in line and text in line, line

    # Training runs the same checks before its first step and refuses with the same problem.
    line = expect_error(["train", str(cfg)], capsys, text, "sdidd check-data", "data.on_bad_data=skip")
    assert not (tmp_path / "run" / "last.pth").exists(), line


def test_duplicate_images_are_a_warning_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_neu(tmp_path / "NEU-DET")
    (root / "IMAGES" / "crazing_3.jpg").write_bytes((root / "IMAGES" / "crazing_1.jpg").read_bytes())
    rc, out, err = run_cli(["check-data", str(root)], capsys)
    assert rc == 0 and err == "", err
    assert "warning: duplicate_image: 1" in out and "crazing_3.jpg: same bytes as" in out and "OK: 0 error(s), 1 warning(s)" in out


def test_check_data_counts_several_problems_and_lists_first_examples(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_neu(tmp_path / "NEU-DET")
    for name in ("crazing_1", "crazing_3", "crazing_7"):
        (root / "ANNOTATIONS" / f"{name}.xml").write_text("<oops")
    (root / "IMAGES" / "inclusion_2.jpg").write_bytes(b"")
    rc, out, err = run_cli(["check-data", str(root), "--split", "train"], capsys)
    assert rc == 1 and "error: malformed_annotation: 3" in out and "error: unreadable_image: 1" in out
    assert "(train)" in out and "FAILED: 4 error(s)" in out
    assert "4 error(s), first unreadable_image: " in error_line(err) and "inclusion_2.jpg" in err


@pytest.mark.slow
def test_on_bad_data_skip_reports_the_skips_and_trains(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_neu(tmp_path / "NEU-DET")
    _truncate(root / "IMAGES" / "crazing_3.jpg")  # a train image (3 % 5 != 0)
    (root / "ANNOTATIONS" / "crazing_7.xml").write_text("<annotation>")  # another one
    cfg = neu_cfg(tmp_path, root, on_bad_data="skip")
    rc, out, err = run_cli(["train", str(cfg)], capsys)
    assert rc == 0, err
    assert "Traceback" not in err
    assert out.count("warning: train: skipped annotation problems (data.on_bad_data=skip): malformed_annotation x1") == 1, out
    assert "warning: skipping 1 unreadable or mis-sized images (data.on_bad_data=skip), e.g. " in out and "crazing_3.jpg" in out
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert state["epoch"] == 1 and (tmp_path / "run" / "metrics.json").is_file()
    # 8 train images - 2 skipped = 6, one batch of 4 and one of 2 (drop_last only when >= 2 batches fit)
    assert state["iteration"] == 2


# ---------------------------------------------------------------- checkpoints given to eval and incremental

def test_eval_of_a_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    expect_error(["eval", str(tmp_path / "model.pth"), "--device", "cpu"], capsys, "model.pth: checkpoint not found")
    (tmp_path / "folder.pth").mkdir()
    expect_error(["eval", str(tmp_path / "folder.pth"), "--device", "cpu"], capsys, "folder.pth: checkpoint is not a file")


def test_eval_of_a_non_sdidd_pth(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    layer = torch.nn.Linear(3, 2)
    torch.save(layer.state_dict(), tmp_path / "state_dict.pth")  # plain tensors, but no sdidd record
    torch.save(layer, tmp_path / "module.pth")  # a pickled nn.Module: loading it would import and run code
    torch.save([1, 2, 3], tmp_path / "list.pth")
    expect_error(["eval", str(tmp_path / "state_dict.pth"), "--device", "cpu"], capsys,
                 "state_dict.pth: not an sdidd checkpoint (no model/format_version)")
    expect_error(["eval", str(tmp_path / "module.pth"), "--device", "cpu"], capsys,
                 "module.pth: refused", "pickled object (torch.nn.modules.linear.Linear)")
    expect_error(["eval", str(tmp_path / "list.pth"), "--device", "cpu"], capsys, "list.pth: not an sdidd checkpoint")


def _fake_teacher(path: Path, classes: list[str], backbone: str = "tf_efficientnet_lite0") -> Path:
    """A structurally valid checkpoint (checked before any weights are loaded)."""
    save_checkpoint({"model": {"w": torch.zeros(1)}, "detector": {"backbone": backbone, "num_classes": len(classes)},
                     "classes": classes, "step": 0}, path)
    return path


def test_teacher_checkpoint_must_fit_the_task(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = synthetic_cfg(tmp_path)
    wrong_order = _fake_teacher(tmp_path / "order.pth", ["spot", "scratch"])
    expect_error(["incremental", str(cfg), "incremental.protocol=2+2", f"incremental.teacher={wrong_order}"], capsys,
                 "order.pth: cannot be the teacher of step 1 (sdidd)", "classes ['spot', 'scratch'] (needs ['scratch', 'spot'])")
    other_backbone = _fake_teacher(tmp_path / "backbone.pth", ["scratch", "spot"], backbone="tf_efficientnet_lite2")
    expect_error(["incremental", str(cfg), "incremental.protocol=2+2", f"incremental.teacher={other_backbone}"], capsys,
                 "backbone.pth: cannot be the teacher", "backbone tf_efficientnet_lite2 (needs tf_efficientnet_lite0)")
    odd = _fake_teacher(tmp_path / "odd.pth", ["scratch", "spot", "patch"])
    expect_error(["incremental", str(cfg), "incremental.protocol=2+2", f"incremental.teacher={odd}"], capsys,
                 "odd.pth: teacher with 3 classes fits no step")
    expect_error(["incremental", str(cfg), "incremental.protocol=2+2", f"incremental.teacher={tmp_path / 'none.pth'}"], capsys,
                 "none.pth: checkpoint not found")
