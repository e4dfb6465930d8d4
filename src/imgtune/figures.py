"""Every figure imgtune draws (the report's, and the PNG files of ``imgtune evaluate``), and the data
behind them: pure functions returning numbers and PNG bytes; writing files is the caller's business.

Matplotlib with the Agg backend (no display); every figure closed after rendering
(:func:`imgtune.encode.figure_png`). The curves' areas come from scikit-learn (``roc_auc_score``,
``average_precision_score``), one class against the rest.
"""

from __future__ import annotations

import math

import numpy as np

from .encode import figure_png

CURVE_LEGEND_LIMIT = 10  # above this many classes, per-class curves are drawn without legend entries


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _legend(ax, **options) -> None:
    """A legend only where something has a label (matplotlib warns about an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**options)


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def training_curves(rows: list[dict]) -> bytes | None:
    """Loss and accuracy per epoch (train and validation; validation macro F1 when present) from the rows
    of metrics.csv; epochs are counted across phases, with a dotted line where the phase changes."""
    if not rows:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    x = np.arange(1, len(rows) + 1)

    def column(name: str) -> np.ndarray | None:
        values = np.array([_number(row.get(name)) for row in rows])
        return None if np.isnan(values).all() else values

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, series in ((loss_ax, (("train_loss", "train"), ("val_loss", "validation"))),
                       (acc_ax, (("train_accuracy", "train accuracy"), ("val_accuracy", "validation accuracy"),
                                 ("val_macro_f1", "validation macro F1")))):
        for name, label in series:
            values = column(name)
            if values is not None:
                ax.plot(x, values, marker="o", markersize=3, label=label)
    phases = [row.get("phase", "") for row in rows]
    for ax in (loss_ax, acc_ax):
        for i in range(len(phases)):
            if i == 0 or phases[i] != phases[i - 1]:
                if i:
                    ax.axvline(i + 0.5, color="grey", linestyle=":")
                ax.annotate(f" {phases[i]}", (i + 0.5 if i else x[0], 1), xycoords=("data", "axes fraction"),
                            va="top", fontsize="small", color="grey")
        ax.set_xlabel("epoch (all phases)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _legend(ax, fontsize="small")
    loss_ax.set(ylabel="loss", title="Loss")
    acc_ax.set(ylabel="score", title="Accuracy", ylim=(0, 1.02))
    fig.tight_layout()
    return figure_png(fig)


def normalise_rows(matrix) -> np.ndarray:
    """Each row divided by its total (the true class's images): recall on the diagonal; empty rows stay 0."""
    matrix = np.asarray(matrix, dtype=np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)


def confusion_png(matrix, classes: list[str], title: str) -> bytes:
    """Counts (left) and row-normalised shares (right); values written in the cells up to 30 classes."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    matrix = np.asarray(matrix)
    side = min(3.5 + 0.4 * len(classes), 16)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side, side))
    show_values = len(classes) <= 30
    count_format = "d" if np.issubdtype(matrix.dtype, np.integer) else ".3g"  # float counts, e.g. read from a CSV
    for ax, values, name, fmt in ((axes[0], matrix, "counts", count_format),
                                  (axes[1], normalise_rows(matrix), "share of the row", ".2f")):
        ConfusionMatrixDisplay(values, display_labels=classes).plot(
            ax=ax, cmap="Blues", colorbar=False, xticks_rotation="vertical", include_values=show_values,
            values_format=fmt)
        ax.set_title(f"{title}: {name}")
    fig.tight_layout()
    return figure_png(fig)


def top_confusions(matrix, classes: list[str], limit: int = 20) -> list[dict]:
    """The off-diagonal cells with images, most images first (ties in class order)."""
    matrix = np.asarray(matrix)
    totals = matrix.sum(axis=1)
    cells = [(int(matrix[t, p]), t, p) for t in range(len(classes)) for p in range(len(classes))
             if t != p and matrix[t, p] > 0]
    cells.sort(key=lambda cell: (-cell[0], cell[1], cell[2]))
    return [{"true": classes[t], "predicted": classes[p], "count": count,
             "share_of_true": float(count / totals[t])}
            for count, t, p in cells[:limit]]


def roc_pr(y_true, probs, classes: list[str]) -> dict:
    """One-vs-rest ROC AUC and average precision per class (None for a class with no positives or no
    negatives here, left out of the macro means, which say over how many classes they are), the micro
    averages, and a PNG with the ROC and precision-recall curves."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    onehot = np.eye(len(classes), dtype=int)[y_true]
    per_class, defined = {}, []
    for i, name in enumerate(classes):
        positives = int(onehot[:, i].sum())
        ok = 0 < positives < len(y_true)
        per_class[name] = {"positives": positives,
                           "roc_auc": float(roc_auc_score(onehot[:, i], probs[:, i])) if ok else None,
                           "average_precision": float(average_precision_score(onehot[:, i], probs[:, i])) if ok else None}
        if ok:
            defined.append(i)
    found = {"per_class": per_class, "macro_over": len(defined),
             "macro_roc_auc": _mean([per_class[classes[i]]["roc_auc"] for i in defined]),
             "macro_average_precision": _mean([per_class[classes[i]]["average_precision"] for i in defined]),
             "micro_roc_auc": None, "micro_average_precision": None}
    if len(classes) > 2 and defined:
        found["micro_roc_auc"] = float(roc_auc_score(onehot.ravel(), probs.ravel()))
        found["micro_average_precision"] = float(average_precision_score(onehot.ravel(), probs.ravel()))
    found["png"] = _curves_png(onehot, probs, classes, defined, found)
    return found


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _curves_png(onehot: np.ndarray, probs: np.ndarray, classes: list[str], defined: list[int], found: dict) -> bytes:
    from sklearn.metrics import precision_recall_curve, roc_curve

    plt = _pyplot()
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(11, 4.8))
    roc_ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="chance")
    if len(classes) == 2:
        shown = [i for i in defined if i == 1]  # the second class as the positive one
    else:
        shown = defined
    many = len(classes) > CURVE_LEGEND_LIMIT
    for i in shown:
        stats = found["per_class"][classes[i]]
        style = {"color": "#bbbbbb", "linewidth": 0.6} if many else {"linewidth": 1.5}
        fpr, tpr, _ = roc_curve(onehot[:, i], probs[:, i])
        precision, recall, _ = precision_recall_curve(onehot[:, i], probs[:, i])
        roc_ax.plot(fpr, tpr, label=None if many else f"{classes[i]} (AUC {stats['roc_auc']:.3f})", **style)
        pr_ax.plot(recall, precision, label=None if many else f"{classes[i]} (AP {stats['average_precision']:.3f})",
                   **style)
        if not many:
            pr_ax.axhline(onehot[:, i].mean(), color=pr_ax.lines[-1].get_color(), linestyle=":", linewidth=0.8)
    if many and found["micro_roc_auc"] is not None:
        fpr, tpr, _ = roc_curve(onehot.ravel(), probs.ravel())
        precision, recall, _ = precision_recall_curve(onehot.ravel(), probs.ravel())
        roc_ax.plot(fpr, tpr, color="#c44e52", linewidth=2,
                    label=f"micro-average (AUC {found['micro_roc_auc']:.3f}); macro AUC {found['macro_roc_auc']:.3f}")
        pr_ax.plot(recall, precision, color="#c44e52", linewidth=2,
                   label=f"micro-average (AP {found['micro_average_precision']:.3f})")
        pr_ax.axhline(1 / len(classes), color="grey", linestyle=":", linewidth=0.8, label="prevalence")
        roc_ax.plot([], [], color="#bbbbbb", label=f"each of {len(shown)} classes")
    roc_ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate", ylabel="true positive rate",
               title="ROC, one class against the rest")
    pr_ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
              title="Precision-recall (dotted: prevalence)")
    for ax in (roc_ax, pr_ax):
        _legend(ax, fontsize="x-small", loc="lower right" if ax is roc_ax else "lower left")
    fig.tight_layout()
    return figure_png(fig)


def reliability_png(table: dict, ece: float, title: str, calibrated: dict | None = None,
                    temperature: float | None = None) -> bytes:
    """A reliability diagram: accuracy per confidence bin as bars against the diagonal of perfect
    calibration, ECE in the title; with ``calibrated`` (a second :meth:`calibration.Reliability.to_dict`),
    the temperature-scaled accuracies as steps."""
    from .calibration import Reliability

    plt = _pyplot()
    edges = np.array(table["edges"])

    def values(key: str, source: dict) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in source[key]], dtype=float)

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.bar(edges[:-1], np.nan_to_num(values("accuracy", table)), width=np.diff(edges), align="edge",
           color="#4c72b0", edgecolor="white", label="accuracy (model)")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    heading = f"{title}: ECE {ece:.3f}"
    if calibrated is not None:
        ece_after = Reliability(edges, np.array(calibrated["count"]), values("confidence", calibrated),
                                values("accuracy", calibrated)).ece
        ax.stairs(np.nan_to_num(values("accuracy", calibrated)), edges, baseline=None, color="#dd8452", linewidth=2,
                  label=f"accuracy at T = {temperature:.2f}")
        heading += f", {ece_after:.3f} at T = {temperature:.2f}"
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top label)", ylabel="accuracy", title=heading)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    return figure_png(fig)


def lr_find_png(lrs: list[float], losses: list[float], suggestion: float, rule: str) -> bytes:
    """The learning-rate range test: smoothed training loss against the learning rate (log scale), the
    suggested rate marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses, color="#4c72b0")
    at = int(np.argmin(np.abs(np.log(np.asarray(lrs)) - math.log(suggestion))))
    ax.plot([lrs[at]], [losses[at]], "o", color="#dd8452", label=f"{rule}: lr {suggestion:.2g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss (smoothed)", title="Learning-rate range test")
    _legend(ax, loc="upper left", fontsize="small")
    fig.tight_layout()
    return figure_png(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (latency, accuracy) points no other point beats on both (lower latency and at least
    the accuracy, or the latency and higher accuracy), fastest first."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def pareto_png(names: list[str], latency_ms: list[float], accuracy: list[float],
               intervals: list[list[float]], title: str) -> bytes:
    """Probe accuracy (with its 95% interval) against batch-1 latency (log scale), the Pareto front joined."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    lows = [a - ci[0] for a, ci in zip(accuracy, intervals)]
    highs = [ci[1] - a for a, ci in zip(accuracy, intervals)]
    ax.errorbar(latency_ms, accuracy, yerr=[lows, highs], fmt="o", color="tab:blue", ecolor="0.6", capsize=3,
                label="candidate (95% interval)")
    front = pareto_front(list(zip(latency_ms, accuracy)))
    ax.plot([latency_ms[i] for i in front], [accuracy[i] for i in front], "-", color="tab:orange",
            label="Pareto front (no candidate is both faster and more accurate)")
    for i, (name, x, y) in enumerate(zip(names, latency_ms, accuracy)):  # labels alternate above and below
        ax.annotate(name.split(":")[-1], (x, y), textcoords="offset points", xytext=(5, 4 if i % 2 else -11),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("latency per image at batch 1 on this machine (ms, log scale)")
    ax.set_ylabel("probe accuracy (cross-validated)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax, loc="lower right", fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def explanation_curves_png(methods: dict) -> bytes:
    """Mean deletion and insertion curves (explained class's probability against the fraction of pixels
    removed or restored) of each method of an explanation evaluation, with the random ordering dashed
    (the one over the most images)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    widest = max(methods, key=lambda m: methods[m]["images"])
    for ax, kind in zip(axes, ("deletion", "insertion")):
        for method, entry in methods.items():
            curve = entry[f"{kind}_curve"]
            ax.plot(np.linspace(0, 1, len(curve)), curve, label=f"{method} ({entry[f'{kind}_auc']['mean']:.3f})")
        random = methods[widest][f"random_{kind}_curve"]
        ax.plot(np.linspace(0, 1, len(random)), random, "k--",
                label=f"random ({methods[widest][f'random_{kind}_auc']['mean']:.3f})")
        ax.set_xlabel("fraction of the model's view " + ("removed" if kind == "deletion" else "restored"))
        ax.set_ylabel("probability of the explained class")
        ax.set_title(f"{kind} (area in brackets; {'lower' if kind == 'deletion' else 'higher'} is better)")
        ax.set_ylim(0, 1.02)
        _legend(ax, fontsize=7)
    fig.tight_layout()
    return figure_png(fig)
