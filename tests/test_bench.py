"""The benchmark scripts are not run here (they take minutes on real data); they must compile, and use
the helpers of ``bench/common.py`` rather than defining their own copies."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name != "common.py")


def top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bench_script_uses_common_helpers(script):
    common = {name for name in top_level_names(BENCH / "common.py") if not name.startswith("_")}
    assert top_level_names(script) & common == set()  # ast.parse also proves it compiles
