"""The cheap checks of a dataset before training (``imgtune doctor`` runs every check): exact copies
across splits or classes stop training, near-duplicates across splits are warned about."""

from __future__ import annotations

import logging

from ..errors import DataError
from .duplicates import exact_groups, leaks_into
from .scan import DataSplits, Sample

log = logging.getLogger(__name__)


def check_duplicates(splits: DataSplits, source: str = "DATA", allow_leakage: bool = False) -> None:
    """The cheap checks before training: the same file in two splits (leakage) or under two classes (a
    label conflict) stops training unless ``allow_leakage``; near-duplicates across splits are warned
    about. (``imgtune doctor`` runs every check.)"""
    groups = exact_groups(splits.samples)
    bad = [g for g in groups if g.kinds() != ["within-class"]]
    within = len(groups) - len(bad)
    if within:
        log.info("%d file(s) have exact copies in the same class and split (harmless; imgtune doctor lists them)",
                 within)
    if bad:
        listed = "; ".join(f"{' + '.join(g.kinds())}: {_where_all(g.members)}" for g in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        message = (f"{len(bad)} image(s) are stored more than once, in different splits or classes: {listed}{more}. The "
                   "same image in train and val/test inflates every metric; under two classes one label "
                   "is wrong")
        if not allow_leakage:
            raise DataError(f"{message}. Remove the copies (imgtune doctor {source} lists them "
                            "all) or pass --allow-leakage to train anyway")
        log.warning("%s; training anyway (--allow-leakage)", message)
    train = splits.split("train")
    held_out = [s for s in splits.samples if s.split != "train"]
    near = leaks_into(train, held_out)
    for other, original, bits in near[:10]:
        log.warning("near-duplicate across splits: %s looks like %s (%d of 256 bits differ); metrics may "
                    "be optimistic", _where(other), _where(original), bits)
    if len(near) > 10:
        log.warning("... and %d more near-duplicate pair(s) across splits (imgtune doctor lists them all)",
                    len(near) - 10)


def _where(sample: Sample) -> str:
    return f"{sample.path} ({sample.split}/{sample.label})"


def _where_all(samples) -> str:
    return ", ".join(_where(s) for s in samples)
