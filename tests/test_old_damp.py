"""benchmarks/new_class_confusion.py --old-damp: new-class scores fall where the old classes are confident."""
from pathlib import Path

import pytest
import torch

from bench_scripts import load_script
from sdidd.engine.checkpoint import save_checkpoint
from sdidd.errors import SdiddError
from test_model import tiny_detector


def test_old_damped_scores_scale_new_classes_by_the_old_confidence_and_keep_old_ones() -> None:
    torch.manual_seed(0)
    model = tiny_detector(num_classes=5).eval()
    images = torch.rand(2, 3, 64, 64)
    plain = model(images).cls.sigmoid()
    damped = load_script("new_class_confusion").OldDamped(model, old=3, gamma=2.0).eval()
    got = damped(images).cls.sigmoid()
    assert torch.allclose(got[..., :3], plain[..., :3])
    want = plain[..., 3:] * (1 - plain[..., :3].amax(-1, keepdim=True)) ** 2
    assert torch.allclose(got[..., 3:], want, atol=1e-5)
    assert (got[..., 3:] < plain[..., 3:]).all()  # every old score is > 0, so every new score falls
    # detections go through the re-scored output: predict's new-class scores are never above the plain model's
    sizes = [(64, 64), (64, 64)]
    for a, b in zip(damped.predict(images, sizes, score_thr=0.0), model.predict(images, sizes, score_thr=0.0)):
        new_a, new_b = a["scores"][a["labels"] >= 3], b["scores"][b["labels"] >= 3]
        assert new_a.max() < new_b.max()


def test_old_damped_scores_can_come_from_another_model() -> None:
    model, scorer = tiny_detector(num_classes=5).eval(), tiny_detector(num_classes=3).eval()
    torch.manual_seed(1)
    for p in scorer.parameters():  # a different model than `model`'s own old channels
        p.data.add_(0.05 * torch.randn_like(p))
    images = torch.rand(1, 3, 64, 64)
    plain, q = model(images).cls.sigmoid(), scorer(images).cls.sigmoid()
    got = load_script("new_class_confusion").OldDamped(model, old=3, gamma=1.0, scorer=scorer).eval()(images).cls.sigmoid()
    assert torch.allclose(got[..., 3:], plain[..., 3:] * (1 - q.amax(-1, keepdim=True)), atol=1e-5)
    own = plain[..., 3:] * (1 - plain[..., :3].amax(-1, keepdim=True))
    assert not torch.allclose(got[..., 3:], own, atol=1e-4)


def test_per_class_table_gives_each_class_on_its_own_subset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--per-class: one row per class, new classes on the images without old defects; --blend needs a stack."""
    torch.manual_seed(0)
    teacher, model = tiny_detector(num_classes=2).eval(), tiny_detector(num_classes=4).eval()
    rec = lambda m: m.cfg.__dict__ | {"num_classes": m.num_classes}  # noqa: E731
    single = {"model": model.state_dict(), "detector": rec(model), "classes": ["scratch", "spot", "patch", "crack"]}
    save_checkpoint(single, tmp_path / "one.pth")
    save_checkpoint(single | {"kept_models": [{"model": teacher.state_dict(), "detector": rec(teacher), "answers_to": 2}]},
                    tmp_path / "stack.pth")
    sets = ["data.num_train_images=2", "data.num_test_images=8", "data.train_sizes=[64]", "data.test_size=64",
            "data.max_size=64", "model.pretrained=false"]
    common = ["--recipe", "synthetic_quick", *(x for kv in sets for x in ("--set", kv)), "--old", "2"]
    load_script("new_class_confusion").main([*common, "--per-class", "--blend", "0.3", f"s={tmp_path / 'stack.pth'}"])
    out = capsys.readouterr().out
    rows = [r.split(" | ") for r in out.splitlines() if r.startswith("| s | per class | ")]
    assert len(rows) == 5 and len(rows[0]) == 7, out  # the group row, then one row per class
    assert [r[2] for r in rows[1:]] == ["scratch", "spot", "patch", "crack"] and {len(r) for r in rows[1:]} == {5}, out
    assert "| AP50, new classes on the " in out and " without old defects, old classes on the " in out, out
    with pytest.raises(SdiddError, match="two-models checkpoint only"):
        load_script("new_class_confusion").main([*common, "--blend", "0.3", f"one={tmp_path / 'one.pth'}"])
