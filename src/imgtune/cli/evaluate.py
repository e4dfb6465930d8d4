"""imgtune evaluate RUN [DATA]: metrics with 95% bootstrap intervals, per-class table, confusion matrix.

Writes evaluation_<split>.json, confusion_matrix_<split>.csv/.png and reliability_<split>.png into RUN; on
other data (DATA) the names end in _<split>_<tag>, the tag made of DATA's name and a hash of its path."""

from __future__ import annotations


from .. import finite
from .args import positive_int
from .predict import add_engine, add_tta
from .output import console, print_confusion, print_metrics, print_per_class, print_split_calibration


def register(commands) -> None:
    p = commands.add_parser("evaluate", help="measure a trained run on its validation split or on other data",
                            description=__doc__)
    add_run_data_split(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--format", choices=("table", "json"), default="table")
    add_engine(p)
    add_tta(p)
    p.set_defaults(handler=run)


def add_run_data_split(p) -> None:
    """RUN, optional DATA and --split: which images ``evaluate`` (and ``report``) measure."""
    p.add_argument("run", help="run folder written by imgtune train")
    p.add_argument("data", nargs="?", help="data to measure on (default: the run's own data)")
    p.add_argument("--split", choices=("train", "val", "test"),
                   help="which split (default: val for the run's data; test, else val, for other data)")


def run(args) -> int:
    from ..evaluation import evaluate, write_evaluation
    from ..runlock import hold

    with hold(args.run, "evaluate"):  # no train --overwrite may replace the run while it is measured
        result = evaluate(args.run, args.data, args.split, args.device, args.batch_size, args.engine,
                          args.int8, args.tta)
        files = write_evaluation(result)
    if args.format == "json":
        print(finite.dumps({"split": result.split, "data": result.source, **result.report}, indent=2))
        return 0
    classes = list(result.report["per_class"])
    print_metrics(result.report, f"{result.split} of {result.source}")
    print_per_class(result.report)
    print_confusion(result.report["confusion_matrix"], classes)
    print_split_calibration(result.report["calibration"])
    for path, reason in result.skipped:
        console.print(f"skipped {path}: {reason}")
    console.print(f"results written to {files['json']}; confusion matrix to {files['csv']} and {files['png']}; "
                  f"reliability diagram to {files['reliability']}")
    return 0
