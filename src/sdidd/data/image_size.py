"""The image size of a run: the recipe's, or from the data when the recipe leaves it unset.

A recipe fixes the size with `data.train_sizes` and/or `data.test_size` (an unset partner is 160, as
before sizes could come from the data). When it sets neither, the short side is the median short
side of the training images rounded to the stride (32), at least 32 and at most `data.max_size`
(the recipe's cap of the long side). The chosen size is logged with its reason at the start of the
run, and a warning names how many images shrink below a third of their side.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from sdidd.data.records import Record
from sdidd.data.transforms import PAD_DIVISOR, target_size

__all__ = ["DEFAULT_SIZE", "choose_image_size", "size_from_records", "shrink_warning"]

log = logging.getLogger(__name__)

DEFAULT_SIZE = 160  # the short side when only one of train_sizes / test_size is set, or there is no image
SHRINK_WARNING = 1 / 3  # an image resized below this fraction of its side loses small defects


def size_from_records(records: Sequence[Record], max_size: int) -> tuple[int, str]:
    """(short side, reason): the median short side of `records` rounded to the stride, within 32..max_size."""
    if not records:
        return min(DEFAULT_SIZE, max_size), f"no training image to measure: {DEFAULT_SIZE}"
    short = float(np.median([min(r.width, r.height) for r in records]))
    long = float(np.median([max(r.width, r.height) for r in records]))
    rounded = max(PAD_DIVISOR, int(round(short / PAD_DIVISOR)) * PAD_DIVISOR)
    size = min(rounded, max_size)
    capped = f", capped by data.max_size {max_size}" if size < rounded else ""
    return size, (f"from the data: median image side {short:g} (short) x {long:g} (long) over {len(records)} "
                  f"training images, rounded to the stride {PAD_DIVISOR}{capped}")


def shrink_warning(records: Sequence[Record], short_size: int, max_size: int) -> str:
    """A warning line when some images shrink below a third of their side at this size, else ''."""
    shrunk = []
    for r in records:
        nh, nw, scale = target_size(r.height, r.width, short_size, max_size)
        if scale < SHRINK_WARNING:
            shrunk.append((scale, r, nh, nw))
    if not shrunk:
        return ""
    scale, r, nh, nw = min(shrunk, key=lambda x: x[0])
    return (f"warning: {len(shrunk)} of {len(records)} images shrink below a third of their side at short side "
            f"{short_size} / long side <= {max_size} (e.g. {r.file}: {r.width}x{r.height} -> {nw}x{nh}); small defects "
            "may vanish: set data.test_size, data.train_sizes and data.max_size to keep them")


def choose_image_size(cfg: Any, records: Sequence[Record]) -> tuple[list[int], int, str]:
    """(training sizes, test size, reason): a DataConfig's sizes, or from the data when it leaves them unset; logged."""
    if cfg.train_sizes or cfg.test_size:
        train_sizes, test_size = list(cfg.train_sizes) or [DEFAULT_SIZE], int(cfg.test_size) or DEFAULT_SIZE
        reason = "set by the recipe"
    else:
        size, reason = size_from_records(records, cfg.max_size)
        train_sizes, test_size = [size], size
    log.info(f"image size: short side {test_size} (training {', '.join(map(str, train_sizes))}), "
             f"long side <= {cfg.max_size} ({reason})")
    warning = shrink_warning(records, test_size, cfg.max_size)
    if warning:
        log.warning(warning)
    return train_sizes, test_size, reason
