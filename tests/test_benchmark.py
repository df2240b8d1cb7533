"""The benchmark's JSON contract, Markdown report, plots and stage reuse, on a tiny synthetic run."""
import json
import time

import pytest
import torch

from sdidd.benchmark import aggregate_seeds, markdown_report, mean_std_text, method_config, parse_methods, run_benchmark
from sdidd.config import config_from_dict
from sdidd.errors import SdiddError

TINY = {
    "data": {"dataset": "synthetic", "num_train_images": 16, "num_test_images": 8, "train_sizes": [64], "test_size": 64,
             "max_size": 64, "check": False},
    "model": {"pretrained": False, "fpn_channels": 16, "head_channels": 16, "head_convs": 1},
    "train": {"epochs": 1, "min_iters": 0, "batch_size": 4, "workers": 0, "threads": 1, "device": "cpu", "progress": False,
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
    assert parse_methods("plus-ablations") == ["sdidd+-no-pseudo", "sdidd+-all-negatives", "sdidd+-l2", "sdidd+-hccd-x8", "sdidd+dual"]
    assert parse_methods("plus-terms") == ["sdidd+-no-cls", "sdidd+-no-reg", "sdidd+-no-feat", "sdidd+-no-erdbox"]
    cfg, base = method_config(config_from_dict(TINY), "sdidd+-no-feat")  # one old-class term off, the rest of sdidd+ kept
    assert base == "sdidd+" and cfg.distill.idfd is False and cfg.distill.pseudo_labels is None
    cfg, base = method_config(config_from_dict(TINY), "sdidd+-hccd-x8")
    assert base == "sdidd+" and cfg.distill.hccd_weight == 8.0 and cfg.incremental.method == "sdidd+"
    cfg, base = method_config(config_from_dict(TINY), "sdidd+dual")
    assert base == "sdidd+" and cfg.distill.new_teacher == "finetune" and cfg.incremental.method == "sdidd+"
    assert parse_methods("old-labels") == ["sdidd-old-labels", "finetune-old-labels"]
    cfg, base = method_config(config_from_dict(TINY), "finetune-old-labels")  # a variant may set its data, too
    assert base == "finetune" and cfg.incremental.old_labels and not config_from_dict(TINY).incremental.old_labels


def test_report_states_the_new_class_teachers_own_training_time():
    report = _seed_report(0, 60.0, 50.0, 70.0)
    report["methods"]["sdidd+dual"] = {**report["methods"].pop("sdidd"), "new_teacher_seconds": 312.0}
    md = markdown_report(report)
    assert "| sdidd+dual | 50.0 | 70.0 |" in md and "sdidd+dual 312 s" in md


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


def _seed_report(seed: int, teacher_old: float, old: float, new: float) -> dict:
    return {"dataset": "d", "protocol": "1+1", "profile": "p", "machine": "m", "date": "x", "command": "c",
            "classes_old": ["a"], "classes_new": ["b"], "settings": {"seed": seed},
            "methods": {"teacher": {"map50_old": teacher_old, "ap50_per_class": {"a": teacher_old}, "train_seconds": 1.0},
                        "sdidd": {"map50_old": old, "map50_new": new, "map50_all": (old + new) / 2, "map_all": 1.0,
                                  "ap50_per_class": {"a": old, "b": new}, "train_seconds": 2.0}}}


def test_seeds_aggregate_to_mean_and_sample_std_with_each_seed_kept():
    report = aggregate_seeds([_seed_report(0, 60.0, 50.0, 70.0), _seed_report(1, 62.0, 54.0, 60.0), _seed_report(2, 58.0, 52.0, 65.0)])
    v = report["methods"]["sdidd"]
    assert report["seeds"] == [0, 1, 2] and v["n_seeds"] == 3
    assert v["map50_old"] == 52.0 and v["std"]["map50_old"] == 2.0  # sample std of 50, 54, 52
    assert v["ap50_per_class"]["b"] == 65.0 and v["std"]["ap50_per_class"]["b"] == 5.0
    assert v["forgetting"] == 8.0 and v["std"]["forgetting"] == 2.0  # each seed against its own teacher: 10, 8, 6
    assert report["per_seed"]["1"]["sdidd"]["map50_old"] == 54.0
    md = markdown_report(report)
    assert "| sdidd | 52.0 ± 2.0 | 65.0 ± 5.0 |" in md and "Seeds 0, 1, 2" in md


def test_mean_std_text_gives_one_value_or_mean_and_sample_std():
    assert mean_std_text([56.34]) == "56.3"
    assert mean_std_text([1.0, 2.0, 3.0]) == "2.0 ± 1.0"
    assert mean_std_text([]) == "–" and mean_std_text([], empty="") == ""


@pytest.mark.slow
def test_benchmark_over_two_seeds_trains_a_teacher_per_seed(tmp_path):
    cfg = config_from_dict(TINY)
    report = run_benchmark(cfg, ["finetune"], tmp_path / "run", tmp_path / "res", "tiny", command="test", tag="s", seeds=[0, 1])
    assert report["seeds"] == [0, 1] and set(report["per_seed"]) == {"0", "1"}
    for seed in (0, 1):
        assert (tmp_path / "run" / f"seed{seed}" / "teacher" / "last.pth").is_file()
        assert (tmp_path / "run" / f"seed{seed}" / "finetune" / "step1" / "last.pth").is_file()
    a, b = (torch.load(tmp_path / "run" / f"seed{s}" / "teacher" / "last.pth", weights_only=False)["model"] for s in (0, 1))
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())  # the seeds trained different models
    assert "±" in (tmp_path / "res" / "s.md").read_text() and (tmp_path / "res" / "s_per_class.png").is_file()


def test_report_compares_each_method_with_sdidd_and_joint_seed_by_seed():
    reports = []
    for seed, (sd, plus, joint) in enumerate([(50.0, 53.0, 70.0), (56.0, 57.0, 70.0), (53.0, 58.0, 75.0)]):
        r = _seed_report(seed, 60.0, sd, sd)
        r["methods"]["plus"] = {**r["methods"]["sdidd"], "map50_all": plus}
        r["methods"]["joint"] = {**r["methods"]["sdidd"], "map50_all": joint}
        reports.append(r)
    md = markdown_report(aggregate_seeds(reports))
    # plus − sdidd per seed: +3, +1, +5 -> +3.0 ± 2.0; plus / joint: 53/70, 57/70, 58/75 -> 0.782 ± 0.029; each seed after
    assert "| plus | +3.0 ± 2.0 (+3.0, +1.0, +5.0) | 0.782 ± 0.029 (0.757, 0.814, 0.773) |" in md, md
    assert "| sdidd | – | 0.740 ± 0.052 (0.714, 0.800, 0.707) |" in md
    single = markdown_report(reports[0])
    assert "| plus | +3.0 | 0.757 |" in single


def test_multi_step_report_counts_forgetting_on_the_teachers_classes_and_shows_each_step():
    report = _seed_report(0, 60.0, 45.0, 70.0)
    report.update(protocol="1+1+1", classes_old=["a", "b"], classes_new=["c"])
    report["methods"]["sdidd"].update(ap50_per_class={"a": 50.0, "b": 40.0, "c": 70.0}, map50_all=53.33, map50_all_step1=55.0)
    md = markdown_report(report)
    assert "| sdidd | 45.0 | 70.0 | 53.3 | 1.0 | 10.0 |" in md, md  # 60 − 50 on the teacher's class a, not 60 − 45
    assert "| sdidd | | 55.0 | 53.3 |" in md and "| teacher | 60.0 |" in md
    report["methods"]["sdidd"]["train_seconds_all_steps"] = 5.0
    assert "all incremental steps together: sdidd 5 s" in markdown_report(report)
    two = aggregate_seeds([report, {**report, "settings": {"seed": 1}}])
    assert two["methods"]["sdidd"]["forgetting"] == 10.0 and two["methods"]["sdidd"]["map50_all_step1"] == 55.0
    report["methods"]["joint"] = {**report["methods"]["sdidd"], "map50_all": 0.0}  # a joint that learnt nothing
    assert "| sdidd | – | – |" in markdown_report(report)


@pytest.mark.slow
def test_benchmark_of_a_three_step_protocol_reports_every_step(tmp_path):
    cfg = config_from_dict({**TINY, "incremental": {"protocol": "2+1+1"}})
    report = run_benchmark(cfg, ["finetune", "joint"], tmp_path / "run", tmp_path / "res", "tiny", command="test", tag="m")
    assert report["classes_old"] == ["scratch", "spot", "patch"] and report["classes_new"] == ["crack"]
    for m in ("finetune", "joint"):
        assert 0.0 <= report["methods"][m]["map50_all_step1"] <= 100.0, m
        assert (tmp_path / "run" / m / "step2" / "last.pth").is_file()
        assert report["methods"][m]["train_seconds_all_steps"] > report["methods"][m]["train_seconds"] > 0
    assert "## After each step" in (tmp_path / "res" / "m.md").read_text()


def test_a_report_of_a_validation_run_says_it_was_not_measured_on_the_test_split():
    report = _seed_report(0, 60.0, 50.0, 70.0)
    assert "per class on the test split" in markdown_report(report)
    report["settings"]["val_fraction"] = 0.2
    md = markdown_report(report)
    assert "**validation split**: 20% of the training images" in md and "on the test split" not in md


@pytest.mark.slow
def test_two_models_rows_reuse_the_finetune_training_and_stack_over_three_steps(tmp_path):
    """At one lr the two-models row trains nothing the finetune row trained: every step starts from its finished
    checkpoint (same teacher, data, seed), and its model is the stack of every step's detector; at two lrs it trains."""
    from sdidd.engine.checkpoint import load_checkpoint, model_from_checkpoint
    cfg = config_from_dict({**TINY, "incremental": {"protocol": "2+1+1"}})
    report = run_benchmark(cfg, ["finetune", "two-models"], tmp_path / "run", tmp_path / "res", "tiny", command="test", tag="m")
    for k in (1, 2):
        ft, tm = (load_checkpoint(tmp_path / "run" / m / f"step{k}" / "last.pth") for m in ("finetune", "two-models"))
        assert tm["method"] == "two-models" and all(torch.equal(ft["model"][n], tm["model"][n]) for n in ft["model"])
    stack = model_from_checkpoint(tm)
    assert stack.ends == [2, 3, 4] and len(stack.members) == 3
    assert 0.0 <= report["methods"]["two-models"]["map50_all"] <= 100.0
    assert "two_models_lr" in report["settings"]
    # At an incremental lr of its own the finetune row trains at it and two-models at the base lr: nothing is reused.
    cfg = config_from_dict({**TINY, "incremental": {"protocol": "2+1+1", "lr": cfg.train.lr / 2}})
    report = run_benchmark(cfg, ["finetune", "two-models"], tmp_path / "run2", tmp_path / "res", "tiny", command="test", tag="m2")
    ft, tm = (load_checkpoint(tmp_path / "run2" / m / "step1" / "last.pth") for m in ("finetune", "two-models"))
    assert not all(torch.equal(ft["model"][n], tm["model"][n]) for n in ft["model"])
    assert report["settings"]["two_models_lr"] == cfg.train.lr and report["settings"]["incremental_lr"] == cfg.train.lr / 2


def _write_report(path, report) -> str:
    path.write_text(json.dumps(report))
    return str(path)


def test_merge_joins_seeds_run_apart_and_keeps_each_seeds_rows(tmp_path):
    from sdidd.cli import main
    r2 = _seed_report(2, 58.0, 52.0, 65.0)
    r2["methods"]["extra"] = dict(r2["methods"]["sdidd"])  # run for seed 2 only: kept in per_seed, not in the table
    one = _write_report(tmp_path / "s2.json", r2)
    two = _write_report(tmp_path / "s01.json", aggregate_seeds([_seed_report(0, 60.0, 50.0, 70.0), _seed_report(1, 62.0, 54.0, 60.0)]))
    assert main(["benchmark", "--merge", one, two, "--tag", "m", "--results-dir", str(tmp_path / "res")]) == 0
    report = json.loads((tmp_path / "res" / "m.json").read_text())
    assert report["seeds"] == [0, 1, 2] and set(report["methods"]) == {"teacher", "sdidd"}
    v = report["methods"]["sdidd"]
    assert v["map50_old"] == 52.0 and v["std"]["map50_old"] == 2.0 and v["forgetting"] == 8.0  # as one 3-seed run
    assert "extra" in report["per_seed"]["2"] and report["per_seed"]["0"]["sdidd"]["map50_old"] == 50.0
    assert [s["seeds"] for s in report["merged_from"]] == [[2], [0, 1]]
    md = (tmp_path / "res" / "m.md").read_text()
    assert "| sdidd | 52.0 ± 2.0 | 65.0 ± 5.0 |" in md and "Merged: `s01.json` (seeds 0, 1;" in md
    assert (tmp_path / "res" / "m_per_class.png").is_file()
    assert "sdidd_losses" not in md and not (tmp_path / "res" / "m_sdidd_losses.png").exists()  # no log: no curves named


def test_merge_refuses_mixed_recipes_a_seed_twice_and_overwriting(tmp_path, capsys):
    from sdidd.cli import main
    a = _write_report(tmp_path / "a.json", _seed_report(0, 60.0, 50.0, 70.0))
    other = _seed_report(1, 60.0, 50.0, 70.0)
    other["settings"]["epochs"] = 32
    b = _write_report(tmp_path / "b.json", other)
    same_seed = _write_report(tmp_path / "c.json", _seed_report(0, 61.0, 51.0, 71.0))
    res = str(tmp_path / "res")
    cases = [([a, b], "settings differ from"), ([a, same_seed], "seed 0 is also in"), ([a, str(tmp_path / "no.json")], "no such file"),
             ([a], "at least two seeds"), ([a, str(tmp_path)], "no such file")]
    (tmp_path / "bad.json").write_text("{not json")
    cases.append(([a, str(tmp_path / "bad.json")], "not a JSON file"))
    for files, message in cases:
        assert main(["benchmark", "--merge", *files, "--tag", "m", "--results-dir", res]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "res" / "m.json").exists()
    ok = _write_report(tmp_path / "d.json", _seed_report(1, 61.0, 51.0, 71.0))
    assert main(["benchmark", "--merge", a, ok, "--tag", "m", "--results-dir", res]) == 0
    before = (tmp_path / "res" / "m.json").read_text()
    assert main(["benchmark", "--merge", a, ok, "--tag", "m", "--results-dir", res]) == 2
    assert "exists; give the merged report another --tag" in capsys.readouterr().err
    assert (tmp_path / "res" / "m.json").read_text() == before
    assert main(["benchmark", "--merge", a, ok, "--results-dir", res]) == 2 and "give --tag" in capsys.readouterr().err


def test_merge_refuses_rows_that_do_not_line_up_and_training_options(tmp_path, capsys):
    from sdidd.cli import main
    a = _write_report(tmp_path / "a.json", _seed_report(0, 60.0, 50.0, 70.0))
    older = _seed_report(1, 60.0, 50.0, 70.0)
    del older["methods"]["sdidd"]["map_all"]  # a row written without a field the other seed has
    b = _write_report(tmp_path / "b.json", older)
    res = str(tmp_path / "res")
    assert main(["benchmark", "--merge", a, b, "--tag", "m", "--results-dir", res]) == 2
    err = capsys.readouterr().err
    assert "rows do not line up" in err and "map_all" in err and err.count("\n") == 1, err
    ok = _write_report(tmp_path / "c.json", _seed_report(1, 61.0, 51.0, 71.0))
    assert main(["benchmark", "--merge", a, ok, "--tag", "m", "--results-dir", res, "--seeds", "0,1"]) == 2
    assert "trains nothing" in capsys.readouterr().err
    assert not (tmp_path / "res").exists()
