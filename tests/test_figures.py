"""The data behind the report's figures, against values worked out by hand."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from imgtune import figures
from imgtune.metrics import confusion_matrix

PNG = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG)
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
        return image.size


def test_confusion_matrix_sums_and_row_normalisation():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])
    y_pred = np.array([0, 0, 1, 2, 1, 1, 2, 0, 0])
    matrix = confusion_matrix(y_true, y_pred, 4)  # class 3 has no images
    assert matrix.tolist() == [[2, 1, 1, 0], [0, 2, 0, 0], [2, 0, 1, 0], [0, 0, 0, 0]]
    assert matrix.sum() == len(y_true) and matrix.sum(axis=1).tolist() == [4, 2, 3, 0]
    shares = figures.normalise_rows(matrix)
    np.testing.assert_allclose(shares[0], [0.5, 0.25, 0.25, 0])
    np.testing.assert_allclose(shares[2], [2 / 3, 0, 1 / 3, 0])
    np.testing.assert_allclose(shares.sum(axis=1), [1, 1, 1, 0])


def test_top_confusions_most_images_first():
    matrix = np.array([[5, 1, 3], [0, 4, 0], [3, 2, 1]])
    found = figures.top_confusions(matrix, ["a", "b", "c"])
    assert [(c["true"], c["predicted"], c["count"]) for c in found] == [
        ("a", "c", 3), ("c", "a", 3), ("c", "b", 2), ("a", "b", 1)]
    assert found[0]["share_of_true"] == pytest.approx(3 / 9) and found[1]["share_of_true"] == pytest.approx(3 / 6)
    assert len(figures.top_confusions(matrix, ["a", "b", "c"], limit=2)) == 2
    assert figures.top_confusions(np.diag([3, 4]), ["a", "b"]) == []


def test_confusion_png_has_both_panels_and_grows_with_classes():
    small = png_size(figures.confusion_png(np.array([[3, 1], [0, 4]]), ["ant", "bee"], "t"))
    many = png_size(figures.confusion_png(np.eye(12, dtype=int) * 5, [f"c{i}" for i in range(12)], "t"))
    assert small[0] > small[1]  # two square panels side by side
    assert many[0] > small[0] and many[1] > small[1]


def test_roc_auc_by_hand_two_classes():
    # positives score 0.35 and 0.8, negatives 0.1 and 0.4: of the 4 (positive, negative) pairs, 3 are
    # ordered right -> AUC 0.75. AP: ranked 0.8 (+), 0.4 (-), 0.35 (+), 0.1 (-): (1 + 2/3) / 2
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    probs = np.stack([1 - scores, scores], axis=1)
    found = figures.roc_pr(np.array([0, 0, 1, 1]), probs, ["neg", "pos"])
    assert found["per_class"]["pos"]["roc_auc"] == pytest.approx(0.75)
    assert found["per_class"]["neg"]["roc_auc"] == pytest.approx(0.75)  # the same ranking, reversed
    assert found["per_class"]["pos"]["average_precision"] == pytest.approx((1 + 2 / 3) / 2)
    assert found["per_class"]["pos"]["positives"] == 2
    assert found["macro_over"] == 2 and found["micro_roc_auc"] is None
    png_size(found["png"])


def test_roc_perfect_three_classes_and_a_class_without_images():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    probs = np.full((6, 4), 0.1)
    probs[np.arange(6), y_true] = 0.7
    found = figures.roc_pr(y_true, probs, ["a", "b", "c", "absent"])
    assert [found["per_class"][c]["roc_auc"] for c in "abc"] == [1.0, 1.0, 1.0]
    assert found["per_class"]["absent"] == {"positives": 0, "roc_auc": None, "average_precision": None}
    assert found["macro_over"] == 3 and found["macro_roc_auc"] == 1.0 and found["micro_roc_auc"] == 1.0


def test_roc_forty_classes_draws_the_micro_average():
    rng = np.random.default_rng(0)
    y_true = np.repeat(np.arange(40), 3)
    logits = rng.normal(size=(120, 40))
    logits[np.arange(120), y_true] += 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    found = figures.roc_pr(y_true, probs, [f"class_{i}" for i in range(40)])
    assert found["macro_over"] == 40 and 0.7 < found["micro_roc_auc"] < 1
    png_size(found["png"])


def test_training_curves_across_phases_and_gaps():
    rows = [{"epoch": "1", "phase": "frozen", "train_loss": "0.9", "train_accuracy": "0.6", "val_loss": "0.7",
             "val_accuracy": "0.7", "val_macro_f1": "0.68"},
            {"epoch": "1", "phase": "full", "train_loss": "0.5", "train_accuracy": "0.8", "val_loss": "",
             "val_accuracy": "0.8", "val_macro_f1": "0.79"},
            {"epoch": "2", "phase": "full", "train_loss": "0.3", "train_accuracy": "0.9", "val_loss": "0.4",
             "val_accuracy": "0.9", "val_macro_f1": "0.9"}]
    width, height = png_size(figures.training_curves(rows))
    assert width > height
    assert figures.training_curves([]) is None


def test_nothing_to_draw_gives_a_png_without_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty legend used to warn "No artists with labels found"
        png_size(figures.training_curves([{"epoch": "1", "phase": "head", "train_loss": "", "val_loss": "n/a"}]))
        found = figures.roc_pr(np.zeros(4, dtype=int), np.full((4, 3), 1 / 3), ["a", "b", "c"])
    assert found["macro_over"] == 0 and found["macro_roc_auc"] is None and found["micro_roc_auc"] is None
    png_size(found["png"])


def test_confusion_png_takes_float_counts_and_shares_are_plain_floats():
    png_size(figures.confusion_png(np.array([[3.0, 1.0], [0.0, 4.0]]), ["ant", "bee"], "t"))  # read back from a CSV
    share = figures.top_confusions(np.array([[3, 1], [0, 4]]), ["ant", "bee"])[0]["share_of_true"]
    assert type(share) is float and share == 0.25


def test_reliability_png_with_and_without_a_temperature():
    from imgtune import calibration

    y = np.array([0, 1, 1, 0, 1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.55, 0.45], [0.3, 0.7]])
    table = calibration.reliability(probs, y).to_dict()
    scaled = calibration.reliability(calibration.scale(calibration.logits_from_probs(probs), 2.0), y).to_dict()
    assert png_size(figures.reliability_png(table, 0.1, "r")) == png_size(
        figures.reliability_png(table, 0.1, "r", scaled, 2.0))


def test_encoding_helpers_and_figures_are_closed():
    import base64

    import matplotlib.pyplot as plt

    from imgtune import encode

    before = len(plt.get_fignums())
    png_size(figures.confusion_png(np.array([[1, 0], [0, 1]]), ["a", "b"], "t"))
    assert len(plt.get_fignums()) == before
    image = Image.new("RGB", (6, 4), (10, 200, 30))
    assert png_size(encode.image_png(image)) == (6, 4)
    jpeg = encode.image_jpeg(image, quality=80)
    assert jpeg.startswith(b"\xff\xd8") and encode.image_jpeg(image.convert("RGBA")).startswith(b"\xff\xd8")
    uri = encode.data_uri(jpeg, "image/jpeg")
    assert uri.startswith("data:image/jpeg;base64,") and base64.b64decode(uri.split(",", 1)[1]) == jpeg
    assert encode.data_uri(None) is None


def test_only_encode_turns_pictures_into_bytes():
    """Image and figure encoding lives in imgtune.encode alone (it had been written six times over)."""
    import re
    from pathlib import Path

    import imgtune

    package = Path(imgtune.__file__).parent
    pattern = re.compile(r"\bbase64\b|\.savefig\(|\.save\(\s*(buffer|io\.BytesIO)")
    offenders = [str(p.relative_to(package)) for p in package.rglob("*.py")
                 if p.name != "encode.py" and pattern.search(p.read_text())]
    assert offenders == []
