"""Models by name from timm and torchvision (and imgtune's own small CNN), split into a *body* that
turns an image into a feature vector and a *head* that turns features into class scores.

``timm:NAME`` and ``torchvision:NAME`` pick a library; a bare name goes to timm when timm knows it,
else torchvision, else imgtune (``small_cnn``). The body/head split is what the transfer strategies
freeze and unfreeze, what gets the lower learning rate, and what a feature cache stores.
"""

from __future__ import annotations

import copy
import difflib
import logging
from dataclasses import dataclass

import torch
from torch import nn

from . import weights as weights_lib
from .config import ModelConfig
from .data.transforms import Preprocessing
from .errors import ModelError

log = logging.getLogger(__name__)

LIBRARIES = ("timm", "torchvision", "imgtune")


@dataclass(frozen=True)
class ModelSpec:
    library: str
    name: str

    def __str__(self) -> str:
        return f"{self.library}:{self.name}"


class SmallCNN(nn.Module):
    """Baseline trained from scratch: three conv+BN+ReLU+max-pool blocks, then dense layers.

    Its ``classifier`` is the last dense layer, replaced by imgtune's head like any other model's."""

    def __init__(self, num_classes: int = 1000, widths: tuple[int, ...] = (32, 64, 128), hidden: int = 256,
                 norm: str = "batch", dropout: float = 0.5):
        super().__init__()
        blocks, channels = [], 3
        for width in widths:
            layer = nn.BatchNorm2d(width) if norm == "batch" else nn.GroupNorm(8, width)
            blocks += [nn.Conv2d(channels, width, 3, padding=1, bias=False), layer, nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*blocks)
        self.dense = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(channels * 16, hidden),
                                   nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dense(self.features(x)))


def small_cnn_gn() -> SmallCNN:
    """SmallCNN with group norm and no dropout: each image's output depends on no other image in the
    batch and on no random draw, so training it with N processes (each with 1/N of the batch) gives
    the same weights as one process, up to float rounding (``tests/test_distributed.py``)."""
    return SmallCNN(norm="group", dropout=0.0)


IMGTUNE_MODELS = {"small_cnn": SmallCNN, "small_cnn_gn": small_cnn_gn}


class FusedHead(nn.Module):
    """The pretrained classifier's outputs fed to the new head beside the features it was given."""

    def __init__(self, old_classifier: nn.Module, num_features: int, old_outputs: int, num_classes: int,
                 dropout: float):
        super().__init__()
        self.old = old_classifier
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(num_features + old_outputs, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.cat([features, self.old(features)], dim=1)))


class Classifier(nn.Module):
    """``head(body(x))``. While ``body_frozen`` the body stays in eval mode (batch-norm statistics fixed)
    and gets no gradients, so it is a pure feature extractor."""

    def __init__(self, body: nn.Module, head: nn.Module, num_features: int):
        super().__init__()
        self.body = body
        self.head = head
        self.num_features = num_features
        self.body_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def freeze_body(self, frozen: bool = True) -> None:
        self.body_frozen = frozen
        self.body.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if self.body_frozen:
            self.body.eval()
        return self


def resolve_spec(name: str) -> ModelSpec:
    """``timm:NAME`` / ``torchvision:NAME`` / ``imgtune:NAME`` or a bare name (timm, then torchvision)."""
    import timm
    import torchvision

    library, sep, bare = name.partition(":")
    if sep:
        if library not in LIBRARIES:
            raise ModelError(f"unknown model library {library!r} in {name!r}; use one of {', '.join(LIBRARIES)}")
        known = {"timm": timm.is_model, "torchvision": lambda n: n in torchvision.models.list_models(),
                 "imgtune": lambda n: n in IMGTUNE_MODELS}[library](bare)
        if not known:
            raise ModelError(f"{library} has no model named {bare!r}{_suggest(bare)}")
        return ModelSpec(library, bare)
    if timm.is_model(name):
        return ModelSpec("timm", name)
    if name in torchvision.models.list_models():
        return ModelSpec("torchvision", name)
    if name in IMGTUNE_MODELS:
        return ModelSpec("imgtune", name)
    raise ModelError(f"no model named {name!r} in timm, torchvision or imgtune{_suggest(name)}")


def _suggest(name: str) -> str:
    import timm
    import torchvision

    pool = timm.list_models() + torchvision.models.list_models() + list(IMGTUNE_MODELS)
    close = difflib.get_close_matches(name, pool, n=4, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def weights_entries(spec: ModelSpec) -> list[weights_lib.WeightsEntry]:
    if spec.library == "timm":
        return weights_lib.timm_entries(spec.name)
    if spec.library == "torchvision":
        return weights_lib.torchvision_entries(spec.name)
    return []


def default_preprocessing(spec: ModelSpec) -> Preprocessing:
    entries = weights_entries(spec)
    if entries:
        return entries[0].preprocessing
    if spec.library == "timm":
        import timm

        arch = timm.models.split_model_name_tag(spec.name)[0]
        cfg = timm.models.get_pretrained_cfg(arch)
        if cfg is not None:
            return weights_lib.timm_preprocessing(cfg.to_dict())
    return Preprocessing()


def build_base(spec: ModelSpec, resolved: weights_lib.ResolvedWeights | None,
               img_size: int | None = None) -> nn.Module:
    """The library's model with its original classifier, loaded with ``resolved`` weights if any.
    ``img_size`` reaches timm models whose layers depend on it (vision transformers)."""
    try:
        if spec.library == "timm":
            return _build_timm(spec, resolved, img_size)
        if spec.library == "torchvision":
            return _build_torchvision(spec, resolved)
        return IMGTUNE_MODELS[spec.name]()
    except ModelError:
        raise
    except RuntimeError as exc:  # shape or key mismatches from load_state_dict
        source = f" from {resolved.path}" if resolved else ""
        raise ModelError(f"cannot load weights{source} into {spec}: {str(exc).splitlines()[0]}") from exc


def _build_timm(spec: ModelSpec, resolved, img_size: int | None = None) -> nn.Module:
    if img_size is not None:
        try:  # ViT-style models fix their patch grid at build time (timm resamples position embeddings)
            return _create_timm(spec, resolved, {"img_size": img_size})
        except TypeError as exc:  # convolutional models take any size and have no such argument
            if "img_size" not in str(exc):
                raise
    return _create_timm(spec, resolved, {})


def _create_timm(spec: ModelSpec, resolved, kwargs: dict) -> nn.Module:
    import timm

    if resolved is None:
        return timm.create_model(spec.name, pretrained=False, **kwargs)
    state_dict = weights_lib.load_file(resolved.path)
    if resolved.convert is not None:
        state_dict = resolved.convert(state_dict, timm.create_model(spec.name, pretrained=False))
    name = resolved.entry.tag if resolved.entry else spec.name
    # timm's own loading path (its checkpoint filters), fed with the state dict we found
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"state_dict": state_dict, "source": ""},
                             **kwargs)


def _build_torchvision(spec: ModelSpec, resolved) -> nn.Module:
    import torchvision

    kwargs = {}
    if resolved is not None and spec.name in ("inception_v3", "googlenet"):
        kwargs = {"aux_logits": True, "transform_input": True, "init_weights": False}
    model = torchvision.models.get_model(spec.name, weights=None, **kwargs)
    if resolved is not None:
        state_dict = weights_lib.load_file(resolved.path)
        if resolved.convert is not None:
            state_dict = resolved.convert(state_dict, model)
        model.load_state_dict(state_dict)
    for attr in ("AuxLogits", "aux1", "aux2"):  # auxiliary classifiers only matter for their old training
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if hasattr(model, "aux_logits"):
        model.aux_logits = False
    return model


def split_base(base: nn.Module, spec: ModelSpec, body_kind: str) -> tuple[nn.Module, nn.Module]:
    """Cut the library model into (body, old classifier)."""
    if spec.library == "timm":
        old = copy.deepcopy(base.get_classifier())
        if body_kind == "conv":
            return nn.Sequential(_TimmTrunk(base), nn.AdaptiveAvgPool2d(1), nn.Flatten()), old
        base.reset_classifier(0)
        return base, old
    parent, attr, old = _last_linear(base, spec)
    if body_kind == "conv" and hasattr(base, "features"):
        extra = [nn.ReLU()] if spec.name.startswith("densenet") else []
        return nn.Sequential(base.features, *extra, nn.AdaptiveAvgPool2d(1), nn.Flatten()), old
    if body_kind == "conv":
        log.info("%s has no separate convolutional trunk; body 'conv' is the same as 'penultimate'", spec)
    setattr(parent, attr, nn.Identity())
    return base, old


class _TimmTrunk(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def _last_linear(model: nn.Module, spec: ModelSpec) -> tuple[nn.Module, str, nn.Linear]:
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = name
    if found is None:
        raise ModelError(f"{spec} has no fully connected classifier imgtune can replace; choose another model")
    parent_name, _, attr = found.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, attr, getattr(parent, attr)


def make_head(config: ModelConfig, num_features: int, num_classes: int, old: nn.Module) -> nn.Module:
    dropout = [nn.Dropout(config.dropout)] if config.dropout > 0 else []
    if config.head == "linear":
        return nn.Sequential(*dropout, nn.Linear(num_features, num_classes))
    if config.head == "mlp":
        return nn.Sequential(nn.Linear(num_features, config.head_hidden), nn.ReLU(inplace=True), *dropout,
                             nn.Linear(config.head_hidden, num_classes))
    old_outputs = _out_features(old)
    if old_outputs is None:
        raise ModelError("head 'fused' needs the model's pretrained linear classifier; this model has none")
    return FusedHead(old, num_features, old_outputs, num_classes, config.dropout)


def _out_features(module: nn.Module) -> int | None:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


@torch.no_grad()
def _feature_size(body: nn.Module, pre: Preprocessing) -> int:
    was_training = body.training
    body.eval()
    out = body(torch.zeros(1, 3, pre.img_size, pre.img_size))
    body.train(was_training)
    if out.dim() != 2:
        raise ModelError(f"the model's body gives features of shape {tuple(out.shape)}, not a vector; "
                         "try --body penultimate")
    return int(out.shape[1])


@dataclass
class BuiltModel:
    model: Classifier
    spec: ModelSpec
    preprocessing: Preprocessing
    weights: weights_lib.ResolvedWeights | None


def create(config: ModelConfig, num_classes: int, offline: bool = False,
           load_pretrained: bool | None = None) -> BuiltModel:
    """Build the classifier for ``num_classes`` from ``config``. ``load_pretrained=False`` builds the
    architecture only (to load a saved run's weights into)."""
    spec = resolve_spec(config.name)
    want_weights = config.pretrained if load_pretrained is None else load_pretrained
    resolved = None
    if want_weights:
        resolved = weights_lib.resolve(spec.library, weights_entries(spec), spec.name, config.weights, offline)
        log.info("weights for %s: %s (%s)", spec, resolved.path, resolved.source)
    pre = resolved.entry.preprocessing if resolved and resolved.entry else default_preprocessing(spec)
    if config.img_size:
        pre = pre.with_size(config.img_size)
    body, old = split_base(build_base(spec, resolved, config.img_size), spec, config.body)
    num_features = _feature_size(body, pre)
    head = make_head(config, num_features, num_classes, old)
    return BuiltModel(Classifier(body, head, num_features), spec, pre, resolved)
