"""imgtune suggest RUN DIR: the unlabelled images under DIR worth labelling next, as a CSV to fill in.

Writes path,label,guess,prob (best first, label empty; default DIR/suggestions.csv); after filling in
labels, imgtune train DATA --extra-labels FILE.csv adds them (docs/unlabelled.md)."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from .args import positive_int
from .output import console


STRATEGIES = ("hybrid", "typical", "diverse", "margin", "entropy", "badge")  # imgtune.suggest's (it loads torch)
DEFAULT_STRATEGY = "typical"  # imgtune.suggest.DEFAULT_STRATEGY
CSV_NAME = "suggestions.csv"  # imgtune.suggest.CSV_NAME


def register(commands) -> None:
    p = commands.add_parser("suggest", help="rank unlabelled images by how much labelling them would help",
                            description=__doc__)
    p.add_argument("run", help="run folder written by imgtune train")
    p.add_argument("folder", metavar="DIR", help="folder of unlabelled images (searched recursively)")
    p.add_argument("--n", type=positive_int, default=50, help="images to suggest (default 50)")
    p.add_argument("--strategy", choices=STRATEGIES, default=DEFAULT_STRATEGY,
                   help="typical (default): the most typical image of each cluster of the features that holds the "
                        "fewest labelled images (TypiClust); margin or entropy: the least certain first; diverse: "
                        "margin, one image per group of near-copies; badge: uncertain and spread (BADGE); hybrid: "
                        "typical below 10 labelled images a class, then diverse (docs/unlabelled.md)")
    p.add_argument("--out", metavar="FILE.csv", help=f"where to write the CSV (default DIR/{CSV_NAME})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (it may hold your labels)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..suggest import check_target, suggest, write_csv

    out = Path(args.out) if args.out else Path(args.folder) / CSV_NAME
    check_target(out, args.overwrite)  # before the model runs
    found = suggest(args.run, args.folder, args.n, args.strategy, args.device, args.batch_size)
    write_csv(found, out, args.overwrite)
    table = Table(title=f"{len(found)} image(s) to label first ({args.strategy})")
    for column in ("#", "image", "guess", "prob"):
        table.add_column(column)
    for rank, item in enumerate(found[:10], start=1):
        table.add_row(str(rank), escape(str(item.path)), escape(item.guess), f"{item.prob:.3f}")
    console.print(table)
    console.print(f"written {out}: fill in the label column, then imgtune train DATA --extra-labels {out}")
    return 0
