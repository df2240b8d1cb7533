"""The benchmark's JSON contract, Markdown report, plots and stage reuse, on a tiny synthetic run."""
import json
import time

import pytest

from sdidd.benchmark import parse_methods, run_benchmark
from sdidd.config import config_from_dict
from sdidd.errors import SdiddError

TINY = {
    "data": {"dataset": "synthetic", "num_train_images": 16, "num_test_images": 8, "train_sizes": [64], "test_size": 64,
             "max_size": 64, "check": False},
    "model": {"pretrained": False, "fpn_channels": 16, "head_channels": 16, "head_convs": 1},
    "train": {"epochs": 1, "batch_size": 4, "workers": 0, "threads": 1, "device": "cpu", "progress": False,
              "warmup_iters": 2, "milestones": []},
    "incremental": {"protocol": "2+2"},
}
METHOD_KEYS = {"map50_old", "map50_new", "map50_all", "map_all", "ap50_per_class", "train_seconds",
               "images_per_second", "peak_memory_mb"}


def test_parse_methods_expands_ablations_and_refuses_unknown():
    assert parse_methods("finetune,ablations")[:3] == ["finetune", "sdidd-no-cls", "sdidd-no-reg"]
    assert "sdidd-no-floor" in parse_methods("ablations")
    with pytest.raises(SdiddError, match="unknown method 'foo'"):
        parse_methods("sdidd,foo")


@pytest.mark.slow
def test_benchmark_writes_the_contract_and_reuses_finished_stages(tmp_path):
    cfg = config_from_dict(TINY)
    out, res = tmp_path / "run", tmp_path / "results"
    report = run_benchmark(cfg, ["finetune", "sdidd"], out, res, "tiny", command="test", tag="t")
    data = json.loads((res / "t.json").read_text())
    assert data == json.loads(json.dumps(report))
    for key in ("dataset", "protocol", "profile", "machine", "date", "command", "classes_old", "classes_new", "methods"):
        assert key in data, key
    assert data["classes_old"] == ["scratch", "spot"] and data["classes_new"] == ["patch", "crack"]
    assert set(data["methods"]) == {"teacher", "finetune", "sdidd"}
    assert set(data["methods"]["teacher"]["ap50_per_class"]) == {"scratch", "spot"}
    for m in ("finetune", "sdidd"):
        v = data["methods"][m]
        assert METHOD_KEYS <= set(v), m
        assert v["train_seconds"] > 0 and v["images_per_second"] > 0
        assert set(v["ap50_per_class"]) == {"scratch", "spot", "patch", "crack"}
        assert v["map50_all"] == pytest.approx(sum(v["ap50_per_class"].values()) / 4, abs=0.01)
    md = (res / "t.md").read_text()
    assert "| finetune |" in md and "| sdidd |" in md and "Command: `test`" in md
    for png in ("t_per_class.png", "t_sdidd_losses.png"):
        assert (res / png).stat().st_size > 1000, png
    for png in ("predictions_finetune.png", "predictions_sdidd.png"):  # dataset images: the run folder, not results
        assert (out / png).stat().st_size > 1000 and not (res / f"t_{png}").exists(), png
    # A second call reuses every finished stage: same numbers, no training.
    t0 = time.perf_counter()
    again = run_benchmark(cfg, ["finetune", "sdidd"], out, res, "tiny", command="test", tag="t")
    assert again["methods"] == report["methods"]
    assert time.perf_counter() - t0 < 60
