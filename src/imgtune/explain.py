"""Where a run's model looks: class activation maps (Grad-CAM, Grad-CAM++ and others from the ``grad-cam``
package, ``pytorch_grad_cam``) as heatmaps and overlays.

Geometry: the model sees the centre crop of the image (shorter side resized to ``resize_size``, then a
square of ``img_size``). :func:`heatmap` returns the map on that view (``img_size`` x ``img_size``);
:func:`to_original` puts it back onto the original image's pixels, where the crop is the centred
square of side ``min(W, H) * img_size / resize_size``, and everything outside it gets zero heat (the
model never saw it). :func:`overlay` draws on the whole original image, dims what lies outside the crop
and outlines the crop.

Target layers (:func:`target_layer`): for ViT-style timm models (``blocks`` and ``num_prefix_tokens``)
the last block's first norm, with its tokens (class/prefix tokens dropped) reshaped into the patch
grid; for everything else the last module of the body whose output is a 4-D feature map, found by a
forward hook on a probe input (adaptive/global pooling excluded), i.e. the last convolutional stage.

Explanations need gradients through the unfused model, so they use ``Predictor.model``, never the
batch-norm-folded ``inference_model``.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from . import explain_methods
from .data.transforms import Preprocessing, eval_transform
from .errors import ModelError, UsageError
from .explain_methods import AttributionSettings

if TYPE_CHECKING:
    from .predict import Predictor

log = logging.getLogger(__name__)

# name -> class in pytorch_grad_cam; all weight the target layer's activations, with gradients (the first
# five) or with how the class score changes when each channel alone is kept (scorecam, no gradients)
CAM_METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM", "xgradcam": "XGradCAM",
               "layercam": "LayerCAM", "scorecam": "ScoreCAM"}
# every method: the CAM family, then Captum's, LIME and SHAP (explain_methods.py)
METHODS = (*CAM_METHODS, *explain_methods.METHODS)
# Grad-CAM: it passed the sanity check and beat random ordering on hymenoptera, and the methods that scored
# higher (LIME, Kernel SHAP, occlusion) did not do so significantly at 5-30 times its cost (docs/report.md,
# "Which method is the default")
DEFAULT_METHODS = ("gradcam",)
_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass(frozen=True)
class Layer:
    module: nn.Module
    name: str
    reshape: Callable[[torch.Tensor], torch.Tensor] | None = None


def target_layer(model: nn.Module, preprocessing: Preprocessing) -> Layer:
    """The layer the CAM methods read: the last block's norm of a ViT (tokens reshaped to the patch grid),
    else the last spatial 4-D feature map (permuted to channels-first when the model keeps it NHWC)."""
    body = getattr(model, "body", model)
    vit = _find_vit(body)
    if vit is not None:
        name, module = vit
        prefix = f"{name}." if name else ""
        return Layer(module.blocks[-1].norm1, f"{prefix}blocks.{len(module.blocks) - 1}.norm1",
                     _TokensToGrid(int(getattr(module, "num_prefix_tokens", 1))))
    name, module, channels_last = _last_feature_map(body, preprocessing, getattr(model, "num_features", None))
    return Layer(module, name, _nhwc_to_nchw if channels_last else None)


def _nhwc_to_nchw(features: torch.Tensor) -> torch.Tensor:
    return features.permute(0, 3, 1, 2)


def _find_vit(body: nn.Module) -> tuple[str, nn.Module] | None:
    for name, module in body.named_modules():
        if hasattr(module, "blocks") and hasattr(module, "num_prefix_tokens") and hasattr(module, "patch_embed"):
            return name, module
    return None


class _TokensToGrid:
    """(batch, tokens, channels) -> (batch, channels, rows, cols), prefix (class) tokens dropped."""

    def __init__(self, prefix_tokens: int):
        self.prefix_tokens = prefix_tokens

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, self.prefix_tokens:, :]
        side = int(round(patches.shape[1] ** 0.5))
        if side * side != patches.shape[1]:
            raise ValueError(f"{patches.shape[1]} patch tokens do not form a square grid")
        return patches.reshape(patches.shape[0], side, side, patches.shape[2]).permute(0, 3, 1, 2)


@torch.no_grad()
def _last_feature_map(body: nn.Module, preprocessing: Preprocessing,
                      num_features: int | None) -> tuple[str, nn.Module, bool]:
    """The last module whose output is a spatial 4-D map (rows and columns > 1: not a pooled 1x1),
    found by hooks on a probe input, and whether that map is channels-last (NHWC, as timm's Swin).

    Hooks fire when a module finishes, so the outermost module returning the final feature map comes
    last: that container (not a batch norm whose output an in-place activation later overwrites)."""
    found: list[tuple[str, torch.Size]] = []
    names = {module: name for name, module in body.named_modules()}

    def record(module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4 and not _is_global_pool(module):
            found.append((names[module], output.shape))

    handles = [m.register_forward_hook(record) for m in names if m is not body]
    was_training = body.training
    body.eval()
    try:
        param = next(body.parameters(), None)
        device = param.device if param is not None else "cpu"
        body(torch.zeros(1, 3, preprocessing.img_size, preprocessing.img_size, device=device))
    finally:
        body.train(was_training)
        for handle in handles:
            handle.remove()
    spatial = [(name, shape, _channels_last(shape, num_features)) for name, shape in found]
    spatial = [(name, last) for name, shape, last in spatial
               if min(shape[1:3] if last else shape[2:4]) > 1] or [(name, last) for name, _, last in spatial]
    if not spatial:
        raise ModelError("found no convolutional feature map in the model's body to explain")
    name, last = spatial[-1]
    return name, body.get_submodule(name), last


def _channels_last(shape: torch.Size, num_features: int | None) -> bool:
    return num_features is not None and shape[3] == num_features and shape[1] != num_features


def _is_global_pool(module: nn.Module) -> bool:
    return isinstance(module, _GLOBAL_POOLS) or type(module).__name__ == "SelectAdaptivePool2d"


def model_input(image: Image.Image, preprocessing: Preprocessing) -> torch.Tensor:
    """The (1, 3, img_size, img_size) tensor the model sees for ``image`` (the evaluation transform)."""
    return eval_transform(preprocessing)(image).unsqueeze(0)


def check_methods(methods) -> None:
    """Unknown names fail before any work, with the list to choose from."""
    for method in methods:
        if method not in METHODS:
            raise UsageError(f"unknown explanation method {method!r}; use one of {', '.join(METHODS)}")


def explain_tensor(model: nn.Module, preprocessing: Preprocessing, batch: torch.Tensor, class_index: int,
                   method: str = "gradcam", layer: Layer | None = None,
                   settings: AttributionSettings = AttributionSettings()) -> tuple[np.ndarray, np.ndarray]:
    """Heatmap (on the model's view, in [0, 1]) of the first image of ``batch`` for ``class_index``, and
    the model's class probabilities for that image. ``layer`` (CAM methods) defaults to
    :func:`target_layer`; ``settings`` sizes the other methods, whose signed attributions become heatmaps
    by :func:`imgtune.explain_methods.to_heat`."""
    check_methods((method,))
    if method not in CAM_METHODS:
        signed = explain_methods.attribute(model, preprocessing, batch, class_index, method, settings)
        probs = explain_methods.probabilities(model, batch[:1])[0].numpy()
        return explain_methods.to_heat(signed, method), probs
    return _cam(model, preprocessing, batch, class_index, method, layer)


def _cam(model: nn.Module, preprocessing: Preprocessing, batch: torch.Tensor, class_index: int, method: str,
         layer: Layer | None) -> tuple[np.ndarray, np.ndarray]:
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = layer or target_layer(model, preprocessing)
    was_training = model.training
    param = next(model.parameters())
    cam = getattr(pytorch_grad_cam, CAM_METHODS[method])(model, [layer.module], reshape_transform=layer.reshape)
    cam.compute_input_gradient = True  # the activations need gradients even where the body is frozen
    try:
        heat = cam(input_tensor=batch[:1].to(param.device, param.dtype),
                   targets=[ClassifierOutputTarget(class_index)])[0]
        probs = torch.softmax(cam.outputs.detach().float(), dim=1)[0].cpu().numpy()
    finally:
        cam.activations_and_grads.release()
        model.train(was_training)
    return _unit_range(heat), probs


def _unit_range(heat: np.ndarray) -> np.ndarray:
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float32))
    low, high = float(heat.min()), float(heat.max())
    if high - low < 1e-12:
        return np.zeros_like(heat)
    return (heat - low) / (high - low)


def crop_box(size: tuple[int, int], preprocessing: Preprocessing) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the model's centre crop in the original image's pixels, following
    torchvision's Resize (shorter side to ``resize_size``) and CenterCrop (``img_size``)."""
    width, height = size
    short, long = sorted((width, height))
    resized_long = int(preprocessing.resize_size * long / short)
    rw, rh = (preprocessing.resize_size, resized_long) if width <= height else (resized_long, preprocessing.resize_size)
    crop = preprocessing.img_size
    left, top = int(round((rw - crop) / 2.0)), int(round((rh - crop) / 2.0))
    sx, sy = width / rw, height / rh
    return left * sx, top * sy, (left + crop) * sx, (top + crop) * sy


def to_original(heat: np.ndarray, size: tuple[int, int], preprocessing: Preprocessing) -> np.ndarray:
    """The model-view heatmap on the original image's pixels (height, width); zero outside the crop."""
    width, height = size
    left, top, right, bottom = (int(round(v)) for v in crop_box(size, preprocessing))
    left, top, right, bottom = max(left, 0), max(top, 0), min(right, width), min(bottom, height)
    full = np.zeros((height, width), dtype=np.float32)
    if right > left and bottom > top:
        scaled = Image.fromarray(heat.astype(np.float32), mode="F").resize((right - left, bottom - top),
                                                                            Image.BILINEAR)
        full[top:bottom, left:right] = np.clip(np.asarray(scaled), 0, 1)
    return full


def overlay(image: Image.Image, heat: np.ndarray, preprocessing: Preprocessing | None = None,
            alpha: float = 0.5) -> Image.Image:
    """``heat`` in colour (matplotlib's jet) over ``image``. With ``preprocessing``, ``heat`` is on the
    model's view and is drawn over the whole original image: outside the crop dimmed, the crop outlined.
    Without it, ``heat`` must already have the image's size."""
    from matplotlib import colormaps

    image = image.convert("RGB")
    inside = None
    if preprocessing is not None:
        inside = crop_box(image.size, preprocessing)
        heat = to_original(heat, image.size, preprocessing)
    if heat.shape != (image.height, image.width):
        raise ValueError(f"heatmap of shape {heat.shape} for an image of {image.width}x{image.height}")
    colours = (colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255).astype(np.float32)
    pixels = np.asarray(image, dtype=np.float32)
    blended = pixels * (1 - alpha) + colours * alpha
    if inside is not None:
        mask = np.zeros(heat.shape, dtype=bool)
        left, top, right, bottom = (int(round(v)) for v in inside)
        mask[max(top, 0):bottom, max(left, 0):right] = True
        blended = np.where(mask[..., None], blended, pixels * 0.4)
    result = Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))
    if inside is not None:
        ImageDraw.Draw(result).rectangle([round(v) for v in inside], outline=(255, 255, 255),
                                         width=max(1, min(image.size) // 200))
    return result


@dataclass
class Explanation:
    method: str
    class_index: int
    class_name: str
    prob: float  # the model's probability of the explained class
    heatmap: np.ndarray  # on the model's view, [0, 1]
    seconds: float = 0.0  # how long the method took on this image


class Explainer:
    """A run's model (unfused, with gradients) and its preprocessing, for explaining images."""

    def __init__(self, model: nn.Module, classes: list[str], preprocessing: Preprocessing,
                 settings: AttributionSettings = AttributionSettings()):
        self.model = model.eval()
        self.classes = classes
        self.preprocessing = preprocessing
        self.settings = settings
        self._layer: Layer | None = None

    @classmethod
    def from_run(cls, path: str | Path, device: str = "auto",
                 settings: AttributionSettings = AttributionSettings()) -> "Explainer":
        from .predict import Predictor

        return cls.from_predictor(Predictor.from_run(path, device), settings)

    @classmethod
    def from_predictor(cls, predictor: "Predictor", settings: AttributionSettings = AttributionSettings()
                       ) -> "Explainer":
        """The predictor's own model (unfused, on its device): no second copy of the weights."""
        return cls(predictor.model, predictor.classes, predictor.preprocessing, settings)

    @property
    def layer(self) -> Layer:
        if self._layer is None:
            self._layer = target_layer(self.model, self.preprocessing)
        return self._layer

    def class_index(self, name: str) -> int:
        if name not in self.classes:
            raise UsageError(f"unknown class {name!r}; this run's classes are: {', '.join(self.classes)}")
        return self.classes.index(name)

    def prepare(self, method: str) -> None:
        """What a method needs once (its library imported, the CAM layer found): kept out of its timing."""
        if method in CAM_METHODS:
            importlib.import_module("pytorch_grad_cam")
            _ = self.layer
        else:
            explain_methods.import_library(method)

    def heatmap(self, batch: torch.Tensor, class_index: int, method: str) -> tuple[np.ndarray, np.ndarray]:
        """:func:`explain_tensor` with this explainer's layer and settings."""
        layer = self.layer if method in CAM_METHODS else None
        return explain_tensor(self.model, self.preprocessing, batch, class_index, method, layer, self.settings)

    def explain(self, image: Image.Image, methods: tuple[str, ...] = DEFAULT_METHODS,
                class_index: int | None = None) -> tuple[np.ndarray, list[Explanation]]:
        """Class probabilities and one explanation per method, for ``class_index`` (default: the
        predicted class)."""
        check_methods(methods)
        batch = model_input(image, self.preprocessing)
        probs = None
        if class_index is None:
            probs = explain_methods.probabilities(self.model, batch)[0].numpy()
            class_index = int(np.argmax(probs))
        found = []
        for method in methods:
            self.prepare(method)
            started = time.perf_counter()
            heat, probs = self.heatmap(batch, class_index, method)
            seconds = time.perf_counter() - started
            log.info("%s: %.2f s", method, seconds)
            found.append(Explanation(method, class_index, self.classes[class_index], float(probs[class_index]), heat,
                                     seconds))
        return probs, found


def pool(heat: np.ndarray, cells: int) -> np.ndarray:
    """``heat`` averaged over a ``cells`` x ``cells`` grid (rows top to bottom); unchanged when ``cells`` is 0
    or not smaller than the map."""
    if cells <= 0 or cells >= heat.shape[0]:
        return heat
    edges = np.linspace(0, heat.shape[0], cells + 1).round().astype(int)[:-1]
    sums = np.add.reduceat(np.add.reduceat(heat.astype(np.float64), edges, axis=0), edges, axis=1)
    sizes = np.diff(np.append(edges, heat.shape[0]))
    return sums / (sizes[:, None] * sizes[None, :])
