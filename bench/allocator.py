"""What glibc's raised malloc thresholds (imgtune.allocator, on in the imgtune command) do to CPU inference.

In one child process per setting, each fresh: mobilenet_v2 (offline weights), channels-last, eval, batch 32 of
224 px; one warm-up pass, then the mean of three timed passes; with glibc's defaults (the reference path) and
with :func:`imgtune.allocator.tune` called first. Prints seconds per batch and the ratio.

    python bench/allocator.py
"""

from __future__ import annotations

import subprocess
import sys

from common import ROOT

CHILD = """
import sys, time, torch
sys.path.insert(0, {src!r})
if {tuned}:
    from imgtune import allocator
    assert allocator.tune(), "glibc only"
from imgtune import models
from imgtune.config import ModelConfig
model = models.create(ModelConfig(name="mobilenet_v2"), 2, offline=True).model.to(memory_format=torch.channels_last)
model.eval()
x = torch.randn(32, 3, 224, 224).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    model(x)
    start = time.perf_counter()
    for _ in range(3):
        model(x)
print((time.perf_counter() - start) / 3)
"""


def seconds(tuned: bool) -> float:
    code = CHILD.format(src=str(ROOT / "src"), tuned=tuned)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    default, tuned = seconds(False), seconds(True)
    print(f"inference, batch 32 at 224 px: glibc defaults {default:.3f} s, thresholds raised {tuned:.3f} s "
          f"({default / tuned:.2f}x faster)")


if __name__ == "__main__":
    main()
