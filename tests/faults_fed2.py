"""Fault cases of ``imgtune federate --secure-aggregation`` (see faultlib): option combinations SecAgg+
cannot serve, each refused with a message naming the options before any Flower process starts, and no
run folder written."""

from __future__ import annotations

from pathlib import Path

from datagen import PRETRAINED_ARGS, make_split_dataset
from faultlib import Fault, Outcome, cli


def _secure(tmp: Path, *extra: str) -> Outcome:
    sites = [str(make_split_dataset(tmp / name, train=2, val=1)) for name in ("a", "b")]
    out = tmp / "run"
    outcome = cli("federate", "simulate", *sites, "--strategy", "linear-probe", "--secure-aggregation", *extra,
                  "--out", str(out), *PRETRAINED_ARGS)
    if out.exists():
        outcome.lost = f"{out} was written"
    return outcome


FAULTS = [
    Fault("federate --secure-aggregation with --dp-noise (the coordinator cannot clip hidden updates)",
          "federated", 2, lambda tmp: _secure(tmp, "--dp-noise", "1")),
    Fault("federate --secure-aggregation with --min-sites 1 (one site's sum is its update)", "federated", 2,
          lambda tmp: _secure(tmp, "--min-sites", "1")),
    Fault("federate --secure-aggregation --secagg-threshold not below --secagg-shares", "federated", 2,
          lambda tmp: _secure(tmp, "--secagg-shares", "3", "--secagg-threshold", "3")),
    Fault("federate --secure-aggregation --secagg-quantization 2**31 (the masked sum would overflow)",
          "federated", 2, lambda tmp: _secure(tmp, "--secagg-quantization", str(2**31))),
    Fault("federate --secure-aggregation --secagg-clip 0", "federated", 2,
          lambda tmp: _secure(tmp, "--secagg-clip", "0")),
]
