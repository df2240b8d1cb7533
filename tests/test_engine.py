"""The engine's rules: one schedule rule, data parsed and decoded once per run, no teacher forward without
distillation, checkpoint retention, and the label space of a step's data."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sdidd.data.check as check_mod
import sdidd.data.records as records_mod
import sdidd.engine.run_data as run_data
from sdidd.benchmark import run_benchmark
from sdidd.config import config_from_dict, replaced
from sdidd.errors import SdiddError
from sdidd.engine.build import StepSpec, build_step, detector_config
from sdidd.engine.checkpoint import save_epoch
from sdidd.engine.run_data import load_run_data
from sdidd.engine.protocol import evaluated_on, step_specs
from sdidd.engine.run_data import channel_view, cut_new_images
from sdidd.engine.schedule import step_schedule
from sdidd.model.detector import build_detector
from test_cli_errors import TINY, make_neu

torch.set_num_threads(1)


def _cfg(**sections: dict) -> "object":
    data = {k: dict(v) for k, v in TINY.items()}
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    return config_from_dict(data)


def test_a_config_is_frozen_and_what_a_run_derives_is_not_written_back() -> None:
    """Configs change only into new ones (`replaced`, validated); the image size chosen from the data lives on RunData."""
    import dataclasses
    cfg = config_from_dict({"data": {"dataset": "synthetic", "num_train_images": 6, "num_test_images": 2}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.seed = 1  # type: ignore[misc]
    other = replaced(cfg, {"train.seed": 3, "distill.hccd": False})
    assert (cfg.train.seed, cfg.distill.hccd, other.train.seed, other.distill.hccd) == (0, None, 3, False)
    with pytest.raises(SdiddError, match="train.batch_size"):
        replaced(cfg, {"train.batch_size": 0})
    data = load_run_data(cfg.data)  # the recipe leaves the sizes to the data
    assert (cfg.data.train_sizes, cfg.data.test_size) == ([], 0) and data.test_size > 0
    sized = data.sized(cfg)
    assert (sized.data.train_sizes, sized.data.test_size) == (data.train_sizes, data.test_size)
    assert sized.data.dataset == cfg.data.dataset and data.sized(sized) is sized


def test_schedule_rule_for_base_and_incremental_steps() -> None:
    cfg = _cfg(train={"epochs": 12, "lr": 0.01, "milestones": [8, 11]}, incremental={"epochs": 6, "lr": 0.003})
    base, inc = step_schedule(cfg, with_teacher=False), step_schedule(cfg, with_teacher=True)
    assert (base.epochs, base.lr, base.milestones) == (12, 0.01, (8, 11))
    assert (inc.epochs, inc.lr, inc.milestones) == (6, 0.003, (8, 11))  # no incremental.milestones: train's
    cfg = replaced(cfg, {"incremental.milestones": [4]})
    assert step_schedule(cfg, with_teacher=True).milestones == (4,)
    # Warmup is linear over iterations, decay counts epochs.
    assert base.factor(0, 10) == pytest.approx(cfg.train.warmup_ratio)
    assert base.factor(80, 10) == pytest.approx(0.1) and base.factor(110, 10) == pytest.approx(0.01)


def test_a_two_models_step_trains_at_the_base_lr_unless_given_its_own() -> None:
    cfg = _cfg(train={"epochs": 12, "lr": 0.01, "milestones": [8, 11]},
               incremental={"epochs": 6, "lr": 0.003, "method": "two-models"})
    assert step_schedule(cfg, with_teacher=True).lr == 0.01  # nothing to forget: the base lr, the step's epochs
    assert step_schedule(cfg, with_teacher=True).epochs == 6
    assert step_schedule(replaced(cfg, {"incremental.two_models_lr": 0.005}), with_teacher=True).lr == 0.005
    assert step_schedule(replaced(cfg, {"incremental.method": "finetune"}), with_teacher=True).lr == 0.003
    with pytest.raises(SdiddError, match="two_models_lr"):
        replaced(cfg, {"incremental.two_models_lr": 0})


def test_schedule_stretches_a_small_step_to_min_iters_and_leaves_a_full_one_as_the_recipe_says() -> None:
    cfg = _cfg(train={"epochs": 8, "lr": 0.01, "milestones": [6, 7], "warmup_iters": 100, "min_iters": 500})
    full = step_schedule(cfg, with_teacher=False, iters_per_epoch=90)  # NEU-DET quick: 720 images / batch 8
    assert (full.epochs, full.milestones, full.warmup_iters, full.recipe_epochs) == (8, (6, 7), 100, 0)
    small = step_schedule(cfg, with_teacher=False, iters_per_epoch=12)  # 100 images / batch 8 (last batch dropped)
    assert small.total_iters == 500 and small.epochs == 42  # exactly min_iters: the last epoch stops part-way
    assert small.recipe_epochs == 8
    assert small.milestone_iters == (375, 438)  # decay at the same fractions (6/8, 7/8) of the 500 iterations
    assert small.factor(374, 12) == pytest.approx(1.0) and small.factor(375, 12) == pytest.approx(0.1)
    # Steps of different sizes get the same budget (teacher 992 images, joint 1,000 on DeepPCB at batch 8: both 500).
    assert step_schedule(cfg, False, iters_per_epoch=62).total_iters == step_schedule(cfg, False, iters_per_epoch=61).total_iters
    cfg = replaced(cfg, {"train.min_iters": 0})  # off: the recipe's epochs
    raw = step_schedule(cfg, with_teacher=False, iters_per_epoch=12)
    assert (raw.epochs, raw.milestones, raw.warmup_iters) == (8, (6, 7), 100)


def test_a_100_image_step_runs_at_least_min_iters(tmp_path: Path) -> None:
    cfg = _cfg(data={"dataset": "synthetic", "num_train_images": 100, "num_test_images": 4},
               train={"batch_size": 8, "min_iters": 120, "epochs": 2})
    data = load_run_data(cfg.data)
    spec = StepSpec(list(data.classes), list(data.classes), "joint", 0)
    step = build_step(cfg, spec, data, tmp_path, None)
    assert len(step.loader) * step.schedule.epochs >= 120 > len(step.loader) * 2
    assert step.stats["iterations"] == 120


def test_a_stretched_step_trains_exactly_min_iters_iterations(tmp_path: Path) -> None:
    from sdidd.engine.trainer import train_step
    cfg = _cfg(data={"dataset": "synthetic", "num_train_images": 20, "num_test_images": 4},
               train={"batch_size": 4, "min_iters": 12, "epochs": 1, "milestones": [1], "eval_every": 0})
    data = load_run_data(cfg.data)
    spec = StepSpec(list(data.classes), list(data.classes), "joint", 0)
    result = train_step(cfg, spec, tmp_path / "run", data)  # 5 iterations per epoch: 2 whole epochs and 2 iterations
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=False)
    assert state["iteration"] == 12 and state["epoch"] == 3 and result.stats["iterations"] == 12


def test_small_data_protocol_cuts_only_the_images_of_the_added_classes() -> None:
    data = load_run_data(config_from_dict({"data": {"dataset": "synthetic", "num_train_images": 60, "num_test_images": 2}}).data)
    old, new = data.classes[:2], data.classes[2:]
    ids = [data.classes.index(c) for c in new]
    holds = lambda r: bool(set(r.labels.tolist()) & set(ids))  # noqa: E731
    cut = cut_new_images(data.train, new, 10, seed=0)
    assert sum(map(holds, cut.records)) == 10
    assert [r.image_id for r in cut.records if not holds(r)] == [r.image_id for r in data.train.records if not holds(r)]
    again, other = cut_new_images(data.train, new, 10, seed=0), cut_new_images(data.train, new, 10, seed=1)
    assert [r.image_id for r in again.records] == [r.image_id for r in cut.records]  # seeded: every method sees the same images
    assert [r.image_id for r in other.records] != [r.image_id for r in cut.records]
    assert cut_new_images(data.train, new, 10_000, seed=0).records == data.train.records
    # Joint keeps the old-class boxes of the images it does not choose: only the new classes are cut down.
    joint_cut = cut_new_images(data.train, new, 10, seed=0, keep_other_boxes=True)
    assert sum(map(holds, joint_cut.records)) == 10
    old_boxes = lambda d: sum(int((~torch.isin(torch.as_tensor(r.labels), torch.tensor(ids))).sum()) for r in d.records)  # noqa: E731
    assert old_boxes(joint_cut) == old_boxes(data.train) > old_boxes(cut)
    # A joint step relearns every class but the cut applies to the classes it adds.
    joint = step_specs([old, new], "joint")[1]
    assert joint.new_classes == old + new and joint.added_classes == new


def test_val_fraction_holds_out_the_same_training_images_for_every_seed_and_never_reads_the_test_split(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = load_run_data(config_from_dict({"data": {"dataset": "synthetic", "num_train_images": 40, "num_test_images": 2}}).data)
    cfg = config_from_dict({"data": {"dataset": "synthetic", "num_train_images": 40, "num_test_images": 2, "val_fraction": 0.25},
                            "train": {"seed": 3}})
    data = load_run_data(cfg.data)
    train_ids, val_ids = {r.image_id for r in data.train.records}, {r.image_id for r in data.test.records}
    assert len(val_ids) == 10 and len(train_ids) == 30 and not train_ids & val_ids
    assert train_ids | val_ids == {r.image_id for r in full.train.records}
    again = load_run_data(config_from_dict({"data": {**vars(cfg.data), "val_fraction": 0.25}, "train": {"seed": 7}}).data)
    assert {r.image_id for r in again.test.records} == val_ids  # one validation split, whatever the training seed
    assert "validation split" in data.test.name
    assert evaluated_on(cfg) == "validation split" and evaluated_on(config_from_dict({})) == "test split"
    # On a real dataset the test split is not even parsed.
    root = make_neu(tmp_path / "NEU-DET")
    splits: list[str] = []
    real = run_data.load_split
    monkeypatch.setattr(run_data, "load_split", lambda c, split: splits.append(split) or real(c, split))
    load_run_data(config_from_dict({"data": {"dataset": "neu-det", "root": str(root), "val_fraction": 0.5}}).data)
    assert splits == ["train"]
    with pytest.raises(SdiddError, match="val_fraction"):
        config_from_dict({"data": {"val_fraction": 1.0}})
    with pytest.raises(SdiddError, match="holds out 0 of the 40 training images"):
        run_data.hold_out(full.train, 0.01)


def test_eval_of_a_run_with_val_fraction_reads_its_held_out_images_unless_told_the_test_split() -> None:
    from sdidd.engine.run_data import default_eval_split
    cfg = config_from_dict({"data": {"dataset": "synthetic", "num_train_images": 40, "num_test_images": 3, "val_fraction": 0.25}})
    held_out = {r.image_id for r in load_run_data(cfg.data).test.records}
    assert default_eval_split(cfg.data) == "val" and default_eval_split(config_from_dict({}).data) == "test"
    val = run_data.load_eval_split(cfg.data, "val")
    assert {r.image_id for r in val.records} == held_out and "validation split" in val.name
    assert len(run_data.load_eval_split(cfg.data, "test").records) == 3  # asked for by name: the test split
    # Evaluated on another dataset (data=FILE, --data, --root), the run's hold-out does not apply: that dataset's splits do.
    from sdidd.cli import _eval_data
    assert _eval_data(cfg, None, None, []).data.val_fraction == 0.25
    assert _eval_data(cfg, None, None, ["data=other.yaml"]).data.val_fraction == 0.0
    assert _eval_data(cfg, None, "/elsewhere", []).data.val_fraction == 0.0
    assert _eval_data(cfg, None, None, ["data=other.yaml", "data.val_fraction=0.25"]).data.val_fraction == 0.25


def test_keep_checkpoints_keeps_last_and_the_newest_epochs(tmp_path: Path) -> None:
    state = {"model": {"w": torch.zeros(1)}, "detector": {"backbone": "x", "num_classes": 1}, "classes": ["a"]}
    for epoch in range(1, 5):
        save_epoch({**state, "epoch": epoch}, tmp_path, epoch, keep=2)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["epoch_3.pth", "epoch_4.pth", "last.pth"]
    save_epoch({**state, "epoch": 5}, tmp_path, 5, keep=0)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["last.pth"]


@pytest.mark.parametrize("method, runs_teacher", [("finetune", False), ("erd", True), ("sdidd", True)])
def test_teacher_forward_only_when_distillation_reads_it(tmp_path: Path, method: str, runs_teacher: bool) -> None:
    cfg = _cfg(data={"dataset": "synthetic", "num_train_images": 8, "num_test_images": 4})
    data = load_run_data(cfg.data)
    teacher = build_detector(detector_config(cfg, 2))
    spec = StepSpec(["scratch", "spot", "patch", "crack"], ["patch", "crack"], method, 1)
    step = build_step(cfg, spec, data, tmp_path, teacher)
    assert (step.teacher is not None) == runs_teacher
    assert step.trained.tolist() == [False, False, True, True]
    # The step's training data carries model-channel labels of the trained classes only.
    labels = torch.cat([torch.as_tensor(r.labels) for r in step.loader.dataset.records])
    assert set(labels.tolist()) <= {2, 3} and len(labels) > 0
    assert step.test_set.classes == spec.classes


def test_a_benchmark_parses_and_decodes_each_split_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Teacher + two methods: each split parsed once, each image decoded once (then served from memory)."""
    root = make_neu(tmp_path / "NEU-DET")
    calls = {"load_split": 0, "inspect_image": 0, "read_image": 0}

    def counting(module: object, name: str) -> None:
        real = getattr(module, name)

        def wrapper(*a: object, **k: object) -> object:
            calls[name] += 1
            return real(*a, **k)
        monkeypatch.setattr(module, name, wrapper)
    counting(run_data, "load_split")
    counting(check_mod, "inspect_image")
    counting(records_mod, "read_image")
    cfg = _cfg(data={"dataset": "neu-det", "root": str(root)}, incremental={"groups": [["crazing"], ["inclusion"]]})
    report = run_benchmark(cfg, ["finetune", "sdidd"], tmp_path / "run", tmp_path / "results", "tiny", command="test")
    assert set(report["methods"]) == {"teacher", "finetune", "sdidd"}
    assert calls == {"load_split": 2, "inspect_image": 10, "read_image": 0}, calls



def test_a_joint_step_of_the_small_data_protocol_keeps_every_old_box(tmp_path: Path) -> None:
    """incremental.new_images cuts the added classes' images; joint training still sees every old-class box."""
    cfg = _cfg(data={"dataset": "synthetic", "num_train_images": 60, "num_test_images": 2},
               incremental={"new_images": 5})
    data = load_run_data(cfg.data)
    old, new = data.classes[:2], data.classes[2:]
    joint = step_specs([old, new], "joint")[1]
    step = build_step(cfg, joint, data, tmp_path / "j", None)
    seen = step.loader.dataset.records
    count = lambda recs, ids: sum(int(torch.isin(torch.as_tensor(r.labels), torch.tensor(ids)).sum()) for r in recs)  # noqa: E731
    full = channel_view(data.train, joint.classes)
    assert count(seen, [0, 1]) == count(full.records, [0, 1])  # old channels 0, 1: all their boxes
    assert sum(bool(torch.isin(torch.as_tensor(r.labels), torch.tensor([2, 3])).any()) for r in seen) == 5


def test_nms_across_old_and_added_classes_is_a_setting_of_incremental_steps_only() -> None:
    """incremental.old_new_nms gives class_groups 0 (old) / 1 (added) for a step with old classes, nothing for a base
    or joint step (it relearns every class) or when off."""
    from sdidd.engine.build import StepSpec
    step1 = StepSpec(["a", "b", "c"], ["c"], "sdidd", 1)
    assert step1.postprocess(True) == {"class_groups": [0, 0, 1]} and step1.postprocess(False) == {}
    assert StepSpec(["a", "b", "c"], ["a", "b", "c"], "joint", 1, added=["c"]).postprocess(True) == {}
    assert StepSpec(["a", "b"], ["a", "b"]).postprocess(True) == {}
