"""``imgtune explain --evaluate`` (:mod:`imgtune.explain_eval`): deletion and insertion curves on a
hand-built model whose class is decided by one known patch, the model-randomisation sanity check (an
edge detector, which never looks at the model, must be flagged), the command's files, the report's
table, and the command's errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from datagen import write_unreadable
from imgtune import explain, explain_eval
from imgtune.cli import main
from imgtune.metrics import bootstrap_mean_ci
from test_explain import PRE, colour_model, patch_image, run  # noqa: F401 (run: the trained tiny run)

RED = (4, 4, 20, 20)


def red_case() -> tuple[torch.nn.Module, torch.Tensor, np.ndarray]:
    """The colour model, an image whose only evidence is a red patch, and a map that is 1 on the patch."""
    image = patch_image(((250, 0, 0), RED))
    mask = np.zeros((64, 64), dtype=np.float32)
    mask[RED[1]:RED[3], RED[0]:RED[2]] = 1.0
    return colour_model(), explain.model_input(image, PRE), mask


def test_deleting_the_deciding_patch_first_drops_the_probability_fastest():
    model, batch, mask = red_case()
    rng = np.random.default_rng(0)
    first, _ = explain_eval.curves(model, batch, 0, explain_eval.cell_order(mask, 16, rng), 16, 16)
    last, _ = explain_eval.curves(model, batch, 0, explain_eval.cell_order(1 - mask, 16, rng), 16, 16)
    randoms = [explain_eval.curves(model, batch, 0, rng.permutation(256), 16, 16) for _ in range(5)]
    assert first[0] == pytest.approx(last[0]) and first[0] > 0.99  # the untouched image
    assert first[1] == pytest.approx(0.5, abs=0.01)  # the patch (16 of 256 cells) gone after one step
    assert first[1] < min(r[0][1] for r in randoms) and last[1] > 0.99
    random_auc = np.mean([explain_eval.auc(r[0]) for r in randoms])
    assert explain_eval.auc(first) < random_auc < explain_eval.auc(last)
    _, insertion = explain_eval.curves(model, batch, 0, explain_eval.cell_order(mask, 16, rng), 16, 16)
    assert insertion[1] > 0.99 and explain_eval.auc(insertion) > np.mean([explain_eval.auc(r[1]) for r in randoms])


def test_a_method_map_beats_the_random_ordering_on_deletion():
    model, batch, _ = red_case()
    explainer = explain.Explainer(model, ["red", "blue"], PRE)
    loaded = [explain_eval.Loaded("red.png", batch, 0, 1.0)] * 3
    settings = explain_eval.EvalSettings(sanity_images=1, n_boot=200)
    summary = explain_eval.summarise(explain_eval.evaluate_methods(explainer, loaded, ["gradcam"], settings),
                                     settings)
    found = summary["methods"]["gradcam"]
    assert found["images"] == 3 and found["deletion_auc"]["mean"] < found["random_deletion_auc"]["mean"]
    assert found["deletion_gain"]["mean"] > 0 and found["insertion_gain"]["mean"] > 0
    assert len(found["deletion_curve"]) == settings.steps + 1 and set(found["sanity"]["stages"]) == set(
        explain_eval.STAGES)


def edge_detector(_model, batch: torch.Tensor, _class_index: int) -> np.ndarray:
    """Sobel edges of the image: an "explanation" that never looks at the model."""
    from scipy import ndimage

    grey = batch[0].mean(dim=0).numpy()
    return np.hypot(ndimage.sobel(grey, 0), ndimage.sobel(grey, 1))


def test_the_randomisation_check_flags_an_edge_detector_as_model_independent():
    model, _, _ = red_case()
    images = [patch_image(((250, 0, 0), (x, 8, x + 16, 24)), ((0, 0, 250), (40, 40, 56, 56))) for x in (4, 20)]
    loaded = [explain_eval.Loaded(f"{i}.png", explain.model_input(im, PRE), 0, 1.0) for i, im in enumerate(images)]
    correlations = explain_eval.sanity(edge_detector, model, loaded)
    assert all(rho == pytest.approx(1.0) for values in correlations.values() for rho in values)
    summary = explain_eval.sanity_summary(correlations, n_boot=100)
    assert summary["passed"] is False and "model-independent" in summary["verdict"]

    def from_model(model, batch, class_index):  # input x gradient of the class logit: changes with the model
        batch = batch.clone().requires_grad_(True)
        model(batch)[0, class_index].backward()
        return (batch.grad * batch).sum(dim=1)[0].clamp(min=0).detach().numpy()

    assert explain_eval.sanity_summary(explain_eval.sanity(from_model, model, loaded), n_boot=100)["passed"]


def test_randomised_copies_reset_the_head_then_the_top_blocks():
    model = colour_model()
    head, top = explain_eval.randomised(model, "head"), explain_eval.randomised(model, "top blocks")
    assert not torch.equal(head.head[2].weight, model.head[2].weight)
    assert torch.equal(head.body[2].weight, model.body[2].weight)  # the body is kept at the first stage
    assert not torch.equal(top.body[2].weight, model.body[2].weight)  # the last conv: the top third
    assert torch.equal(top.body[0].weight, model.body[0].weight)
    assert torch.equal(model.head[2].weight, torch.eye(2) * 20)  # the original is untouched


def test_rank_correlation_and_bootstrap_mean_interval():
    heat = np.random.default_rng(0).random((64, 64))
    assert explain_eval.rank_correlation(heat, heat * 2) == pytest.approx(1.0)
    assert explain_eval.rank_correlation(heat, -heat) == pytest.approx(-1.0)
    assert explain_eval.rank_correlation(np.zeros((8, 8)), heat[:8, :8]) == 0.0
    low, high = bootstrap_mean_ci(np.arange(100.0), n_boot=500)
    assert low < 49.5 < high and high - low < 20
    assert np.isnan(bootstrap_mean_ci(np.array([]))).all()


def test_explain_new_methods_json_gives_seconds_and_the_attribution_grid(run, tmp_path, capsys):
    out, data = run
    image = next((data / "val" / "red_circle").glob("*.png"))
    bad = write_unreadable(tmp_path / "broken.png")
    assert main(["explain", str(out), str(image), str(bad), "--method", "occlusion", "kernel-shap", "--samples", "30",
                 "--grid", "4", "--out", str(tmp_path / "x"), "--format", "json"]) == 3
    good, broken = json.loads(capsys.readouterr().out)
    assert set(good["files"]) == set(good["seconds"]) == set(good["grids"]) == {"occlusion", "kernel-shap"}
    assert all(np.asarray(g).shape == (4, 4) for g in good["grids"].values()) and len(good["crop"]) == 4
    assert all(Path(p).is_file() for p in good["files"].values())
    assert "error" in broken and "files" not in broken


@pytest.mark.slow
def test_evaluate_writes_json_and_page_and_the_report_shows_the_table(run, capsys):
    out, _ = run
    assert main(["explain", str(out), "--evaluate", "--images", "3", "--slow-images", "2", "--sanity-images", "2",
                 "--methods", "gradcam", "lime", "--samples", "30"]) == 0
    assert "written:" in capsys.readouterr().out
    found = json.loads((out / "explain_eval.json").read_text())
    assert list(found["methods"]) == ["gradcam", "lime"] and len(found["images"]) == 3
    for name, images in (("gradcam", 3), ("lime", 2)):
        entry = found["methods"][name]
        assert entry["images"] == images and entry["seconds_per_image"] > 0
        for key in ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc"):
            low, high = entry[key]["ci95"]
            assert 0 <= low <= entry[key]["mean"] <= high <= 1
        assert set(entry["sanity"]["stages"]) == {"head", "top blocks"}
        assert len(entry["sanity"]["stages"]["head"]["per_image"]) == 2
    html = (out / "explain_eval.html").read_text()
    assert "deletion AUC" in html and html.count("data:image/jpeg") == 3 + 2  # gallery: gradcam on 3 images, lime on 2
    assert main(["-q", "report", str(out)]) == 0
    report = (out / "report.html").read_text()
    assert "Which explanation reflects the model?" in report and 'href="explain_eval.html"' in report


def test_evaluate_and_explain_errors(run, tmp_path, capsys):
    out, data = run
    assert main(["explain", str(out), str(data), "--evaluate", str(data)]) == 2
    assert "at most one DATA folder" in capsys.readouterr().err
    assert main(["explain", str(out)]) == 2
    assert "IMAGE" in capsys.readouterr().err
    assert main(["explain", str(out), "--evaluate", "--images", "0"]) == 2
    assert main(["explain", str(out), "--evaluate", str(tmp_path / "missing")]) == 3
    assert not (tmp_path / "explain_eval.json").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", str(out), "--evaluate", "--methods", "saliency"])
    assert exit_info.value.code == 2
