"""Per-class AP50 of a checkpoint on all test images and on those that hold no defect of a class it does not know.

After step 1 of a multi-step protocol the test split still holds the defects of later steps, unlabelled for this
checkpoint (background to it). A detector that never saw them may call them one of its classes: false positives that
the second column does not contain. The gap between the columns is what the later defects cost each class.

    python benchmarks/later_defects.py RUN/seed0/two-models-replay20/step1/last.pth --set data.val_fraction=0.2

Prints a Markdown table (one row per class and "all", the number of images of each set in the header).
"""
from __future__ import annotations

import argparse

import torch

from sdidd.config import load_config
from sdidd.engine.checkpoint import load_checkpoint, model_from_checkpoint
from sdidd.engine.evaluation import evaluate_model
from sdidd.engine.run_data import channel_view, load_run_data, only_images_of
from sdidd.errors import SdiddError


def main() -> None:
    """Evaluate the checkpoint on both sets of the recipe's evaluation split; print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--recipe", default="neu_det_quick", help="recipe or YAML of the data (splits, sizes)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override (data.val_fraction=0.2: the validation split the run held out); repeatable")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(a.recipe, a.set)
    data = load_run_data(cfg.data)  # with data.val_fraction its `test` is the held-out validation split
    state = load_checkpoint(a.checkpoint)
    classes = list(state["classes"])
    model = model_from_checkpoint(state).eval()
    test = channel_view(data.test, classes, keep_empty=True)
    known = only_images_of(test, data.test, set(classes))  # no box of a class the checkpoint does not know
    groups = {"all": list(range(len(classes))), **{c: [i] for i, c in enumerate(classes)}}
    res = [evaluate_model(model, ds, cfg.data, torch.device("cpu"), groups=groups).groups for ds in (test, known)]
    print(f"| class | AP50, all {len(test.records)} images | AP50, the {len(known.records)} without an unknown "
          "class's defect | cost of the unknown defects |")
    print("|---|---|---|---|")
    for c in [*classes, "all"]:
        print(f"| {c} | {res[0][c]:.1f} | {res[1][c]:.1f} | {res[1][c] - res[0][c]:.1f} |")


if __name__ == "__main__":
    try:
        main()
    except SdiddError as e:  # a missing or foreign checkpoint: one line, no traceback
        raise SystemExit(f"error: {e}") from None
