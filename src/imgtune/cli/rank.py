"""imgtune rank DATA: which pretrained backbone suits these images, and how fast each runs here.

Each candidate's frozen features (cached) are scored by a cross-validated logistic-regression probe on the
training images; the table (best first) shows its accuracy and macro F1 with 95% intervals, the LogME
score, parameters, FLOPs, and latency measured on this machine. Writes rank.json, rank.csv,
rank_pareto.png and rank.html into --out.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .. import config as cfg
from .args import positive_int
from .output import console
from .train import add_flag

# The training options rank reads (the data, its splits and caches, the body cut, input size, device, offline).
SHARED = ("val_fraction", "test_fraction", "batch_size", "num_workers", "cache", "cache_dir", "allow_leakage",
          "allow_outside_paths", "body", "img_size", "seed", "device", "offline")


def register(commands) -> None:
    p = commands.add_parser("rank", help="rank pretrained models on your images (probe accuracy, speed)",
                            description=__doc__.splitlines()[0])
    p.add_argument("data", help="folder with train/ and val/, a class-per-folder tree, or a CSV (as imgtune train)")
    p.add_argument("--models", metavar="A,B,C", help="candidates, comma-separated (timm:NAME, torchvision:NAME or a "
                                                     "bare name); default: a shortlist across sizes and libraries "
                                                     "(docs/choosing-a-model.md)")
    p.add_argument("--budget-ms", type=float, metavar="MS", help="skip models slower than MS milliseconds per image "
                                                                 "at batch 1 on this machine")
    p.add_argument("--folds", type=positive_int, default=5, help="cross-validation folds on the training images "
                                                                 "(default: 5)")
    p.add_argument("--out", metavar="DIR", help="folder for rank.json, rank.csv, rank_pareto.png, rank.html "
                                                "(default: runs/rank-<timestamp>)")
    for name in SHARED:
        add_flag(p, cfg.OPTIONS[name])
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..artifact import check_writable_folder
    from ..rank import RankSettings, nothing_ranked, parse_models, rank
    from ..rank_files import write_all

    out = Path(args.out) if args.out else Path("runs") / f"rank-{datetime.now():%Y%m%d-%H%M%S}"
    check_writable_folder(out, "--out")  # before minutes of work
    config = cfg.resolve(cfg.build(args.data, **{name: getattr(args, name) for name in SHARED}))
    settings = RankSettings(parse_models(args.models), args.folds, args.budget_ms)
    ranking = rank(config, settings)
    paths = write_all(ranking, out)
    print_ranking(ranking)
    console.print(f"written: {', '.join(str(p) for p in paths.values())}  ({ranking.seconds:.0f} s)")
    if not ranking.ranked:  # the files say why each was skipped; the exit code says nothing was ranked
        raise nothing_ranked(ranking, "imgtune rank")
    return 0


def print_ranking(ranking) -> None:
    if ranking.ranked:
        print_table(ranking)
    for s in ranking.skipped:
        console.print(f"skipped {s.model}: {s.reason}", soft_wrap=True)


def print_table(ranking) -> None:
    table = Table(title=f"ranking on {ranking.data['source']} ({ranking.data['images']['train']} training images, "
                        f"{ranking.settings['folds']}-fold probe; best first)")
    for column in ("#", "model", "accuracy (95% CI)", "macro F1", ranking.score_name, "params", "GFLOPs",
                   "ms/img b1", "img/s b32"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for place, r in enumerate(ranking.ranked, 1):
        table.add_row(str(place), r.model, f"{r.accuracy:.3f} ({r.accuracy_ci95[0]:.3f}-{r.accuracy_ci95[1]:.3f})",
                      f"{r.macro_f1:.3f}", f"{r.score:.3f}", f"{r.params / 1e6:.1f}M",
                      "-" if r.flops is None else f"{r.flops / 1e9:.2f}", f"{r.latency_ms_b1:.1f}",
                      f"{r.images_per_s_b32:.0f}")
    if console.is_terminal:
        console.print(table)
    else:  # a pipe or file: rich's default 80 columns would wrap every figure
        Console(file=console.file, width=140, highlight=False).print(table)
