"""glibc's malloc set to keep large freed blocks for reuse, for the ``imgtune`` command (docs/performance.md).

PyTorch's CPU tensors come from ``malloc``. With glibc's defaults a block above the mmap threshold (128 KB,
raised as blocks are freed, but never above 32 MB) is a fresh ``mmap`` each time, and the activations of a
batch are larger than that (a 32-image batch at 224 px has 50-150 MB tensors in its first blocks): every
forward pass has the kernel fault in and zero those pages again. Measured on this project's 2-core machine
(mobilenet_v2, channels-last, batch 32 at 224 px, inference): 0.55-0.61 s a batch with the defaults,
0.22-0.24 s with the threshold raised; the unfrozen epochs of the default hymenoptera run went from 8-10 s
to 5-6 s. With the defaults the same process ran inference twice as fast only after its first backward
pass, which had raised the threshold as a side effect; the time plan had timed validation before that.

:func:`tune` raises the mmap and trim thresholds to 2 GB (``mallopt``), so blocks below that come from the
heap and are reused. The cost is memory: what the process frees is kept for it rather than returned to the
system while it runs, and the heap fragments; the default hymenoptera run peaked at 4.8 GB resident against
3.9 GB untuned. Only the command does this (``imgtune.cli``),
not ``import imgtune``: a library does not change its host's allocator. It is skipped off glibc, when the
user set glibc's own variables (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``
or ``GLIBC_TUNABLES``), or with ``IMGTUNE_MALLOC=default``.

Python's cyclic garbage collector, for a process that ends with the command (the ``imgtune`` console
script, ``imgtune.cli.run``; not :func:`imgtune.cli.main`, which tests and other programs call in their own
processes). :func:`collect_for_command` raises the first generation's threshold from 700 to
:data:`GEN0_THRESHOLD` allocations: loading torch, torchvision, timm and scikit-learn ran 1,094 young and 7
full collections, 0.5-0.6 s of a 4.8 s start-up here, against 84 and none. Full collections still run
(after 10 x 10 young ones, and CPython's own rule that the survivors have grown by a quarter), so a
long-running ``imgtune serve`` keeps freeing cyclic garbage. :func:`before_exit` freezes what is alive
(``gc.freeze``) when the command has returned: the interpreter's last collection at shutdown then does not
walk the million objects of the loaded libraries, which took 1.1-1.4 s of every torch-loading command
here (measured: a default hymenoptera run exited 1.3 s after its last line). Objects still alive at that
point were never promised a collection; ``atexit`` handlers, ``weakref.finalize`` (temporary folders) and
logging's flush run as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
THRESHOLD = 2**31 - 1  # mallopt takes an int
GEN0_THRESHOLD = 10_000  # young objects between collections (CPython's default: 700)
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def tune() -> bool:
    """Raise glibc's mmap and trim thresholds in this process (and the processes it forks); whether it did."""
    if os.environ.get("IMGTUNE_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    if any(name in os.environ for name in USER_SETTINGS):
        return False  # the user's own malloc settings win
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl has mallopt but not these settings
    except (OSError, AttributeError):
        return False
    done = libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD) == 1
    log.debug("glibc malloc thresholds raised to %d bytes: %s", THRESHOLD, done)
    return done


def collect_for_command() -> None:
    """Fewer young-generation collections in the command's process (see the module's docstring)."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, middle, old)


def before_exit() -> None:
    """Spare the interpreter's shutdown a walk over every object still alive: the process is ending."""
    gc.freeze()
