"""Every fault-injection case (``tests/faults_*.py``, see ``faultlib``) as a test: the documented exit
code, never 1 ("a bug in imgtune"), no hang, nothing lost, and a message that says something."""

from __future__ import annotations

import pytest

from faultlib import all_faults

FAULTS = all_faults()


@pytest.mark.parametrize("fault", FAULTS, ids=[f"{f.part}: {f.name}" for f in FAULTS])
def test_fault(fault, tmp_path):
    outcome = fault.run(tmp_path)
    assert outcome.lost is None, f"{fault.name}: lost {outcome.lost}"
    assert outcome.exit_code != 1, f"{fault.name}: reported as a bug: {outcome.message}"
    assert outcome.exit_code == fault.expected, f"{fault.name}: exit {outcome.exit_code}: {outcome.message}"
    if fault.expected != 0:
        assert outcome.message, f"{fault.name}: failed without saying why"
