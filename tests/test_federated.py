"""``imgtune federate``: a real Flower federation on loopback (a SuperLink and three SuperNodes as separate
processes, started by ``imgtune federate server`` and ``imgtune federate site``), plus the pieces that need
no processes: pooling, the site's data under the coordinator's classes, what travels, FedProx's term."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from datagen import CLASSES, PRETRAINED_ARGS, make_split_dataset  # noqa: E402
from imgtune import metrics  # noqa: E402
from imgtune.cli import main  # noqa: E402
from imgtune.errors import DataError  # noqa: E402
from imgtune.federated import coordinator, site  # noqa: E402
from imgtune.federated.certs import make_certificates  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
A, B, C = sorted(CLASSES)[:3]
TIMEOUT = 600  # the whole federation, on a slow shared machine


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "imgtune", *args]


def _env() -> dict:
    return os.environ | {"PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _wait_rows(csv: Path, rows: int, procs: list, deadline: float) -> None:
    while time.monotonic() < deadline:
        if csv.is_file() and len(csv.read_text().splitlines()) > rows:
            return
        if procs[0].poll() is not None:
            raise AssertionError(f"the server stopped early: {procs[0].returncode}")
        time.sleep(1)
    raise AssertionError(f"no round {rows} in {csv} in time")


def run_killing_c(procs: list, run: Path, c_err: Path, restart=None) -> tuple[str, int]:
    """Once round 1 is written, kills site c's SuperNode and its ClientApp (SIGKILL to its group), starts
    ``restart()`` (a new SuperNode) if given, and waits for the server (``procs[0]``); every process is
    stopped whatever happens. Returns the server's output and the killed pid."""
    deadline = time.monotonic() + TIMEOUT
    try:
        _wait_rows(run / "metrics.csv", 1, procs, deadline)
        killed = int(re.search(r"supernode \(pid (\d+)\)", c_err.read_text()).group(1))
        os.killpg(killed, signal.SIGKILL)
        if restart is not None:
            procs.append(restart())
        output, _ = procs[0].communicate(timeout=max(1, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(30)
    return output, killed


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Three sites (site c lacks class B), every party over TLS, gradual: round 1 frozen (the head travels), round 2 unfrozen
    (the whole model travels); site c's SuperNode is killed (SIGKILL) once round 1 is written, and the
    run must finish with the two others (--min-sites 2)."""
    root = tmp_path_factory.mktemp("federation")
    sites = {name: make_split_dataset(root / name, classes=classes, train=6, val=3, seed=i)
             for i, (name, classes) in enumerate((("a", (A, B)), ("b", (A, B)), ("c", (A,))))}
    port, run = _free_port(), root / "run"
    tls = make_certificates(root / "tls")  # every party over TLS, verified against the test CA
    server = subprocess.Popen(_cli("federate", "server", "--tls", str(root / "tls"), "--host", "127.0.0.1",
                                   "--port", str(port), "--min-sites",
                                   "2", "--rounds", "2", "--freeze-rounds", "1", "--strategy", "gradual",
                                   "--round-timeout", "150", "--out", str(run), "--logs", str(root / "server-logs"),
                                   "--batch-size", "8", "--augment", "none", *PRETRAINED_ARGS),
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs, errs = [server], {}
    time.sleep(3)
    for name, data in sites.items():
        errs[name] = root / f"{name}.err"
        with open(errs[name], "w") as err:
            procs.append(subprocess.Popen(_cli("federate", "site", str(data), "--server", f"127.0.0.1:{port}",
                                               "--tls-ca", str(tls["ca.crt"]),
                                               "--audit", str(root / f"{name}.audit.jsonl"), "--logs",
                                               str(root / f"{name}-logs")), env=_env(), stderr=err))
    output, killed = run_killing_c(procs, run, errs["c"])
    return {"root": root, "run": run, "sites": sites, "code": server.returncode, "output": output,
            "site_codes": [p.returncode for p in procs[1:]], "killed": killed}


@pytest.mark.slow
def test_federation_finishes_without_the_killed_site(federation):
    assert federation["code"] == 0, federation["output"][-3000:]
    superlink = (federation["root"] / "server-logs" / "superlink.log").read_text()
    assert "Uvicorn running on https://127.0.0.1" in superlink  # TLS: the SuperLink served HTTPS
    rounds = json.loads((federation["run"] / "metrics.json").read_text())["federated"]["rounds"]
    assert [(r["round"], r["phase"]) for r in rounds] == [(1, "frozen"), (2, "unfrozen")]
    assert sorted(rounds[0]["val"]["sites"]) == ["a", "b", "c"]
    assert sorted(rounds[1]["val"]["sites"]) == ["a", "b"]  # c was killed after round 1
    assert sorted(rounds[1]["train"]["sites"]) == ["a", "b"]


@pytest.mark.slow
def test_run_folder_is_a_normal_one(federation, capsys):
    run = federation["run"]
    assert federation["code"] == 0, federation["output"][-3000:]
    found = json.loads((run / "metrics.json").read_text())
    last = found["federated"]["rounds"][-1]["val"]
    matrix = np.zeros((2, 2), dtype=int)
    for name in last["sites"]:
        assert last["sites"][name]["n"] == 6  # a and b: 3 val images of each class
    matrix = np.asarray(found["confusion_matrix"])
    assert matrix.sum() == found["n"] == 12  # pooled over a and b, the sites of the last round
    assert found["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    meta = json.loads((run / "meta.json").read_text())
    assert meta["classes"] == [A, B] and meta["strategy"] == "gradual"
    image = next((federation["sites"]["a"] / "val" / A).iterdir())
    assert main(["predict", str(run), str(image), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["label"] in (A, B)
    assert main(["evaluate", str(run)]) == 3  # the coordinator holds no images: DATA must be named
    assert "trained by a federation" in capsys.readouterr().err
    assert main(["evaluate", str(run), str(federation["sites"]["a"])]) == 0
    check = federation["sites"]["a"] / "val"
    assert main(["export", str(run), "--check-images", str(check)]) == 0
    assert (run / "export" / "model.onnx").is_file()


@pytest.mark.slow
def test_sites_send_only_parameters_and_documented_scalars(federation):
    """The audit mod's record of every reply of site a: arrays of the model's shapes, the documented
    scalars, the site's name and class folder names; no file name, path or feature."""
    model = site.open_site(str(federation["sites"]["a"]), _options(federation["run"]), [A, B]).built.model
    shapes = {phase: {k: list(v.shape) for k, v in site.travelling(model, phase).items()}
              for phase in (site.FROZEN, site.UNFROZEN)}
    lines = [json.loads(line) for line in (federation["root"] / "a.audit.jsonl").read_text().splitlines()]
    assert [entry["type"] for entry in lines] == ["query", "train", "evaluate", "train", "evaluate"]
    scalars = {"train": {"num-examples", "train-loss", "train-accuracy", "round"},
               "evaluate": {"num-examples", "loss-sum", "confusion", "round"}}
    for entry, phase in zip(lines[1:], (site.FROZEN, site.FROZEN, site.UNFROZEN, site.UNFROZEN)):
        records = entry["records"]
        assert records["site"]["items"] == {"name": "a"}
        assert set(records["metrics"]["items"]) == scalars[entry["type"]]
        if entry["type"] == "train":
            assert {k: v["shape"] for k, v in records["arrays"]["items"].items()} == shapes[phase]
        else:
            assert set(records) == {"metrics", "site"}
    assert lines[0]["records"]["classes"]["items"] == {"classes": [A, B]}
    text = (federation["root"] / "a.audit.jsonl").read_text()
    assert ".png" not in text and str(federation["root"]) not in text
    assert len(shapes[site.FROZEN]) == 2  # linear head: weight and bias only while frozen


@pytest.mark.slow
def test_no_process_outlives_the_federation(federation):
    assert federation["site_codes"] and not _alive(federation["killed"])
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert str(federation["root"]) not in ps  # no SuperNode or SuperLink of this test is left


def _options(run: Path) -> dict:
    return json.loads((run / "meta.json").read_text())["config"]


def test_pooled_report_is_the_report_of_the_summed_matrix():
    rng = np.random.default_rng(0)
    y, probs = rng.integers(0, 3, 40), rng.dirichlet(np.ones(3), 40)
    whole = metrics.classification_report(y, probs, ["x", "y", "z"])
    parts = [metrics.confusion_matrix(y[s], probs[s].argmax(1), 3) for s in (slice(0, 15), slice(15, 40))]
    loss = -np.log(probs[np.arange(40), y]).sum()
    pooled = coordinator.pooled_report(sum(parts), loss, ["x", "y", "z"])
    for key in ("n", "accuracy", "balanced_accuracy", "macro_f1", "weighted_f1"):
        assert pooled[key] == pytest.approx(whole[key])
    assert pooled["per_class"] == whole["per_class"] and pooled["confusion_matrix"] == whole["confusion_matrix"]
    assert pooled["loss"] == pytest.approx(whole["loss"])


def test_site_lacking_a_class_opens_under_the_coordinators_classes(tmp_path):
    data = make_split_dataset(tmp_path / "s", classes=(A,), train=4, val=2)
    splits = site.open_splits(str(data), [A, B], seed=0)
    assert splits.classes == [A, B] and splits.counts()["train"] == {A: 4, B: 0}
    with pytest.raises(DataError, match="not among the federation's classes"):
        site.open_splits(str(data), [B, C], seed=0)


def test_arrays_of_another_shape_are_refused():
    model = _tiny_classifier()
    arrays = site.to_arrays(model, site.FROZEN)
    assert set(arrays) == {"head.weight", "head.bias"}
    site.load_arrays(model, arrays, site.FROZEN)
    with pytest.raises(DataError, match="do not fit"):
        site.load_arrays(model, {"head.weight": np.zeros((3, 4), np.float32), "head.bias": np.zeros(3, np.float32)},
                         site.FROZEN)


def test_proximal_term_pulls_towards_the_global_weights():
    model = _tiny_classifier()
    start = model.head.weight.detach().clone()
    with site._proximal(model, site.RoundPlan(site.FROZEN, 1, proximal_mu=0.5)):
        with torch.no_grad():
            model.head.weight.add_(1.0)
        model.head.weight.sum().backward()  # the plain gradient is 1 everywhere
    assert torch.allclose(model.head.weight.grad, torch.full_like(start, 1.0 + 0.5 * 1.0))


def _tiny_classifier():
    from torch import nn

    from imgtune.models import Classifier

    return Classifier(nn.Flatten(), nn.Linear(4, 2), 4)


def test_bad_settings_fail_before_any_process(tmp_path, capsys):
    data = make_split_dataset(tmp_path / "s", classes=(A, B), train=2, val=1)
    assert main(["federate", "simulate", str(data), str(tmp_path / "missing"), "--out", str(tmp_path / "r"),
                 *PRETRAINED_ARGS]) == 3
    assert "missing" in capsys.readouterr().err
    assert main(["federate", "simulate", str(data), "--strategy", "finetune", "--out", str(tmp_path / "r"),
                 *PRETRAINED_ARGS]) == 2
    assert main(["federate", "simulate", str(data), "--unfreeze", "top:2", "--out", str(tmp_path / "r"),
                 *PRETRAINED_ARGS]) == 2
    assert "a federation's sites fine-tune every block" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_federation_fine_tunes_every_block_under_unfreeze_auto():
    from imgtune.config import RunConfig

    assert RunConfig().train.unfreeze == "auto"
    assert site.whole_model(RunConfig()).train.unfreeze == "all"


def test_certificates_chain_to_their_authority(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    files = make_certificates(tmp_path / "tls", ["coordinator.example.org"])
    ca = x509.load_pem_x509_certificate(files["ca.crt"].read_bytes())
    server = x509.load_pem_x509_certificate(files["server.crt"].read_bytes())
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm))
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coordinator.example.org" in names.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in [str(a) for a in names.get_values_for_type(x509.IPAddress)]
    assert oct(files["server.key"].stat().st_mode & 0o777) == "0o600"


def test_privacy_spent_is_flowers_rdp_account_of_the_noised_rounds():
    """(epsilon, delta) reported for Z = 1 over 1 and 4 rounds: positive, growing with the rounds, and
    below the classic RDP bound of the Gaussian mechanism (min over orders a of T a / (2 Z^2) +
    log(1/delta) / (a - 1))."""
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    settings = coordinator.Settings(options={}, out="x", min_sites=3, dp_noise=1.0, dp_delta=1e-5)
    spent = []
    for rounds in (1, 4):
        accountant = coordinator.make_accountant(settings)
        accountant.compose(GaussianPrivacyEvent(noise_multiplier=1.0, sample_size=3, population_size=3), rounds)
        report = coordinator.privacy_report(settings, accountant)
        assert report["delta"] == 1e-5 and report["noised_rounds"] == rounds
        orders = np.linspace(1.01, 200, 20000)
        bound = np.min(rounds * orders / 2 + np.log(1e5) / (orders - 1))
        assert 0 < report["epsilon"] <= bound + 1e-6
        spent.append(report["epsilon"])
    assert spent[1] > spent[0]
    assert coordinator.make_accountant(coordinator.Settings(options={}, out="x")) is None
