"""Secure aggregation with Flower's SecAgg+: the coordinator learns the weighted sum of the sites' updates,
never one site's update.

Flower 1.42 has SecAgg+ only for its legacy workflow API (``SecAggPlusWorkflow`` run with a
``LegacyContext`` and a ``flwr.server.strategy`` strategy; ``secaggplus_mod`` at each ClientApp, on
``FitRes``-shaped replies), so a secure round is carried here in that shape, while evaluation stays on the
Message API (:func:`evaluate`, the same ``evaluate`` messages as every other federation).

Per round, four message exchanges (setup, share keys, collect masked vectors, unmask). What a site puts
into the protocol is its **update** (its trained parameters minus the global ones) weighted by
``num-examples / max_weight``; SecAgg+ clips each value to [-clip, clip], quantises it to
``quantization`` levels (stochastic rounding), masks it, and the coordinator recovers only the sum,
from which it forms FedAvg's weighted average and adds it to the global parameters. Quantisation step on
one site's update value: ``2 clip max_weight / (quantization num-examples)``. A value beyond the clipping
range would be changed silently, so each site counts them (``secagg-clipped``) and the coordinator stops
the federation, naming the site and the option to raise, rather than release a clipped aggregate.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from ..errors import DataError, FederationError

if TYPE_CHECKING:  # the sites import this module for client_mod; coordinator imports torch
    from .coordinator import Recorder, Settings

log = logging.getLogger(__name__)

MODULUS = 2**32  # Flower's mask modulus: the sum of every site's quantised values must stay below it
LEGACY_CONFIG = "imgtune"  # the one FitIns config entry: the round's config as JSON (legacy configs are scalars)


def shares(value: float) -> int | float:
    """Flower's convention: a count (an int above 1) or a fraction of the round's sites (a float <= 1)."""
    return int(value) if value > 1 else float(value)


def check(settings: Settings) -> None:
    """The combinations SecAgg+ cannot serve, refused before any process starts."""
    from ..errors import UsageError

    if not settings.secure_aggregation:
        return
    if settings.dp_noise > 0:
        raise UsageError("--secure-aggregation with --dp-noise: central DP clips each site's update at the "
                         "coordinator, which secure aggregation hides from it; use one or the other")
    if settings.min_sites < 2:
        raise UsageError("--secure-aggregation needs --min-sites 2 or more (one site's sum is its update)")
    if settings.secagg_clip <= 0 or settings.secagg_max_weight < 0:
        raise UsageError("--secagg-clip must be above 0 and --secagg-max-weight 0 (automatic) or above")
    if not 2 <= settings.secagg_quantization < 2**31 or settings.min_sites * settings.secagg_quantization >= MODULUS:
        raise UsageError(f"--secagg-quantization {settings.secagg_quantization}: between 2 and 2**31, and times "
                         f"the number of sites ({settings.min_sites} or more) below 2**32")
    count, threshold = shares(settings.secagg_shares), shares(settings.secagg_threshold)
    if settings.secagg_shares <= 0 or settings.secagg_threshold <= 0 or count == 2:
        raise UsageError("--secagg-shares and --secagg-threshold: a fraction in (0, 1] or a count; a share count "
                         "must be 3 or more")
    if isinstance(count, int) and isinstance(threshold, int) and threshold >= count:
        raise UsageError(f"--secagg-threshold {threshold} must be below --secagg-shares {count}")


def run_phase(grid, context: Context, settings: Settings, recorder: Recorder, initial: dict[str, np.ndarray],
              rounds: int, config: dict) -> dict[str, np.ndarray]:
    """``rounds`` SecAgg+ rounds from ``initial``, each followed by an evaluation; the final arrays."""
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.compat.app_utils import start_update_client_manager_thread
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    max_weight = settings.secagg_max_weight if settings.secagg_max_weight > 0 else largest_site(grid, settings)
    recorder.secure = {"protocol": "SecAgg+ (Flower)", "max_weight": max_weight, "clip": settings.secagg_clip,
                       "quantization": settings.secagg_quantization, "shares": settings.secagg_shares,
                       "threshold": settings.secagg_threshold,
                       "step": 2 * settings.secagg_clip / settings.secagg_quantization}
    config = config | {"array-names": list(initial), "secagg-clip": settings.secagg_clip,
                       "secagg-max-weight": max_weight}
    rounds_state = SecureRounds(settings, recorder, config, initial)
    legacy = LegacyContext(context, ServerConfig(num_rounds=rounds), rounds_state)
    workflow = SecAggPlusWorkflow(shares(settings.secagg_shares), shares(settings.secagg_threshold),
                                  max_weight=max_weight, clipping_range=settings.secagg_clip,
                                  quantization_range=settings.secagg_quantization, modulus_range=MODULUS,
                                  timeout=settings.round_timeout)
    thread, stop, ready = start_update_client_manager_thread(grid, legacy.client_manager)
    try:
        ready.wait()
        for number in range(1, rounds + 1):
            legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: number,
                                                                             Key.START_TIME: time.time()})
            legacy.state.array_records[MAIN_PARAMS_RECORD] = _legacy_record(rounds_state.current)
            workflow(grid, legacy)
            if rounds_state.done != number:
                raise FederationError(f"secure aggregation halted in round {number}: fewer sites answered than "
                                      "--secagg-threshold needs (see the sites' logs)")
            evaluate(grid, settings, recorder, rounds_state.current, config | {"server-round": number})
    finally:
        stop.set()
        thread.join()
    return rounds_state.current


def largest_site(grid, settings: Settings) -> float:
    """The largest number of training images among the connected sites (each is asked; the same counts
    travel in plain with every update): every site's weight then uses the most of SecAgg+'s range."""
    from .apps import ask_sites

    replies = ask_sites(grid, settings, "train-images", "said how many training images they have")
    largest = max(int(r.content["counts"]["train-images"]) for r in replies)
    log.info("secure aggregation: weights are images / %d (the largest site's training images)", largest)
    return float(largest)


def _legacy_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    from flwr.common import ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import parameters_to_arrayrecord

    return parameters_to_arrayrecord(ndarrays_to_parameters(list(arrays.values())), keep_input=True)


class SecureRounds:
    """The legacy strategy SecAggPlusWorkflow calls: it picks the sites (every connected one, at least
    --min-sites) and turns the securely summed update into the new global parameters with Flower's
    FedAvg or FedAdam; the sites' plaintext scalars go to the recorder."""

    def __init__(self, settings: Settings, recorder: Recorder, config: dict, initial: dict[str, np.ndarray]):
        self.settings, self.recorder, self.config = settings, recorder, config
        self.current, self.done = initial, 0
        self.inner = _legacy_strategy(settings, self._fit_config, list(initial.values()))

    def _fit_config(self, server_round: int) -> dict:
        return {LEGACY_CONFIG: json.dumps(self.config | {"server-round": server_round})}

    def configure_fit(self, server_round: int, parameters, client_manager):
        chosen = self.inner.configure_fit(server_round, parameters, client_manager)
        if len(chosen) * self.settings.secagg_quantization >= MODULUS:
            raise DataError(f"{len(chosen)} sites x --secagg-quantization {self.settings.secagg_quantization} "
                            "reaches 2**32, where the masked sum overflows: lower --secagg-quantization")
        return chosen

    def aggregate_fit(self, server_round: int, results: list, failures: list):
        from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

        replies = [_reply(fitres) for _, fitres in results]
        _check_clipping(replies, self.settings)
        self.recorder.on_train(replies, "num-examples")
        update = parameters_to_ndarrays(results[0][1].parameters)  # every result carries the secure average
        merged = [(g.astype(np.float64) + d).astype(np.float32) for g, d in zip(self.current.values(), update)]
        for _, fitres in results:
            fitres.parameters = ndarrays_to_parameters(merged)
        parameters, metrics = self.inner.aggregate_fit(server_round, results, failures)
        self.current = dict(zip(self.current, (a.astype(np.float32) for a in parameters_to_ndarrays(parameters))))
        self.done = server_round
        return parameters, metrics


def _legacy_strategy(settings: Settings, fit_config, initial: list[np.ndarray]):
    from flwr.common import ndarrays_to_parameters
    from flwr.server.strategy import FedAdam, FedAvg

    common = {"fraction_fit": 1.0, "fraction_evaluate": 0.0, "min_fit_clients": settings.min_sites,
              "min_available_clients": settings.min_sites, "on_fit_config_fn": fit_config}
    if settings.strategy == "fedadam":  # the Message API FedAdam's tau, so both paths step alike
        return FedAdam(initial_parameters=ndarrays_to_parameters(initial), eta=settings.server_lr, tau=1e-3,
                       **common)
    return FedAvg(**common)  # fedprox aggregates as FedAvg; its proximal term is the sites' (config)


def _reply(fitres) -> RecordDict:
    """A site's plaintext scalars as the recorder reads a Message API reply."""
    metrics = dict(fitres.metrics)
    name = str(metrics.pop("site", "site"))
    return RecordDict({"metrics": MetricRecord({k: v for k, v in metrics.items() if not isinstance(v, str)}),
                       "site": ConfigRecord({"name": name})})


def _check_clipping(replies: list[RecordDict], settings: Settings) -> None:
    for reply in replies:
        metrics, name = reply["metrics"], reply["site"]["name"]
        if int(metrics.get("secagg-clipped", 0)):
            raise DataError(f"site {name}: {int(metrics['secagg-clipped'])} value(s) of its weighted update lay "
                            f"outside +-{settings.secagg_clip} and would be clipped by secure aggregation; raise "
                            f"--secagg-clip (largest: {float(metrics['secagg-largest']):.4g})")


def evaluate(grid, settings: Settings, recorder: Recorder, arrays: dict[str, np.ndarray], config: dict) -> None:
    """The global model on every connected site's val split (Message API ``evaluate`` messages)."""
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "config": ConfigRecord(config)})
    asks = [Message(content, dst_node_id=node, message_type="evaluate") for node in sorted(grid.get_node_ids())]
    replies = [r.content for r in grid.send_and_receive(asks, timeout=settings.round_timeout) if not r.has_error()]
    recorder.on_evaluate(replies, "num-examples")


def client_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower client mod: a train message of a SecAgg+ round goes through Flower's ``secaggplus_mod``,
    whose collect stage calls the site's ``train`` on the Message API shape; everything else passes, except
    a plain train message at a site that requires secure aggregation (node config ``secure-aggregation``)."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        if msg.metadata.message_type == "train" and str(context.node_config.get("secure-aggregation", "")) == "1":
            raise RuntimeError("this site requires secure aggregation (imgtune federate site --secure-aggregation) "
                               "and the coordinator asked for a plain round: no update sent")
        return call_next(msg, context)
    return secaggplus_mod(msg, context, lambda inner, ctx: _train_legacy(inner, ctx, call_next))


def _train_legacy(msg: Message, context: Context, call_next) -> Message:
    """FitIns in, FitRes out: the update (trained minus global), the scalars, the clipping count."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters, fitres_to_recorddict

    config = json.loads(str(msg.content.config_records["fitins.config"][LEGACY_CONFIG]))
    names = config.pop("array-names")
    tensors = parameters_to_ndarrays(arrayrecord_to_parameters(msg.content.array_records["fitins.parameters"], True))
    start = dict(zip(names, tensors))
    msg.content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in start.items()}),
                              "config": ConfigRecord(config)})
    reply = call_next(msg, context)
    trained = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    update = [trained[n].astype(np.float64) - start[n] for n in names]
    metrics = dict(reply.content["metrics"])
    weighted = float(metrics["num-examples"]) / float(config["secagg-max-weight"])
    largest = max(float(np.abs(u).max()) for u in update) * weighted
    clipped = sum(int((np.abs(u) * weighted > float(config["secagg-clip"])).sum()) for u in update)
    scalars = metrics | {"site": str(reply.content["site"]["name"]), "secagg-clipped": clipped,
                         "secagg-largest": largest}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), int(metrics["num-examples"]), scalars)
    return Message(fitres_to_recorddict(fitres, False), reply_to=msg)
