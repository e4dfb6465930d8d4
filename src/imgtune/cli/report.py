"""imgtune report RUN [DATA]: one self-contained HTML page about a run (figures embedded).

Configuration and data, training curves, confusion matrix, per-class table with 95% intervals, ROC and
precision-recall curves, reliability diagram and calibration, and the most confident mistakes with
Grad-CAM overlays. Measured on the run's validation split, or on DATA (its test split, else val)."""

from __future__ import annotations

from .anonymize import add_flags, from_args, scrubbing
from .evaluate import add_run_data_split


def register(commands) -> None:
    p = commands.add_parser("report", help="write an HTML report of a run (figures, mistakes, calibration)",
                            description=__doc__)
    add_run_data_split(p)
    p.add_argument("--out", help="HTML file to write (default: RUN/report.html, RUN/report_<split>.html for "
                                 "other data or splits)")
    p.add_argument("--gallery", type=int, default=12, metavar="N", help="how many mistakes to show (default 12)")
    p.add_argument("--device", default="auto")
    add_flags(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..report import write_report

    anonymizer = from_args(args)  # a bad key stops the command before any work
    with scrubbing(anonymizer, args.run, args.data, args.out):
        path = write_report(args.run, args.data, args.split, args.out, args.device, args.gallery, anonymizer)
    print(f"{path.name} (anonymised)" if anonymizer else path)
    return 0
