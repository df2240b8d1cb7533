"""New-class teacher (distill.new_teacher): its terms are 0 at agreement, it takes LD's new positives, and a step
fine-tunes it first (reused when finished) or loads it from a checkpoint that must know the new classes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdidd.config import DistillConfig, LossConfig, config_from_dict, replaced
from sdidd.distill import new_class_positives, new_teacher_loss
from sdidd.engine.build import StepSpec, build_step
from sdidd.engine.checkpoint import load_checkpoint
from sdidd.engine.new_teacher import attach_new_teacher
from sdidd.engine.objective import step_loss
from sdidd.engine.protocol import run_steps, step_specs
from sdidd.engine.run_data import load_run_data
from sdidd.engine.trainer import train_step
from sdidd.errors import SdiddError
from sdidd.model.gfl_loss import assign_targets
from test_cli_errors import TINY
from test_distill import ALL_TERMS, TRAINED, _NoSync, _step_inputs

torch.set_num_threads(1)


def test_new_class_positives_are_the_positives_of_new_class_boxes_only() -> None:
    s, _, boxes, _, _ = _step_inputs()
    labels = torch.tensor([[1, 4]]).repeat(2, 1)  # box 0: an old class (a pseudo-label), box 1: new
    asg = assign_targets(s.grid, boxes, labels)
    new = new_class_positives(asg, num_old=3)
    label_of = torch.gather(labels, 1, asg.assigned.clamp(min=0))
    assert new.any() and (asg.pos_mask & ~new).any()
    assert torch.equal(new, asg.pos_mask & (label_of == 4))


def test_new_teacher_terms_are_zero_at_agreement_and_pull_the_student_to_the_new_teacher() -> None:
    s, _, boxes, labels, sizes = _step_inputs()
    asg = assign_targets(s.grid, boxes, labels)
    nt_cls, nt_reg = s.cls.detach()[..., 3:].clone(), s.reg.detach().clone()
    nt_cls[:, :6, 1] = 5.0  # a few anchors where the new teacher is sure of a new class
    student_cls = s.cls.detach().clone()
    student_cls[..., 3:] = nt_cls
    same = new_teacher_loss(student_cls, s.reg, nt_cls, nt_reg, asg, num_old=3)
    assert abs(float(same["new_cls"].detach())) < 1e-5 and abs(float(same["new_ld"].detach())) < 1e-5
    assert same["n_new_cls"] >= 12 and same["n_new_ld"] == asg.num_pos
    other = new_teacher_loss(s.cls, s.reg, nt_cls, nt_reg + torch.randn_like(nt_reg), asg, num_old=3)
    assert float(other["new_cls"].detach()) > 0 and float(other["new_ld"].detach()) > 0
    (other["new_cls"] + other["new_ld"]).backward()
    assert float(s.cls.grad[..., :3].abs().sum()) == 0.0  # the old channels are the old teacher's business
    assert float(s.cls.grad[..., 3:].abs().sum()) > 0 and float(s.reg.grad.abs().sum()) > 0


def test_with_a_new_teacher_the_old_teacher_no_longer_distils_the_boxes_of_new_positives() -> None:
    s, t, boxes, labels, sizes = _step_inputs(seed=2)
    nt_cls = s.cls.detach().clone()
    nt_cls[:, :6, 4] = 5.0
    nt_reg = s.reg.detach().clone()
    nt_reg[..., 0] += 2.0  # another distribution (a constant added to every bin would be the same softmax: KL exactly 0)
    nt = type(s)(nt_cls, nt_reg, s.feats, s.grid)
    channels = torch.tensor([3, 4, 5])
    cfg = DistillConfig(**{**ALL_TERMS, "erd_box": False, "kd_mismatch": False})
    _, plain = step_loss(s, t, boxes, labels, sizes, TRAINED, LossConfig(), 2.0, cfg)
    with _NoSync():  # the extra teacher adds no host sync to the step
        total, log = step_loss(s, t, boxes, labels, sizes, TRAINED, LossConfig(), 2.0, cfg, nt, channels)
        total.backward()
    assert plain["n_ld"] > 0 and float(plain["loss_ld"]) > 0
    assert log["n_ld"] == 0 and float(log["loss_ld"]) == 0.0  # every GT here is new: LD moved to the new teacher
    assert log["n_new_ld"] == plain["n_ld"] and float(log["loss_new_ld"]) > 0 and float(log["loss_new_cls"]) > 0
    assert torch.equal(log["loss_vlr"], plain["loss_vlr"])  # the old teacher's VLR term stays


def _tiny(tmp_path: Path, **distill) -> tuple:
    cfg = config_from_dict({**TINY, "data": {**TINY["data"], "dataset": "synthetic", "num_train_images": 8, "num_test_images": 2},
                            "incremental": {"method": "sdidd+"}, "distill": distill})
    data = load_run_data(cfg.data)
    base = train_step(cfg, StepSpec(data.classes[:2], data.classes[:2], "base", 0), tmp_path / "base", data)
    return cfg, data, base


def test_a_fine_tuned_new_teacher_is_trained_once_reused_and_costed(tmp_path: Path) -> None:
    cfg, data, base = _tiny(tmp_path, new_teacher="finetune", pseudo_labels=False)
    cfg = replaced(cfg, {"train.resume": True})  # as the benchmark runs: finished stages are reused
    spec = step_specs([data.classes[:2], data.classes[2:]], "sdidd+")[1]
    # The benchmark's finetune run of the same step serves as the new teacher: trained by its own config first.
    ft = run_steps(cfg, data, [StepSpec(spec.classes, spec.new_classes, "finetune", 1)], lambda s: tmp_path / "finetune",
                   teacher=base.model)[0]
    before = (tmp_path / "finetune" / "last.pth").stat().st_mtime_ns
    res = train_step(cfg, spec, tmp_path / "sdidd+", data, teacher=base.model, new_teacher_dir=tmp_path / "finetune")
    assert (tmp_path / "finetune" / "last.pth").stat().st_mtime_ns == before  # reused, not retrained
    assert "new_teacher_seconds" in res.stats and res.stats["new_teacher_seconds"] == pytest.approx(ft.stats["train_seconds"])
    log = (tmp_path / "sdidd+" / "log.csv").read_text().splitlines()
    assert "loss_new_cls" in log[0] and "loss_new_ld" in log[0]
    # Without a finished one, the step fine-tunes it into <out>/new_teacher first.
    res2 = train_step(cfg, spec, tmp_path / "own", data, teacher=base.model)
    assert load_checkpoint(tmp_path / "own" / "new_teacher" / "last.pth")["method"] == "finetune"
    assert res2.stats["new_teacher_seconds"] > 0


def _no_training(*a: object) -> None:
    raise AssertionError("a checkpoint new-class teacher must not train anything")


def test_a_new_teacher_checkpoint_must_know_the_new_classes(tmp_path: Path) -> None:
    cfg, data, base = _tiny(tmp_path, pseudo_labels=False)
    spec = StepSpec(data.classes, data.classes[2:], "sdidd+", 1)
    step = build_step(replaced(cfg, {"distill.new_teacher": str(base.checkpoint)}),  # knows only the old classes
                       spec, data, tmp_path / "s", base.model)
    with pytest.raises(SdiddError, match=r"base/last.pth: cannot be the new-class teacher, it does not know "):
        attach_new_teacher(step, base.model, tmp_path / "unused", train=_no_training)
    assert not (tmp_path / "unused").exists()  # nothing was trained
    # A model that knows them (here: all four classes, in another order) distils them from its own channels.
    order = [data.classes[3], data.classes[0], data.classes[2], data.classes[1]]
    other = train_step(cfg, StepSpec(order, order, "joint", 0), tmp_path / "other", data)
    step.cfg = replaced(cfg, {"distill.new_teacher": str(other.checkpoint)})
    attach_new_teacher(step, base.model, tmp_path / "unused", train=_no_training)
    assert step.new_channels.tolist() == [2, 0] and step.new_teacher is not None
    assert not any(p.requires_grad for p in step.new_teacher.parameters())
