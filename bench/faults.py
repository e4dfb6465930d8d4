"""Run every fault-injection case (tests/faults_*.py) in one go and print the table of
docs/reliability.md: case, exit code (expected), message, whether anything was lost.

    python bench/faults.py > /tmp/faults.md
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from faultlib import all_faults  # noqa: E402


def main() -> int:
    rows, bad = [], 0
    for fault in all_faults():
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            outcome = fault.run(Path(tmp))  # what the commands print is not the table
        ok = outcome.lost is None and outcome.exit_code == fault.expected and outcome.exit_code != 1
        bad += not ok
        message = outcome.message.replace("|", "\\|")
        message = message if len(message) <= 160 else message[:157] + "..."
        rows.append(f"| {fault.part} | {fault.name} | {outcome.exit_code} ({fault.expected}) | {message} | "
                    f"{outcome.lost or 'nothing'} | {'ok' if ok else 'FAIL'} | {time.perf_counter() - started:.1f} |")
    print("| part | case | exit (expected) | message | lost | result | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print(f"\n{len(rows) - bad} passed, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
