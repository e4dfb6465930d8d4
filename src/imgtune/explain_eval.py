"""Which explanation reflects the model? Faithfulness and a sanity check for every method, measured on
the run's own images (``imgtune explain RUN --evaluate``).

- **Deletion** (Petsiuk et al., RISE, 2018): the model's view is cut into ``cells`` x ``cells`` squares,
  ordered by the method's mean heat; the most important are set to the preprocessing's mean colour
  (zero in the normalised space) first, ``steps`` equal amounts at a time, and the explained class's
  probability is recorded after each step; the area under that curve (fraction removed on x) is low
  when the map found what the model uses. **Insertion**: the reverse, from a heavily blurred copy of
  the view, the most important squares put back first; its area is high for a faithful map. Both are
  compared with a random ordering of the same squares on the same images (ties in a map are broken
  at random too), with bootstrap intervals over the images, and the paired gains (random minus method
  for deletion, method minus random for insertion).
- **Sanity** (Adebayo et al., "Sanity Checks for Saliency Maps", 2018): the model's head is
  re-initialised, then also the top blocks of its body (the modules holding the last third of the
  body's parameters), and each method explains the same class again; the Spearman rank correlation
  between the maps is reported. A map that barely changes (mean correlation at the last stage at or
  above :data:`SANITY_THRESHOLD`) does not depend on the model: it is flagged.

Computing only: :mod:`imgtune.explain_page` writes ``explain_eval.json`` and the HTML page.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from .explain import Explainer, model_input, pool
from .explain_methods import SLOW, probabilities
from .metrics import bootstrap_mean_ci

log = logging.getLogger(__name__)

SANITY_THRESHOLD = 0.5  # mean rank correlation after randomising the top blocks at or above this: flagged
SANITY_GRID = 32  # maps are compared on a 32 x 32 pooled grid (pixel-level ties would dominate the ranks)
STAGES = ("head", "top blocks")
# every method but scorecam (one forward pass per feature channel: minutes per image on a CPU)
EVAL_METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "integrated-gradients", "occlusion",
                "lime", "kernel-shap")
HeatFn = Callable[[nn.Module, torch.Tensor, int], np.ndarray]


@dataclass(frozen=True)
class EvalSettings:
    """How many images each part uses (the slow methods: LIME, SHAP, Score-CAM, get fewer)."""

    images: int = 50
    slow_images: int = 20
    sanity_images: int = 8
    steps: int = 16  # points of each curve after the start
    # Why 8 x 8 cells (28 px at 224), near the 7 x 7 grid of a stride-32 body's last
    # feature map. With 16 x 16 (14 px) cells a random ordering scatters small grey squares over the whole
    # view after a few steps, which breaks the texture in nearly every cell of that feature map at once: on
    # hymenoptera's default model that fragmentation lowered the probability as much as removing the insect
    # did, and no method, not even occlusion, beat random on deletion (docs/report.md). A centred Gaussian
    # "map" does not beat random at 8 x 8 either: the coarser grid does not reward a blob for being a blob.
    cells: int = 8  # the view is removed and restored in cells x cells squares
    n_boot: int = 1000
    gallery: int = 4  # images shown with every method side by side
    seed: int = 0


@dataclass
class Loaded:
    path: str
    batch: torch.Tensor  # (1, 3, H, W) normalised
    class_index: int  # the predicted class, which every method explains
    prob: float  # its probability
    image: object = None  # the decoded PIL image (kept for the gallery only)


@dataclass
class MethodRecord:
    seconds: list[float] = field(default_factory=list)
    deletion: list[np.ndarray] = field(default_factory=list)
    insertion: list[np.ndarray] = field(default_factory=list)
    random_deletion: list[np.ndarray] = field(default_factory=list)
    random_insertion: list[np.ndarray] = field(default_factory=list)
    sanity: dict[str, list[float]] = field(default_factory=dict)
    heatmaps: list[np.ndarray] = field(default_factory=list)  # of the gallery's images


def cell_order(heat: np.ndarray, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Cells of a ``cells`` x ``cells`` grid over the view, most mean heat first; equal values in a random
    order. Removing whole cells, not scattered pixels, keeps the random ordering from winning merely by
    sprinkling noise that no photo has (every pixel-level random deletion does)."""
    pooled = pool(heat, cells).ravel()
    return np.lexsort((rng.random(pooled.size), -pooled))


def perturbed(batch: torch.Tensor, order: np.ndarray, steps: int, start: torch.Tensor, cells: int) -> torch.Tensor:
    """``steps + 1`` images: ``start`` with the first k/steps of ``order``'s cells taken from ``batch``.
    Deletion passes the fill as ``batch`` and the image as ``start``; insertion the other way round."""
    image, start = batch[0].cpu().float(), start[0].cpu().float()
    side = image.shape[-1]
    rank = np.empty(cells * cells, dtype=np.int64)
    rank[order] = np.arange(cells * cells)
    edges = np.linspace(0, side, cells + 1).round().astype(int)
    cell_of = np.searchsorted(edges, np.arange(side), side="right") - 1
    pixel_rank = torch.from_numpy(rank.reshape(cells, cells)[cell_of[:, None], cell_of[None, :]])
    counts = torch.linspace(0, cells * cells, steps + 1).round().long()
    taken = (pixel_rank[None] < counts[:, None, None]).unsqueeze(1)  # (steps + 1, 1, H, W)
    return torch.where(taken, image[None], start[None])


def blurred(batch: torch.Tensor) -> torch.Tensor:
    """The insertion curve's start: the view blurred until no object detail survives (RISE's choice)."""
    from torchvision.transforms.functional import gaussian_blur

    side = batch.shape[-1]
    return gaussian_blur(batch.cpu().float(), [2 * (side // 8) + 1] * 2, [side / 16.0] * 2)


def curves(model: nn.Module, batch: torch.Tensor, class_index: int, order: np.ndarray, steps: int,
           cells: int) -> tuple[np.ndarray, np.ndarray]:
    """The class's probability along deletion (to the mean colour) and insertion (from the blurred view)."""
    fill = torch.zeros_like(batch.cpu().float())
    images = torch.cat([perturbed(fill, order, steps, batch, cells),
                        perturbed(batch, order, steps, blurred(batch), cells)])
    probs = probabilities(model, images)[:, class_index].numpy()
    return probs[:steps + 1], probs[steps + 1:]


def auc(curve: np.ndarray) -> float:
    """Area under a curve sampled at equal steps of x from 0 to 1."""
    return float(np.trapezoid(curve, dx=1.0 / (len(curve) - 1)))


def randomised(model: nn.Module, stage: str, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with its head re-initialised (``stage`` "head"), and also the top blocks of its
    body ("top blocks": the modules holding the last third of the body's parameters)."""
    found = copy.deepcopy(model)
    head = getattr(found, "head", None)
    body = getattr(found, "body", None)
    if head is None or body is None:
        raise ValueError("the sanity check needs a model with a body and a head (imgtune's Classifier)")
    chosen = [m for m in head.modules() if hasattr(m, "reset_parameters")]
    if stage == "top blocks":
        chosen += _top_modules(body)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in chosen:
            module.reset_parameters()
    return found.eval()


def _top_modules(body: nn.Module, share: float = 1 / 3) -> list[nn.Module]:
    """The leaf modules with parameters, from the output backwards, until they hold ``share`` of the body's."""
    leaves = [m for m in body.modules() if hasattr(m, "reset_parameters") and list(m.parameters(recurse=False))]
    total = sum(p.numel() for p in body.parameters())
    chosen, held = [], 0
    for module in reversed(leaves):
        if held >= share * total:
            break
        chosen.append(module)
        held += sum(p.numel() for p in module.parameters(recurse=False))
    return chosen


def rank_correlation(first: np.ndarray, second: np.ndarray, cells: int = SANITY_GRID) -> float:
    """Spearman correlation of two maps pooled to ``cells`` x ``cells``; 1.0 for two equal constant maps
    (nothing changed), 0.0 when only one is constant."""
    from scipy.stats import spearmanr

    a, b = (pool(m, cells).ravel() for m in (first, second))
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 1.0 if np.ptp(a) == np.ptp(b) == 0 and np.allclose(a, b) else 0.0
    return float(spearmanr(a, b).statistic)


def sanity(heat_fn: HeatFn, model: nn.Module, loaded: Sequence[Loaded], seed: int = 0) -> dict[str, list[float]]:
    """Per stage, the rank correlation between each image's map from ``model`` and from the randomised copy."""
    found: dict[str, list[float]] = {}
    originals = [heat_fn(model, item.batch, item.class_index) for item in loaded]
    for stage in STAGES:
        copy_ = randomised(model, stage, seed)
        found[stage] = [rank_correlation(original, heat_fn(copy_, item.batch, item.class_index))
                        for original, item in zip(originals, loaded)]
    return found


def sanity_summary(correlations: dict[str, list[float]], n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean correlation and interval per stage, and whether the map passed (changed when the model did)."""
    stages = {stage: {"mean": float(np.mean(values)), "ci95": bootstrap_mean_ci(values, n_boot, seed=seed),
                      "per_image": [round(v, 4) for v in values]} for stage, values in correlations.items()}
    last = stages[STAGES[-1]]["mean"]
    return {"metric": "Spearman rank correlation with the trained model's map", "threshold": SANITY_THRESHOLD,
            "stages": stages, "passed": bool(last < SANITY_THRESHOLD),
            "verdict": "depends on the model" if last < SANITY_THRESHOLD else
            "model-independent: the map barely changes when the model is randomised"}


def load_images(explainer: Explainer, refs: Sequence, limit: int, seed: int) -> tuple[list[Loaded], list]:
    """Up to ``limit`` of ``refs`` (a seeded random choice, so every class appears), decoded, with the
    model's predicted class; unreadable ones are skipped with why."""
    from .data.decode import DecodeError, load_rgb

    picked = np.random.default_rng(seed).permutation(len(refs))
    loaded, skipped = [], []
    for i in picked:
        if len(loaded) >= limit:
            break
        try:
            image = load_rgb(refs[i])
        except DecodeError as exc:
            skipped.append((str(refs[i]), str(exc)))
            continue
        batch = model_input(image, explainer.preprocessing)
        probs = probabilities(explainer.model, batch)[0]
        index = int(probs.argmax())
        loaded.append(Loaded(str(refs[i]), batch, index, float(probs[index]), image))
    return loaded, skipped


def evaluate_methods(explainer: Explainer, loaded: Sequence[Loaded], methods: Sequence[str],
                     settings: EvalSettings = EvalSettings()) -> dict[str, MethodRecord]:
    """Curves, seconds and sanity correlations of every method on ``loaded`` (the slow methods on the first
    ``slow_images``), each against a random ordering of the same images."""
    rng = np.random.default_rng(settings.seed)
    random_curves = [curves(explainer.model, item.batch, item.class_index, rng.permutation(settings.cells ** 2),
                            settings.steps, settings.cells) for item in loaded]
    records = {}
    for method in methods:
        record = records[method] = MethodRecord()
        count = min(len(loaded), settings.slow_images if method in (*SLOW, "scorecam") else settings.images)
        explainer.prepare(method)
        for i, item in enumerate(loaded[:count]):
            started = time.perf_counter()
            heat, _ = explainer.heatmap(item.batch, item.class_index, method)
            record.seconds.append(time.perf_counter() - started)
            deletion, insertion = curves(explainer.model, item.batch, item.class_index,
                                         cell_order(heat, settings.cells, rng), settings.steps, settings.cells)
            record.deletion.append(deletion)
            record.insertion.append(insertion)
            record.random_deletion.append(random_curves[i][0])
            record.random_insertion.append(random_curves[i][1])
            if i < settings.gallery:
                record.heatmaps.append(heat)
        log.info("%s: %d images, %.2f s per image", method, count, float(np.mean(record.seconds or [0])))
        record.sanity = sanity(_heat_fn(explainer, method), explainer.model,
                               loaded[:min(count, settings.sanity_images)], settings.seed)
    return records


def _heat_fn(explainer: Explainer, method: str) -> HeatFn:
    def heat(model: nn.Module, batch: torch.Tensor, class_index: int) -> np.ndarray:
        other = Explainer(model, explainer.classes, explainer.preprocessing, explainer.settings)
        return other.heatmap(batch, class_index, method)[0]
    return heat


def summarise(records: dict[str, MethodRecord], settings: EvalSettings) -> dict:
    """Per method: AUCs with intervals, the random ordering on the same images, the paired gains, the
    mean curves, seconds per image and the sanity check; ``best``: the largest total gain over random
    among the methods that beat it on deletion (the paired gain's interval above zero) and pass the
    sanity check. ``intervals_apart``: the stricter reading, the method's deletion interval entirely
    below the random ordering's."""
    out = {}
    for method, record in records.items():
        out[method] = entry = {"images": len(record.seconds), "seconds_per_image": float(np.mean(record.seconds))}
        aucs = {}
        for key in ("deletion", "insertion", "random_deletion", "random_insertion"):
            aucs[key] = np.array([auc(c) for c in getattr(record, key)])
            entry[f"{key}_auc"] = _interval(aucs[key], settings)
            entry[f"{key}_curve"] = np.mean(getattr(record, key), axis=0).round(4).tolist()
        entry["deletion_gain"] = _interval(aucs["random_deletion"] - aucs["deletion"], settings)
        entry["insertion_gain"] = _interval(aucs["insertion"] - aucs["random_insertion"], settings)
        entry["faithfulness"] = entry["deletion_gain"]["mean"] + entry["insertion_gain"]["mean"]
        # the same images under both orderings: the paired gain's interval above zero, not two intervals apart
        entry["beats_random_deletion"] = entry["deletion_gain"]["ci95"][0] > 0
        entry["intervals_apart"] = entry["deletion_auc"]["ci95"][1] < entry["random_deletion_auc"]["ci95"][0]
        entry["sanity"] = sanity_summary(record.sanity, settings.n_boot, settings.seed)
    eligible = [m for m, e in out.items() if e["beats_random_deletion"] and e["sanity"]["passed"]]
    best = max(eligible, key=lambda m: out[m]["faithfulness"]) if eligible else None
    return {"methods": out, "best": best, "settings": asdict(settings),
            "best_rule": "largest faithfulness (deletion gain + insertion gain over random) among the methods whose "
                         "paired deletion gain over random has its interval above zero and that pass the sanity check"}


def _interval(values: np.ndarray, settings: EvalSettings) -> dict:
    return {"mean": float(np.mean(values)), "ci95": bootstrap_mean_ci(values, settings.n_boot, seed=settings.seed)}


@dataclass
class EvalResult:
    summary: dict  # what explain_eval.json holds
    records: dict[str, MethodRecord]
    loaded: list[Loaded]


def evaluate_run(explainer: Explainer, run, data: str | None = None, split: str | None = None,
                 methods: Sequence[str] = EVAL_METHODS, settings: EvalSettings = EvalSettings()) -> EvalResult:
    """Every method on up to ``settings.images`` images of the run's own split (val by default) or of
    ``data`` (:func:`imgtune.evaluation.select_images`), each image explained for its predicted class."""
    from .errors import DataError
    from .evaluation import select_images
    from .explain import check_methods

    check_methods(methods)
    started = time.perf_counter()
    selection = select_images(run, data, split)
    loaded, skipped = load_images(explainer, selection.images, settings.images, settings.seed)
    if not loaded:
        raise DataError(f"no readable image to explain in the {selection.split} split of {data or run.path}")
    records = evaluate_methods(explainer, loaded, methods, settings)
    summary = summarise(records, settings)
    summary.update(run=str(run.path), model=run.meta["model"]["name"], source=str(data or run.config.data.source),
                   split=selection.split, images=[item.path for item in loaded],
                   skipped=[list(s) for s in [*skipped, *selection.skipped]],
                   attribution=asdict(explainer.settings), seconds=time.perf_counter() - started)
    return EvalResult(summary, records, loaded)
