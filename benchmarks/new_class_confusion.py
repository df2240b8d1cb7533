"""Where a model's new-class AP goes: all test images vs the test images that hold no old-class defect.

A model trained on new-class images only never sees an old defect labelled as "not new", so on a test image
holding old defects it may call them new ones: false positives that lower the new classes' AP although they
were learnt well. Evaluating the new classes again on the test images without any old-class box separates
"learnt the new classes" from "confuses old defects for new ones".

    python benchmarks/new_class_confusion.py --recipe neu_det_quick --old 3 joint=RUN/joint/step1/last.pth \
        finetune=RUN/finetune/step1/last.pth sdidd=RUN/sdidd/step1/last.pth

Prints a Markdown table (new-class mAP50 on both sets, and the number of images in each). The same holds the
other way: the old classes are measured again on the images without a new-class defect, where calling a new
defect an old one cannot cost them (the old teacher never saw the new defects either). With `--agnostic` each
model is also evaluated with NMS across classes (one box per place, the best-scored class's): the old classes'
boxes, which the distilled model scores higher on old defects, then remove the new-class boxes on them. With
`--old-new`, the step setting `incremental.old_new_nms`: a new-class box goes where a higher-scored old-class box
overlaps it; old boxes stay, and within a group NMS stays per class. `--set data.val_fraction=0.2` measures on the
validation split the run held out (the checkpoints must have been trained with the same setting).
`--per-class` adds a table of each class's AP50 on all images and on its group's subset (a new class on the images
without old defects, an old class on those without new defects). `--blend B` reads two-models checkpoints with the
old-score blending B instead of the one they stored (`incremental.old_score_blend`).
`--old-damp G` (repeatable) uses the model's own old channels at inference instead: every new-class score is
multiplied by (1 - the anchor's best old-class score)^G before post-processing, so a new-class box where the old
classes are confident ranks lower within its class; with `--damp-by TEACHER.pth` the old scores come from that model
(the frozen old teacher, run beside the model) instead of the model's own old channels.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from sdidd.config import load_config
from sdidd.engine.build import StepSpec
from sdidd.engine.checkpoint import load_checkpoint, model_from_checkpoint
from sdidd.engine.run_data import channel_view, load_run_data, only_images_of
from sdidd.engine.evaluation import evaluate_model
from sdidd.model.stack import ModelStack


class OldDamped(nn.Module):
    """Wraps a GFL model: new-class scores times (1 - best old-class score at the anchor)^gamma; old scores unchanged.

    The old-class scores are the model's own first `old` channels, or those of `scorer` (e.g. the old teacher).
    """

    def __init__(self, model: nn.Module, old: int, gamma: float, scorer: nn.Module | None = None) -> None:
        super().__init__()
        self.model, self.old, self.gamma, self.scorer = model, old, gamma, scorer

    def forward(self, images: torch.Tensor):
        """The wrapped model's dense output with the new-class logits re-scored."""
        out = self.model(images)
        p = out.cls.float().sigmoid()
        q = p if self.scorer is None else self.scorer(images).cls.float().sigmoid()
        damp = (1 - q[..., :self.old].amax(-1, keepdim=True)).clamp_min(1e-6) ** self.gamma
        new = torch.logit((p[..., self.old:] * damp).clamp(1e-6, 1 - 1e-6))
        out.cls = torch.cat([out.cls[..., :self.old].float(), new], dim=-1)
        return out

    def predict(self, images, image_sizes, scales=None, **kw):
        """As GFL.predict, through the re-scored forward."""
        return type(self.model).predict(self, images, image_sizes, scales, **kw)

    def postprocess(self, out, image_sizes, **kw):
        """GFL's post-processing of the re-scored output."""
        return self.model.postprocess(out, image_sizes, **kw)


def main(argv: list[str] | None = None) -> None:
    """Evaluate each NAME=CHECKPOINT's new classes (channels --old and up) on both test sets; print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="neu_det_quick", help="recipe or YAML of the data (test split, sizes)")
    ap.add_argument("--old", type=int, required=True, help="number of old classes (the first ones of the checkpoints)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--agnostic", action="store_true", help="also evaluate with NMS across classes (one box per place)")
    ap.add_argument("--old-new", action="store_true", help="also evaluate with NMS across old and new classes")
    ap.add_argument("--old-damp", type=float, action="append", default=[], metavar="G",
                    help="also evaluate with new-class scores times (1 - best old score)^G; repeatable")
    ap.add_argument("--damp-by", metavar="CHECKPOINT", help="with --old-damp: take the old-class scores from this model")
    ap.add_argument("--old-from", metavar="CHECKPOINT",
                    help="also evaluate each model with its old classes taken from this model (two models at "
                         "inference; with --old-damp, the new classes damped by its old scores)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override (e.g. data.val_fraction=0.2); repeatable")
    ap.add_argument("--per-class", action="store_true", help="also print each class's AP50 on all images and on its subset")
    ap.add_argument("--blend", type=float, help="two-models checkpoints: read them with this old-score blending")
    ap.add_argument("--out", help="also write the table to this Markdown file")
    ap.add_argument("models", nargs="+", metavar="NAME=CHECKPOINT")
    a = ap.parse_args(argv)
    bad = [m for m in a.models if "=" not in m or not m.split("=", 1)[1]]
    if bad:
        ap.error(f"{bad[0]!r}: expected NAME=CHECKPOINT")
    if a.damp_by and not a.old_damp:
        ap.error("--damp-by needs --old-damp G (the exponent of the damping)")
    torch.set_num_threads(a.threads)
    cfg = load_config(a.recipe, a.set)
    data = load_run_data(cfg.data)
    rows, per_class = [], []
    scorer = model_from_checkpoint(load_checkpoint(a.damp_by)).eval() if a.damp_by else None
    old_model = model_from_checkpoint(load_checkpoint(a.old_from)).eval() if a.old_from else None
    modes = [("per class", {})] + ([("across classes", {"agnostic": True})] if a.agnostic else [])
    for item in a.models:
        name, path = item.split("=", 1)
        state = load_checkpoint(path)
        classes = list(state["classes"])
        test = channel_view(data.test, classes, keep_empty=True)
        # "without old defects": no box of any dataset class outside the model's new channels, read from the full
        # labels, so a model that knows only the new classes (--old 0) is measured on the same images
        clean = only_images_of(test, data.test, set(classes[a.old:]))
        # "without new defects": no box of a class outside the model's old channels (for the old teacher too)
        no_new = only_images_of(test, data.test, set(classes[:a.old]))
        model = model_from_checkpoint(state, blend=a.blend).eval()
        groups = {"old": list(range(a.old)), "new": list(range(a.old, len(classes))), "all": list(range(len(classes)))}
        old_new = [("across old and new", StepSpec(classes, classes[a.old:]).postprocess(True))]
        damped = [(f"old-damped, G = {g:g}", {}, OldDamped(model, a.old, g, scorer).eval()) for g in a.old_damp]
        if old_model is not None:
            damped += [(f"old classes from {Path(a.old_from).name}" + (f", new damped G = {g:g}" if g else ""), {},
                        ModelStack([old_model, model], [a.old, len(classes)], g).eval()) for g in [0.0, *a.old_damp]]
        for mode, post, net in [(m, p, model) for m, p in modes + (old_new if a.old_new else [])] + damped:
            full, part, old_part = (evaluate_model(net, ds, cfg.data, torch.device("cpu"), groups=groups,
                                                   postprocess=post) if ds is not None else None
                                    for ds in (test, clean, no_new if a.old else None))
            rows.append((name, mode, full.groups["new"], part.groups["new"], full.groups["old"],
                         old_part.groups["old"] if old_part else None, full.groups["all"]))
            for i, c in enumerate(classes):  # each class on its group's subset: where the other group can't be called it
                sub = part if i >= a.old else old_part
                per_class.append((name, mode, c, full.per_class[c]["ap50"], sub.per_class[c]["ap50"] if sub else None))
        n_all, n_clean, n_no_new = len(test.records), len(clean.records), len(no_new.records)
    where = "validation" if cfg.data.val_fraction else "test"
    lines = [f"| model | NMS | new mAP50, all {n_all} {where} images | new mAP50, the {n_clean} without old defects "
             f"| old mAP50 | old mAP50, the {n_no_new} without new defects | all mAP50 |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {m} | {f:.1f} | {c:.1f} | {o:.1f} | {'–' if on is None else f'{on:.1f}'} | {al:.1f} |"
              for n, m, f, c, o, on, al in rows]
    if a.per_class:
        lines += ["", f"| model | NMS | class | AP50, all {n_all} {where} images | AP50, new classes on the {n_clean} "
                  f"without old defects, old classes on the {n_no_new} without new defects |", "|---|---|---|---|---|"]
        lines += [f"| {n} | {m} | {c} | {f:.1f} | {'–' if s is None else f'{s:.1f}'} |" for n, m, c, f, s in per_class]
    print("\n".join(lines))
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    from sdidd.errors import SdiddError
    try:
        main()
    except SdiddError as e:  # a missing or foreign checkpoint: one line, no traceback
        raise SystemExit(f"error: {e}") from None
