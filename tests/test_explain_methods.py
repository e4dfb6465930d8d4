"""The attribution methods beside the CAM family (:mod:`imgtune.explain_methods`): on a hand-built model
whose class is decided by one known patch, each puts most of its attribution on that patch; settings and
method names are checked before any work."""

from __future__ import annotations

import numpy as np
import pytest

from imgtune import explain, explain_methods
from imgtune.errors import UsageError
from imgtune.explain_methods import AttributionSettings
from test_explain import PRE, colour_model, heat_share, patch_image

RED, BLUE = (4, 4, 20, 20), (44, 40, 60, 56)
FAST = AttributionSettings(samples=100, superpixels=40, steps=16)


def hottest_inside(heat: np.ndarray, box: tuple[int, int, int, int]) -> bool:
    row, column = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return box[0] <= column < box[2] and box[1] <= row < box[3]


@pytest.mark.parametrize("method", explain_methods.METHODS)
def test_every_new_method_puts_most_attribution_on_the_deciding_patch(method):
    image = patch_image(((250, 0, 0), RED), ((0, 0, 250), BLUE))
    explainer = explain.Explainer(colour_model(), ["red", "blue"], PRE, FAST)
    probs, (red,) = explainer.explain(image, (method,), class_index=0)
    _, (blue,) = explainer.explain(image, (method,), class_index=1)
    for found, box, other in ((red, RED, BLUE), (blue, BLUE, RED)):
        assert found.heatmap.shape == (64, 64) and found.heatmap.dtype == np.float32
        assert 0.0 <= found.heatmap.min() and found.heatmap.max() == pytest.approx(1.0)
        assert heat_share(found.heatmap, box) > 0.5  # the patch is 6% of the image
        assert heat_share(found.heatmap, other) < 0.05  # the other class's patch is no evidence
        assert hottest_inside(found.heatmap, box)
        assert found.seconds > 0
    assert probs.shape == (2,) and abs(probs.sum() - 1) < 1e-5


def test_signed_attribution_is_negative_on_the_other_class_patch():
    """Occlusion of the blue patch raises the probability of red: negative evidence, dropped from the heatmap."""
    image = patch_image(((250, 0, 0), RED), ((0, 0, 250), BLUE))
    batch = explain.model_input(image, PRE)
    signed = explain_methods.attribute(colour_model(), PRE, batch, 0, "occlusion", FAST)
    assert signed[44:56, 48:56].mean() < 0 < signed[8:16, 8:16].mean()


def test_integrated_gradients_heat_is_scaled_to_its_99th_percentile():
    signed = np.ones((40, 40), dtype=np.float32)
    signed[0, 0] = 100.0  # one outlier pixel would leave everything else dark
    heat = explain_methods.to_heat(signed, "integrated-gradients")
    assert heat[0, 0] == 1.0 and heat[5, 5] == pytest.approx(1.0)
    assert explain_methods.to_heat(signed, "occlusion")[5, 5] == pytest.approx(0.01)
    assert not explain_methods.to_heat(-signed, "lime").any()  # no positive evidence: all zero


def test_unknown_method_and_bad_settings_are_refused_before_any_work():
    explainer = explain.Explainer(colour_model(), ["red", "blue"], PRE)
    with pytest.raises(UsageError, match="unknown explanation method 'saliency'.*kernel-shap"):
        explainer.explain(patch_image(), ("gradcam", "saliency"))
    with pytest.raises(UsageError, match="samples must be at least 1"):
        AttributionSettings(samples=0)
    with pytest.raises(UsageError, match="occlusion window"):
        AttributionSettings(occlusion_window=1.5)


def test_attribution_grid_pools_the_view():
    heat = np.zeros((64, 64), dtype=np.float32)
    heat[:32, :32] = 1.0
    assert explain.pool(heat, 2).tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert explain.pool(heat, 0) is heat
    assert np.asarray(explain.pool(heat, 3)).shape == (3, 3)


def test_a_missing_library_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lime.lime_image", None)  # as if lime were not installed
    with pytest.raises(UsageError, match=r"pip install 'imgtune\[explain\]'.*--method gradcam"):
        explain.Explainer(colour_model(), ["red", "blue"], PRE).explain(patch_image(), ("lime",))
