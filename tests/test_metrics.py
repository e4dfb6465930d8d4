"""imgtune's numpy metrics give scikit-learn's numbers, including absent and never-predicted classes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from imgtune.metrics import classification_report, quick_metrics


@pytest.mark.parametrize("seed, n, classes", [(0, 50, 4), (1, 7, 6), (2, 300, 12), (3, 20, 2)])
def test_report_matches_scikit_learn(seed, n, classes):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, classes, n)
    y_true[y_true == classes - 1] = 0  # the last class never appears in y_true
    probs = rng.dirichlet(np.ones(classes), n)
    probs[np.arange(n) % 3 == 0, y_true[np.arange(n) % 3 == 0]] += 1.0  # some skill
    probs /= probs.sum(axis=1, keepdims=True)
    y_pred = probs.argmax(axis=1)
    labels = np.arange(classes)
    report = classification_report(y_true, probs, [f"c{i}" for i in labels])

    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    assert [report["per_class"][f"c{i}"]["precision"] for i in labels] == pytest.approx(p)
    assert [report["per_class"][f"c{i}"]["recall"] for i in labels] == pytest.approx(r)
    assert [report["per_class"][f"c{i}"]["f1"] for i in labels] == pytest.approx(f)
    assert [report["per_class"][f"c{i}"]["support"] for i in labels] == list(s)
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns that a predicted class is absent from y_true
        balanced = skm.balanced_accuracy_score(y_true, y_pred)
    assert report["balanced_accuracy"] == pytest.approx(balanced)
    assert report["macro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, labels=labels, average="macro",
                                                            zero_division=0))
    assert report["weighted_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, labels=labels, average="weighted",
                                                               zero_division=0))
    assert report["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    assert report["loss"] == pytest.approx(skm.log_loss(y_true, probs, labels=labels), rel=1e-6)
    for k in (3, 5):
        if k < classes:
            assert report[f"top{k}_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y_true, probs, k=k,
                                                                                        labels=labels))
    quick = quick_metrics(y_true, probs, classes)
    assert (quick["accuracy"], quick["macro_f1"]) == pytest.approx((report["accuracy"], report["macro_f1"]))

