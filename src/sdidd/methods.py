"""Every training method of sdidd in one table: what it distils, its defaults, and what it needs.

A method is an entry of :data:`METHODS`. An engine method (``variant_of`` None) gives the defaults of the
`distill` switches the config leaves unset (None) and its QFL weight; a benchmark variant (an ablation, or
``sdidd+dual``, a replay or old-labels row) runs as the engine method it names with some `distill` or
`incremental` settings. The CLI's choices, config validation, the step builder, the new-class teacher and
the benchmark all read this table; an unknown name is one error line wherever it is given. Adding a method or
an ablation is one entry here; a distillation term is an entry of `distill/terms.py` (see docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional

from .errors import SdiddError, shown

if TYPE_CHECKING:
    from .config import Config, DistillConfig

__all__ = ["Method", "METHODS", "ENGINE_METHODS", "ADD_CLASSES_METHODS", "method", "resolved_distill", "qfl_weight",
           "uses_teacher", "variant_config", "VARIANT_GROUPS"]

_NONE = dict(hccd=False, erd_box=False, dscrd=False, idfd=False, hccd_min_score=0.0, pseudo_labels=False, hccd_form="l2",
             pseudo_ignore_confident=False, hccd_outside_new=False)


@dataclass(frozen=True)
class Method:
    """One method: its `distill` switches (defaults, or a variant's settings), QFL weight, and where it is offered."""

    summary: str
    distill: Mapping[str, Any] = field(default_factory=dict)
    qfl_weight: float = 1.0  # as released: SD-IDD doubles QFL
    variant_of: Optional[str] = None  # a benchmark variant: the engine method it runs as, with `distill` set
    add_classes: bool = False  # offered by `sdidd add-classes --method`
    group: Optional[str] = None  # benchmark shorthand that selects it with its group ('ablations', 'plus-terms', ...)
    incremental: Mapping[str, Any] = field(default_factory=dict)  # a variant's `incremental.*` settings (its data)


METHODS: dict[str, Method] = {
    "joint": Method("every label of every class seen so far (the upper bound)", _NONE),
    "finetune": Method("new labels only, no distillation (the lower bound)", _NONE, add_classes=True),
    # Not distillation: the old model stays as it is and answers for the old classes; the step's fine-tune answers
    # for the new ones, damped where the old model sees a defect (model/stack.py). Two forwards at inference.
    "two-models": Method("the old model kept for the old classes, a fine-tune for the new ones (two forwards at "
                         "inference)", _NONE, add_classes=True),
    "erd": Method("ERD: HCCD (L2 on logits, mu+2sigma) and elastic box distillation", {
        **_NONE, "hccd": True, "erd_box": True}, add_classes=True),
    "sdidd": Method("SD-IDD (the paper): ERD's terms, HCCD score floor, DSCRD and IDFD", {
        **_NONE, "hccd": True, "erd_box": True, "dscrd": True, "idfd": True, "hccd_min_score": 0.1},
        qfl_weight=2.0, add_classes=True),
    "sdidd+": Method("SD-IDD with HCCD on scores (bounded gradient) and old-class pseudo-labels on the new images", {
        **_NONE, "hccd": True, "erd_box": True, "dscrd": True, "idfd": True, "hccd_min_score": 0.1,
        "pseudo_labels": True, "hccd_form": "bce", "pseudo_ignore_confident": True}, qfl_weight=2.0, add_classes=True),
    # Each ablation removes one strategy (or our HCCD score floor) from the full sdidd method.
    "sdidd-no-cls": Method("SD-IDD without HCCD", {"hccd": False}, variant_of="sdidd", group="ablations"),
    "sdidd-no-reg": Method("SD-IDD without DSCRD", {"dscrd": False}, variant_of="sdidd", group="ablations"),
    "sdidd-no-feat": Method("SD-IDD without IDFD", {"idfd": False}, variant_of="sdidd", group="ablations"),
    "sdidd-no-erdbox": Method("SD-IDD without ERD's box term", {"erd_box": False}, variant_of="sdidd", group="ablations"),
    "sdidd-no-floor": Method("SD-IDD with the paper's mu+2sigma HCCD selection alone", {"hccd_min_score": 0.0},
                             variant_of="sdidd", group="ablations"),
    # Each sdidd+ variant removes one of its additions (sdidd itself removes both) or adds one.
    "sdidd+-no-pseudo": Method("sdidd+ without pseudo-labels", {"pseudo_labels": False}, variant_of="sdidd+",
                               group="plus-ablations"),
    "sdidd+-all-negatives": Method("sdidd+ with every anchor without a pseudo-label an old-channel negative, "
                                   "HCCD's confident anchors too", {"pseudo_ignore_confident": False},
                                   variant_of="sdidd+", group="plus-ablations"),
    "sdidd+-l2": Method("sdidd+ with the L2 HCCD", {"hccd_form": "l2"}, variant_of="sdidd+", group="plus-ablations"),
    # The score form's gradient σ'(z_t)·Δz is at most 1/4·Δz, L2's is 2·Δz: at 8× weight the two pull alike where
    # the teacher's score is 0.5, while the score form still lets go of classes the teacher scores near 0.
    "sdidd+-hccd-x8": Method("sdidd+ with the score-form HCCD at 8x", {"hccd_weight": 8.0}, variant_of="sdidd+",
                             group="plus-ablations"),
    # Pseudo-labels dropped where they touch a new box at all: most that do mark part of a new defect (a crack, a patch),
    # and as old-class targets they train the new channels to 0 there (docs/results/add_classes_story.md).
    "sdidd+-iou0.1": Method("sdidd+ with pseudo-labels dropped at IoU >= 0.1 with a new box (default 0.5)",
                            {"pseudo_overlap_iou": 0.1}, variant_of="sdidd+"),
    # DSCRD copies the old teacher's box distributions at new-class positives, boxes of defects it never learnt
    # (without DSCRD the new classes gained 2.7 on NEU-DET's validation split): copy them as far as they fit.
    "sdidd+-dscrd-iou": Method("sdidd+ with DSCRD weighted by the IoU of the old teacher's box with the GT box",
                               {"dscrd_teacher_iou": True}, variant_of="sdidd+"),
    # The teacher calls many new defects old ones (on NEU-DET's validation split its old classes lose 5-8 AP50 points
    # to the images holding a new defect); HCCD copies that into the student unless it stays out of the new boxes.
    "sdidd+-outside-new": Method("sdidd+ with HCCD left out inside the new-class boxes", {"hccd_outside_new": True},
                                 variant_of="sdidd+"),
    "sdidd-outside-new": Method("SD-IDD with HCCD left out inside the new-class boxes", {"hccd_outside_new": True},
                                variant_of="sdidd"),
    "sdidd+dual": Method("sdidd+ with a second, new-class teacher (the step's fine-tune)", {"new_teacher": "finetune"},
                         variant_of="sdidd+", group="plus-ablations"),
    # sdidd+ with one old-class term removed: which of them holds the new classes back (each also acts at new-class
    # positives: IDFD pulls the FPN features there to the old teacher's, DSCRD the box distributions, HCCD the old
    # channels at the teacher's confident anchors, ERD-box the teacher's confident box sides).
    "sdidd+-no-cls": Method("sdidd+ without HCCD", {"hccd": False}, variant_of="sdidd+", group="plus-terms"),
    "sdidd+-no-reg": Method("sdidd+ without DSCRD", {"dscrd": False}, variant_of="sdidd+", group="plus-terms"),
    "sdidd+-no-feat": Method("sdidd+ without IDFD", {"idfd": False}, variant_of="sdidd+", group="plus-terms"),
    "sdidd+-no-erdbox": Method("sdidd+ without ERD's box term", {"erd_box": False}, variant_of="sdidd+",
                               group="plus-terms"),
    # The same methods when the new images keep the labels of the old defects they show (a line that labels every
    # defect it sees): those labels are trained as ground truth, distillation still keeps what they do not cover.
    "sdidd-old-labels": Method("SD-IDD, the new images' old-class labels kept", variant_of="sdidd",
                               incremental={"old_labels": True}, group="old-labels"),
    "finetune-old-labels": Method("fine-tune, the new images' old-class labels kept", variant_of="finetune",
                                  incremental={"old_labels": True}, group="old-labels"),
    # A few kept old images per old class replayed with their labels (engine/replay.py): the curve N = 5, 20, 50.
    **{f"sdidd-replay{n}": Method(f"SD-IDD with {n} replayed old images per old class", variant_of="sdidd",
                                  incremental={"replay_images": n}, group="replay") for n in (5, 20, 50)},
    # The same kept images under two-models: the fine-tune learns from them that an old defect is not a new one
    # (the old model still answers for the old classes).
    **{f"two-models-replay{n}": Method(f"two-models, its fine-tune with {n} replayed old images per old class",
                                       variant_of="two-models", incremental={"replay_images": n}, group="replay")
       for n in (5, 20, 50)},
    # The 20 kept images oversampled: each four times per epoch, near as many as the step's new images. Level with
    # replaying them once on a validation split (docs/results/replay_oversample_val.md), so outside the replay group.
    "two-models-replay20x4": Method("two-models, its fine-tune with 20 replayed old images per old class, each 4x per epoch",
                                    variant_of="two-models", incremental={"replay_images": 20, "replay_repeat": 4}),
}
ENGINE_METHODS = tuple(n for n, m in METHODS.items() if m.variant_of is None)  # what incremental.method accepts
ADD_CLASSES_METHODS = tuple(n for n, m in METHODS.items() if m.add_classes)
# The benchmark's group names, in table order, each with its variants.
VARIANT_GROUPS = {g: [n for n, m in METHODS.items() if m.group == g]
                  for g in dict.fromkeys(m.group for m in METHODS.values() if m.group)}


def method(name: str) -> Method:
    """The table entry of `name`; one SdiddError line naming the known ones."""
    if name not in METHODS:
        raise SdiddError(f"unknown method {shown(name)} (known: {', '.join(METHODS)})")
    return METHODS[name]


def engine_method(name: str) -> str:
    """The engine method `name` runs as (itself, or the one a variant names)."""
    return method(name).variant_of or name


def resolved_distill(cfg: "Config", name: str) -> "DistillConfig":
    """The config's distill switches with engine method `name`'s defaults where the config left None."""
    entry = method(name)
    if entry.variant_of is not None:
        raise SdiddError(f"method {shown(name)} is a benchmark variant of {entry.variant_of}: run it through "
                         f"variant_config (or incremental.method={entry.variant_of} with its distill.* settings)")
    d = cfg.distill
    defaults = {k: v for k, v in entry.distill.items() if k != "terms" and getattr(d, k) is None}
    # terms switched on by name: the method's, then the config's weights over them
    terms = {**entry.distill.get("terms", {}), **d.terms}
    return dataclasses.replace(d, **defaults, terms=terms)


def qfl_weight(cfg: "Config", name: str) -> float:
    """QFL weight: the config's (loss.qfl), or the engine method's as-released default."""
    if cfg.loss.qfl is not None:
        return cfg.loss.qfl
    return method(engine_method(name)).qfl_weight


def uses_teacher(d: "DistillConfig") -> bool:
    """Whether any distillation term that is on reads the old teacher's outputs (else its forward is skipped)."""
    from .distill.terms import reads_teacher  # the terms table (torch) only when a step is built
    return reads_teacher(d)


def variant_config(cfg: "Config", name: str) -> tuple["Config", str]:
    """(the config of method `name`, the engine method it runs as): a variant's distill and incremental settings on a copy."""
    entry = method(name)
    base = entry.variant_of or name
    variant = entry.variant_of is not None  # a variant's settings are this table's own, valid by construction
    distill = dataclasses.replace(cfg.distill, **entry.distill) if variant else cfg.distill
    incremental = dataclasses.replace(cfg.incremental, **(entry.incremental if variant else {}), method=base)
    return dataclasses.replace(cfg, distill=distill, incremental=incremental), base
