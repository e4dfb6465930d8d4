"""imgtune doctor DATA: check a dataset for broken files, outliers, duplicates, leakage, imbalance and
likely label errors; write doctor.json and doctor.html."""

from __future__ import annotations

from pathlib import Path

from .anonymize import add_flags, from_args, scrubbing
from .args import positive_int
from .output import console

SHOWN = 20  # findings per check in the terminal; doctor.json and doctor.html have more


def register(commands) -> None:
    p = commands.add_parser("doctor", help="check a dataset before training", description=__doc__)
    p.add_argument("data", help="any dataset imgtune train accepts (split folders, class folders, CSV)")
    p.add_argument("--out", default="doctor", help="folder for doctor.json and doctor.html (default ./doctor)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="as for train: the split checked for leakage")
    p.add_argument("--test-fraction", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="as for train: let a CSV name files outside its own folder (only a CSV you trust)")
    g = p.add_argument_group("label errors")
    g.add_argument("--no-labels", dest="labels", action="store_false",
                   help="skip the label-error check (the only one that runs a model)")
    g.add_argument("--model", default="mobilenet_v2", help="pretrained backbone for the features (default mobilenet_v2)")
    g.add_argument("--img-size", type=positive_int, help="input size (default: the model's)")
    g.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    g.add_argument("--cache-dir", help="feature cache (default $IMGTUNE_CACHE, else ~/.cache/imgtune)")
    g.add_argument("--offline", action="store_true", help="never download weights (also IMGTUNE_OFFLINE=1)")
    add_flags(p)
    p.add_argument("--strict", action="store_true", help="exit with code 3 when an error-level problem is found")
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..atomic import check_writable_folder
    from ..errors import UsageError

    if args.folds < 2:
        raise UsageError("--folds must be at least 2")
    check_writable_folder(args.out, "--out")
    anonymizer = from_args(args)  # a bad key stops the command before any work
    with scrubbing(anonymizer, args.data, args.out):
        return _diagnose(args, anonymizer)


def _diagnose(args, anonymizer) -> int:
    from ..doctor import LabelCheck, diagnose
    from ..doctor.render import anonymised, write_html, write_json

    labels = LabelCheck(args.model, args.img_size, args.folds, args.cache_dir, args.offline, args.device) \
        if args.labels else None
    diagnosis = diagnose(args.data, args.val_fraction, args.test_fraction, args.seed, labels,
                         allow_outside_paths=args.allow_outside_paths)
    out = Path(args.out)
    _make_folder(out)
    shown = anonymised(diagnosis, anonymizer) if anonymizer else diagnosis
    write_json(shown, out / "doctor.json")
    write_html(diagnosis, out / "doctor.html", anonymizer)
    _print(shown)
    console.print("written: doctor.json and doctor.html (anonymised) in the --out folder" if anonymizer else
                  f"written: {out / 'doctor.json'}, {out / 'doctor.html'}")
    errors = [f for f in diagnosis.findings if f.severity == "error"]
    return 3 if args.strict and errors else 0


def _make_folder(out: Path) -> None:
    from ..errors import UsageError

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # the folder changed since check_writable_folder looked
        raise UsageError(f"--out {out}: cannot create the folder ({exc.strerror})") from exc


def _print(diagnosis) -> None:
    from ..doctor.render import CHECKS, TITLES

    console.print(f"[bold]{diagnosis.source}[/]: {diagnosis.files} files ({diagnosis.layout}), "
                  f"{diagnosis.readable} readable, {len(diagnosis.classes)} classes, imbalance "
                  f"{_ratio(diagnosis.imbalance_ratio)}, {diagnosis.seconds.get('total', 0):.1f} s")
    for check in CHECKS:
        found = diagnosis.by_check(check)
        if not found:
            continue
        console.print(f"[bold]{TITLES[check]}[/] ({len(found)})", highlight=False)
        for finding in found[:SHOWN]:
            colour = {"error": "red", "warning": "yellow"}.get(finding.severity, "blue")
            console.print(f"  [{colour}]{finding.severity}[/] {finding.message}", highlight=False, soft_wrap=True)
        if len(found) > SHOWN:
            console.print(f"  ... and {len(found) - SHOWN} more (doctor.json)")
    if not diagnosis.findings:
        console.print("no problems found")


def _ratio(ratio: float | None) -> str:
    return "n/a (a class has no training images)" if ratio is None else f"{ratio:.1f}:1"
