"""imgtune train DATA: train a classifier and write a run folder.

The training flags are generated from :data:`imgtune.config.OPTIONS` (the config dataclasses' fields),
and so are the defaults their help shows.
"""

from __future__ import annotations

import argparse
from typing import Any

from .. import config as cfg
from ..errors import UsageError
from .output import console, print_calibration, print_metrics

# help section (argument group) of each config section's flags; None: RunConfig's own fields
GROUPS = {"model": "model", "train": "training", "data": "data", None: "output"}


def register(commands) -> None:
    p = commands.add_parser("train", help="train a classifier on a folder of images or a CSV",
                            description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", help="folder with train/ and val/ (and test/), a class-per-folder tree, or "
                                           "a CSV with columns path,label[,split]")
    p.add_argument("--resume", metavar="RUN", help="continue the interrupted run in folder RUN from its newest "
                                                   "checkpoint, with its saved config (only --epochs may be given, "
                                                   "to raise the epoch count)")
    add_training_flags(p)
    p.set_defaults(handler=run)


def add_training_flags(p) -> None:
    """--preset, --config and one flag per training option (train and lr-find)."""
    p.add_argument("--preset", choices=sorted(cfg.PRESETS), help=_escape(preset_help()))
    p.add_argument("--config", dest="config_file", metavar="YAML",
                   help="a config file (e.g. a run's config.yaml); flags override it, it overrides --preset")
    groups = {title: p.add_argument_group(title) for title in GROUPS.values()}
    for option in cfg.OPTIONS.values():
        add_flag(groups[option.group or GROUPS[option.section]], option)


def add_flag(parser, option: cfg.Option) -> None:
    """The flag of ``option``: default None ("not given") so that YAML and preset values stand."""
    kwargs: dict[str, Any] = {"dest": option.name, "default": None, "help": _escape(option_help(option))}
    if option.type is bool:  # True by default: --x/--no-x; False by default: a switch
        kwargs["action"] = argparse.BooleanOptionalAction if option.default else "store_true"
    else:
        kwargs.update(type=_with_words(option) if option.words else option.type, choices=option.choices,
                      metavar=option.metavar or ("{" + ",".join(option.words) + ",NUMBER}" if option.words else None))
    parser.add_argument(option.flag, **kwargs)


def _with_words(option: cfg.Option):
    """The flag's type, also taking the option's special words (``--lr auto``)."""
    def parse(text: str):
        if text in option.words:
            return text
        try:
            return option.type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is neither {' nor '.join(option.words)} nor a number") \
                from None
    return parse


def option_help(option: cfg.Option) -> str:
    default = default_text(option)
    return f"{option.help} (default: {default})" if default else option.help


def default_text(option: cfg.Option) -> str | None:
    """The default as the help shows it, from STRATEGY_DEFAULTS or the dataclass; None: nothing to show."""
    if option.section == "train":
        by_strategy = [(name, values[option.key]) for name, values in cfg.STRATEGY_DEFAULTS.items()
                       if option.key in values]
        if by_strategy:
            return ", ".join(f"{show(value)} {name}" for name, value in by_strategy)
    if option.default is None:
        return option.unset
    if option.type is bool:
        return "on" if option.default else None  # a switch is off unless given
    return show(option.default)


def preset_help() -> str:
    """One line per preset, from the resolved preset config."""
    lines = []
    for name in cfg.PRESETS:
        c = cfg.resolve(cfg.apply_preset(cfg.RunConfig(), name))
        lines.append(f"{name}: {c.model.name} {c.train.strategy}, {c.train.optimizer} lr {show(c.train.lr)}, "
                     f"{c.train.epochs} epochs")
    return "a classic tutorial recipe (docs/recipes.md); " + "; ".join(lines)


def preset_flags(name: str) -> str:
    """The flags that give the same config as ``--preset name``."""
    flags = []
    for section, values in cfg.PRESETS[name].items():
        for key, value in values.items():
            option = cfg.option_for(f"{section}.{key}")
            if option.type is bool:
                flags.append(option.flag if value else option.flag.replace("--", "--no-", 1))
            else:
                flags.append(f"{option.flag} {show(value)}")
    return " ".join(flags)


def show(value: Any) -> str:
    """A value as a user types it: 1e-3 rather than 0.001, 1 rather than 1.0."""
    if isinstance(value, float) and 0 < abs(value) < 0.01 and float(f"{value:.0e}") == value:
        return f"{value:.0e}".replace("e-0", "e-")
    return f"{value:g}" if isinstance(value, float) else str(value)


def _escape(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help with %


def run(args) -> int:
    from ..distributed import launched_rank
    from ..training import resume, train

    if args.resume is not None:
        _refuse_flags_with_resume(args)
        result = resume(args.resume, args.epochs)
    else:
        options = {name: getattr(args, name) for name in cfg.OPTIONS}
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
    flags = [("--preset", args.preset), ("--config", args.config_file),
             *((o.flag, getattr(args, o.name)) for o in cfg.OPTIONS.values() if o.name != "epochs")]
    given = [flag.replace("--", "--no-", 1) if value is False else flag for flag, value in flags if value is not None]
    if args.data is not None:
        given.insert(0, f"DATA ({args.data})")
    if given:
        raise UsageError(f"--resume continues the run with its saved config.yaml: only --epochs may be given with "
                         f"it, not {', '.join(given)}")
