"""Fault cases of ``--anonymize`` and ``imgtune anonymize`` (see faultlib): a key that is missing, readable
by others, too short, a folder, or cannot be created; a token that is malformed or matches nothing; a key
that would be overwritten. Each stops before any work, with exit code 2 (3 for a token not found), and
leaves what was written before as it was."""

from __future__ import annotations

import os
from pathlib import Path

from datagen import SCRATCH_ARGS, make_split_dataset
from faultlib import Fault, Outcome, cli

DOCTOR = ("--no-labels",)


def _with_key_env(tmp: Path, key: Path, *args: str) -> Outcome:
    """``imgtune ARGS`` with the default key at ``key`` (never the user's ~/.config)."""
    before = os.environ.get("IMGTUNE_ANONYMIZE_KEY")
    os.environ["IMGTUNE_ANONYMIZE_KEY"] = str(key)
    try:
        return cli(*args)
    finally:
        if before is None:
            del os.environ["IMGTUNE_ANONYMIZE_KEY"]
        else:
            os.environ["IMGTUNE_ANONYMIZE_KEY"] = before


def _kept(outcome: Outcome, path: Path, before: bytes) -> Outcome:
    if not path.is_file() or path.read_bytes() != before:
        outcome.lost = f"{path.name} written before was replaced or removed"
    return outcome


def _doctor_with_key(tmp: Path, key: Path, *flags: str) -> Outcome:
    """doctor over an earlier doctor.html, with ``--anonymize-key key``: the earlier page must survive."""
    data = make_split_dataset(tmp / "data", train=3, val=2)
    out = tmp / "checked"
    out.mkdir()
    (out / "doctor.html").write_text("<p>the earlier check</p>")
    outcome = _with_key_env(tmp, tmp / "default.key", "doctor", str(data), *DOCTOR, "--out", str(out),
                            "--anonymize-key", str(key), *flags)
    return _kept(outcome, out / "doctor.html", b"<p>the earlier check</p>")


def _missing_key(tmp: Path) -> Outcome:
    return _doctor_with_key(tmp, tmp / "no-such.key")


def _key_readable_by_others(tmp: Path) -> Outcome:
    key = tmp / "shared.key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    key.chmod(0o644)
    return _doctor_with_key(tmp, key)


def _short_key(tmp: Path) -> Outcome:
    key = tmp / "short.key"
    key.write_text("abc\n")
    key.chmod(0o600)
    return _doctor_with_key(tmp, key)


def _key_is_a_folder(tmp: Path) -> Outcome:
    (tmp / "keys").mkdir()
    return _doctor_with_key(tmp, tmp / "keys")


def _report_key_cannot_be_created(tmp: Path) -> Outcome:
    """The default key's place is under a file: no key can be made; the earlier report is kept."""
    data = make_split_dataset(tmp / "data", train=3, val=2)
    run = tmp / "run"
    assert cli("-q", "train", str(data), *SCRATCH_ARGS, "--epochs", "1", "--workers", "0", "--out",
               str(run)).exit_code == 0
    (run / "report.html").write_text("<p>the earlier report</p>")
    (tmp / "blocker").write_text("a file where the key's folder would be")
    outcome = _with_key_env(tmp, tmp / "blocker" / "anonymize.key", "report", str(run), "--anonymize")
    return _kept(outcome, run / "report.html", b"<p>the earlier report</p>")


def _malformed_token(tmp: Path) -> Outcome:
    key = tmp / "k"
    assert cli("anonymize", "key", str(key)).exit_code == 0
    return cli("anonymize", "lookup", "patient_SMITH_001.png", str(tmp), "--anonymize-key", str(key))


def _token_not_found(tmp: Path) -> Outcome:
    key = tmp / "k"
    assert cli("anonymize", "key", str(key)).exit_code == 0
    (tmp / "a.png").write_bytes(b"x")
    return cli("anonymize", "lookup", "file-0123456789abcdef", str(tmp), "--anonymize-key", str(key))


def _key_not_overwritten(tmp: Path) -> Outcome:
    key = tmp / "k"
    assert cli("anonymize", "key", str(key)).exit_code == 0
    before = key.read_bytes()
    return _kept(cli("anonymize", "key", str(key)), key, before)


FAULTS = [
    Fault("doctor --anonymize-key naming a file that does not exist", "anonymised outputs", 2, _missing_key),
    Fault("doctor --anonymize-key with a key other users can read (0644)", "anonymised outputs", 2,
          _key_readable_by_others),
    Fault("doctor --anonymize-key with a 3-byte key", "anonymised outputs", 2, _short_key),
    Fault("doctor --anonymize-key naming a folder", "anonymised outputs", 2, _key_is_a_folder),
    Fault("report --anonymize where the default key cannot be created", "anonymised outputs", 2,
          _report_key_cannot_be_created),
    Fault("anonymize lookup of a file name instead of a token", "anonymised outputs", 2, _malformed_token),
    Fault("anonymize lookup of a token no file under DATA has", "anonymised outputs", 3, _token_not_found),
    Fault("anonymize key FILE where FILE exists", "anonymised outputs", 2, _key_not_overwritten),
]
