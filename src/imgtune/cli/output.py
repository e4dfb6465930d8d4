"""Tables on the terminal (rich); results go to stdout, messages to stderr."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console(highlight=False)


def _ci(report: dict, key: str) -> str:
    ci = report.get("ci95", {}).get(key)
    return f"  (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""


def print_metrics(report: dict, title: str) -> None:
    table = Table(title=f"{title} ({report['n']} images)", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("accuracy", "macro_f1", "balanced_accuracy", "weighted_f1", "top3_accuracy", "top5_accuracy",
                "loss"):
        if report.get(key) is not None:  # None: not finite (strict JSON), e.g. a diverged federation's loss
            table.add_row(key, f"{report[key]:.4f}{_ci(report, key)}")
    console.print(table)


def print_per_class(report: dict) -> None:
    table = Table(title="per class (95% bootstrap intervals)")
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, row in report["per_class"].items():
        table.add_row(name, *(_with_ci(row, key) for key in ("precision", "recall", "f1")), str(row["support"]))
    table.add_section()
    table.add_row("macro avg", f"{report['macro_precision']:.3f}", f"{report['macro_recall']:.3f}",
                  f"{report['macro_f1']:.3f}", str(report["n"]))
    table.add_row("weighted avg", f"{report['weighted_precision']:.3f}", f"{report['weighted_recall']:.3f}",
                  f"{report['weighted_f1']:.3f}", str(report["n"]))
    console.print(table)


def _with_ci(row: dict, key: str) -> str:
    ci = row.get("ci95", {}).get(key)
    return f"{row[key]:.3f} ({ci[0]:.2f}-{ci[1]:.2f})" if ci else f"{row[key]:.3f}"


def print_confusion(matrix: list[list[int]], classes: list[str], limit: int = 20) -> None:
    if len(classes) > limit:
        console.print(f"confusion matrix: {len(classes)} classes, see the CSV and PNG files")
        return
    table = Table(title="confusion matrix (rows: true, columns: predicted)")
    table.add_column("")
    for name in classes:
        table.add_column(name, justify="right")
    for name, row in zip(classes, matrix):
        table.add_row(name, *map(str, row))
    console.print(table)


def print_calibration(found: dict) -> None:
    """The temperature stored with a run and the ECE before and after it (``metrics["calibration"]``)."""
    console.print(f"calibration: temperature {found['temperature']:.3f}, fitted on {found['n_fit']} val images "
                  f"(predict --calibrated uses it)" + (" - at the end of its range: fitted on too few or too "
                                                       "easy images" if found.get("at_bound") else ""))
    if "ece_before" in found:
        console.print(f"  ECE ({found['n_bins']} bins) on {found['assessed_on']}, {found['n_assessed']} images: "
                      f"{found['ece_before']:.4f} before, {found['ece_after']:.4f} after; NLL "
                      f"{found['nll_before']:.4f} before, {found['nll_after']:.4f} after")


def print_split_calibration(found: dict) -> None:
    """ECE of the split ``imgtune evaluate`` measured (``report["calibration"]``)."""
    line = f"ECE ({found['n_bins']} bins): {found['ece']:.4f}"
    if found.get("ece_calibrated") is not None:
        line += f"; with the run's temperature {found['temperature']:.3f}: {found['ece_calibrated']:.4f}"
    console.print(line)
    if found.get("note"):
        console.print(f"  {found['note']}")
