"""torchrun with 2 CPU processes (gloo): only rank 0 writes, resume works, and the result is one process's.

The DDP run trains 1 epoch, is relaunched with train.resume=true for a 2nd, and is compared with one
process training 2 epochs at the same global batch (2 ranks x 2 images = 4). Everything is tiny
(16 synthetic 64 px images, 16-channel head, 1 thread per process), so the file takes ~30-60 s.
"""
from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from sdidd.cli import main

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
PER_RANK_BATCH = 2
# One train size, no flip and equal-size images: augmentation and batch padding cannot differ between
# the ranks and one process, so the runs differ only by float rounding (see engine/distributed.py).
CFG = {
    "data": {"dataset": "synthetic", "num_train_images": 16, "num_test_images": 8, "train_sizes": [64], "test_size": 64,
             "max_size": 64, "flip": 0.0},
    "model": {"pretrained": False, "fpn_channels": 16, "head_channels": 16, "head_convs": 1},
    "train": {"epochs": 2, "min_iters": 0, "batch_size": PER_RANK_BATCH, "workers": 0, "threads": 1, "device": "cpu", "progress": False,
              "log_every": 1, "warmup_iters": 2, "milestones": [2],
              # fp32: bf16 rounds a batch of 4 per rank and a batch of 8 differently (1.8e-4 relative in the losses),
              # which would hide the float32-summation-order comparison below; NCHW for the same reason (oneDNN's
              # channels_last kernels differ between a batch of 2 and of 4: 2.7e-4 relative in the losses).
              "amp": False, "channels_last": False},
}
# Tolerances. Both runs compute the same SGD steps on the same images with the same (all-reduced) loss
# normalisers; they differ only in float32 summation order (partial sums per rank, the gradient all-reduce).
# One step's gradients agree to ~1e-6 relative; after 8 steps the largest weight difference is 1.25e-5
# (a backbone BN bias of magnitude 3e-4), exactly what merely reordering the images inside the batches
# of the one-process run gives, and logged losses agree to 6e-6 relative. The bounds below leave ~8-16x
# headroom and stay below what a DDP bug gives (measured by breaking the code on purpose): ranks drawing
# the same images change the first logged loss (before any update) by 47%; ranks training without the
# gradient all-reduce end 9e-4 apart in weights and 9e-3 in losses.
LOSS_RTOL = 1e-4  # observed <= 6e-6 relative (losses are logged with 6 decimals, hence abs_tol 1e-5 as well)
WEIGHT_ATOL = 1e-4  # max |w_ddp - w_single| over all parameters; observed 1.25e-5
MAP_ATOL = 0.5  # AP points: weights equal up to rounding give the same detections (observed difference 0)

# Loaded by every process the test launches (PYTHONPATH): a ranked process (RANK set by torchrun) records
# every file it creates, writes, renames or removes under SDIDD_WATCH, and dumps the list at exit.
HOOK = textwrap.dedent('''
    import atexit, json, os, sys
    _watch, _report, _rank = os.environ.get("SDIDD_WATCH"), os.environ.get("SDIDD_WRITES"), os.environ.get("RANK")
    if _watch and _report and _rank is not None:
        _seen = []
        _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

        def _under(p):
            try:
                return os.path.abspath(os.fsdecode(p)).startswith(_watch)
            except TypeError:  # a file descriptor
                return False

        def _hook(event, args):
            if event == "open":
                path, mode, flags = args
                writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE)
                if writes and _under(path):
                    _seen.append(f"open {os.fsdecode(path)}")
            elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.truncate", "os.symlink", "os.link"):
                paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]  # rename: source and target
                if any(_under(a) for a in paths):
                    _seen.append(f"{event} {' '.join(os.fsdecode(a) for a in paths)}")

        sys.addaudithook(_hook)

        @atexit.register
        def _dump():
            with open(os.path.join(_report, f"rank{_rank}.json"), "w") as f:
                json.dump(_seen, f)
''')


def free_port() -> int:
    """A TCP port nobody listens on right now (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(target: list[str], tmp_path: Path, writes: Path) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node 2 TARGET...` on CPU (gloo), with the write hook."""
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    writes.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", SDIDD_WATCH=str(tmp_path / "runs"), SDIDD_WRITES=str(writes),
               PYTHONPATH=os.pathsep.join([str(hook_dir), str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *target]
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    # Rank 0's traceback after a crash of rank 1 only says 'connection closed': show every error line, then the tail.
    errors = "\n".join(ln for ln in res.stderr.splitlines() if "Error" in ln or ln.startswith("error"))
    assert res.returncode == 0, errors + "\n...\n" + res.stdout[-2000:] + res.stderr[-2000:]
    return res


def sdidd_train(cfg: Path, overrides: list[str]) -> list[str]:
    """torchrun target: `-m sdidd train CFG overrides...`."""
    return ["-m", "sdidd", "train", str(cfg), *overrides]


def log_rows(path: Path) -> list[dict[str, str]]:
    """log.csv rows without the wall-clock column."""
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "img_s"} for r in csv.DictReader(f)]


def rank_writes(writes: Path) -> dict[str, list[str]]:
    """What each rank recorded writing under the watched folder."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(writes.glob("rank*.json"))}


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_match_single_process(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    ddp_dir, single_dir = tmp_path / "runs" / "ddp", tmp_path / "runs" / "single"

    # DDP: epoch 1, then a relaunch resumes from rank 0's last.pth for epoch 2.
    first = torchrun(sdidd_train(cfg, [f"train.out_dir={ddp_dir}", "train.epochs=1"]), tmp_path, tmp_path / "writes1")
    assert f"DDP: {WORLD} ranks x train.batch_size {PER_RANK_BATCH} = global batch {WORLD * PER_RANK_BATCH}" in first.stdout
    second = torchrun(sdidd_train(cfg, [f"train.out_dir={ddp_dir}", "train.resume=true"]), tmp_path, tmp_path / "writes2")
    assert second.stdout.count(f"resumed {ddp_dir / 'last.pth'} at epoch 1/2") == 1, second.stdout  # printed by rank 0 only
    for writes in (tmp_path / "writes1", tmp_path / "writes2"):
        by_rank = rank_writes(writes)
        assert set(by_rank) == {"rank0", "rank1"}, by_rank  # both ranks ran under the hook
        assert by_rank["rank1"] == [], by_rank["rank1"]
        assert any(w.endswith("last.pth") for w in by_rank["rank0"]), by_rank["rank0"]  # the hook does see writes

    # One process, the same global batch, in this process (saves an interpreter start).
    assert main(["train", str(cfg), f"train.out_dir={single_dir}", f"train.batch_size={WORLD * PER_RANK_BATCH}"]) == 0
    capsys.readouterr()

    names = {p.name for p in single_dir.iterdir()}
    assert {p.name for p in ddp_dir.iterdir()} == names and {"last.pth", "log.csv", "metrics.json"} <= names

    # Same iterations (4 per epoch), lr schedule and positives; losses equal up to rounding. The first row
    # is computed before any update, so it alone tells whether the ranks drew the right images.
    ddp_rows, single_rows = log_rows(ddp_dir / "log.csv"), log_rows(single_dir / "log.csv")
    assert len(ddp_rows) == len(single_rows) == 8
    for d, s in zip(ddp_rows, single_rows):
        assert set(d) == set(s)
        for k in d:
            if k.startswith("loss"):
                assert math.isclose(float(d[k]), float(s[k]), rel_tol=LOSS_RTOL, abs_tol=1e-5), (k, d, s)
            else:  # epoch, iter, lr, n_pos (summed over ranks)
                assert float(d[k]) == pytest.approx(float(s[k]), rel=1e-9), (k, d, s)

    ddp = torch.load(ddp_dir / "last.pth", map_location="cpu", weights_only=True)
    single = torch.load(single_dir / "last.pth", map_location="cpu", weights_only=True)
    assert set(ddp["model"]) == set(single["model"])  # no DDP 'module.' prefix
    assert ddp["iteration"] == single["iteration"] == 8 and ddp["epoch"] == single["epoch"] == 2
    diff = max((ddp["model"][k].double() - v.double()).abs().max().item() for k, v in single["model"].items() if v.is_floating_point())
    assert diff <= WEIGHT_ATOL, diff

    m_ddp = json.loads((ddp_dir / "metrics.json").read_text())
    m_single = json.loads((single_dir / "metrics.json").read_text())
    for key in ("map50", "map"):
        assert math.isfinite(m_ddp[key]) and abs(m_ddp[key] - m_single[key]) <= MAP_ATOL, (key, m_ddp[key], m_single[key])
    assert m_ddp["num_gt"] == m_single["num_gt"]
    assert m_ddp["stats"]["train_images"] == m_single["stats"]["train_images"] == 2 * 16


# Run by each rank of test_sharding_and_gathered_evaluation: the samplers and evaluate_model's gather, with an
# oracle detector (it answers each image's ground truth), so a complete gather must score 100 mAP50.
PROBE = textwrap.dedent('''
    import json, sys
    import torch
    from sdidd.config import config_from_dict
    from sdidd.engine import distributed as dist
    from torch.utils.data import DistributedSampler
    from sdidd.engine.run_data import channel_view, load_run_data, test_loader, train_loader
    from sdidd.evaluate import evaluate_detections
    from sdidd.engine.evaluation import evaluate_model

    cfg_dict, out = json.loads(sys.argv[1]), sys.argv[2]
    assert dist.init_from_env("cpu") and dist.world_size() == 2
    cfg = config_from_dict(cfg_dict)
    data = load_run_data(cfg.data)
    train = data.train
    sampler = train_loader(train, cfg.data, 2, 0, seed=3).sampler
    sampler.set_epoch(1)
    test = channel_view(data.test, data.classes, keep_empty=True)
    order = list(test_loader(test, cfg.data, 2, 0).sampler)

    class Oracle(torch.nn.Module):
        """Returns the ground truth of the images in the order this rank's eval loader yields them."""
        def __init__(self):
            super().__init__()
            self.queue = [test.records[i] for i in order]
        def predict(self, images, sizes, scales):
            recs = [self.queue.pop(0) for _ in range(images.shape[0])]
            return [{"boxes": torch.as_tensor(r.boxes, dtype=torch.float32), "scores": torch.ones(len(r.labels)),
                     "labels": torch.as_tensor(r.labels, dtype=torch.int64)} for r in recs]

    model = Oracle()
    full = evaluate_model(model, test, cfg.data, torch.device("cpu"), batch_size=2, workers=0)
    local = {int(test.records[i].image_id): {"boxes": r.boxes, "scores": [1.0] * len(r.labels), "labels": r.labels}
             for i, r in ((i, test.records[i]) for i in order)}
    own = evaluate_detections(test.records, test.classes, local)
    base = DistributedSampler(train, num_replicas=1, rank=0, shuffle=True, seed=3)  # what one process draws
    base.set_epoch(1)
    with open(f"{out}/rank{dist.rank()}.json", "w") as f:
        json.dump({"train": list(sampler), "perm": list(base), "eval": order, "left": len(model.queue),
                   "map50": full.map50, "own_map50": own.map50}, f)
''')


@pytest.mark.slow
def test_sharding_and_gathered_evaluation(tmp_path: Path) -> None:
    """Ranks split each epoch's permutation round-robin, and evaluation unites their disjoint test shards."""
    cfg = {**CFG, "data": {**CFG["data"], "num_train_images": 11}}  # odd: one rank gets a padded repeat
    script, out = tmp_path / "probe.py", tmp_path / "out"
    script.write_text(PROBE)
    out.mkdir()
    torchrun([str(script), json.dumps(cfg), str(out)], tmp_path, tmp_path / "writes")
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD))
    perm = r0["perm"]
    assert r1["perm"] == perm and sorted(perm) == list(range(11))
    # Global batch i of 2 ranks x b = batch i of one process with 2b: rank r takes perm[r::2], padded to 12.
    assert r0["train"] == perm[0::2] and r1["train"] == (perm + perm[:1])[1::2]
    assert sorted(r0["eval"] + r1["eval"]) == list(range(8)) and not set(r0["eval"]) & set(r1["eval"])
    assert r0["left"] == r1["left"] == 0  # each rank's loader went through exactly its shard
    assert r0["map50"] == r1["map50"] == pytest.approx(100.0)  # every rank scores the gathered detections
    assert r0["own_map50"] < 99.0  # one shard alone would not: the gather matters


# Run by each rank of test_nan_on_one_rank_stops_every_rank: rank 1's loss turns NaN at its 3rd step.
NAN_PROBE = textwrap.dedent('''
    import json, sys
    import torch
    import sdidd.engine.trainer as trainer
    from sdidd.config import config_from_dict
    from sdidd.engine import distributed as dist
    from sdidd.errors import SdiddError

    cfg_dict, out = json.loads(sys.argv[1]), sys.argv[2]
    assert dist.init_from_env("cpu") and dist.world_size() == 2
    real_loss, calls = trainer.step_loss, [0]

    def nan_on_rank1(*args, **kwargs):
        loss, parts = real_loss(*args, **kwargs)
        calls[0] += 1
        if dist.rank() == 1 and calls[0] == 3:
            loss, parts = loss * float("nan"), {**parts, "loss_qfl": torch.tensor(float("nan"))}
        return loss, parts

    trainer.step_loss = nan_on_rank1
    cfg = config_from_dict(cfg_dict)
    classes = ["scratch", "spot", "patch", "crack"]
    try:
        trainer.train_step(cfg, trainer.StepSpec(classes, classes, "joint", 0), f"{out}/run")
        msg = "finished"
    except SdiddError as e:
        msg = str(e)
    with open(f"{out}/rank{dist.rank()}.txt", "w") as f:
        f.write(msg)
''')


@pytest.mark.slow
def test_nan_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    """A NaN loss on rank 1 only stops both ranks at the same step with one-line errors (no all-reduce hang)."""
    script, out = tmp_path / "nan_probe.py", tmp_path / "out"
    script.write_text(NAN_PROBE)
    out.mkdir()
    torchrun([str(script), json.dumps(CFG), str(out)], tmp_path, tmp_path / "writes")  # a hang fails by timeout
    r0, r1 = ((out / f"rank{r}.txt").read_text() for r in range(WORLD))
    assert "non-finite loss at epoch 1, iteration 3 (part: loss_qfl)" in r1, r1
    assert "non-finite loss at epoch 1, iteration 3 (on another rank)" in r0, r0
