"""Data-parallel training on PyTorch's own engine: ``torchrun --nproc_per_node=N -m imgtune train ...``.

torchrun starts N processes and tells each its ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; imgtune
then joins them in a process group (NCCL on GPUs, gloo on CPUs), and:
- rank 0 alone reads and checks the data, creates the run folder and writes every file, log line and
  progress bar; the others receive the checked data and the final config from it;
- ``--batch-size`` stays the *global* batch: each of N ranks takes ``batch_size / N`` images of the
  same seeded order (rank r takes items r, r+N, ...), so one step sees the same images as a single
  process would, and DistributedDataParallel averages the gradients;
- validation is split across ranks without padding and the predictions are gathered, so every image
  counts exactly once in the metrics, which all ranks then agree on (early stopping included);
- cached backbone features are computed once: each rank computes its share, then all read them.

Nothing here is used in a single process (``WORLD_SIZE`` unset or 1): every function is then a no-op.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
TIMEOUT_ENV = "IMGTUNE_DIST_TIMEOUT"  # seconds a rank may wait for the others (default 3600)


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_context = Context()


def current() -> Context:
    return _context


def quiet_rank() -> bool | None:
    """``disable`` for tqdm: progress bars on rank 0 only (None: tqdm decides, off when not a terminal)."""
    return None if _context.is_main else True


def on_main(function, *args, **kwargs):
    """Run ``function`` on rank 0 only and give its result (or raise its error) on every rank, so that
    an error there (e.g. a run folder that exists) stops all ranks instead of leaving them waiting."""
    if not _context.enabled:
        return function(*args, **kwargs)
    outcome = None
    if _context.is_main:
        try:
            outcome = ("ok", function(*args, **kwargs))
        except Exception as exc:  # re-raised below on every rank
            outcome = ("error", exc)
    kind, value = broadcast(outcome)
    if kind == "error":
        raise value
    return value


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 when not launched): for output after training."""
    return int(os.environ.get("RANK", "0"))


def launched() -> bool:
    """True in a process started by torchrun (or another launcher) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_name: str = "auto") -> Context:
    """Join the process group torchrun prepared; returns the context (single-process: the default)."""
    global _context
    if dist.is_initialized():  # the caller's own process group
        _context = Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                           int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())), dist.get_backend())
        return _context
    if not launched():
        return _context
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    gpu = device_name in ("auto", "cuda") and torch.cuda.is_available()
    backend = "nccl" if gpu else "gloo"
    if gpu:
        torch.cuda.set_device(local_rank)
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "3600")))
    dist.init_process_group(backend, timeout=timeout)
    _context = Context(rank, world, local_rank, local_world, backend)
    _set_threads(local_world)
    if rank != 0:  # one voice: rank 0 logs, the others only warn about themselves
        logging.getLogger("imgtune").setLevel(logging.WARNING)
    log.info("distributed: %d processes (%s backend), %d of them on this machine, %d CPU thread(s) each",
             world, backend, local_world, torch.get_num_threads())
    return _context


def _set_threads(local_world: int) -> None:
    """torchrun sets OMP_NUM_THREADS=1 for every rank when it is not set; the CPU ranks on one machine
    share its cores instead (``IMGTUNE_THREADS`` overrides)."""
    wanted = os.environ.get("IMGTUNE_THREADS")
    threads = int(wanted) if wanted else max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(threads)


@contextlib.contextmanager
def session(device_name: str = "auto"):
    """Join torchrun's process group for the duration (and leave it after), unless the caller already
    has one; a no-op in a single process."""
    owned = launched() and not dist.is_initialized()
    setup(device_name)
    try:
        yield current()
    finally:
        if owned:
            teardown()


def teardown() -> None:
    global _context
    if dist.is_initialized():
        dist.destroy_process_group()
    _context = Context()


def device_for(ctx: Context, device: torch.device) -> torch.device:
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def broadcast(value=None):
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not _context.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value) -> list:
    """Every rank's ``value``, in rank order, on every rank."""
    if not _context.enabled:
        return [value]
    out = [None] * _context.world
    dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    if _context.enabled:
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (a stop request seen by one rank stops all)."""
    if not _context.enabled:
        return flag
    tensor = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def sum_across(values: list[float]) -> list[float]:
    if not _context.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def _collective_device() -> torch.device:
    return torch.device("cuda", _context.local_rank) if _context.backend == "nccl" else torch.device("cpu")


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around the module being trained (identity in a single process)."""
    if not _context.enabled or not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Batch-norm statistics over the global batch where the backend supports it (NCCL); with gloo
    each rank normalises with its own share of the batch (as with any CPU DDP)."""
    if not _context.enabled or not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if _context.backend == "nccl":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    log.info("batch norm: gloo has no SyncBatchNorm; each rank normalises with its own %s of the batch",
             f"1/{_context.world}")
    return model
