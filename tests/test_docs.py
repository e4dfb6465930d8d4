"""The tables of defaults in the README and docs/training.md say what config.STRATEGY_DEFAULTS holds
(they are written by hand; this keeps them from drifting)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from imgtune.config import STRATEGY_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]


def table_rows(path: Path) -> dict[str, list[str]]:
    rows = {}
    for line in path.read_text().splitlines():
        match = re.match(r"\| `([a-z-]+)`( \(default\))? \|(.*)\|\s*$", line)
        if match and match[1] in STRATEGY_DEFAULTS:
            rows[match[1]] = [cell.strip() for cell in match[3].split("|")]
    return rows


def numbers(text: str) -> list[float]:
    return [float(n) for n in re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", text)]


def expected(strategy: str) -> tuple[int, float, float | None]:
    values = STRATEGY_DEFAULTS[strategy]
    body = values["lr"] * values["backbone_lr_factor"] if values["backbone_lr_factor"] else None
    return values["epochs"], values["lr"], body


@pytest.mark.parametrize("strategy", sorted(STRATEGY_DEFAULTS))
def test_readme_strategy_table(strategy):
    cells = table_rows(ROOT / "README.md")[strategy]
    epochs, lr, body = expected(strategy)
    shown = numbers(cells[-1])  # "epochs, head lr, backbone lr"
    assert shown[:2] == [epochs, lr]
    assert (shown[2:] or [None])[0] == pytest.approx(body) if body else len(shown) == 2


@pytest.mark.parametrize("strategy", sorted(STRATEGY_DEFAULTS))
def test_training_doc_strategy_table(strategy):
    cells = table_rows(ROOT / "docs" / "training.md")[strategy]
    epochs, lr, body = expected(strategy)
    assert numbers(cells[1])[0] == epochs and numbers(cells[2]) == [lr]
    if body is None:
        assert not numbers(cells[3])
    else:
        shown = numbers(cells[3])
        assert shown[0] == pytest.approx(body)
        factor = STRATEGY_DEFAULTS[strategy]["backbone_lr_factor"]
        assert factor in shown[1:]
