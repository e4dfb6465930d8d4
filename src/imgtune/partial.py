"""Partial fine-tuning on cached activations (``--unfreeze top:K``; docs/training.md).

Fine-tuning pays a forward and a backward pass of the whole backbone per image and epoch, although
most of it (the lower blocks) moves little. With ``top:K`` the lower blocks stay frozen (eval mode: their
batch-norm statistics fixed, no gradients) and their output for a few views of each training image is
computed once and stored (float16, in the cache folder, keyed like the feature cache: model, weights,
preprocessing, cut, views; bounded in size); the top ``K`` blocks and the head then train on those
activations, each epoch drawing one stored view per image. ``--unfreeze all`` is the full path.

``--unfreeze auto`` (the default) is :data:`AUTO_TOP` blocks for ``gradual`` on a CPU, where the
benchmark shows it as accurate as the full path and faster (docs/benchmarks.md), and ``all`` wherever
that evidence does not reach or ``top:K`` cannot run: another strategy, a GPU, torchrun, shards, a body
this module cannot cut below that many blocks, or a training split whose activations would not fit two
views within :data:`MAX_BYTES` (:func:`choose`). The choice is logged, saved in the run's config (so
a resume and ``--config RUN/config.yaml`` repeat it) and recorded in meta.json's ``unfreeze``.

The views: the evaluation view, its mirror image, then random resized crops (35-100% of the area, as
``--augment light``), each randomly mirrored, seeded by the file's content digest so that the same
image gives the same views in every run (that is what makes them cacheable).

Blocks, in the order they run: timm's ``model.blocks`` (stages flattened), torchvision's ``features``,
else the stages timm's ``feature_info`` names (``layer1`` ... of a ResNet). The lower part is run by
calling the body and stopping at the cut; the upper part by calling it on a one-image stand-in whose
activation at the cut is replaced by the stored one (a stand-in of :data:`STAND_IN` pixels a side, or of the
model's own size where the small one does not reproduce the output); a model for which neither does is
refused (:func:`split`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ModelError, UsageError
from .models import Classifier

log = logging.getLogger(__name__)

VIEWS = 4  # stored views per training image (the first two: the evaluation view and its mirror)
MAX_BYTES = 2 << 30  # the training split's activations, on disk and in memory, at most this (fewer views else)
AUTO = "auto"
AUTO_TOP = 3  # --unfreeze auto: the blocks that train (docs/benchmarks.md, "top:3 as the default")
AUTO_MIN_VIEWS = 2  # --unfreeze auto: top:K only where at least this many views of each image fit MAX_BYTES
STAND_IN = 32  # the side of the one-image stand-in the upper part runs the lower blocks on (Split.upper)


def top_blocks(unfreeze: str) -> int | None:
    """``--unfreeze`` as it runs (``auto`` resolved by :func:`choose`): None for ``all``, K for ``top:K``."""
    if unfreeze == "all":
        return None
    kind, _, count = unfreeze.partition(":")
    if kind != "top" or not count.isdigit() or int(count) < 1:
        raise UsageError(f"--unfreeze {unfreeze!r}: use auto (the default), all (every block trains) or top:K (the "
                         "top K blocks train on cached activations of the frozen lower blocks, K at least 1), e.g. "
                         "top:3")
    return int(count)


@dataclass(frozen=True)
class UnfreezeChoice:
    """What ``--unfreeze`` runs and why, for the log and meta.json."""

    unfreeze: str  # all or top:K
    method: str  # "flag" (given), "auto"
    reason: str

    def to_dict(self) -> dict:
        return {"unfreeze": self.unfreeze, "method": self.method, "reason": self.reason}


def choose(train, body: nn.Module, img_size: int, device: torch.device, streamed: bool,
           train_images: int) -> UnfreezeChoice:
    """``--unfreeze`` as it will run: a given value checked (:func:`check`), ``auto`` resolved (see the
    module's docstring). ``streamed``: the data is read as a stream (shards)."""
    if train.unfreeze != AUTO:
        check(train, body, img_size)
        return UnfreezeChoice(train.unfreeze, "flag", f"--unfreeze {train.unfreeze}")
    from .distributed import current

    top = f"top:{AUTO_TOP}"
    against = ("the strategy is not gradual" if train.strategy != "gradual" else
               f"the device is {device.type}, not a CPU" if device.type != "cpu" else
               "torchrun runs several processes" if current().enabled else
               "shards are read as a stream" if streamed else None)
    if against is None:
        try:
            found = split(body, AUTO_TOP, img_size)
        except (ModelError, UsageError) as error:
            against = f"the body cannot run {top} ({error})"
        else:
            from .activations import activation_shape, views_within

            if views_within(train_images, activation_shape(found), AUTO_MIN_VIEWS, MAX_BYTES) < AUTO_MIN_VIEWS:
                against = (f"{AUTO_MIN_VIEWS} views of {train_images} training images' activations would not fit "
                           f"{MAX_BYTES / 2**30:.0f} GiB")
    if against is not None:
        return UnfreezeChoice("all", AUTO, f"--unfreeze auto: all ({against})")
    return UnfreezeChoice(top, AUTO, f"--unfreeze auto: {top} (gradual on a CPU: the top {AUTO_TOP} blocks "
                                     "fine-tune on cached activations of the frozen lower blocks)")


def check(train, body: nn.Module, img_size: int) -> None:
    """Before anything is written: ``--unfreeze`` well formed, and where it is ``top:K``, a strategy that
    unfreezes, one process, and a body it can cut (:func:`split`)."""
    top = top_blocks(train.unfreeze)
    if top is None:
        return
    if train.strategy == "linear-probe":
        raise UsageError(f"--unfreeze {train.unfreeze}: linear-probe never unfreezes the backbone; use finetune or "
                         "gradual")
    from .distributed import current

    if current().enabled:
        raise UsageError(f"--unfreeze {train.unfreeze}: partial fine-tuning runs in one process; use --unfreeze all "
                         "with torchrun")
    split(body, top, img_size)


def blocks_of(body: nn.Module) -> list[nn.Module]:
    """The body's blocks in the order they run (a stage that is a plain ``nn.Sequential`` is flattened)."""
    root = body
    if isinstance(body, nn.Sequential) and hasattr(body[0], "model"):  # --body conv of a timm model
        root = body[0].model
    container = getattr(root, "blocks", None) or getattr(root, "features", None)
    if container is None and isinstance(body, nn.Sequential):  # --body conv of torchvision: (features, pool, ...)
        container = body[0]
    stages = list(container.children()) if container is not None else _feature_info_stages(root)
    return [block for stage in stages
            for block in (stage.children() if type(stage) is nn.Sequential else [stage])]


def _feature_info_stages(model: nn.Module) -> list[nn.Module]:
    info = getattr(model, "feature_info", None)
    names = [entry["module"] for entry in info] if isinstance(info, list) else []
    return [model.get_submodule(name) for name in names if isinstance(model.get_submodule(name), nn.Sequential)]


class _Stop(Exception):
    def __init__(self, output: torch.Tensor):
        self.output = output


@dataclass
class Split:
    """A body cut after ``blocks[cut]``: :meth:`lower` gives the activation there, :meth:`upper` the
    body's output from it. ``lower_modules``: every module that runs before the cut."""

    body: nn.Module
    blocks: list[nn.Module]
    cut: int
    img_size: int
    lower_modules: list[nn.Module]
    stand_in: int = 0  # the side of the image :meth:`upper` runs the lower part on (0: img_size)

    def lower(self, images: torch.Tensor) -> torch.Tensor:
        def stop(module, inputs, output):
            raise _Stop(output)

        handle = self.blocks[self.cut].register_forward_hook(stop)
        try:
            self.body(images)
        except _Stop as found:
            return found.output
        finally:
            handle.remove()
        raise ModelError("the body never ran the block it is cut after")

    def upper(self, activations: torch.Tensor) -> torch.Tensor:
        side = self.stand_in or self.img_size
        stand_in = torch.zeros(1, 3, side, side, device=activations.device)
        handle = self.blocks[self.cut].register_forward_hook(lambda module, inputs, output: activations)
        try:
            return self.body(stand_in)
        finally:
            handle.remove()

    def lower_module(self) -> "LowerPart":
        """:meth:`lower` as a module that a tracer can follow (e.g. to export it to ONNX)."""
        return LowerPart(self)

    def freeze_lower(self) -> None:
        for module in self.lower_modules:
            module.requires_grad_(False)
            module.eval()


class LowerPart(nn.Module):
    """:meth:`Split.lower` as a module. Traced (an ONNX export), the body runs whole and a hook keeps the
    activation at the cut: a tracer cannot follow the exception that stops the body early, and the
    exporter drops the unused upper part."""

    def __init__(self, found: Split):
        super().__init__()
        self.body, self.found = found.body, found

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing():
            return self.found.lower(images)
        kept: list[torch.Tensor] = []
        handle = self.found.blocks[self.found.cut].register_forward_hook(
            lambda module, inputs, output: kept.append(output))
        try:
            self.body(images)
        finally:
            handle.remove()
        return kept[0]


def split(body: nn.Module, top: int, img_size: int) -> Split:
    """Cut ``body`` below its top ``top`` blocks; refused where the blocks are not found, ``top`` is not
    below their number, or the two parts do not give the body's own output."""
    blocks = blocks_of(body)
    if len(blocks) < 2:
        raise ModelError(f"--unfreeze top:{top}: imgtune does not find the blocks of this model's body; use "
                         "--unfreeze all")
    if top >= len(blocks):
        raise UsageError(f"--unfreeze top:{top}: the body has {len(blocks)} blocks; K must be below that "
                         f"(top:{len(blocks) - 1} leaves only the first frozen), or use --unfreeze all")
    cut = len(blocks) - top - 1
    found = Split(body, blocks, cut, img_size, _modules_before(body, blocks[cut], img_size), STAND_IN)
    try:  # a small stand-in makes every call of upper() cheaper; a model that needs its own size gets it
        _check(found)
    except Exception:  # noqa: BLE001 - e.g. a ViT's patch embedding refuses another size
        found.stand_in = 0
        _check(found)
    return found


def _modules_before(body: nn.Module, last: nn.Module, img_size: int) -> list[nn.Module]:
    """The modules whose forward ends before ``last``'s does (``last`` included): the lower part."""
    finished: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda module, i, o: finished.append(module)) for m in body.modules()]
    try:
        with torch.no_grad():
            was = body.training
            body.eval()
            body(torch.zeros(1, 3, img_size, img_size))
            body.train(was)
    finally:
        for handle in handles:
            handle.remove()
    return finished[:next(i for i, m in enumerate(finished) if m is last) + 1]


@torch.no_grad()
def _check(found: Split) -> None:
    was = found.body.training
    found.body.eval()
    images = torch.randn(2, 3, found.img_size, found.img_size, generator=torch.Generator().manual_seed(0))
    try:
        whole, parts = found.body(images), found.upper(found.lower(images))
    finally:
        found.body.train(was)
    if whole.shape != parts.shape or not torch.allclose(whole, parts, rtol=1e-4, atol=1e-4):
        raise ModelError("--unfreeze top:K: this model's body does not run as its blocks one after another; "
                         "use --unfreeze all")


class PartialNet(nn.Module):
    """The top blocks and the head, on stored activations of the lower blocks (kept in eval mode)."""

    def __init__(self, model: Classifier, found: Split):
        super().__init__()
        self.model, self.found = model, found
        found.freeze_lower()

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.found.upper(activations))

    def train(self, mode: bool = True) -> "PartialNet":
        super().train(mode)
        for module in self.found.lower_modules:
            module.eval()
        return self
