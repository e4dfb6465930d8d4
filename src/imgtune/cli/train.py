"""imgtune train DATA: train a classifier and write a run folder."""

from __future__ import annotations

import argparse

from .. import config as cfg
from ..errors import UsageError
from .output import console, print_calibration, print_metrics


def register(commands) -> None:
    p = commands.add_parser("train", help="train a classifier on a folder of images or a CSV",
                            description=__doc__)
    p.add_argument("data", nargs="?", help="folder with train/ and val/ (and test/), a class-per-folder tree, or "
                                           "a CSV with columns path,label[,split]")
    p.add_argument("--resume", metavar="RUN", help="continue the interrupted run in folder RUN from its newest "
                                                   "checkpoint, with its saved config (only --epochs may be given, "
                                                   "to raise the epoch count)")
    p.add_argument("--preset", choices=sorted(cfg.PRESETS), help="a classic tutorial recipe (docs/recipes.md)")
    p.add_argument("--config", dest="config_file", metavar="YAML", help="a config file (e.g. a run's config.yaml)")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="timm:NAME, torchvision:NAME or a bare name (default mobilenet_v2)")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--weights", metavar="FILE", help="weights file used before any cache, package or download")
    g.add_argument("--img-size", type=int, help="input size (default: the pretrained configuration's)")
    g.add_argument("--body", choices=cfg.BODIES, help="penultimate (default): all but the last layer; "
                                                       "conv: convolutional trunk + global average pooling")
    g.add_argument("--head", choices=cfg.HEADS, help="linear (default), mlp, or fused (old logits beside features)")
    g.add_argument("--head-hidden", type=int, help="hidden units of the mlp head (default 1024)")
    g.add_argument("--dropout", type=float, help="dropout before the head's last layer (default 0)")
    g = p.add_argument_group("training")
    g.add_argument("--strategy", choices=cfg.STRATEGIES, help="default gradual")
    g.add_argument("--epochs", type=int, help="default depends on the strategy (docs/training.md)")
    g.add_argument("--freeze-epochs", type=int, help="gradual: epochs with the backbone frozen (default: half of --epochs)")
    g.add_argument("--lr", type=float, help="head learning rate (default depends on the strategy)")
    g.add_argument("--backbone-lr-factor", type=float, help="backbone lr = lr x this (finetune/gradual, default 0.1)")
    g.add_argument("--optimizer", choices=cfg.OPTIMIZERS)
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--early-stop", type=int, metavar="PATIENCE", help="stop after PATIENCE epochs without improvement")
    g.add_argument("--monitor", choices=cfg.MONITORS, help="validation metric for early stopping and --keep best")
    g.add_argument("--keep", choices=cfg.KEEPS, help="weights saved: final epoch's (default) or best on val "
                                                      "(makes val metrics optimistic)")
    g.add_argument("--balance", choices=cfg.BALANCES,
                   help="class imbalance: none, weights (class-weighted loss) or sampler (class-balanced "
                        f"sampling); default: weights when the largest training class has over "
                        f"{cfg.IMBALANCE_THRESHOLD:g}x the images of the smallest, else none")
    g.add_argument("--accumulate", type=int, metavar="N",
                   help="sum the gradients of N batches per optimizer step (an N times larger batch in memory "
                        "of one; default 1)")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", choices=cfg.DEVICES)
    g.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                   help="also write a checkpoint every STEPS optimizer steps (one is written after every epoch)")
    g = p.add_argument_group("data")
    g.add_argument("--val-fraction", type=float, help="share of each class held out for validation (default 0.2)")
    g.add_argument("--test-fraction", type=float, help="share of each class held out for testing (default 0)")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--workers", dest="num_workers", type=int, help="data loader processes (default: sized to the data)")
    g.add_argument("--augment", choices=cfg.AUGMENTS)
    g.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                   help="cache backbone features and decoded pixels on disk (default on)")
    g.add_argument("--allow-leakage", action="store_true", default=None,
                   help="train even when the same file is in two splits (leakage) or under two classes "
                        "(a label conflict); imgtune doctor DATA lists them")
    g.add_argument("--cache-dir", help="cache folder (default $IMGTUNE_CACHE, else ~/.cache/imgtune)")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="run folder (default runs/<timestamp>); must be new or empty")
    g.add_argument("--overwrite", action="store_true", default=None, help="reuse a non-empty --out")
    g.add_argument("--offline", action="store_true", default=None, help="never download (also IMGTUNE_OFFLINE=1)")
    g.add_argument("--log", choices=cfg.LOGS, help="per-epoch metrics: csv (metrics.csv, default) or tensorboard "
                                                  "(also RUN/tensorboard/ event files; pip install "
                                                  "'imgtune[tensorboard]')")
    p.set_defaults(handler=run)


OPTION_KEYS = ("model", "pretrained", "weights", "img_size", "body", "head", "head_hidden", "dropout", "strategy",
               "epochs", "freeze_epochs", "lr", "backbone_lr_factor", "optimizer", "momentum", "weight_decay",
               "warmup_epochs", "label_smoothing", "early_stop", "monitor", "keep", "balance", "seed", "device",
               "accumulate", "checkpoint_every", "val_fraction", "test_fraction", "batch_size", "num_workers", "augment", "cache",
               "cache_dir", "allow_leakage", "out", "overwrite", "offline", "log")


# flags whose name is not the option's key with dashes
FLAG_NAMES = {"num_workers": "--workers", "config_file": "--config"}


def run(args) -> int:
    from ..distributed import launched_rank
    from ..training import resume, train

    if args.resume is not None:
        _refuse_flags_with_resume(args)
        result = resume(args.resume, args.epochs)
    else:
        options = {key: getattr(args, key) for key in OPTION_KEYS}
        result = train(cfg.build(args.data, args.preset, args.config_file, **options))
    if launched_rank() != 0:  # under torchrun: rank 0 reports
        return 0
    data = result.data
    console.print(f"data: {len(data['classes'])} classes, formats {data['formats_text']}, "
                  f"{len(data['skipped'])} unreadable file(s) skipped")
    for item in data["skipped"]:
        console.print(f"  skipped {item['path']}: {item['reason']}")
    print_metrics(result.metrics, "validation")
    if "test" in result.metrics:
        print_metrics(result.metrics["test"], "test")
    if result.metrics.get("calibration"):
        print_calibration(result.metrics["calibration"])
    console.print(f"run folder: {result.run_dir}  ({result.seconds:.0f} s)")
    return 0


def _refuse_flags_with_resume(args) -> None:
    """A resumed run is the run its config.yaml describes; only its epoch count may be raised."""
    given = [_flag(key, getattr(args, key)) for key in ("preset", "config_file", *OPTION_KEYS)
             if key != "epochs" and getattr(args, key) is not None]
    if args.data is not None:
        given.insert(0, f"DATA ({args.data})")
    if given:
        raise UsageError(f"--resume continues the run with its saved config.yaml: only --epochs may be given with "
                         f"it, not {', '.join(given)}")


def _flag(key: str, value) -> str:
    name = FLAG_NAMES.get(key, "--" + key.replace("_", "-"))
    return name.replace("--", "--no-", 1) if value is False else name
