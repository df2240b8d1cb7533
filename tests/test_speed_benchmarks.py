"""The speed scripts under benchmarks/ still run and write their reports (tiny sizes; no timing asserted)."""
from pathlib import Path

import pytest

from bench_scripts import load_script, run_script


def _run(script: str, *args: str) -> None:
    assert run_script(Path(script).stem, *args) == 0


@pytest.mark.slow
def test_train_speed_writes_report(tmp_path):
    out = tmp_path / "train.md"
    _run("train_speed.py", "--size", "64", "--batch", "2", "--iters", "1", "--warmup", "1", "--rounds", "1",
         "--fpn-channels", "32", "--head-channels", "32", "--head-convs", "1", "--out", str(out))
    text = out.read_text()
    for row in ("sdidd GFL", "torchvision FCOS", "incremental: fine-tune", "incremental: ERD", "incremental: SD-IDD"):
        assert f"| {row} |" in text
    assert "Ratio GFL / FCOS" in text and "Distillation overhead" in text
    assert "Machine limit" in text and "teacher's outputs cached" in text
    assert "i.e. 2 iterations per row" in text  # 1 warm-up + 1 timed step, one round: every row's budget is stated


@pytest.mark.slow
def test_precision_modes_writes_report(tmp_path):
    out = tmp_path / "modes.md"
    _run("precision_modes.py", "--sizes", "64", "--batches", "2", "--iters", "1", "--rounds", "1", "--out", str(out))
    text = out.read_text()
    for row in ("fp32", "bf16", "channels_last fp32", "channels_last bf16"):
        assert f"| {row} |" in text
    assert "## 64 px, batch 2" in text and "GFLOP/s" in text


@pytest.mark.slow
def test_step_profile_sums_every_operator_into_a_kind(tmp_path):
    out = tmp_path / "profile.md"
    _run("step_profile.py", "--sizes", "64", "--batch", "2", "--steps", "1", "--warmup", "1", "--out", str(out))
    text = out.read_text()
    assert "## 64 px, batch 2" in text and "mode: fp32, channels_last" in text
    shares = [int(line.rsplit("|", 2)[1].strip(" %")) for line in text.splitlines() if line.endswith(" % |")]
    assert len(shares) >= 4 and 97 <= sum(shares) <= 103  # every operator's self time lands in one kind
    assert "| convolution_backward |" in text
    kind_of = load_script("step_profile").kind_of
    assert kind_of("aten::convolution_backward") == "convolution backward"
    assert kind_of("aten::mkldnn_convolution") == "convolution forward"
    assert kind_of("aten::native_batch_norm_backward").startswith("normalisation")
    assert kind_of("aten::constant_pad_nd").startswith("memory") and kind_of("aten::_to_copy").startswith("memory")
    assert kind_of("aten::add_").startswith("the rest")


@pytest.mark.slow
def test_inference_speed_writes_report(tmp_path):
    out = tmp_path / "infer.md"
    _run("inference_speed.py", "--size", "64", "--batches", "1,2", "--iters", "1", "--warmup", "1",
         "--backbones", "lite0", "--out", str(out))
    text = out.read_text()
    assert "| 1 |" in text and "| 2 |" in text


@pytest.mark.slow
def test_eval_modes_writes_report(tmp_path):
    from sdidd.engine.precision import cpu_has_bf16
    if not cpu_has_bf16():
        pytest.skip("this CPU has no native bf16: eval_modes.py compares bf16 with fp32")
    from sdidd.cli import main
    assert main(["train", "synthetic_quick", f"train.out_dir={tmp_path / 'run'}", "train.epochs=1", "train.min_iters=0",
                 "data.num_train_images=8", "data.num_test_images=4", "data.train_sizes=[64]", "data.test_size=64",
                 "data.max_size=64", "model.pretrained=false", "train.progress=false", "train.milestones=[]"]) == 0
    out = tmp_path / "eval.md"
    _run("eval_modes.py", str(tmp_path / "run" / "last.pth"), "--rounds", "1", "--out", str(out))
    text = out.read_text()
    assert "| mAP50 fp32 | mAP50 bf16 |" in text and "last.pth" in text


@pytest.mark.slow
def test_train_modes_writes_report_with_each_rows_budget(tmp_path):
    out = tmp_path / "modes.md"
    # one process per mode: two modes cover the table (all four run the same code path)
    _run("train_modes.py", "--recipe", "synthetic_quick", "--batches", "4", "--rounds", "1", "--out", str(out),
         "--modes", "fp32,channels_last bf16", "data.num_train_images=8", "data.num_test_images=4",
         "data.train_sizes=[64]", "data.test_size=64", "data.max_size=64", "model.pretrained=false")
    text = out.read_text()
    for row in ("| fp32 | 1 / 2 |", "| channels_last bf16 | 1 / 2 |"):
        assert row in text, row
    assert "| bf16 |" not in text and "Seeds and budget" in text
    assert "- Command: `python benchmarks/train_modes.py --recipe synthetic_quick" in text  # main(argv)'s own arguments
