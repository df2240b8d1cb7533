"""Replay: the choice rule, the per-image supervision it needs, and a step that trains with a few old images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdidd.config import config_from_dict
from sdidd.data import DetectionDataset, Record
from sdidd.engine.build import StepSpec, build_step
from sdidd.engine.objective import step_loss
from sdidd.config import LossConfig
from sdidd.engine.replay import batch_channels, choose_replay, offset_ids, with_replay
from sdidd.engine.run_data import load_run_data
from sdidd.errors import SdiddError
from sdidd.methods import METHODS, variant_config
from sdidd.model.gfl_loss import assign_targets
from test_distill import _step_inputs

torch.set_num_threads(1)


def _ds(labels: list[list[int]], start: int = 1) -> DetectionDataset:
    recs = [Record(start + i, f"/x/{start + i}.png", 64, 64, np.tile([[1, 1, 9, 9]], (len(ls), 1)), np.array(ls))
            for i, ls in enumerate(labels)]
    return DetectionDataset(["a", "b", "c"], recs)


def test_choice_rule_counts_each_old_class_skips_the_steps_images_and_is_seeded():
    ds = _ds([[0], [0, 1], [1], [1], [0], [2], [0], [1]])  # channels 0, 1 old; 2 new
    chosen = choose_replay(ds, old_channels=2, n=2, seed=0, exclude=frozenset({1}))
    held = [set(ds.records[i].labels.tolist()) for i in chosen]
    assert sum(0 in h for h in held) >= 2 and sum(1 in h for h in held) >= 2
    assert 0 not in chosen and 5 not in chosen  # excluded id 1 (index 0); index 5 holds no old class
    assert len(chosen) <= 4 and len(set(chosen)) == len(chosen)
    assert chosen == choose_replay(ds, 2, 2, seed=0, exclude=frozenset({1}))
    assert len(choose_replay(ds, 2, 100, seed=0)) == 7  # fewer images than asked: all of them
    several = {tuple(choose_replay(ds, 2, 1, seed=s)) for s in range(8)}
    assert len(several) > 1


def test_with_replay_merges_two_datasets_without_id_clashes_and_refuses_nothing_to_replay():
    new = _ds([[2], [2]])
    old = offset_ids(_ds([[0], [1], [0, 1]]), start=100)
    assert [r.image_id for r in old.records] == [100, 101, 102]
    merged, ids = with_replay(new, old, old_channels=2, n=1, seed=0)
    assert len(merged) == 2 + len(ids) and ids <= {100, 101, 102} and len(new) == 2  # the step's set is not changed
    with pytest.raises(SdiddError, match="replay_images=1"):
        with_replay(new, _ds([[2]], start=50), old_channels=2, n=1, seed=0)


def test_replay_repeat_puts_each_replayed_image_k_times_into_an_epoch_and_the_same_images():
    new = _ds([[2], [2], [2]])
    old = offset_ids(_ds([[0], [1], [0, 1], [0], [1]]), start=100)
    once, ids = with_replay(new, old, old_channels=2, n=2, seed=3)
    four, ids4 = with_replay(new, old, old_channels=2, n=2, seed=3, repeat=4)
    assert ids4 == ids and len(once) == 3 + len(ids) and len(four) == 3 + 4 * len(ids)
    counts = [sum(r.image_id == i for r in four.records) for i in sorted(ids)]
    assert counts == [4] * len(ids) and sum(r.image_id in ids for r in four.records[:3]) == 0  # new images once
    with pytest.raises(SdiddError, match="replay_repeat"):
        config_from_dict({"incremental": {"replay_images": 2, "replay_repeat": 0}})
    with pytest.raises(SdiddError, match="replay_repeat"):  # a repeat with nothing to repeat is a mistake, said so
        config_from_dict({"incremental": {"replay_repeat": 4}})


def test_replayed_images_supervise_only_the_old_channels():
    trained = torch.tensor([False, False, False, True, True, True])
    old = ~trained
    channels, at_pos, replayed = batch_channels(trained, old, frozenset({7}), [3, 7])
    assert channels.tolist() == [trained.tolist(), old.tolist()] and replayed.flatten().tolist() == [False, True]
    assert at_pos.tolist() == [[False] * 6, trained.tolist()]  # a replayed image's new channels: at its old boxes only
    assert batch_channels(trained, None, frozenset(), [3, 7]) == (trained, None, None)
    # In the loss: the new image trains its new channels only; the replayed one its old channels, and its new
    # channels only where its old boxes lie (an old defect is not a new one), nowhere else.
    s, t, boxes, labels, sizes = _step_inputs()
    labels = torch.tensor([[3, 5], [0, 1]])  # image 1 is a replayed old image with old-class boxes
    total, _ = step_loss(s, None, boxes, labels, sizes, channels, LossConfig(), 2.0, None, at_positives=at_pos)
    total.backward()
    g = s.cls.grad.abs()  # [B, A, C]
    pos = assign_targets(s.grid, boxes, labels).pos_mask
    assert float(g[0, :, :3].sum()) == 0.0 and float(g[0, :, 3:].sum()) > 0
    assert float(g[1, :, :3].sum()) > 0
    assert float(g[1][pos[1]][:, 3:].sum()) > 0 and float(g[1][~pos[1]][:, 3:].sum()) == 0.0


def test_a_replay_step_holds_n_old_images_per_class_and_the_benchmark_offers_the_curve(tmp_path: Path):
    cfg = config_from_dict({"data": {"dataset": "synthetic", "num_train_images": 40, "num_test_images": 4, "train_sizes": [64],
                                     "test_size": 64, "max_size": 64},
                            "model": {"pretrained": False, "fpn_channels": 16, "head_channels": 16, "head_convs": 1},
                            "train": {"device": "cpu", "batch_size": 4, "workers": 0, "min_iters": 0},
                            "incremental": {"replay_images": 3}})
    data = load_run_data(cfg.data)
    classes = list(data.classes)
    teacher_spec = StepSpec(classes[:2], classes[:2], "base", 0)
    teacher = build_step(cfg, teacher_spec, data, tmp_path / "t", None).model
    step = build_step(cfg, StepSpec(classes, classes[2:], "sdidd", 1), data, tmp_path / "s", teacher)
    ds = step.loader.dataset
    replayed = [r for r in ds.records if r.image_id in step.replay_ids]
    assert replayed and all(len(r.labels) and (r.labels < 2).all() for r in replayed)  # old-class labels only
    for c in (0, 1):
        assert sum(c in r.labels for r in replayed) >= 3
    assert step.replay_channels.tolist() == [True, True, False, False]
    assert {"sdidd-replay5", "sdidd-replay20", "sdidd-replay50"} <= set(METHODS)


def test_two_models_replays_into_its_fine_tune_and_trains_its_own_detector_in_the_benchmark(tmp_path: Path):
    """A two-models step with replay keeps the old model and mixes old images into its fine-tune; the benchmark then
    trains that fine-tune itself instead of reusing the (replay-free) finetune row."""
    from sdidd.benchmark import reuses_finetune
    cfg = config_from_dict({"data": {"dataset": "synthetic", "num_train_images": 40, "num_test_images": 4, "train_sizes": [64],
                                     "test_size": 64, "max_size": 64},
                            "model": {"pretrained": False, "fpn_channels": 16, "head_channels": 16, "head_convs": 1},
                            "train": {"device": "cpu", "batch_size": 4, "workers": 0, "min_iters": 0}})
    assert reuses_finetune(cfg, "two-models") and not reuses_finetune(cfg, "two-models-replay20")
    assert not reuses_finetune(cfg, "sdidd") and not reuses_finetune(cfg, "sdidd-replay20")
    data = load_run_data(cfg.data)
    classes = list(data.classes)
    teacher = build_step(cfg, StepSpec(classes[:2], classes[:2], "base", 0), data, tmp_path / "t", None).model
    mcfg, base = variant_config(cfg, "two-models-replay20")
    step = build_step(mcfg, StepSpec(classes, classes[2:], base, 1), data, tmp_path / "s", teacher)
    assert step.kept is not None and step.replay_ids and step.replay_channels.tolist() == [True, True, False, False]
    # Oversampled: the same kept images, each four times, so the step's epoch is longer by three copies of them.
    xcfg, _ = variant_config(cfg, "two-models-replay20x4")
    x4 = build_step(xcfg, StepSpec(classes, classes[2:], base, 1), data, tmp_path / "x4", teacher)
    assert x4.replay_ids == step.replay_ids
    assert len(x4.loader.dataset) == len(step.loader.dataset) + 3 * len(step.replay_ids)
    assert x4.stats["images"] == step.stats["images"] == len(step.loader.dataset)  # the report counts each image once
