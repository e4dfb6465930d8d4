"""Fault cases of ``imgtune serve`` (see faultlib): what is refused before the server listens (an open
address without a key, a key variable that is unset, a port in use, a run folder that is not one, damaged
weights, an export that is missing). The server writes nothing, so ``lost`` checks the run folder is as it
was."""

from __future__ import annotations

import hashlib
import shutil
import socket
from pathlib import Path

from faultlib import Fault, Outcome, cli
from serving import train_tiny

_TEMPLATE: list[Path] = []  # one tiny run, trained once, copied into each case's folder


def _run(tmp: Path) -> Path:
    if not _TEMPLATE:
        import atexit
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="imgtune-faults-serve-"))
        atexit.register(shutil.rmtree, root, True)
        _TEMPLATE.append(train_tiny(root, per_class=4)[0])
    return Path(shutil.copytree(_TEMPLATE[0], tmp / "run"))


def _digest(run: Path) -> str:
    files = sorted(p for p in run.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()


def _serving(*args: str, prepare=None):
    """A case: ``imgtune serve RUN ARGS`` on a fresh copy of the tiny run (``prepare(run)`` first)."""
    def case(tmp: Path) -> Outcome:
        run = _run(tmp)
        if prepare is not None:
            prepare(run)
        before = _digest(run)
        outcome = cli("serve", str(run), *args)
        changed = _digest(run) != before
        return Outcome(outcome.exit_code, outcome.message, "the run folder changed" if changed else None)
    return case


def _not_a_run(tmp: Path) -> Outcome:
    (tmp / "photos").mkdir()
    return cli("serve", str(tmp / "photos"))


def _damage_weights(run: Path) -> None:
    weights = run / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)
    weights.write_bytes(bytes(data))


def _port_in_use(tmp: Path) -> Outcome:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        return _serving("--port", str(taken.getsockname()[1]))(tmp)


FAULTS = [
    Fault("serve a folder that is not a run", "serving", 3, _not_a_run),
    Fault("serve on 0.0.0.0 without an API key", "serving", 2, _serving("--host", "0.0.0.0")),
    Fault("serve with --api-key-env naming an unset variable", "serving", 2,
          _serving("--api-key-env", "IMGTUNE_FAULTS_UNSET_KEY")),
    Fault("serve on a port another program holds", "serving", 2, _port_in_use),
    Fault("serve a run whose weights were damaged", "serving", 4, _serving("--port", "0", prepare=_damage_weights)),
    Fault("serve --engine onnxruntime without an export", "serving", 2,
          _serving("--port", "0", "--engine", "onnxruntime")),
    Fault("serve with a negative --max-wait-ms", "serving", 2, _serving("--max-wait-ms", "-1")),
]
