"""Fault cases of ``imgtune federate`` (see faultlib): every mistake found before any Flower process
starts, and nothing in an existing run folder touched."""

from __future__ import annotations

from pathlib import Path

from datagen import PRETRAINED_ARGS, make_split_dataset
from faultlib import Fault, Outcome, cli


def _site(tmp: Path, name: str = "site") -> Path:
    return make_split_dataset(tmp / name, train=2, val=1)


def _untouched(outcome: Outcome, out: Path, before: dict[str, bytes] | None = None) -> Outcome:
    now = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None
    if (before is None and now) or (before is not None and now != before):
        outcome.lost = f"{out} was written or changed"
    return outcome


def _missing_site(tmp: Path) -> Outcome:
    out = tmp / "run"
    return _untouched(cli("federate", "simulate", str(_site(tmp)), str(tmp / "nowhere"), "--out", str(out),
                          *PRETRAINED_ARGS), out)


def _finetune(tmp: Path) -> Outcome:
    out = tmp / "run"
    return _untouched(cli("federate", "simulate", str(_site(tmp)), "--strategy", "finetune", "--out", str(out),
                          *PRETRAINED_ARGS), out)


def _partial_fine_tuning(tmp: Path) -> Outcome:
    out = tmp / "run"
    return _untouched(cli("federate", "simulate", str(_site(tmp)), "--unfreeze", "top:2", "--out", str(out),
                          *PRETRAINED_ARGS), out)


def _out_not_empty(tmp: Path) -> Outcome:
    out = tmp / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an earlier run's weights")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    return _untouched(cli("federate", "simulate", str(_site(tmp, "a")), str(_site(tmp, "b")), "--out", str(out),
                          *PRETRAINED_ARGS), out, before)


def _tls_folder_empty(tmp: Path) -> Outcome:
    (tmp / "tls").mkdir()
    out = tmp / "run"
    return _untouched(cli("federate", "server", "--tls", str(tmp / "tls"), "--out", str(out), "--port", "1",
                          *PRETRAINED_ARGS), out)


def _site_without_data(tmp: Path) -> Outcome:
    return cli("federate", "site", str(tmp / "nowhere"), "--server", "127.0.0.1:1", "--logs", str(tmp / "logs"))


def _dp_with_fedadam(tmp: Path) -> Outcome:
    out = tmp / "run"
    return _untouched(cli("federate", "simulate", str(_site(tmp)), "--fl-strategy", "fedadam", "--dp-noise", "1",
                          "--out", str(out), *PRETRAINED_ARGS), out)


FAULTS = [
    Fault("federate simulate with a site folder that does not exist", "federated", 3, _missing_site),
    Fault("federate simulate --strategy finetune (the body would travel untrained)", "federated", 2, _finetune),
    Fault("federate simulate --unfreeze top:2 (a round averages the whole model)", "federated", 2,
          _partial_fine_tuning),
    Fault("federate simulate into a non-empty --out", "federated", 2, _out_not_empty),
    Fault("federate server --tls DIR without the certificates", "federated", 2, _tls_folder_empty),
    Fault("federate site DATA where DATA does not exist", "federated", 3, _site_without_data),
    Fault("federate simulate --dp-noise with fedadam (no privacy accounting for it)", "federated", 2,
          _dp_with_fedadam),
]
