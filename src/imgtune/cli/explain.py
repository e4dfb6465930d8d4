"""imgtune explain RUN IMAGE...: where the model looks, as heatmap overlays (Grad-CAM and others).

For each image and method a PNG is written: the class activation map in colour over the image; the part
the model does not see (outside its centre crop) is dimmed and the crop outlined. A file that cannot be
read gives an error row and the others go on; the exit code is then 3."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from .. import finite
from ..errors import DataError
from .output import console


# the names of imgtune.explain.METHODS (importing that module here would import torch for --help);
# tests/test_explain.py checks they agree
METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "scorecam")
DEFAULT_METHODS = ("gradcam", "gradcam++")


def register(commands) -> None:
    p = commands.add_parser("explain", help="heatmaps of where the model looks (Grad-CAM, Grad-CAM++, ...)",
                            description=__doc__)
    p.add_argument("run", help="run folder written by imgtune train")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders (searched recursively)")
    p.add_argument("--out", help="folder for the overlays (default: RUN/explanations)")
    p.add_argument("--method", action="append", choices=tuple(METHODS), dest="methods",
                   help=f"repeat for several (default: {' and '.join(DEFAULT_METHODS)}); scorecam needs no "
                        "gradients but runs the model once per feature channel (minutes on a CPU)")
    p.add_argument("--class", dest="class_name", metavar="NAME",
                   help="explain this class (default: each image's predicted class)")
    p.add_argument("--device", default="auto")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..atomic import check_writable_folder
    from ..explain import Explainer, explain_files
    from ..predict import expand_paths
    from ..runlock import hold, inside

    if args.out:  # before the model is built
        check_writable_folder(args.out, "--out")
    paths = expand_paths(args.images)
    out = Path(args.out) if args.out else Path(args.run) / "explanations"  # artifact.EXPLANATIONS
    check_writable_folder(out, "--out")
    with hold(args.run, "explain") if inside(out, args.run) else contextlib.nullcontext():
        explainer = Explainer.from_run(args.run, args.device)
        results = explain_files(explainer, paths, out, tuple(args.methods or DEFAULT_METHODS), args.class_name)
    if args.format == "json":
        print(finite.dumps([r.to_dict() for r in results], indent=2))
    else:
        _table(results)
    failed = sum(r.error is not None for r in results)
    if failed:
        print(f"{failed} of {len(results)} file(s) could not be read", file=sys.stderr)
        return DataError.exit_code
    if args.format == "table":
        console.print(f"overlays written to {out}")
    return 0


def _table(results) -> None:
    table = Table()
    for column in ("image", "predicted", "explained", "overlays"):
        table.add_column(column, overflow="fold")
    for r in results:
        if r.error:
            table.add_row(escape(r.path), f"[red]error: {escape(r.error)}[/red]", "", "")
            continue
        table.add_row(escape(r.path), f"{escape(r.predicted)} {r.predicted_prob:.3f}",
                      f"{escape(r.explained)} {r.explained_prob:.3f}",
                      "\n".join(escape(p.name) for p in r.files.values()))
    console.print(table)
