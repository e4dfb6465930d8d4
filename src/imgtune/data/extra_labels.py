"""``imgtune train DATA --extra-labels FILE.csv``: images a person labelled after ``imgtune suggest``
asked, added to the training split.

The CSV is the one ``suggest`` writes (``path,label,guess,prob``) or any CSV with ``path`` and ``label``
columns: rows whose ``label`` is filled are added to the training split, rows left empty are ignored,
every other column is ignored. Paths are relative to the CSV's folder (``suggest`` writes them so when
the images are under it) or absolute; as with a data CSV, a path outside the CSV's folder needs
``--allow-outside-paths``. A label that is not one of the dataset's classes is an error naming the row.
The added files go through the same checks as the dataset's (unreadable ones skipped and named; a copy
of a val or test image is leakage).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .scan import Sample, _check_inside, _csv_rows


def read_extra_labels(path: str | Path, classes: set[str], allow_outside_paths: bool = False) -> list[Sample]:
    """The labelled rows of ``path`` as training samples of ``classes``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--extra-labels {path}: no such file; pass the CSV imgtune suggest wrote, with the label "
                        "column filled in")
    rows, columns = _csv_rows(path)
    if not {"path", "label"} <= set(columns):
        raise DataError(f"--extra-labels {path} needs a header with columns path,label (imgtune suggest writes "
                        f"path,label,guess,prob); found columns {columns}")
    samples = []
    for line, row in enumerate(rows, start=2):
        row = {(key or "").strip().lower(): (value or "").strip() for key, value in row.items() if key}
        if not row.get("label"):
            continue
        where = f"--extra-labels {path} line {line}"
        if not row.get("path"):
            raise DataError(f"{where}: a label without a path")
        if row["label"] not in classes:
            raise DataError(f"{where}: class {row['label']!r} is not one of the dataset's classes "
                            f"{sorted(classes)}; correct the label or leave it empty to skip the image")
        if not allow_outside_paths:
            _check_inside(path, row["path"], where)
        samples.append(Sample((path.parent / row["path"]).resolve(), row["label"], "train"))
    if not samples:
        raise DataError(f"--extra-labels {path}: no row has a label; fill in the label column of the images "
                        "you labelled (rows left empty are skipped)")
    return samples
