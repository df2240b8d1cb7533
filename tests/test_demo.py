"""`sdidd demo --quick` (the README's first command, shrunk) and `sdidd eval` on the checkpoint it leaves."""
import json

import pytest

from sdidd.cli import main


@pytest.mark.slow
def test_demo_quick_prints_tables_and_writes_report(tmp_path, capsys):
    assert main(["demo", "--quick", "--seed", "3", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "mAP50 (%) on the test split" in out and "AP50 (%) per class:" in out
    assert "In this run" in out and "vary from run to run" in out  # a comparison of this run's numbers, not a promise
    for name in ("teacher", "finetune", "sdidd", "scratch", "crack"):
        assert name in out
    report = json.loads((tmp_path / "demo" / "results" / "demo.json").read_text())
    assert set(report["methods"]) == {"teacher", "finetune", "sdidd"}
    assert report["settings"]["seed"] == 3 and report["command"] == "sdidd demo --quick --seed 3"
    assert set(report["methods"]["sdidd"]["ap50_per_class"]) == {"scratch", "spot", "patch", "crack"}
    assert (tmp_path / "demo" / "results" / "demo.md").is_file()
    assert (tmp_path / "demo" / "results" / "demo_per_class.png").is_file()

    # `sdidd eval` on the demo's SD-IDD checkpoint: the table, the JSON and its three figures.
    ckpt = tmp_path / "demo" / "sdidd" / "step1" / "last.pth"
    assert main(["eval", str(ckpt), "--device", "cpu"]) == 0
    assert "AP50" in capsys.readouterr().out
    for name in ("eval.json", "eval.png", "eval_predictions.png", "eval_losses.png"):
        assert (ckpt.parent / name).is_file(), name
    assert set(json.loads((ckpt.parent / "eval.json").read_text())["per_class"]) == {"scratch", "spot", "patch", "crack"}


def test_demo_states_the_comparison_it_measured():
    from sdidd.demo import demo_comparison
    report = {"methods": {"teacher": {"map50_old": 78.0}, "finetune": {"map50_old": 39.0, "map50_new": 81.8},
                          "sdidd": {"map50_old": 68.8, "map50_new": 78.2}}}
    assert "distillation kept more of the old classes than fine-tuning" in demo_comparison(report)
    report["methods"]["sdidd"]["map50_old"] = 30.0
    assert "did NOT show" in demo_comparison(report)
