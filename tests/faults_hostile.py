"""Fault cases of hostile input and ordinary mistakes (see faultlib): files that are not regular files,
reads over the size limit, CSV paths leaving the CSV's folder, option values of the wrong type or not
finite, folders that cannot be written, a full disk, odd CSVs and pickled weights."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
from pathlib import Path

from datagen import SCRATCH_ARGS, make_class_folders
from faultlib import Fault, Outcome, cli, cli_subprocess

TRAIN = (*SCRATCH_ARGS, "--epochs", "1", "--batch-size", "4")


def _data(tmp: Path) -> Path:
    return make_class_folders(tmp / "data", per_class=5, size=32)


def _cli_text(*args: str) -> tuple[Outcome, str]:
    """:func:`faultlib.cli`, and everything written to stderr (to find a warning that is not the last line)."""
    from imgtune.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
    lines = [line.strip() for line in buffer.getvalue().splitlines() if line.strip() and not line.startswith(" ")]
    return Outcome(code, lines[-1] if lines else ""), buffer.getvalue()


def _skipped(outcome: Outcome, run: Path, path: Path) -> Outcome:
    """The warning that ``path`` was skipped (the run's meta.json lists it) as the message; ``lost`` says
    so when it was not skipped."""
    meta = run / "meta.json"
    if outcome.lost or not meta.is_file():
        return outcome  # the run failed; its exit code tells
    reasons = {item["path"]: item["reason"] for item in json.loads(meta.read_text())["data"]["skipped"]}
    if str(path) in reasons:
        outcome.message = f"skipping {path}: {reasons[str(path)]}"
    else:
        outcome.lost = f"{path} was not reported as skipped"
    return outcome


def _warning(outcome: Outcome, text: str, words: str) -> str | None:
    """The warning line containing ``words`` as the message; None when there is none."""
    found = [line for line in text.splitlines() if line.startswith("WARNING") and words in line]
    if found:
        outcome.message = found[-1]
    return found[-1] if found else None


def _refused_before_run_folder(outcome: Outcome, out: Path) -> Outcome:
    """A refused run must leave no run folder behind (a rerun with the fix must not meet a non-empty --out)."""
    if outcome.exit_code != 0 and out.exists():
        outcome.lost = f"{out} was created by a run that was refused"
    return outcome


# ---- not regular files, size limit -------------------------------------------------------------------


def _fifo_in_data(tmp: Path) -> Outcome:
    data = _data(tmp)
    fifo = data / "red_circle" / "x.jpg"
    os.mkfifo(fifo)
    outcome = cli_subprocess("train", str(data), *TRAIN, "--out", str(tmp / "run"), timeout=90)
    return _skipped(outcome, tmp / "run", fifo)


def _dev_zero_in_csv(tmp: Path) -> Outcome:
    data = _data(tmp)
    rows = [f"{p.relative_to(data)},{p.parent.name}" for p in sorted(data.glob("*/*.png"))] + ["/dev/zero,red_circle"]
    (data / "rows.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    outcome = cli_subprocess("train", str(data / "rows.csv"), *TRAIN, "--allow-outside-paths", "--out",
                             str(tmp / "run"), timeout=120)
    return _skipped(outcome, tmp / "run", Path("/dev/zero"))


def _over_size_limit(tmp: Path) -> Outcome:
    data = _data(tmp)
    big = data / "red_circle" / "big.png"
    big.write_bytes((data / "red_circle" / "red_circle_00.png").read_bytes() + b"\0" * (2 << 20))
    with _env("IMGTUNE_MAX_FILE_MB", "1"):
        outcome = cli("doctor", str(data), "--no-labels", "--out", str(tmp / "doctor"))
    found = json.loads((tmp / "doctor" / "doctor.json").read_text()) if outcome.exit_code == 0 else {}
    findings = [f for f in found.get("findings", []) if str(big) in json.dumps(f)]
    if outcome.exit_code == 0 and "too-large" not in [f["details"].get("problem") for f in findings]:
        outcome.lost = f"{big} (2 MB, limit 1 MB) was read: {findings}"
    elif findings:
        outcome.message = f"doctor: {findings[0]['message']}"
    return outcome


@contextlib.contextmanager
def _env(name: str, value: str):
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


# ---- CSVs --------------------------------------------------------------------------------------------


def _csv_with(tmp: Path, extra: str) -> Path:
    data = _data(tmp)
    rows = [f"{p.relative_to(data)},{p.parent.name}" for p in sorted(data.glob("*/*.png"))] + [extra]
    (data / "rows.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    return data / "rows.csv"


def _csv_outside(extra: str, isolated: bool = False):
    """``isolated``: in a child process with a memory limit (a regression reading /dev/zero must not take
    the machine)."""
    def run(tmp: Path) -> Outcome:
        out, runner = tmp / "run", cli_subprocess if isolated else cli
        return _refused_before_run_folder(runner("train", str(_csv_with(tmp, extra)), *TRAIN, "--out", str(out)),
                                          out)
    return run


def _csv_not_utf8(tmp: Path) -> Outcome:
    path = _csv_with(tmp, "red_circle/red_circle_00.png,red_circle")
    path.write_bytes(path.read_bytes() + "caf\u00e9.png,red_circle\n".encode("latin-1"))
    outcome = cli("train", str(path), *TRAIN, "--out", str(tmp / "run"))
    if "line 18" not in outcome.message:
        outcome.lost = "the message does not give the line (18)"
    return outcome


def _csv_repeated_rows(tmp: Path) -> Outcome:
    path = _csv_with(tmp, "red_circle/red_circle_00.png,red_circle")
    outcome, text = _cli_text("doctor", str(path), "--no-labels", "--out", str(tmp / "doctor"))
    files = json.loads((tmp / "doctor" / "doctor.json").read_text())["files"] if outcome.exit_code == 0 else None
    if outcome.exit_code == 0 and (files != 15 or not _warning(outcome, text, "repeated row")):
        outcome.lost = f"the repeated row was counted as another file ({files} files, not 15) or not warned of"
    return outcome


# ---- option values -----------------------------------------------------------------------------------


def _train_with(*flags: str, yaml: str | None = None):
    def run(tmp: Path) -> Outcome:
        data, out = _data(tmp), tmp / "run"
        config = ()
        if yaml is not None:
            (tmp / "c.yaml").write_text(yaml)
            config = ("--config", str(tmp / "c.yaml"))
        outcome, text = _cli_text("train", str(data), *TRAIN, *config, *flags, "--out", str(out))
        if yaml == "" and not _warning(outcome, text, "is empty"):
            outcome.lost = "an empty config file ran without a warning"
        return _refused_before_run_folder(outcome, out)
    return run


def _predict_with(*flags: str):
    def run(tmp: Path) -> Outcome:
        return cli("predict", str(tmp / "run"), str(tmp / "x.png"), *flags)
    return run


# ---- where imgtune writes ----------------------------------------------------------------------------


def _out_at(where: str):
    def run(tmp: Path) -> Outcome:
        data, keep = _data(tmp), tmp / "afile"
        keep.write_text("keep me\n")
        out = {"file": keep, "proc": Path("/proc/imgtune-run")}[where]
        outcome = cli("train", str(data), *TRAIN, "--out", str(out))
        if keep.read_text() != "keep me\n":
            outcome.lost = f"{keep} was changed"
        return outcome
    return run


def _cache_in_proc(tmp: Path) -> Outcome:
    out = tmp / "run"
    return _refused_before_run_folder(cli("train", str(_data(tmp)), *TRAIN, "--out", str(out), "--cache-dir",
                                          "/proc/imgtune-cache"), out)


def _command_out_is_file(*argv: str):
    def run(tmp: Path) -> Outcome:
        keep = tmp / "afile"
        keep.write_text("keep me\n")
        names = {"FILE": str(keep), "DATA": str(tmp / "data"), "RUN": str(tmp / "run")}
        if "DATA" in argv:
            _data(tmp)
        outcome = cli(*(names.get(a, a) for a in argv))
        if keep.read_text() != "keep me\n":
            outcome.lost = f"{keep} was changed"
        return outcome
    return run


def _disk_full(tmp: Path) -> Outcome:
    """ENOSPC on the first file written to disk (an fsync is where a full disk shows)."""
    import imgtune.atomic as atomic

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    data, out = _data(tmp), tmp / "run"
    saved, atomic.os.fsync = atomic.os.fsync, full
    try:
        outcome = cli("train", str(data), *TRAIN, "--no-cache", "--out", str(out))
    finally:
        atomic.os.fsync = saved
    left = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*.tmp"))
    if left:
        outcome.lost = f"half-written files left: {', '.join(left)}"
    return outcome


def _pickled_weights(tmp: Path) -> Outcome:
    import torch

    torch.save({"state": Path("x")}, tmp / "model.pt")  # a pickled object, not a state dict of tensors
    outcome = cli("train", str(_data(tmp)), "--model", "mobilenet_v2", "--img-size", "32", "--offline",
                  "--weights", str(tmp / "model.pt"), "--epochs", "2", "--out", str(tmp / "run"))
    if "weights_only=False" in outcome.message:
        outcome.lost = "the message suggests weights_only=False"
    return outcome


FAULTS = [
    Fault("a FIFO named x.jpg inside DATA", "hostile input", 0, _fifo_in_data),
    Fault("/dev/zero named by a CSV (--allow-outside-paths)", "hostile input", 0, _dev_zero_in_csv),
    Fault("an image over the size limit (IMGTUNE_MAX_FILE_MB=1)", "hostile input", 0, _over_size_limit),
    Fault("a CSV row ../x.png (outside the CSV's folder)", "hostile input", 3, _csv_outside("../x.png,red_circle")),
    Fault("a CSV row /etc/passwd", "hostile input", 3, _csv_outside("/etc/passwd,red_circle")),
    Fault("a CSV row /dev/zero without --allow-outside-paths", "hostile input", 3,
          _csv_outside("/dev/zero,red_circle", isolated=True)),
    Fault("a CSV that is not UTF-8", "user mistakes", 3, _csv_not_utf8),
    Fault("a CSV row given twice", "user mistakes", 0, _csv_repeated_rows),
    Fault("lr: \"fast\" in YAML", "user mistakes", 2, _train_with(yaml="train:\n  lr: fast\n")),
    Fault("seed: \"abc\" in YAML", "user mistakes", 2, _train_with(yaml="train:\n  seed: abc\n")),
    Fault("lr: .nan in YAML", "user mistakes", 2, _train_with(yaml="train:\n  lr: .nan\n")),
    Fault("an empty config file", "user mistakes", 0, _train_with(yaml="")),
    Fault("--lr nan", "user mistakes", 2, _train_with("--lr", "nan")),
    Fault("--lr inf", "user mistakes", 2, _train_with("--lr", "inf")),
    Fault("--weight-decay nan", "user mistakes", 2, _train_with("--weight-decay", "nan")),
    Fault("--momentum -1 --optimizer sgd", "user mistakes", 2, _train_with("--momentum", "-1", "--optimizer", "sgd")),
    Fault("--seed -5", "user mistakes", 2, _train_with("--seed", "-5")),
    Fault("--warmup-epochs -1", "user mistakes", 2, _train_with("--warmup-epochs", "-1")),
    Fault("predict --batch-size 0", "user mistakes", 2, _predict_with("--batch-size", "0")),
    Fault("predict --top-k 0", "user mistakes", 2, _predict_with("--top-k", "0")),
    Fault("train --out that is a file", "user mistakes", 2, _out_at("file")),
    Fault("train --out under /proc", "user mistakes", 2, _out_at("proc")),
    Fault("train --cache-dir under /proc", "user mistakes", 2, _cache_in_proc),
    Fault("explain --out that is a file", "user mistakes", 2, _command_out_is_file("explain", "RUN", "x.png",
                                                                                   "--out", "FILE")),
    Fault("doctor --out that is a file", "user mistakes", 2, _command_out_is_file("doctor", "DATA", "--no-labels",
                                                                                  "--out", "FILE")),
    Fault("sample into a file", "user mistakes", 2, _command_out_is_file("sample", "FILE")),
    Fault("a full disk (ENOSPC) while writing the run", "user mistakes", 3, _disk_full),
    Fault("--weights FILE.pt holding pickled objects", "user mistakes", 4, _pickled_weights),
]
