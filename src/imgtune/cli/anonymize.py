"""imgtune anonymize key|lookup: the key behind ``--anonymize`` (report, doctor, explain), and turning a
token of an anonymised output back into the file it stands for, on the machine that holds the key.

  imgtune anonymize key [FILE]          create a key (default: the one --anonymize uses); never overwrites
  imgtune anonymize lookup TOKEN DATA   which file or folder under DATA (one or more) has this token

The flags --anonymize and --anonymize-key FILE of report, doctor and explain are added by
:func:`add_flags` and read by :func:`from_args`."""

from __future__ import annotations

import contextlib
from pathlib import Path

from .output import console


def register(commands) -> None:
    p = commands.add_parser("anonymize", help="the key of --anonymize, and looking a token up locally",
                            description=__doc__)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    key = actions.add_parser("key", help="create a new anonymisation key (mode 0600); never overwrites one")
    key.add_argument("file", nargs="?", help="where (default: $IMGTUNE_ANONYMIZE_KEY, else "
                                             "$XDG_CONFIG_HOME/imgtune/anonymize.key, else ~/.config/...)")
    lookup = actions.add_parser("lookup", help="the file or folder under DATA that a token stands for")
    lookup.add_argument("token", help="file-<16 hex digits> or folder-<16 hex digits>, as an anonymised output "
                                      "shows it")
    lookup.add_argument("data", nargs="+", metavar="DATA", help="folders to search (the data, the run folder)")
    lookup.add_argument("--anonymize-key", metavar="FILE", help="the key the output was made with (default: "
                                                                "the default key)")
    p.set_defaults(handler=run)


def add_flags(parser) -> None:
    """``--anonymize`` and ``--anonymize-key FILE`` for a command whose outputs may leave the site."""
    group = parser.add_argument_group("anonymised output (docs/privacy.md)")
    group.add_argument("--anonymize", action="store_true",
                       help="no file paths or names in the output (keyed tokens instead), image metadata "
                            "removed, and a note saying so; class names are kept")
    group.add_argument("--anonymize-key", metavar="FILE",
                       help="the secret key of the tokens (implies --anonymize; default: "
                            "~/.config/imgtune/anonymize.key, created on first use with mode 0600)")


def from_args(args):
    """The :class:`~imgtune.anonymize.Anonymizer` the flags ask for (its key read now, before any work),
    or None."""
    if not (args.anonymize or args.anonymize_key):
        return None
    from ..anonymize import Anonymizer

    return Anonymizer.open(args.anonymize_key)


def scrubbing(anonymizer, *folders):
    """With an anonymizer: the log scrubbed while the command runs, ``folders`` (data, run, --out; a file
    given is its own token) and every path below them replaced; without: nothing."""
    if anonymizer is None:
        return contextlib.nullcontext()
    for folder in folders:
        if folder and Path(folder).is_file():  # an image, or a CSV naming files beside it
            anonymizer.token(folder)
            if Path(folder).suffix.lower() == ".csv":
                anonymizer.folder(Path(folder).parent)
        elif folder:
            anonymizer.folder(folder)
    return anonymizer.scrubbed_logging()


def run(args) -> int:
    from ..anonymize import create_key, default_key_path, find_token, load_key
    from ..errors import DataError, UsageError

    if args.action == "key":
        console.print(f"created {create_key(args.file or default_key_path())}; keep it private and keep it: "
                      "without it no token can be looked up", highlight=False)
        return 0
    missing = [d for d in args.data if not Path(d).exists()]
    if missing:
        raise UsageError(f"{missing[0]} does not exist; give the folders the anonymised output was made from")
    found = find_token(args.token, load_key(args.anonymize_key, create=False), args.data)
    if not found:
        raise DataError(f"no file or folder under {', '.join(args.data)} has the token {args.token} under this "
                        "key: another key was used, or the files were moved or renamed since (a token is of "
                        "the absolute path)")
    for path in found:
        console.print(str(path), highlight=False, soft_wrap=True)
    return 0
