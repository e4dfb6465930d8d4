"""The coordinator's Flower app, ``server`` (in the SuperLink's ServerApp process): the class list, each
phase's rounds through a Flower strategy (or SecAgg+ rounds, ``secagg.py``), the run folder. The sites'
app is ``client.py``; docs/federated.md lists what each message carries.
"""

from __future__ import annotations

import contextlib
import json
import logging

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from . import coordinator, secagg, site
from .coordinator import Recorder, Settings

log = logging.getLogger(__name__)

server = ServerApp()


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
    strategy = make_strategy(settings, recorder, accountant, statistics(built.model))
    initial = ArrayRecord({k: Array(v) for k, v in site.to_arrays(built.model, phase).items()})
    log.info("federation: %d %s round(s) with %s", rounds, phase, type(strategy).__name__)
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, timeout=settings.round_timeout,
                            train_config=config, evaluate_config=ConfigRecord(dict(config)))
    site.load_arrays(built.model, {k: a.numpy() for k, a in result.arrays.items()}, phase)


def _proximal(settings: Settings) -> dict:
    """FedProx's mu, as Flower's FedProx puts it into the train config (the secure path sets it itself)."""
    return {"proximal-mu": settings.proximal_mu} if settings.strategy == "fedprox" else {}


def statistics(model) -> frozenset[str]:
    """The names of the travelling tensors that are statistics, not parameters (batch-norm running means and
    variances): averaged, never stepped by a server optimizer."""
    return frozenset(name for name, _ in model.named_buffers())


def make_strategy(settings: Settings, recorder: Recorder, accountant=None,
                  statistics: frozenset[str] = frozenset()):
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
        strategy = _fedadam(FedAdam)(statistics, eta=settings.server_lr, **common)
    else:
        strategy = FedAvg(**common)
    if accountant is None:
        return strategy
    return DifferentialPrivacyServerSideFixedClipping(strategy, settings.dp_noise, settings.dp_clip,
                                                      settings.min_sites, accountant=accountant)


def _fedadam(base):
    """Flower's FedAdam, its Adam step applied to the parameters only."""
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    class FedAdamOnParameters(base):
        """FedAdam steps every travelling array by about ``eta``, batch-norm running variances included, which can
        turn them negative (the model's outputs then NaN, seen with ``gradual``'s unfrozen rounds). Statistics
        are not parameters: they take the sites' weighted average, as in FedAvg."""

        def __init__(self, statistics: frozenset[str], **kwargs):
            super().__init__(**kwargs)
            self.statistics = statistics

        def aggregate_train(self, server_round: int, replies):
            replies = list(replies)
            stepped, metrics = super().aggregate_train(server_round, replies)
            if stepped is None or not self.statistics.intersection(stepped.keys()):
                return stepped, metrics
            contents = [reply.content for reply in replies if not reply.has_error()]
            averaged = aggregate_arrayrecords(contents, self.weighted_by_key)
            return ArrayRecord({k: averaged[k] if k in self.statistics else a for k, a in stepped.items()}), metrics

    return FedAdamOnParameters


def ask_sites(grid: Grid, settings: Settings, ask: str, what: str) -> list[Message]:
    """A ``query`` (``ask``) to every connected site once --min-sites are connected, not to a sample of
    them; the replies, at least --min-sites of them."""
    from flwr.serverapp.strategy.strategy_utils import sample_nodes

    sample_nodes(grid, settings.min_sites, settings.min_sites)  # waits until --min-sites sites are connected
    asks = [Message(RecordDict({"config": ConfigRecord({"ask": ask})}), message_type="query", dst_node_id=node)
            for node in sorted(grid.get_node_ids())]
    replies = [r for r in grid.send_and_receive(asks, timeout=settings.round_timeout) if not r.has_error()]
    if len(replies) < settings.min_sites:
        raise RuntimeError(f"only {len(replies)} site(s) {what}, fewer than --min-sites {settings.min_sites}")
    return replies


def gather_classes(grid: Grid, settings: Settings) -> tuple[list[str], dict]:
    """The union of the class folder names of every site connected once --min-sites are (each site sends
    its names, nothing else); a site joining later must have no class outside it."""
    replies = ask_sites(grid, settings, "classes", "sent their class names")
    found = {str(r.content["site"]["name"]): sorted(str(c) for c in r.content["classes"]["classes"])
             for r in replies}
    classes = sorted({c for names in found.values() for c in names})
    log.info("federation: classes %s (the union of %d sites' class names)", classes, len(found))
    if len(classes) < 2:
        raise RuntimeError(f"the sites have only the class(es) {classes}; a classifier needs at least two")
    return classes, {name: {"classes": names} for name, names in found.items()}
