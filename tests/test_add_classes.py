"""Adding classes to a trained model from a dataset that labels only the new classes (`sdidd add-classes`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from sdidd.cli import main
from sdidd.demo import export_defects
from sdidd.engine.checkpoint import load_checkpoint, model_from_checkpoint
from test_cli_errors import error_line as one_line
from test_cli_errors import run_cli as run

torch.set_num_threads(1)
TINY = {
    "data": {"train_sizes": [64], "test_size": 64, "max_size": 64},
    "model": {"pretrained": False, "fpn_channels": 16, "head_channels": 16, "head_convs": 1},
    "train": {"epochs": 1, "min_iters": 0, "batch_size": 8, "workers": 0, "threads": 1, "device": "cpu", "progress": False, "log_every": 1,
              "warmup_iters": 2, "milestones": [2]},
    "incremental": {"epochs": 1},
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in defects as base (scratch, spot), new (patch, crack) and all_test datasets, small."""
    root = tmp_path_factory.mktemp("defects")
    export_defects(root, num_train_images=32, num_test_images=8, image_size=64)
    return root


@pytest.fixture(scope="module")
def base_model(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model of the base classes, trained from the exported base dataset's description."""
    out = tmp_path_factory.mktemp("base")
    recipe = out / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(recipe), f"data={exported / 'base' / 'data.yaml'}", f"train.out_dir={out / 'run'}"]) == 0
    return out / "run" / "last.pth"


def test_description_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, exported: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    cases = {
        "missing.yaml": (None, "dataset description not found"),
        "bad_key.yaml": ({"format": "coco", "train": "a.json", "imgs": "x"}, "unknown key 'imgs'"),
        "labelme.yaml": ({"format": "labelme", "train": "a.json"}, "format 'labelme' is not supported"),
        "names.yaml": ({"train": "a.json", "names": [None]}, "'names' must be a list of non-empty class names"),
        "nosplit.yaml": ({"format": "coco"}, "neither 'train' nor 'test'"),
    }
    for name, (content, text) in cases.items():
        if content is not None:
            (tmp_path / name).write_text(yaml.safe_dump(content))
        rc, _, err = run(["train", str(recipe), f"data={tmp_path / name}"], capsys)
        assert rc == 2 and text in one_line(err) and name in err, (name, err)
    wrong = tmp_path / "wrong_names.yaml"
    desc = yaml.safe_load((exported / "new" / "data.yaml").read_text())
    wrong.write_text(yaml.safe_dump({**desc, "path": str(exported / "new"), "names": ["crack", "patch"]}))
    rc, _, err = run(["train", str(recipe), f"data={wrong}", f"train.out_dir={tmp_path / 'run'}"], capsys)
    assert rc == 2 and "differ from the description's names ['crack', 'patch']" in one_line(err)


@pytest.mark.slow
def test_add_classes_chain_and_refusals(exported: Path, base_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Base model + new-class dataset -> a model of all classes, in order, with the old/new table; it can be the
    teacher of the next add-classes run; each refusal is one line."""
    rc, out, err = run(["add-classes", str(base_model), str(exported / "new" / "data.yaml"), "--old-test",
                        str(exported / "base" / "data.yaml"), "--out", str(tmp_path / "step1"), "train.threads=1"], capsys)
    assert rc == 0, err
    state = load_checkpoint(tmp_path / "step1" / "last.pth")
    assert state["classes"] == ["scratch", "spot", "patch", "crack"] and state["new_classes"] == ["patch", "crack"]
    assert state["step"] == 1 and state["method"] == "sdidd+"
    table = json.loads((tmp_path / "step1" / "add_classes.json").read_text())
    sources = {r["class"]: r["test_set"] for r in table["rows"]}
    assert "old test set" in sources["scratch"] and "new dataset's test split" in sources["crack"]
    assert "mAP50 old" in out and "the teacher of a next add-classes run" in out

    # The same images under two more class names: the step-1 model learns them as a third group.
    more = tmp_path / "more"
    more.mkdir()
    for split in ("train", "test"):
        doc = json.loads((exported / "new" / "annotations" / f"{split}.json").read_text())
        doc["categories"] = [{"id": 1, "name": "dent"}, {"id": 2, "name": "stain"}]
        (more / f"{split}.json").write_text(json.dumps(doc))
    (more / "data.yaml").write_text(yaml.safe_dump({"format": "coco", "path": str(exported / "new"), "train": str(more / "train.json"),
                                                    "test": str(more / "test.json"), "train_images": "images/train",
                                                    "test_images": "images/test"}))
    rc, out, err = run(["add-classes", str(tmp_path / "step1" / "last.pth"), str(more / "data.yaml"), "--test",
                        str(exported / "all_test" / "data.yaml"), "--out", str(tmp_path / "step2")], capsys)
    assert rc == 0, err
    state = load_checkpoint(tmp_path / "step2" / "last.pth")
    assert state["classes"] == ["scratch", "spot", "patch", "crack", "dent", "stain"] and state["step"] == 2

    # With a validation split held out of the new images, the new classes are measured there, and the table says so.
    rc, _, err = run(["add-classes", str(base_model), str(exported / "new" / "data.yaml"), "--out", str(tmp_path / "val"),
                      "data.val_fraction=0.25", "train.threads=1"], capsys)
    assert rc == 0, err
    table = json.loads((tmp_path / "val" / "add_classes.json").read_text())
    (where,) = {r["test_set"] for r in table["rows"] if r["group"] == "new"}
    assert where.startswith("validation split (") and "data.val_fraction=0.25" in where, where

    # Refusals, one line each.
    rc, _, err = run(["add-classes", str(base_model), str(exported / "base" / "data.yaml"), "--out", str(tmp_path / "x")], capsys)
    assert rc == 2 and "the new dataset names no class the teacher does not know" in one_line(err)
    empty = tmp_path / "empty"
    empty.mkdir()
    doc = json.loads((exported / "new" / "annotations" / "train.json").read_text())
    (empty / "train.json").write_text(json.dumps({**doc, "annotations": []}))
    (empty / "data.yaml").write_text(yaml.safe_dump({"path": str(exported / "new"), "train": str(empty / "train.json"),
                                                     "images": "images/train"}))
    rc, _, err = run(["add-classes", str(base_model), str(empty / "data.yaml"), "--out", str(tmp_path / "y")], capsys)
    assert rc == 2 and "holds no box of patch, crack" in one_line(err)
    rc, _, err = run(["add-classes", str(base_model), str(exported / "new" / "data.yaml"), "--out", str(tmp_path / "z"),
                      "model.backbone=resnet50"], capsys)
    assert rc == 2 and "the teacher is a tf_efficientnet_lite0 model" in one_line(err)


def test_a_description_combines_with_data_key_overrides_in_any_order(exported: Path, tmp_path: Path) -> None:
    from sdidd.config import load_config
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    desc = str(exported / "base" / "data.yaml")
    for order in (["data.test_size=48", f"data={desc}", "data.on_bad_data=skip"], [f"data={desc}", "data.on_bad_data=skip", "data.test_size=48"]):
        cfg = load_config(recipe, order)
        assert cfg.data.dataset == "coco" and cfg.data.train_ann.endswith("train.json")
        assert cfg.data.test_size == 48 and cfg.data.on_bad_data == "skip"


@pytest.mark.slow
def test_a_new_dataset_may_name_and_label_old_classes(exported: Path, base_model: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """A full names list with old classes at zero boxes is fine; old classes that the new images label are trained
    from those labels (and get no pseudo-labels), and measured on the new test split when no old test set is given."""
    names_only = tmp_path / "names_only"
    names_only.mkdir()
    for split in ("train", "test"):
        doc = json.loads((exported / "new" / "annotations" / f"{split}.json").read_text())
        ids = {c["id"]: c["name"] for c in doc["categories"]}
        doc["categories"] = [{"id": i + 1, "name": n} for i, n in enumerate(["scratch", "spot", "patch", "crack"])]
        for a in doc["annotations"]:
            a["category_id"] = ["scratch", "spot", "patch", "crack"].index(ids[a["category_id"]]) + 1
        (names_only / f"{split}.json").write_text(json.dumps(doc))
    (names_only / "data.yaml").write_text(yaml.safe_dump({
        "format": "coco", "path": str(exported / "new"), "train": str(names_only / "train.json"),
        "test": str(names_only / "test.json"), "train_images": "images/train", "test_images": "images/test"}))
    rc, out, err = run(["add-classes", str(base_model), str(names_only / "data.yaml"), "--out", str(tmp_path / "a"),
                        "train.threads=1"], capsys)
    assert rc == 0, err
    assert load_checkpoint(tmp_path / "a" / "last.pth")["classes"] == ["scratch", "spot", "patch", "crack"]
    assert "labels old classes too" not in out  # named, but no box: nothing to train from

    labelled = tmp_path / "labelled"  # every defect labelled (the all-class test images stand in for such a set)
    labelled.mkdir()
    (labelled / "data.yaml").write_text(yaml.safe_dump({
        "format": "coco", "path": str(exported / "all_test"), "train": "annotations/test.json",
        "test": "annotations/test.json", "images": "images/test"}))
    rc, out, err = run(["add-classes", str(base_model), str(labelled / "data.yaml"), "--out", str(tmp_path / "b"),
                        "train.threads=1"], capsys)
    assert rc == 0, err
    assert "labels old classes too (scratch" in out and "trained from those labels, with no pseudo-labels" in out
    table = json.loads((tmp_path / "b" / "add_classes.json").read_text())
    rows = {r["class"]: r for r in table["rows"]}
    assert "new dataset's test split" in rows["scratch"]["test_set"] and rows["scratch"]["ap50"] == rows["scratch"]["ap50"]



def test_add_classes_replays_a_few_kept_old_images(exported: Path, base_model: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    """--replay OLD.yaml --replay-images N: N old images per old class train with the new ones (ids kept apart), in a
    distilled step and in a two-models step's fine-tune."""
    for method in ("sdidd", "two-models"):
        rc, out, err = run(["add-classes", str(base_model), str(exported / "new" / "data.yaml"), "--replay",
                            str(exported / "base" / "data.yaml"), "--replay-images", "3", "--out", str(tmp_path / method),
                            "--method", method, "train.threads=1"], capsys)
        assert rc == 0, err
        line = next(x for x in (out + err).splitlines() if x.startswith("replay:"))
        assert "(3 per old class" in line
        state = load_checkpoint(tmp_path / method / "last.pth")
        assert state["config"]["incremental"]["replay_images"] == 3 and state["method"] == method
        if method == "two-models":  # the replayed fine-tune votes on the old classes at inference (model/stack.py)
            assert state["stack_blend"] == 0.3 and model_from_checkpoint(state).blend == 0.3
    rc, _, err = run(["add-classes", str(base_model), str(exported / "new" / "data.yaml"), "--replay-images", "3",
                      "--out", str(tmp_path / "r2")], capsys)
    assert rc == 2 and one_line(err) and "--replay-images needs --replay" in err
    rc, _, err = run(["add-classes", str(base_model), str(exported / "new" / "data.yaml"), "incremental.replay_images=3",
                      "--out", str(tmp_path / "r3")], capsys)
    assert rc == 2 and one_line(err) and "--replay OLD.yaml" in err
