"""imgtune explain RUN IMAGE...: where the model looks, as heatmap overlays (Grad-CAM and the CAM family,
integrated gradients, occlusion, LIME, Kernel SHAP).

For each image and method a PNG is written: the heatmap in colour over the image; the part the model does
not see (outside its centre crop) is dimmed and the crop outlined. Each method's seconds per image are
printed; --format json adds the heatmap pooled to a --grid x --grid grid of the model's view. A file that
cannot be read gives an error row and the others go on; the exit code is then 3.

imgtune explain RUN --evaluate [DATA]: which method reflects the model? Deletion and insertion curves with
bootstrap intervals against a random ordering, and the model-randomisation sanity check, on the run's val
images (or DATA's); writes explain_eval.json and explain_eval.html to --out (default RUN)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from .. import finite
from ..errors import DataError, UsageError
from .anonymize import add_flags, from_args, scrubbing
from .output import console

# the names of imgtune.explain.METHODS and explain_eval.EVAL_METHODS (importing them here would import torch
# for --help); tests/test_explain.py checks they agree
METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "scorecam", "integrated-gradients",
           "occlusion", "lime", "kernel-shap")
DEFAULT_METHODS = ("gradcam",)  # imgtune.explain.DEFAULT_METHODS (a test checks they agree)
EVAL_METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "integrated-gradients", "occlusion",
                "lime", "kernel-shap")


def register(commands) -> None:
    p = commands.add_parser("explain", help="heatmaps of where the model looks (Grad-CAM, LIME, SHAP, ...) and "
                                            "--evaluate: which of them reflects the model", description=__doc__)
    p.add_argument("run", help="run folder written by imgtune train")
    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help="image files or folders (searched recursively); with --evaluate: at most one DATA folder "
                        "(default: the run's own val split)")
    p.add_argument("--out", help="folder for the files (default: RUN/explanations; with --evaluate: RUN)")
    p.add_argument("--method", "--methods", nargs="+", action="extend", choices=METHODS, dest="methods",
                   metavar="METHOD", help=f"one or more of {', '.join(METHODS)} (default: "
                   f"{' and '.join(DEFAULT_METHODS)}: passed the sanity check, beat random ordering, under a second "
                   "per image; lime and kernel-shap scored higher on the benchmark, not significantly, at about 20 s "
                   "per image; with --evaluate every method but scorecam, which runs the model once per feature "
                   "channel: minutes per image on a CPU)")
    p.add_argument("--class", dest="class_name", metavar="NAME",
                   help="explain this class (default: each image's predicted class)")
    sizes = p.add_argument_group("method settings (CPU-sized defaults)")
    sizes.add_argument("--samples", type=int, default=200, help="LIME and SHAP: perturbed images scored (default 200)")
    sizes.add_argument("--superpixels", type=int, default=50, help="LIME and SHAP: SLIC superpixels (default 50)")
    sizes.add_argument("--steps", type=int, default=32, help="integrated gradients: path steps (default 32)")
    p.add_argument("--grid", type=int, default=16, metavar="N",
                   help="--format json: the heatmap averaged over N x N cells of the model's view (0: every pixel)")
    evaluation = p.add_argument_group("--evaluate")
    evaluation.add_argument("--evaluate", nargs="?", const="", metavar="DATA",
                            help="measure every method's faithfulness and sanity instead of explaining images, on "
                                 "the run's own val split or on DATA (a folder with one subfolder per class)")
    evaluation.add_argument("--images", type=int, default=50, metavar="N", dest="eval_images", help="images per method (default 50)")
    evaluation.add_argument("--slow-images", type=int, default=20, metavar="N",
                            help="images for lime, kernel-shap and scorecam (default 20)")
    evaluation.add_argument("--sanity-images", type=int, default=8, metavar="N",
                            help="images for the randomisation check (default 8)")
    evaluation.add_argument("--split", help="with --evaluate: the split to use (default val; test for DATA that has one)")
    p.add_argument("--device", default="auto")
    p.add_argument("--format", choices=("table", "json"), default="table")
    add_flags(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..atomic import check_writable_folder
    from ..explain_methods import AttributionSettings
    from ..runlock import hold, inside

    _check_args(args)
    settings = AttributionSettings(steps=args.steps, superpixels=args.superpixels, samples=args.samples)
    if args.out:  # before the model is built
        check_writable_folder(args.out, "--out")
    evaluate = args.evaluate is not None
    default = Path(args.run) if evaluate else Path(args.run) / "explanations"  # artifact.EXPLANATIONS
    out = Path(args.out) if args.out else default
    check_writable_folder(out, "--out")
    anonymizer = from_args(args)  # a bad key stops the command before any work
    with hold(args.run, "explain") if inside(out, args.run) else contextlib.nullcontext(), \
            scrubbing(anonymizer, args.run, out, *args.images):
        return (_evaluate if evaluate else _explain)(args, out, settings, anonymizer)


def _check_args(args) -> None:
    """``--evaluate`` takes DATA as its value or as the one positional path (``RUN DATA --evaluate``)."""
    if args.evaluate is not None:
        if len(args.images) > 1 or (args.images and args.evaluate):
            raise UsageError("--evaluate takes at most one DATA folder (with one subfolder per class), not "
                             f"{', '.join([*args.images, args.evaluate][:3])}")
        args.data = args.evaluate or (args.images[0] if args.images else None)
        if args.class_name:
            raise UsageError("--evaluate explains each image's predicted class; --class cannot be combined with it")
    elif not args.images:
        raise UsageError("give one or more IMAGE files or folders to explain (or --evaluate)")
    for flag, value in (("images", args.eval_images), ("slow-images", args.slow_images),
                        ("sanity-images", args.sanity_images)):
        if value < 1:
            raise UsageError(f"--{flag} must be at least 1, not {value}")


def _explain(args, out: Path, settings, anonymizer) -> int:
    from ..explain import Explainer
    from ..explain_output import explain_files
    from ..predict import expand_paths

    paths = expand_paths(args.images)
    explainer = Explainer.from_run(args.run, args.device, settings)
    json_grid = args.grid if args.format == "json" else None
    results = explain_files(explainer, paths, out, tuple(args.methods or DEFAULT_METHODS), args.class_name, json_grid,
                            anonymizer)
    if anonymizer:  # the overlays by their names (tokens) in the --out folder, not by path
        for r in results:
            r.files = r.files and {method: Path(p.name) for method, p in r.files.items()}
    if args.format == "json":
        print(finite.dumps([r.to_dict() for r in results], indent=2))
    else:
        _table(results)
    failed = sum(r.error is not None for r in results)
    if failed:
        print(f"{failed} of {len(results)} file(s) could not be read", file=sys.stderr)
        return DataError.exit_code
    if args.format == "table":
        console.print("overlays written to the --out folder (anonymised)" if anonymizer else
                      f"overlays written to {out}")
    return 0


def _evaluate(args, out: Path, settings, anonymizer) -> int:
    from ..explain import Explainer
    from ..explain_eval import EvalSettings, evaluate_run
    from ..explain_page import anonymised_summary, write_evaluation
    from ..predict import Predictor

    predictor = Predictor.from_run(args.run, args.device)
    explainer = Explainer.from_predictor(predictor, settings)
    chosen = EvalSettings(images=args.eval_images, slow_images=args.slow_images, sanity_images=args.sanity_images)
    result = evaluate_run(explainer, predictor.run, args.data, args.split,
                          tuple(args.methods or EVAL_METHODS), chosen)
    paths = write_evaluation(result, explainer, out, anonymizer)
    if args.format == "json":
        print(finite.dumps(anonymised_summary(result.summary, anonymizer) if anonymizer else result.summary,
                           indent=2))
        return 0
    _eval_table(result.summary)
    console.print(f"written: {paths['json'].name} and {paths['html'].name} (anonymised) in the --out folder"
                  if anonymizer else f"written: {paths['json']} and {paths['html']}")
    return 0


def _table(results) -> None:
    table = Table()
    for column in ("image", "predicted", "explained", "seconds", "overlays"):
        table.add_column(column, overflow="fold")
    for r in results:
        if r.error:
            table.add_row(escape(r.path), f"[red]error: {escape(r.error)}[/red]", "", "", "")
            continue
        table.add_row(escape(r.path), f"{escape(r.predicted)} {r.predicted_prob:.3f}",
                      f"{escape(r.explained)} {r.explained_prob:.3f}",
                      "\n".join(f"{m} {s:.2f} s" for m, s in r.seconds.items()),
                      "\n".join(escape(p.name) for p in r.files.values()))
    console.print(table)


def _eval_table(summary: dict) -> None:
    table = Table(title="explanations: deletion (lower is better) and insertion AUC, 95% intervals; sanity: rank "
                        "correlation after re-initialising head / top blocks")
    for column in ("method", "images", "s/image", "deletion", "random", "insertion", "random", "sanity ρ", "verdict"):
        table.add_column(column, overflow="fold")
    for name, m in summary["methods"].items():
        rho = " / ".join(f"{s['mean']:.2f}" for s in m["sanity"]["stages"].values())
        verdict = ("ok" if m["beats_random_deletion"] else "≈ random") + (
            "" if m["sanity"]["passed"] else ", [red]model-independent[/red]")
        table.add_row(escape(name) + (" [bold](best)[/bold]" if name == summary["best"] else ""), str(m["images"]),
                      f"{m['seconds_per_image']:.2f}", *(_ci(m[k]) for k in ("deletion_auc", "random_deletion_auc",
                                                                            "insertion_auc", "random_insertion_auc")),
                      rho, verdict)
    console.print(table)


def _ci(value: dict) -> str:
    low, high = value["ci95"]
    return f"{value['mean']:.3f} [{low:.3f}, {high:.3f}]"
