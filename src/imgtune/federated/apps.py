"""The Flower apps of a federation: ``server`` (the coordinator, in the SuperLink's ServerApp process) and
``client`` (a site, in each SuperNode's ClientApp process), named by the Flower App that ``launch.py``
writes. Messages carry records only:

- coordinator -> site: ``arrays`` (the global parameters of the travelling part) and ``config`` (the
  phase, local epochs, class list, training options, the backbone's SHA-256, Flower's ``server-round``
  and FedProx's ``proximal-mu``);
- site -> coordinator, train: ``arrays`` (the same names and shapes) and ``metrics``: ``num-examples``,
  ``train-loss``, ``train-accuracy``, ``round``; evaluate: ``metrics``: ``num-examples``, ``loss-sum``,
  ``confusion`` (the val confusion matrix, row-major), ``round``; query: ``classes`` (class folder
  names); every reply also carries ``site`` (its ``name`` from the SuperNode's node config).

No image, feature or file name is ever put in a reply; the ``audit`` mod writes what each reply holds
to the file the node config's ``audit`` names, for a site to check.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from . import coordinator, secagg, site
from .coordinator import Recorder, Settings

log = logging.getLogger(__name__)

QUERY_CLASSES = "classes"


def audit(msg: Message, context: Context, call_next) -> Message:
    """Flower client mod: appends one JSON line per reply to the node config's ``audit`` file: every
    record's kind, its arrays' names, shapes and dtypes, and its metric and config values."""
    reply = call_next(msg, context)
    path = context.node_config.get("audit")
    if path:
        with open(str(path), "a", encoding="utf-8") as file:
            file.write(json.dumps(describe(reply)) + "\n")
    return reply


def describe(reply: Message) -> dict:
    entry: dict = {"type": reply.metadata.message_type, "error": reply.has_error(), "records": {}}
    if reply.has_error():
        return entry
    for name, record in reply.content.items():
        if isinstance(record, ArrayRecord):
            value = {k: {"shape": list(a.shape), "dtype": a.dtype} for k, a in record.items()}
        else:
            value = {k: _plain(v) for k, v in record.items()}
        entry["records"][name] = {"kind": type(record).__name__, "items": value}
    return entry


def _plain(value):
    """Bytes (SecAgg+'s keys, shares and masked vectors) as their length: the audit stays JSON."""
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return [_plain(v) for v in value] if isinstance(value, list) else value


client = ClientApp(mods=[audit, secagg.client_mod])
server = ServerApp()


def _site_name(context: Context) -> ConfigRecord:
    return ConfigRecord({"name": str(context.node_config.get("name", f"node-{context.node_id}"))})


def _data(context: Context) -> str:
    return str(context.node_config["data"])


def _setup(msg: Message, context: Context):
    config = msg.content["config"]
    options = json.loads(str(config["options"]))
    for key, section in (("cache-dir", "data"), ("device", "train")):
        if key in context.node_config:  # the site's own cache folder and device, not the coordinator's
            options.setdefault(section, {})[key.replace("-", "_")] = str(context.node_config[key])
    setup = site.open_site(_data(context), options, [str(c) for c in config["classes"]])
    if site.body_digest(setup.built.model) != str(config["body-sha256"]):
        raise RuntimeError("this site's backbone weights differ from the coordinator's (a different weights "
                           "package or version): install the same imgtune and weights at every party")
    return setup, config


def _arrays(msg: Message) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in msg.content["arrays"].items()}


@client.query()
def query(msg: Message, context: Context) -> Message:
    names = site.class_names(_data(context))
    return Message(RecordDict({"classes": ConfigRecord({"classes": names}), "site": _site_name(context)}),
                   reply_to=msg)


@client.train()
def train(msg: Message, context: Context) -> Message:
    setup, config = _setup(msg, context)
    plan = site.RoundPlan(str(config["phase"]), int(config["local-epochs"]), float(config.get("proximal-mu", 0.0)),
                          int(config["server-round"]), int(config.get("phase-rounds", 0)))
    arrays, scalars = site.train_round(setup, _arrays(msg), plan)
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    metrics = MetricRecord(scalars | {"round": int(config["server-round"])} | _unit_weight(config))
    return Message(RecordDict({"arrays": record, "metrics": metrics, "site": _site_name(context)}), reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    setup, config = _setup(msg, context)
    found = site.evaluate_round(setup, _arrays(msg), str(config["phase"]))
    metrics = MetricRecord({"num-examples": found["num-examples"], "loss-sum": found["loss-sum"],
                            "confusion": [int(v) for v in found["matrix"].ravel()],
                            "round": int(config["server-round"])} | _unit_weight(config))
    return Message(RecordDict({"metrics": metrics, "site": _site_name(context)}), reply_to=msg)


def _unit_weight(config) -> dict:
    """With --dp-noise every site weighs the same (``unit-weight``: 1), as Flower's accounting requires."""
    return {"unit-weight": 1} if bool(config.get("unit-weight", False)) else {}


@server.main()
def main(grid: Grid, context: Context) -> None:
    logging.getLogger("imgtune").setLevel(logging.INFO)  # Flower's log stream carries it to flwr run
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = Settings.from_run_config(dict(context.run_config))
    run(grid, settings, context)


def run(grid: Grid, settings: Settings, context: Context | None = None) -> dict:
    """The whole federation: classes, the run folder, each phase's rounds, the final files."""
    config = coordinator.check_settings(settings)
    classes, sites = settings.classes or None, {}
    if classes is None:
        classes, sites = gather_classes(grid, settings)
    built = coordinator.build_model(config, classes)
    data = coordinator.FederatedData(classes, sites)
    with contextlib.ExitStack() as lock:
        final = coordinator.start_run_folder(settings, config, built, data, lock)
        recorder = Recorder(classes, settings.out, settings.min_sites)
        accountant = coordinator.make_accountant(settings)
        shared = {"classes": classes, "options": json.dumps(_site_options(final)),
                  "body-sha256": site.body_digest(built.model), "local-epochs": settings.local_epochs,
                  "unit-weight": accountant is not None}
        for phase, rounds in settings.phases(config.train.strategy):
            if rounds:
                _run_phase(grid, settings, built, recorder, phase, rounds, shared, accountant, context)
        privacy = coordinator.privacy_report(settings, accountant)
        return coordinator.finish_run_folder(settings.out, built, recorder, privacy)


def _site_options(config) -> dict:
    """The training options every site applies (its data, cache folder and device are its own)."""
    from ..config import to_dict

    options = to_dict(config)
    options["data"].update(source="", cache_dir=None, num_workers=None)
    options["train"]["device"] = "auto"
    options.pop("out", None)
    return options


def _run_phase(grid: Grid, settings: Settings, built, recorder: Recorder, phase: str, rounds: int,
               shared: dict, accountant=None, context: Context | None = None) -> None:
    recorder.phase, recorder.offset = phase, len(recorder.rounds)
    config = ConfigRecord(shared | {"phase": phase, "phase-rounds": rounds})
    if settings.secure_aggregation:
        found = secagg.run_phase(grid, context, settings, recorder, site.to_arrays(built.model, phase), rounds,
                                 dict(config) | _proximal(settings))
        site.load_arrays(built.model, found, phase)
        return
    strategy = make_strategy(settings, recorder, accountant)
    initial = ArrayRecord({k: Array(v) for k, v in site.to_arrays(built.model, phase).items()})
    log.info("federation: %d %s round(s) with %s", rounds, phase, type(strategy).__name__)
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, timeout=settings.round_timeout,
                            train_config=config, evaluate_config=ConfigRecord(dict(config)))
    site.load_arrays(built.model, {k: a.numpy() for k, a in result.arrays.items()}, phase)


def _proximal(settings: Settings) -> dict:
    """FedProx's mu, as Flower's FedProx puts it into the train config (the secure path sets it itself)."""
    return {"proximal-mu": settings.proximal_mu} if settings.strategy == "fedprox" else {}


def make_strategy(settings: Settings, recorder: Recorder, accountant=None):
    """Flower's strategy by name; every reply goes through the recorder (pooled and per-site figures).
    With ``accountant`` (--dp-noise) it is wrapped in Flower's central DP with server-side fixed clipping,
    whose accounting needs an unweighted average: the sites then weigh by ``unit-weight`` (1 each)."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg, FedProx

    common = {"min_train_nodes": settings.min_sites, "min_evaluate_nodes": settings.min_sites,
              "min_available_nodes": settings.min_sites, "train_metrics_aggr_fn": recorder.on_train,
              "evaluate_metrics_aggr_fn": recorder.on_evaluate}
    if accountant is not None:
        common["weighted_by_key"] = "unit-weight"
    if settings.strategy == "fedprox":
        strategy = FedProx(proximal_mu=settings.proximal_mu, **common)
    elif settings.strategy == "fedadam":
        strategy = FedAdam(eta=settings.server_lr, **common)
    else:
        strategy = FedAvg(**common)
    if accountant is None:
        return strategy
    return DifferentialPrivacyServerSideFixedClipping(strategy, settings.dp_noise, settings.dp_clip,
                                                      settings.min_sites, accountant=accountant)


def gather_classes(grid: Grid, settings: Settings) -> tuple[list[str], dict]:
    """The union of the class folder names of every site connected once --min-sites are (each site sends
    its names, nothing else); a site joining later must have no class outside it."""
    from flwr.serverapp.strategy.strategy_utils import sample_nodes

    sample_nodes(grid, settings.min_sites, settings.min_sites)  # waits until --min-sites sites are connected
    nodes = sorted(grid.get_node_ids())  # then asks every connected site, not a sample of them
    asks = [Message(RecordDict({"config": ConfigRecord({"ask": QUERY_CLASSES})}), message_type="query",
                    dst_node_id=node) for node in nodes]
    replies = [r for r in grid.send_and_receive(asks, timeout=settings.round_timeout) if not r.has_error()]
    if len(replies) < settings.min_sites:
        raise RuntimeError(f"only {len(replies)} site(s) sent their class names, fewer than --min-sites "
                           f"{settings.min_sites}")
    found = {str(r.content["site"]["name"]): sorted(str(c) for c in r.content["classes"]["classes"])
             for r in replies}
    classes = sorted({c for names in found.values() for c in names})
    log.info("federation: classes %s (the union of %d sites' class names)", classes, len(found))
    if len(classes) < 2:
        raise RuntimeError(f"the sites have only the class(es) {classes}; a classifier needs at least two")
    return classes, {name: {"classes": names} for name, names in found.items()}
