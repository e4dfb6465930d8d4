"""``imgtune federate`` beyond the basics: secure aggregation (Flower's SecAgg+) against plain FedAvg, a site
that rejoins, and the sites' learning-rate schedule over the whole federation. The federations are real:
a SuperLink and SuperNodes as separate processes on loopback, TLS on, bounded in time."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from datagen import CLASSES, PRETRAINED_ARGS, make_split_dataset  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from test_federated import TIMEOUT, _cli, _env, _free_port, run_killing_c  # noqa: E402

from imgtune.cli import main  # noqa: E402
from imgtune.config import from_dict, resolve  # noqa: E402
from imgtune.federated import coordinator, secagg, site  # noqa: E402
from imgtune.federated.certs import make_certificates  # noqa: E402

A, B = sorted(CLASSES)[:2]
TRAIN = 6  # training images per class and site: 12 per site, the automatic --secagg-max-weight
COMMON = ("--strategy", "linear-probe", "--batch-size", "8", "--augment", "none", *PRETRAINED_ARGS)


def _sites(root: Path, names=("a", "b", "c")) -> dict[str, Path]:
    return {name: make_split_dataset(root / name, classes=(A, B), train=TRAIN, val=3, seed=i)
            for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    """One SecAgg+ round of three sites over TLS (``simulate``), every site's messages audited; the
    weights' scale (--secagg-max-weight) left automatic."""
    root = tmp_path_factory.mktemp("secure")
    sites = _sites(root)
    make_certificates(root / "tls")
    argv = _cli("federate", "simulate", *map(str, sites.values()), "--rounds", "1", "--secure-aggregation",
                "--tls", str(root / "tls"), "--out", str(root / "run"), "--logs", str(root / "logs"),
                "--audit", str(root / "audit"), "--round-timeout", "200", *COMMON)
    done = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    return {"root": root, "sites": sites, "run": root / "run", "done": done}


@pytest.mark.slow
def test_secure_aggregate_equals_plain_fedavg(secure):
    """The secure run's model against FedAvg computed here from the same sites' local rounds (each site's
    training is seeded and deterministic): the difference is SecAgg+'s quantisation, below 1e-5 relative."""
    assert secure["done"].returncode == 0, secure["done"].stdout[-3000:] + secure["done"].stderr[-3000:]
    assert "Secure aggregation completed" in (secure["root"] / "logs" / "flwr-run.log").read_text()
    assert "Uvicorn running on https://127.0.0.1" in (secure["root"] / "logs" / "superlink.log").read_text()
    meta = json.loads((secure["run"] / "meta.json").read_text())
    options, classes = meta["config"], meta["classes"]
    start = site.to_arrays(coordinator.build_model(resolve(from_dict(options)), classes).model, site.FROZEN)
    trained = []
    for data in secure["sites"].values():
        setup = site.open_site(str(data), options, classes)
        arrays, scalars = site.train_round(setup, start, site.RoundPlan(site.FROZEN, 1, 0.0, 1, 1))
        trained.append((arrays, scalars["num-examples"]))
    total = sum(n for _, n in trained)
    fedavg = {k: sum(a[k].astype(np.float64) * n for a, n in trained) / total for k in start}
    found = load_file(str(secure["run"] / "model.safetensors"))
    error = np.sqrt(sum(np.sum((found[k] - v) ** 2) for k, v in fedavg.items()))
    assert 0 < error / np.sqrt(sum(np.sum(v ** 2) for v in fedavg.values())) < 1e-5
    assert not np.allclose(fedavg["head.0.weight"], start["head.0.weight"])  # the round did train


@pytest.mark.slow
def test_secure_sites_send_masked_vectors_only(secure):
    """Every site's replies: the four SecAgg+ stages of the train exchange, none with a parameter array
    (the collect stage's carries the masked vector as bytes), then the evaluate reply as in plain runs."""
    assert secure["done"].returncode == 0
    for name in secure["sites"]:
        lines = [json.loads(line) for line in (secure["root"] / "audit" / f"{name}.jsonl").read_text().splitlines()]
        assert [entry["type"] for entry in lines] == ["query", "query", "train", "train", "train", "train",
                                                      "evaluate"]
        assert lines[1]["records"]["counts"]["items"] == {"train-images": 2 * TRAIN}
        for entry in lines[2:6]:
            arrays = [r["items"] for r in entry["records"].values() if r["kind"] == "ArrayRecord"]
            assert all(items == {} for items in arrays), entry
        masked = lines[4]["records"]["secaggplus_configs"]["items"]["masked_params"]
        assert masked and all(re.fullmatch(r"<\d+ bytes>", m) for m in masked)
        assert set(lines[4]["records"]["fitres.metrics"]["items"]) == {
            "num-examples", "train-loss", "train-accuracy", "round", "site", "secagg-clipped", "secagg-largest"}
    rounds = json.loads((secure["run"] / "metrics.json").read_text())["federated"]["rounds"]
    assert sorted(rounds[0]["train"]["sites"]) == ["a", "b", "c"]
    assert all(s["secagg-clipped"] == 0 for s in rounds[0]["train"]["sites"].values())
    secure_settings = json.loads((secure["run"] / "metrics.json").read_text())["federated"]["secure_aggregation"]
    assert secure_settings["max_weight"] == 2 * TRAIN  # the largest site's training images, asked


def test_secure_aggregation_refuses_what_it_cannot_serve(tmp_path, capsys):
    data = make_split_dataset(tmp_path / "s", classes=(A, B), train=2, val=1)
    out = tmp_path / "r"
    for extra, words in ((("--dp-noise", "1"), "central DP clips"), (("--min-sites", "1"), "--min-sites 2"),
                         (("--secagg-shares", "2"), "3 or more"),
                         (("--secagg-shares", "3", "--secagg-threshold", "3"), "below --secagg-shares"),
                         (("--secagg-quantization", str(2**31)), "--secagg-quantization")):
        assert main(["federate", "simulate", str(data), str(data), "--secure-aggregation", *extra, "--out", str(out),
                     *COMMON]) == 2
        assert words in capsys.readouterr().err
    assert not out.exists()


def test_a_clipped_update_stops_the_round_naming_the_site():
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    settings = coordinator.Settings(options={}, out="x", secure_aggregation=True, secagg_clip=0.5)
    reply = RecordDict({"metrics": MetricRecord({"secagg-clipped": 3, "secagg-largest": 0.8}),
                        "site": ConfigRecord({"name": "north"})})
    with pytest.raises(Exception, match="site north: 3 value.*raise --secagg-clip"):
        secagg._check_clipping([reply], settings)
    assert secagg.shares(1.0) == 1.0 and secagg.shares(5) == 5 and isinstance(secagg.shares(5.0), int)


def test_schedule_runs_over_the_whole_federation():
    """Round r of R with L local epochs follows epochs (r-1)L..rL of one cosine over RL epochs: round 2 of
    2 starts at the cosine's midpoint, not at the full lr again."""
    from imgtune.optim import warmup_cosine, warmup_cosine_from

    plan = site.RoundPlan(site.FROZEN, 2, 0.0, round=2, phase_rounds=2)
    assert plan.span() == (2, 4) and site.RoundPlan(site.FROZEN, 2).span() is None
    whole, per_epoch = warmup_cosine(4 * 5, 0), 5
    second = warmup_cosine_from(4 * per_epoch, 0, 2 * per_epoch)
    assert [second(s) for s in range(10)] == [whole(s) for s in range(10, 20)]
    assert second(0) == pytest.approx(0.505) and warmup_cosine_from(20, 0, 0)(0) == 1.0


def _site_process(root: Path, name: str, data: Path, port: int, tls: Path, attempt: int) -> subprocess.Popen:
    with open(root / f"{name}-{attempt}.err", "w") as err:
        return subprocess.Popen(_cli("federate", "site", str(data), "--server", f"127.0.0.1:{port}", "--name", name,
                                     "--tls-ca", str(tls), "--logs", str(root / f"{name}-{attempt}-logs")),
                                env=_env(), stderr=err)


@pytest.fixture(scope="module")
def rejoined(tmp_path_factory):
    """Three sites, three rounds over TLS; once round 1 is written, site c's SuperNode is killed (SIGKILL)
    and a new one for c started: the run must finish, with c contributing again."""
    root = tmp_path_factory.mktemp("rejoin")
    sites, port, run = _sites(root), _free_port(), root / "run"
    tls = make_certificates(root / "tls")["ca.crt"]
    server = subprocess.Popen(_cli("federate", "server", "--tls", str(root / "tls"), "--host", "127.0.0.1", "--port",
                                   str(port), "--min-sites", "2", "--rounds", "3", "--round-timeout", "90", "--out",
                                   str(run), "--logs", str(root / "server-logs"), *COMMON),
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs = [server] + [_site_process(root, name, data, port, tls, 1) for name, data in sites.items()]
    output, _ = run_killing_c(procs, run, root / "c-1.err", lambda: _site_process(root, "c", sites["c"], port, tls, 2))
    return {"run": run, "code": server.returncode, "output": output, "root": root}


@pytest.mark.slow
def test_a_site_that_rejoins_contributes_again(rejoined):
    assert rejoined["code"] == 0, rejoined["output"][-3000:]
    rounds = json.loads((rejoined["run"] / "metrics.json").read_text())["federated"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert sorted(rounds[0]["train"]["sites"]) == ["a", "b", "c"]
    assert sorted(rounds[-1]["train"]["sites"]) == ["a", "b", "c"]  # c, from its new SuperNode
    assert sorted(rounds[-1]["val"]["sites"]) == ["a", "b", "c"]
    assert (rejoined["root"] / "c-2-logs" / "supernode.log").is_file()


def test_a_loss_that_is_not_finite_is_left_out_of_the_table(capsys):
    """A federation whose model diverged stores its loss as None (strict JSON); the summary still prints."""
    from imgtune.cli.output import print_metrics

    print_metrics({"n": 18, "accuracy": 0.5, "loss": None}, "pooled validation")
    out = capsys.readouterr().out
    assert "0.5000" in out and "loss" not in out


def test_fedadam_steps_the_parameters_and_averages_the_batch_norm_statistics():
    """Flower's FedAdam steps a running variance by about eta, here below zero (the model's outputs then NaN);
    imgtune's takes the sites' weighted average for statistics and the same Adam step for parameters."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAdam

    from imgtune.federated.apps import _fedadam

    current = {"w": np.zeros(3, np.float32), "bn.running_var": np.full(3, 0.01, np.float32)}
    sites = [({"w": np.ones(3, np.float32), "bn.running_var": np.full(3, 0.004, np.float32)}, 30),
             ({"w": np.full(3, 3.0, np.float32), "bn.running_var": np.full(3, 0.002, np.float32)}, 10)]
    replies = [_Reply(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                  "metrics": MetricRecord({"num-examples": n})})) for arrays, n in sites]
    ours, plain = _fedadam(FedAdam)(frozenset({"bn.running_var"}), eta=1.0), FedAdam(eta=1.0)
    ours.current_arrays = plain.current_arrays = current
    stepped, _ = ours.aggregate_train(1, replies)
    flowers, _ = plain.aggregate_train(1, replies)
    assert (flowers["bn.running_var"].numpy() < 0).all()
    np.testing.assert_allclose(stepped["bn.running_var"].numpy(), (0.004 * 30 + 0.002 * 10) / 40, rtol=1e-6)
    np.testing.assert_allclose(stepped["w"].numpy(), flowers["w"].numpy())


class _Reply:
    """A site's reply as a strategy reads it (a real Message needs a running federation's task identity)."""

    def __init__(self, content):
        self.content = content

    def has_error(self) -> bool:
        return False

    def has_content(self) -> bool:
        return True
