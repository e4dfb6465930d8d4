"""imgtune lr-find DATA: the learning-rate range test (Smith 2017) with fastai's valley suggestion.

Takes the flags of imgtune train (the test uses its strategy, model, optimizer and batch size) and
writes lr_find.png (loss against learning rate) and lr_find.json (the curve and the suggestion) into
--out. imgtune train --lr auto runs the same test first. See docs/training.md."""

from __future__ import annotations

from .. import config as cfg
from .args import positive_int
from .output import console
from .train import add_training_flags


def register(commands) -> None:
    p = commands.add_parser("lr-find", help="suggest a learning rate by a range test (fastai's lr_find)",
                            description=__doc__.splitlines()[0])
    p.add_argument("data", help="the data imgtune train would take (folder or CSV)")
    p.add_argument("--iterations", type=positive_int,  # None: lr_find.ITERATIONS (torch is not imported here)
                   help="optimizer steps of the test, the rate growing from 1e-7 to 10 (default 100, as fastai)")
    add_training_flags(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..lr_find import ITERATIONS, run as find

    options = {name: getattr(args, name) for name in cfg.OPTIONS}
    curve, files = find(cfg.build(args.data, args.preset, args.config_file, **options),
                        args.iterations or ITERATIONS)
    console.print(f"suggested learning rate: {curve.suggestion:.3g} ({curve.rule}; range test on the {curve.phase} "
                  f"phase, {len(curve.lrs)} steps, ended at {curve.stopped})")
    console.print(f"plot: {files['png']}; curve: {files['json']}")
    console.print(f"use it: imgtune train {args.data} --lr {curve.suggestion:.3g} (or --lr auto)")
    return 0
