"""The coordinator of a federation: the class list, the rounds of each phase, pooled metrics, the run folder.

It runs inside Flower's ``ServerApp`` (``apps.py``) next to the SuperLink and holds no images. Per round
a Flower strategy (FedAvg by default, FedProx or FedAdam) sends the global parameters of the travelling
part to the sites, aggregates what they send back, and asks each site to measure the result on its own
val split; the sites' confusion matrices are summed into the pooled figures. ``gradual`` runs its
frozen rounds (only the head travels) before its unfrozen rounds (the whole model travels).
The run folder is the one ``imgtune train`` writes (config.yaml, meta.json, model.safetensors,
metrics.csv, metrics.json with the pooled val figures at its top level), so ``imgtune predict`` and
``imgtune export`` read it unchanged.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .. import artifact, models, partial
from ..config import RunConfig, from_dict, resolve, save_yaml
from ..errors import DataError, UsageError
from ..metrics import matrix_report
from ..inference import select_device
from ..prepare import Setup, finalize, run_meta, seed_everything
from .site import FROZEN, UNFROZEN, whole_model

log = logging.getLogger(__name__)

STRATEGIES = ("fedavg", "fedprox", "fedadam")
FEDERATED_STRATEGIES = ("linear-probe", "gradual")  # the transfer strategies a federation runs


@dataclass(frozen=True)
class Settings:
    """Everything the coordinator needs, as it travels in Flower's run config (``to_run_config``)."""

    options: dict  # the imgtune training options (a RunConfig as a dict), the same for every site
    out: str
    rounds: int = 3
    freeze_rounds: int | None = None  # gradual: rounds with the body frozen (default: half, at least 1)
    local_epochs: int = 1
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.1  # FedAdam's eta
    min_sites: int = 2
    classes: list[str] = field(default_factory=list)  # empty: the union of the sites' class names
    round_timeout: float = 600.0
    overwrite: bool = False
    dp_noise: float = 0.0  # central DP (Flower's server-side fixed clipping): noise multiplier; 0: off
    dp_clip: float = 1.0  # the L2 norm each site's update is clipped to
    dp_delta: float = 1e-5
    secure_aggregation: bool = False  # Flower's SecAgg+: the coordinator sees only the sum of the updates
    secagg_shares: float = 1.0  # shares of each site's secrets: a count, or a fraction of the round's sites
    secagg_threshold: float = 0.5  # shares that reconstruct a secret: a count, or a fraction of the shares
    secagg_clip: float = 1.0  # each weighted update value must lie in [-clip, clip]
    secagg_quantization: int = 2**24  # quantisation levels over [-clip, clip]
    secagg_max_weight: float = 0.0  # the largest number of training images a site may have; 0: ask the sites

    def to_run_config(self) -> dict:
        return {"imgtune-settings": json.dumps(asdict(self))}

    @classmethod
    def from_run_config(cls, run_config: dict) -> "Settings":
        return cls(**json.loads(str(run_config["imgtune-settings"])))

    def phases(self, strategy: str) -> list[tuple[str, int]]:
        """(phase, rounds) in order: linear-probe is all frozen; gradual frozen, then unfrozen."""
        if strategy == "linear-probe":
            return [(FROZEN, self.rounds)]
        frozen = self.freeze_rounds if self.freeze_rounds is not None else max(1, self.rounds // 2)
        return [(FROZEN, frozen), (UNFROZEN, self.rounds - frozen)]


def check_settings(settings: Settings) -> RunConfig:
    """Stops bad settings before any process starts; returns the resolved training config."""
    config = resolve(from_dict(settings.options, origin="the training options"))
    if config.train.strategy not in FEDERATED_STRATEGIES:
        raise UsageError(f"--strategy {config.train.strategy}: a federation runs linear-probe or gradual (each site "
                         "starts from the same pretrained backbone)")
    if config.train.unfreeze not in (partial.AUTO, "all"):
        raise UsageError(f"--unfreeze {config.train.unfreeze}: a federation's sites fine-tune every block (each "
                         "round averages the whole model); leave --unfreeze out or give all")
    config = whole_model(config)
    if config.model.name == "auto":
        raise UsageError("--model auto ranks models on the training images, which the coordinator does not hold: "
                         "name the model (imgtune rank DATA at one site suggests one)")
    if settings.strategy not in STRATEGIES:
        raise UsageError(f"--fl-strategy {settings.strategy}: choose one of {', '.join(STRATEGIES)}")
    if settings.rounds < 1 or settings.local_epochs < 1 or settings.min_sites < 1:
        raise UsageError("--rounds, --local-epochs and --min-sites must be at least 1")
    frozen = settings.phases(config.train.strategy)[0][1]
    if config.train.strategy == "gradual" and not 1 <= frozen < settings.rounds:
        raise UsageError(f"--freeze-rounds {frozen} with --rounds {settings.rounds}: gradual needs at least one "
                         "frozen and one unfrozen round")
    if settings.dp_noise < 0 or settings.dp_clip <= 0 or not 0 < settings.dp_delta < 1:
        raise UsageError("--dp-noise must be >= 0, --dp-clip > 0 and --dp-delta between 0 and 1")
    if settings.dp_noise > 0 and settings.strategy == "fedadam":
        raise UsageError("--dp-noise: Flower accounts the privacy of FedAvg's aggregation (fedavg, fedprox), not "
                         "fedadam's")
    from .secagg import check

    check(settings)
    if settings.classes and len(set(settings.classes)) < 2:
        raise UsageError("--classes: a classifier needs at least two distinct classes")
    return config


class FederatedData:
    """What the coordinator knows about the data: class names and per-site image totals, no files.
    It answers what ``prepare.run_meta`` asks of a data source."""

    layout = "federated"

    def __init__(self, classes: list[str], sites: dict[str, dict]):
        self.classes, self.sites = classes, sites

    def summary(self) -> dict:
        return {"layout": self.layout, "classes": self.classes, "sites": self.sites,
                "formats_text": "held by the sites"}

    def content(self) -> None:
        return None


@dataclass
class Recorder:
    """Rounds as they finish: pooled and per-site figures, written to metrics.csv after each round."""

    classes: list[str]
    out: str
    min_sites: int
    phase: str = FROZEN
    offset: int = 0  # rounds of earlier phases
    rows: list[dict] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)
    secure: dict | None = None  # secure aggregation's settings as used (secagg.run_phase)

    def on_train(self, replies: list, weight_key: str):
        from flwr.app import MetricRecord

        self._check_enough(replies, "train")
        sites = {_site(r): dict(next(iter(r.metric_records.values()))) for r in replies}
        n = sum(s["num-examples"] for s in sites.values())
        pooled = {key: sum(s[key] * s["num-examples"] for s in sites.values()) / max(n, 1)
                  for key in ("train-loss", "train-accuracy")}
        self.rounds.append({"round": self.offset + int(_round(replies)), "phase": self.phase,
                            "train": {"pooled": pooled | {"num-examples": n}, "sites": sites}})
        return MetricRecord(pooled | {"num-examples": n})

    def on_evaluate(self, replies: list, weight_key: str):
        from flwr.app import MetricRecord

        self._check_enough(replies, "evaluate")
        k = len(self.classes)
        per_site = {_site(r): next(iter(r.metric_records.values())) for r in replies}
        sites = {name: site_report(m, self.classes) for name, m in per_site.items()}
        matrix = sum(np.asarray(m["confusion"], dtype=np.int64).reshape(k, k) for m in per_site.values())
        loss = sum(float(m["loss-sum"]) for m in per_site.values())
        pooled = pooled_report(matrix, loss, self.classes)
        self.rounds[-1]["val"] = {"pooled": pooled, "sites": sites}
        self._write_row(pooled)
        return MetricRecord({"accuracy": pooled["accuracy"], "loss": pooled["loss"], "num-examples": pooled["n"]})

    def _check_enough(self, replies: list, stage: str) -> None:
        if len(replies) < self.min_sites:
            raise DataError(f"{stage}: only {len(replies)} site(s) answered, fewer than --min-sites "
                            f"{self.min_sites}; the federation stops")

    def _write_row(self, pooled: dict) -> None:
        last = self.rounds[-1]
        self.rows.append({"epoch": last["round"], "phase": last["phase"],
                          "train_loss": last["train"]["pooled"]["train-loss"],
                          "train_accuracy": last["train"]["pooled"]["train-accuracy"],
                          "val_loss": pooled["loss"], "val_accuracy": pooled["accuracy"],
                          "val_macro_f1": pooled["macro_f1"], "sites": len(last["val"]["sites"])})
        artifact.write_metrics_csv(artifact.Path(self.out) / artifact.METRICS_CSV, self.rows)


def _site(record) -> str:
    return str(record["site"]["name"]) if "site" in record.config_records else "site"


def _round(replies: list) -> int:
    return int(next(iter(replies[0].metric_records.values()))["round"])


def pooled_report(matrix: np.ndarray, loss_sum: float, classes: list[str]) -> dict:
    """The report of ``imgtune train``'s metrics.json computed from a summed confusion matrix."""
    report = matrix_report(matrix, classes)
    report["loss"] = loss_sum / report["n"] if report["n"] else None
    return report


def site_report(metrics, classes: list[str]) -> dict:
    k = len(classes)
    matrix = np.asarray(metrics["confusion"], dtype=np.int64).reshape(k, k)
    report = pooled_report(matrix, float(metrics["loss-sum"]), classes)
    return {key: report[key] for key in ("n", "accuracy", "balanced_accuracy", "macro_f1", "loss")}


def build_model(config: RunConfig, classes: list[str]) -> models.BuiltModel:
    seed_everything(config.train.seed)  # the sites seed alike: a random head starts the same everywhere
    return models.create(config.model, len(classes), offline=config.offline)


def start_run_folder(settings: Settings, config: RunConfig, built: models.BuiltModel, data: FederatedData,
                     lock: contextlib.ExitStack) -> RunConfig:
    """config.yaml and meta.json, as ``imgtune train`` writes them (the data: the sites' totals)."""
    device = select_device("cpu")
    held = replace(config.data, source="", num_workers=0)  # no images here: no loader workers to size
    final = finalize(replace(config, out=settings.out, data=held), data, built, device)
    final = replace(final, data=replace(final.data, source=""))  # no data here (finalize made it absolute)
    out = artifact.prepare_out_dir(settings.out, settings.overwrite, lock)
    save_yaml(final, out / artifact.CONFIG)
    meta = run_meta(Setup(final, data, built, device))
    meta["federated"] = {"settings": {k: v for k, v in asdict(settings).items() if k != "options"},
                         "engine": _flower_version()}
    artifact.write_json(out / artifact.META, meta)
    return final


def _flower_version() -> str:
    from importlib.metadata import version

    return f"flwr {version('flwr')}"


def privacy_report(settings: Settings, accountant) -> dict | None:
    """(epsilon, delta) spent, as Flower's RDP accountant composed it over every noised round."""
    if accountant is None:
        return None
    spent = accountant.get_privacy_spent(settings.dp_delta)
    return {"mechanism": "central differential privacy: each site's update clipped to an L2 norm of dp_clip, "
                         "Gaussian noise added to the aggregate (Flower's server-side fixed clipping)",
            "unit": "a site (client-level privacy)", "epsilon": float(spent.epsilon), "delta": float(spent.delta),
            "noise_multiplier": settings.dp_noise, "clipping_norm": settings.dp_clip,
            "noised_rounds": accountant.num_releases, "accountant": "RDP (dp-accounting)"}


def make_accountant(settings: Settings):
    """Flower's RDP accountant, one for the whole federation (every phase composes into it)."""
    if settings.dp_noise <= 0:
        return None
    from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    return RdpAccountant(PrivacyConfig(target_delta=settings.dp_delta, population_size=settings.min_sites,
                                       neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                       sampling_method=SamplingMethod.NO_AMPLIFICATION))


def finish_run_folder(out: str, built: models.BuiltModel, recorder: Recorder, privacy: dict | None = None) -> dict:
    """model.safetensors, then metrics.json: the last round's pooled val figures at the top level."""
    built.model.freeze_body(False)
    artifact.save_weights(built.model.cpu(), artifact.Path(out) / artifact.WEIGHTS)
    last = recorder.rounds[-1]["val"] if recorder.rounds and "val" in recorder.rounds[-1] else {"pooled": {}}
    metrics = dict(last["pooled"])
    metrics["kept"] = "final"
    metrics["federated"] = {"pooled_over": "the sites' val splits (summed confusion matrices)",
                            "sites": last.get("sites", {}), "rounds": recorder.rounds,
                            "secure_aggregation": recorder.secure}
    metrics["privacy"] = privacy
    artifact.write_json(artifact.Path(out) / artifact.METRICS_JSON, metrics)
    return metrics

