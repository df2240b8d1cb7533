"""Method two-models: the old model kept for the old classes, a fine-tune for the new ones (model/stack.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bench_scripts import run_script
from sdidd.engine.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from sdidd.errors import SdiddError
from sdidd.model.stack import ModelStack, stack_scores, stacked
from test_add_classes import base_model, exported  # noqa: F401 - module fixtures: the tiny defects and a base model
from test_cli_errors import error_line as one_line
from test_cli_errors import run_cli as run
from test_model import tiny_detector

torch.set_num_threads(1)
KW = dict(score_thr=1e-9, max_per_img=10_000, nms_pre=10_000)  # every box above the joined output's "off" score


def test_stack_scores_give_each_member_its_classes_and_damp_later_ones() -> None:
    p0, p1, p2 = torch.full((1, 2, 2), 0.5), torch.full((1, 2, 4), 0.4), torch.full((1, 2, 5), 0.8)
    p0[0, 1] = 0.0  # anchor 1: the first member sees nothing there
    a, b, c = stack_scores([p0, p1, p2], [2, 4, 5], damp=1.0)
    assert a.shape == b.shape == c.shape == (1, 2, 5)
    assert torch.equal(a[0, 0], torch.tensor([0.5, 0.5, 0, 0, 0]))
    assert torch.allclose(b[0, 0], torch.tensor([0, 0, 0.2, 0.2, 0]))  # 0.4 x (1 - 0.5)
    assert torch.allclose(b[0, 1], torch.tensor([0, 0, 0.4, 0.4, 0]))  # nothing earlier there: undamped
    assert torch.allclose(c[0, 0, 4], torch.tensor(0.4))  # 0.8 x (1 - max(0.5, 0.2))
    assert torch.allclose(c[0, 1, 4], torch.tensor(0.48))  # 0.8 x (1 - 0.4)
    undamped = stack_scores([p0, p1, p2], [2, 4, 5], damp=0.0)
    assert torch.allclose(undamped[2][0, :, 4], torch.tensor([0.8, 0.8]))


def test_after_a_replay_step_the_newest_member_votes_on_the_earlier_classes() -> None:
    """blend B: an earlier member's score s becomes s^(1-B) q^B, q the newest member's score for that class, so an old
    model firing on a defect the replayed fine-tune knows is not its class is outvoted; the newest member's own stay."""
    old, new = torch.tensor([[[0.8, 0.1], [0.8, 0.1]]]), torch.tensor([[[0.9, 0.1, 0.05], [0.02, 0.1, 0.9]]])
    plain = stack_scores([old, new], [2, 3], damp=1.0)
    voted = stack_scores([old, new], [2, 3], damp=1.0, blend=0.5)
    assert torch.allclose(voted[0][0, 0, 0], torch.tensor((0.8 * 0.9) ** 0.5))  # both see class 0 at anchor 0: it stays high
    assert torch.allclose(voted[0][0, 1, 0], torch.tensor((0.8 * 0.02) ** 0.5))  # anchor 1: a new defect the old model calls 0
    assert voted[0][0, 1, 0] < 0.5 * plain[0][0, 1, 0] and voted[0][0, 0, 0] > 0.8 * plain[0][0, 0, 0]
    assert torch.equal(voted[1], plain[1])  # the newest member's classes (damped by the unblended old scores) unchanged
    assert all(torch.equal(x, y) for x, y in zip(stack_scores([old, new], [2, 3], 1.0, blend=0.0), plain))


def test_a_stack_takes_the_old_classes_from_the_old_model_and_the_new_ones_from_the_new() -> None:
    torch.manual_seed(2)
    teacher, model = tiny_detector(num_classes=3).eval(), tiny_detector(num_classes=5).eval()
    images, sizes = torch.rand(1, 3, 64, 64), [(64, 64)]
    both = stacked(teacher, model, 0.0).eval().predict(images, sizes, **KW)[0]
    t, m = teacher.predict(images, sizes, **KW)[0], model.predict(images, sizes, **KW)[0]
    for c in range(5):
        want = t if c < 3 else m
        got_s, want_s = both["scores"][both["labels"] == c], want["scores"][want["labels"] == c]
        assert len(got_s) == len(want_s) > 0, c
        assert torch.allclose(got_s.sort().values, want_s.sort().values, atol=1e-5), c
    damped = stacked(teacher, model, 1.0).eval().predict(images, sizes, **KW)[0]
    assert damped["scores"][damped["labels"] >= 3].max() < both["scores"][both["labels"] >= 3].max()
    assert torch.allclose(damped["scores"][damped["labels"] < 3].sort().values, both["scores"][both["labels"] < 3].sort().values)
    three = stacked(stacked(teacher, model, 1.0), tiny_detector(num_classes=7).eval(), 1.0)
    assert three.ends == [3, 5, 7] and len(three.members) == 3 and three(images).cls.shape[1] == 3 * model(images).cls.shape[1]
    with pytest.raises(ValueError, match="cannot answer"):
        ModelStack([model, teacher], [5, 7])


def test_a_broken_kept_models_record_is_one_line(tmp_path: Path) -> None:
    model = tiny_detector(num_classes=3)
    state = {"model": model.state_dict(), "detector": model.cfg.__dict__ | {"num_classes": 3}, "classes": ["a", "b", "c"],
             "kept_models": [{"model": model.state_dict(), "detector": model.cfg.__dict__ | {"num_classes": 3}, "answers_to": 3}]}
    save_checkpoint(state, tmp_path / "bad.pth")  # the kept model answers for every class: nothing left for the newest
    with pytest.raises(SdiddError, match="kept_models"):
        load_checkpoint(tmp_path / "bad.pth")


def _renamed(exported: Path, folder: Path, names: list[str]) -> Path:
    """The new dataset's images and boxes under other class names: a description of a further step's dataset."""
    folder.mkdir()
    for split in ("train", "test"):
        doc = json.loads((exported / "new" / "annotations" / f"{split}.json").read_text())
        doc["categories"] = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
        (folder / f"{split}.json").write_text(json.dumps(doc))
    (folder / "data.yaml").write_text(yaml.safe_dump({"format": "coco", "path": str(exported / "new"),
                                                      "train": str(folder / "train.json"), "test": str(folder / "test.json"),
                                                      "train_images": "images/train", "test_images": "images/test"}))
    return folder / "data.yaml"


def test_add_classes_two_models_keeps_the_old_classes_exactly_and_chains(exported: Path, base_model: Path,  # noqa: F811
                                                                         tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`add-classes --method two-models`: the checkpoint holds both detectors, the old classes' detections are the base
    model's own, a next step stacks a third detector, a distillation step on top is refused in one line, and
    predict and export read the stack."""
    rc, out, err = run(["add-classes", str(base_model), str(exported / "new" / "data.yaml"), "--method", "two-models",
                        "--old-test", str(exported / "base" / "data.yaml"), "--out", str(tmp_path / "s1")], capsys)
    assert rc == 0, err
    state = load_checkpoint(tmp_path / "s1" / "last.pth")
    assert state["method"] == "two-models" and [k["answers_to"] for k in state["kept_models"]] == [2]
    stack, base = model_from_checkpoint(state).eval(), model_from_checkpoint(load_checkpoint(base_model)).eval()
    assert isinstance(stack, ModelStack) and stack.ends == [2, 4]
    images = torch.rand(2, 3, 64, 64) * 255
    got, want = stack.predict(images, [(64, 64)] * 2, **KW), base.predict(images, [(64, 64)] * 2, **KW)
    for g, w in zip(got, want):  # no forgetting by construction: the old-class detections are the base model's
        old = g["labels"] < 2
        assert torch.allclose(g["scores"][old].sort().values, w["scores"].sort().values, atol=1e-5)
    table = json.loads((tmp_path / "s1" / "add_classes.json").read_text())
    old_rows = [r for r in table["rows"] if r["group"] == "old"]
    assert all(abs(r["ap50"] - r["teacher_ap50"]) < 1e-6 for r in old_rows), old_rows

    more = _renamed(exported, tmp_path / "more", ["dent", "stain"])  # the same images under two more class names
    rc, _, err = run(["add-classes", str(tmp_path / "s1" / "last.pth"), str(more), "--method", "two-models",
                      "--out", str(tmp_path / "s2")], capsys)
    assert rc == 0, err
    three = model_from_checkpoint(load_checkpoint(tmp_path / "s2" / "last.pth"))
    assert isinstance(three, ModelStack) and three.ends == [2, 4, 6]
    assert three.blend == 0.0  # data-free steps: the fine-tunes never saw an old class, so they get no vote
    rc, _, err = run(["add-classes", str(tmp_path / "s1" / "last.pth"), str(more), "--out", str(tmp_path / "x")], capsys)
    assert rc == 2 and "the teacher is a two-models checkpoint" in one_line(err), err

    rc, out, err = run(["eval", str(tmp_path / "s1" / "last.pth"), f"data={exported / 'all_test' / 'data.yaml'}",
                        "--out", str(tmp_path / "eval.json")], capsys)
    assert rc == 0 and "crack" in out and (tmp_path / "eval.json").is_file(), err
    rc, out, err = run(["eval", str(tmp_path / "s1" / "last.pth"), f"data={exported / 'all_test' / 'data.yaml'}",
                        "--new-score-damp", "0", "--out", str(tmp_path / "eval0.json")], capsys)
    assert rc == 0 and (tmp_path / "eval0.json").is_file(), err  # the damping chosen at evaluation, no training
    # benchmarks/damp_sweep.py: the same checkpoints read with several G; the damping moves only the new classes
    assert run_script("damp_sweep", "--damps", "0,1,4", "--threads", "1", "--out", str(tmp_path / "sweep.md"),
                      f"a={tmp_path / 's1' / 'last.pth'}", f"b={tmp_path / 's2' / 'last.pth'}") == 0
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [(r["run"], r["damp"]) for r in rows] == [(n, g) for n in "ab" for g in (0.0, 1.0, 4.0)]
    # after one step the old classes' detections are the kept model's own, whatever G (after two, G damps the middle one too)
    assert len({r["old"] for r in rows if r["run"] == "a"}) == 1, rows
    assert "all − G = 1's, paired" in (tmp_path / "sweep.md").read_text()
    assert run_script("damp_sweep", "--damps", "1", "--blends", "0,1", "--threads", "1", "--out",
                      str(tmp_path / "blend.md"), f"a={tmp_path / 's1' / 'last.pth'}") == 0
    b0, b1 = json.loads((tmp_path / "blend.json").read_text())["rows"]
    assert (b0["blend"], b1["blend"]) == (0.0, 1.0) and b0["new"] == b1["new"]  # B moves only the old classes
    assert b0["old"] != b1["old"], (b0, b1)  # B = 1: the data-free fine-tune's untrained old channels answer instead
    with pytest.raises(SdiddError, match="not a two-models checkpoint"):  # the script prints it as one line
        run_script("damp_sweep", "--out", str(tmp_path / "x.md"), f"a={base_model}")
    rc, _, err = run(["predict", str(tmp_path / "s1" / "last.pth"), str(exported / "new" / "images" / "test"),
                      "--out", str(tmp_path / "pred")], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "pred" / "predictions.json").read_text())["categories"][-1]["name"] == "crack"

    ort = pytest.importorskip("onnxruntime")
    from sdidd.export import export_onnx, postprocess_onnx_outputs
    path = export_onnx(tmp_path / "s1" / "last.pth", tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    post = json.loads(sess.get_modelmeta().custom_metadata_map["postprocess"])
    assert len(post["num_per_level"]) == 10  # two members' five levels
    boxes, scores = sess.run(["boxes", "scores"], {"images": images.numpy()})
    onnx_dets = postprocess_onnx_outputs(boxes, scores, [(64, 64)] * 2, **post)  # as the README's snippet
    torch_dets = stack.predict(images, [(64, 64)] * 2)
    for o, t in zip(onnx_dets, torch_dets):
        np.testing.assert_array_equal(o["labels"], t["labels"].numpy())
        np.testing.assert_allclose(o["scores"], t["scores"].numpy(), atol=1e-4)
    assert export_onnx(tmp_path / "s1" / "last.pth", tmp_path / "b.onnx", blend=0.5).is_file()  # verified against torch


def test_a_two_models_checkpoint_can_be_read_with_another_damping(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """eval / predict / export --new-score-damp G: the new-class scores follow G, the old ones stay; one detector: one line."""
    torch.manual_seed(3)
    teacher, model = tiny_detector(num_classes=2).eval(), tiny_detector(num_classes=3).eval()
    rec = lambda m: m.cfg.__dict__ | {"num_classes": m.num_classes}  # noqa: E731
    state = {"model": model.state_dict(), "detector": rec(model), "classes": ["a", "b", "c"], "stack_damp": 1.0,
             "kept_models": [{"model": teacher.state_dict(), "detector": rec(teacher), "answers_to": 2}]}
    images, sizes = torch.rand(1, 3, 64, 64) * 255, [(64, 64)]
    own, off = (model_from_checkpoint(state, damp=g).eval() for g in (None, 0.0))
    assert own.damp == 1.0 and off.damp == 0.0
    a, b = own.predict(images, sizes, **KW)[0], off.predict(images, sizes, **KW)[0]
    assert torch.allclose(a["scores"][a["labels"] < 2].sort().values, b["scores"][b["labels"] < 2].sort().values)
    assert b["scores"][b["labels"] == 2].max() > a["scores"][a["labels"] == 2].max()  # undamped new class scores higher
    with pytest.raises(SdiddError, match="must be >= 0"):
        model_from_checkpoint(state, damp=-1.0)
    single = {k: v for k, v in state.items() if k not in ("kept_models", "stack_damp")}
    with pytest.raises(SdiddError, match="two-models checkpoint only"):
        model_from_checkpoint(single, damp=0.0)
    save_checkpoint(single, tmp_path / "one.pth")
    (tmp_path / "img").mkdir()
    from PIL import Image
    Image.new("RGB", (64, 64)).save(tmp_path / "img" / "x.png")
    rc, _, err = run(["predict", str(tmp_path / "one.pth"), str(tmp_path / "img"), "--new-score-damp", "0",
                      "--out", str(tmp_path / "pred")], capsys)
    assert rc == 2 and "two-models checkpoint only" in one_line(err), err
