"""imgtune predict RUN PATH...: top-k labels with probabilities for image files and folders.

A file that cannot be read gives an error row and the others go on; the exit code is then 3."""

from __future__ import annotations

import csv
import sys

from rich.markup import escape
from rich.table import Table

from .. import finite
from ..errors import DataError
from .args import positive_int
from .output import console


def register(commands) -> None:
    p = commands.add_parser("predict", help="predict labels of image files or folders", description=__doc__)
    p.add_argument("run", help="run folder written by imgtune train")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    p.add_argument("--top-k", type=positive_int, default=3, help="classes shown per image (default 3)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--calibrated", action="store_true",
                   help="temperature-scaled probabilities, softmax(logits / T) with the T fitted on the run's "
                        "validation split (calibration.json); the labels are the same")
    add_engine(p)
    add_tta(p)
    p.set_defaults(handler=run)


def add_tta(p) -> None:
    """--tta, for predict and evaluate."""
    p.add_argument("--tta", action="store_true",
                   help="flip test-time augmentation: each image's probabilities are the mean of its own and its "
                        "left-right mirror image's (twice the inference time); exports and imgtune serve answer "
                        "without it")


def add_engine(p) -> None:
    """--engine and --int8, for predict and evaluate."""
    p.add_argument("--engine", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="what runs the model: onnxruntime uses the run's ONNX export (imgtune export RUN) and "
                        "never imports torch; auto (default) uses it when it was made from the run's current "
                        "weights and onnxruntime is installed, else torch")
    p.add_argument("--int8", action="store_true",
                   help="run the int8 export (model.int8.onnx, imgtune export RUN --int8) with onnxruntime")


def run(args) -> int:
    from ..ort_predict import open_predictor
    from ..predictions import expand_paths

    predictor = open_predictor(args.run, args.engine, args.device, calibrated=args.calibrated, int8=args.int8)
    results = predictor.predict(expand_paths(args.paths), args.top_k, args.batch_size, args.tta)
    {"table": _table, "csv": _csv, "json": _json}[args.format](results)
    failed = sum(not r.ok for r in results)
    if failed:
        print(f"{failed} of {len(results)} file(s) could not be read", file=sys.stderr)
        return DataError.exit_code
    return 0


def _table(results) -> None:
    k = max((len(r.labels) for r in results), default=1)
    table = Table()
    table.add_column("path", overflow="fold")
    for i in range(1, k + 1):
        table.add_column(f"top {i}")
    for r in results:
        if r.ok:
            table.add_row(escape(r.path), *(f"{escape(label)} {p:.3f}" for label, p in zip(r.labels, r.probs)))
        else:
            table.add_row(escape(r.path), f"[red]error: {escape(r.error)}[/red]")
    console.print(table)


def _csv(results) -> None:
    k = max((len(r.labels) for r in results), default=1)
    writer = csv.writer(sys.stdout)
    writer.writerow(["path", *[f"{c}{i}" for i in range(1, k + 1) for c in ("label", "prob")], "error"])
    for r in results:
        pairs = [v for label, p in zip(r.labels, r.probs) for v in (label, f"{p:.6f}")]
        writer.writerow([r.path, *pairs, *[""] * (2 * k - len(pairs)), r.error or ""])


def _json(results) -> None:
    print(finite.dumps([r.to_dict() for r in results], indent=2))
