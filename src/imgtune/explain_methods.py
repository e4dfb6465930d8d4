"""Attributions beside the CAM family, each from a maintained library: integrated gradients and occlusion
(Captum), LIME (``lime``'s ``lime_image``) and Kernel SHAP (``shap``'s ``KernelExplainer``), the last two
over scikit-image SLIC superpixels.

Every method works on the model's view (the normalised centre crop, as :func:`imgtune.explain.model_input`
makes it) and returns a signed attribution per pixel of that view: positive = evidence for the class.
What is "removed" is the same for all of them: the preprocessing's mean colour, i.e. zeros in the
normalised space (the integrated-gradients baseline, the occlusion patch, LIME's hidden superpixels and
SHAP's background). Gradients: integrated gradients of the class logit (the softmax saturates); the
perturbation methods score the class probability, as the deletion and insertion curves of
:mod:`imgtune.explain_eval` do.

Defaults are sized for a CPU: at 224 px, MobileNetV2 on 2 cores takes a few seconds per image for
integrated gradients and occlusion and well under 20 s for LIME and SHAP (figures in docs/report.md).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .data.transforms import Preprocessing
from .errors import UsageError

log = logging.getLogger(__name__)

METHODS = ("integrated-gradients", "occlusion", "lime", "kernel-shap")
SLOW = ("lime", "kernel-shap")  # a few hundred forward passes per image
LIBRARIES = {"integrated-gradients": "captum.attr", "occlusion": "captum.attr", "lime": "lime.lime_image",
             "kernel-shap": "shap"}


@dataclass(frozen=True)
class AttributionSettings:
    """How much work each method does per image (the CPU-sized defaults) and its seed."""

    steps: int = 32  # integrated gradients: points on the path from the baseline
    superpixels: int = 50  # LIME and SHAP: SLIC segments asked for
    samples: int = 200  # LIME and SHAP: perturbed images scored
    occlusion_window: float = 1 / 7  # occlusion: side of the square patch, as a fraction of the input
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "superpixels", "samples", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not 0 < self.occlusion_window <= 1:
            raise UsageError(f"occlusion window must be a fraction of the input in (0, 1], not {self.occlusion_window}")


def attribute(model: nn.Module, preprocessing: Preprocessing, batch: torch.Tensor, class_index: int, method: str,
              settings: AttributionSettings = AttributionSettings()) -> np.ndarray:
    """Signed attribution (height, width) of the first image of ``batch`` (normalised, the model's view) for
    ``class_index``; the model is left in eval mode as it was."""
    if method not in METHODS:
        raise UsageError(f"unknown attribution method {method!r}; use one of {', '.join(METHODS)}")
    import_library(method)
    param = next(model.parameters())
    image = batch[:1].to(param.device, param.dtype)
    was_training = model.training
    model.eval()
    try:
        return _FUNCTIONS[method](model, preprocessing, image, class_index, settings).astype(np.float32)
    finally:
        model.train(was_training)


def import_library(method: str) -> None:
    """Import the method's library now (seconds for shap), so that it is not counted in the method's time;
    without the ``explain`` extra, an error that says how to install it."""
    import importlib

    try:
        importlib.import_module(LIBRARIES[method])
        importlib.import_module("skimage.segmentation")
    except ImportError as exc:
        raise UsageError(f"--method {method} needs {exc.name or LIBRARIES[method]}, which is not installed: "
                         "pip install 'imgtune[explain]' (captum, lime, shap, scikit-image), or use --method "
                         "gradcam, which needs none of them") from exc


def to_heat(signed: np.ndarray, method: str) -> np.ndarray:
    """The heatmap of a signed attribution: its positive part (evidence for the class) scaled to [0, 1].
    Integrated gradients are per pixel and a handful of pixels would take the whole colour range, so they
    are scaled to their 99th percentile and clipped above (the order of the pixels is kept)."""
    positive = np.nan_to_num(np.maximum(signed, 0)).astype(np.float32)
    if not positive.any():
        return positive
    top = float(np.percentile(positive[positive > 0], 99)) if method == "integrated-gradients" else positive.max()
    return np.clip(positive / top, 0, 1)


def probabilities(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Softmax of ``model`` over ``images`` (on the model's device), in batches, without gradients."""
    param = next(model.parameters())
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size].to(param.device, param.dtype)
            out.append(torch.softmax(model(chunk).float(), dim=1).cpu())
    return torch.cat(out)


def _integrated_gradients(model, _pre, image, class_index, settings) -> np.ndarray:
    from captum.attr import IntegratedGradients

    found = IntegratedGradients(model).attribute(image, baselines=torch.zeros_like(image), target=class_index,
                                                 n_steps=settings.steps, internal_batch_size=settings.batch_size)
    return found[0].sum(dim=0).detach().float().cpu().numpy()


def _occlusion(model, _pre, image, class_index, settings) -> np.ndarray:
    from captum.attr import Occlusion

    side = image.shape[-1]
    window = max(1, round(side * settings.occlusion_window))
    stride = max(1, window // 2)
    found = Occlusion(lambda x: torch.softmax(model(x), dim=1)).attribute(
        image, sliding_window_shapes=(3, window, window), strides=(3, stride, stride), baselines=0.0,
        target=class_index, perturbations_per_eval=settings.batch_size)
    return found[0].sum(dim=0).detach().float().cpu().numpy()


def superpixels(rgb: np.ndarray, count: int) -> np.ndarray:
    """SLIC segments (labels from 0) of an (height, width, 3) RGB image in [0, 1]."""
    from skimage.segmentation import slic

    return slic(rgb, n_segments=count, compactness=10, start_label=0, channel_axis=-1)


def _rgb(image: torch.Tensor, preprocessing: Preprocessing) -> np.ndarray:
    """The normalised (1, 3, H, W) view back in RGB [0, 1], (H, W, 3), for segmenting."""
    mean = torch.tensor(preprocessing.mean).view(3, 1, 1)
    std = torch.tensor(preprocessing.std).view(3, 1, 1)
    return (image[0].detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy().astype(np.float64)


def _scorer(model: nn.Module, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """Images (n, H, W, 3) in the normalised space -> class probabilities (n, classes)."""
    def score(images: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
        return probabilities(model, tensor, batch_size).numpy().astype(np.float64)
    return score


def _lime(model, pre, image, class_index, settings) -> np.ndarray:
    from lime.lime_image import LimeImageExplainer

    rgb = _rgb(image, pre)
    segments = superpixels(rgb, settings.superpixels)
    view = image[0].detach().float().cpu().permute(1, 2, 0).numpy().astype(np.float64)
    found = LimeImageExplainer(random_state=settings.seed).explain_instance(
        view, _scorer(model, settings.batch_size), labels=(class_index,), top_labels=None, hide_color=0.0,
        num_samples=settings.samples, batch_size=settings.batch_size, segmentation_fn=lambda _: segments,
        random_seed=settings.seed)
    weights = np.zeros(int(segments.max()) + 1)
    for segment, weight in found.local_exp[class_index]:
        weights[segment] = weight
    return weights[segments]


def _kernel_shap(model, pre, image, class_index, settings) -> np.ndarray:
    import shap

    logging.getLogger("shap").setLevel(logging.WARNING)  # it logs every coalition weight at INFO
    segments = torch.from_numpy(superpixels(_rgb(image, pre), settings.superpixels))
    count = int(segments.max()) + 1

    def score(masks: np.ndarray) -> np.ndarray:  # (n, segments) of 0/1 -> the class's probability
        keep = torch.from_numpy(np.asarray(masks, dtype=np.float32))[:, segments]  # (n, H, W)
        images = image.detach().float().cpu() * keep[:, None]
        return probabilities(model, images, settings.batch_size)[:, class_index].numpy().astype(np.float64)

    with _seeded(settings.seed):
        explainer = shap.KernelExplainer(score, np.zeros((1, count)))
        values = explainer.shap_values(np.ones((1, count)), nsamples=settings.samples, l1_reg=False, silent=True)
    return np.asarray(values, dtype=np.float64).reshape(-1)[:count][segments.numpy()]


@contextlib.contextmanager
def _seeded(seed: int):
    """``shap`` samples coalitions from NumPy's global generator: seed it, then give the caller's state back."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


_FUNCTIONS = {"integrated-gradients": _integrated_gradients, "occlusion": _occlusion, "lime": _lime,
              "kernel-shap": _kernel_shap}
