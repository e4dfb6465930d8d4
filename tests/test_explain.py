"""``imgtune explain`` and :mod:`imgtune.explain`: target layers of each model family, heatmaps that point
at what a hand-built model responds to, the crop geometry, and the command's files and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from datagen import SCRATCH_ARGS, make_split_dataset, write_unreadable
from imgtune import explain, explain_eval, models
from imgtune.cli import main
from imgtune.cli import explain as explain_cli
from imgtune.config import ModelConfig
from imgtune.data.transforms import Preprocessing

PRE = Preprocessing(img_size=64, resize_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))  # grey 128 -> ~0


def colour_model() -> models.Classifier:
    """A classifier whose class 0 is "red pixels" and class 1 "blue pixels" (the mean of each channel's
    excess over the others): a CAM of class 0 must light up the red patch and nothing else."""
    conv = nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[2.0, -1.0, -1.0], [-1.0, -1.0, 2.0]])[:, :, None, None])
        conv.bias.zero_()
    body = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(2, 2, 1), nn.ReLU())
    with torch.no_grad():
        body[2].weight.copy_(torch.eye(2)[:, :, None, None])
        body[2].bias.zero_()
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():
        head[2].weight.copy_(torch.eye(2) * 20)
        head[2].bias.zero_()
    return models.Classifier(body, head, 2)


def patch_image(*patches: tuple[tuple[int, int, int], tuple[int, int, int, int]], size: int = 64) -> Image.Image:
    """Grey, with each (colour, (left, top, right, bottom)) patch painted."""
    pixels = np.full((size, size, 3), 128, dtype=np.uint8)
    for colour, (left, top, right, bottom) in patches:
        pixels[top:bottom, left:right] = colour
    return Image.fromarray(pixels)


def heat_share(heat: np.ndarray, box: tuple[int, int, int, int]) -> float:
    left, top, right, bottom = box
    return float(heat[top:bottom, left:right].sum() / heat.sum())


@pytest.mark.parametrize("method", list(explain.CAM_METHODS))
def test_every_method_points_at_the_patch_that_decides_the_class(method):
    image = patch_image(((250, 0, 0), (4, 4, 20, 20)), ((0, 0, 250), (44, 40, 60, 56)))
    explainer = explain.Explainer(colour_model(), ["red", "blue"], PRE)
    probs, (red,) = explainer.explain(image, (method,), class_index=0)
    _, (blue,) = explainer.explain(image, (method,), class_index=1)
    assert red.heatmap.shape == blue.heatmap.shape == (64, 64)
    assert 0.0 <= red.heatmap.min() and red.heatmap.max() <= 1.0
    assert heat_share(red.heatmap, (4, 4, 20, 20)) > 0.8  # the patch is 6% of the image
    assert heat_share(blue.heatmap, (44, 40, 60, 56)) > 0.8
    assert probs.shape == (2,) and abs(probs.sum() - 1) < 1e-5


def test_predicted_class_is_explained_by_default():
    explainer = explain.Explainer(colour_model(), ["red", "blue"], PRE)
    probs, found = explainer.explain(patch_image(((0, 0, 250), (10, 10, 40, 40))))
    assert [e.method for e in found] == list(explain.DEFAULT_METHODS)
    assert probs.argmax() == 1 and all(e.class_name == "blue" and e.prob == pytest.approx(probs[1]) for e in found)


def test_layer_has_gradients_even_when_the_body_is_frozen():
    model = colour_model()
    model.freeze_body()
    _, (found,) = explain.Explainer(model, ["red", "blue"], PRE).explain(
        patch_image(((250, 0, 0), (4, 4, 20, 20))), ("gradcam",), 0)
    assert heat_share(found.heatmap, (4, 4, 20, 20)) > 0.8


@pytest.mark.parametrize("name, img_size, layer_name", [
    ("vit_tiny_patch16_224", 64, "blocks.11.norm1"),  # tokens -> 4x4 grid
    ("convnext_atto", 64, "norm_pre"),  # not the 1x1 map of its head's norm
    ("resnet18", 64, "layer4"),
    ("imgtune:small_cnn", 32, "features"),
])
def test_target_layer_of_each_family(name, img_size, layer_name):
    built = models.create(ModelConfig(name=name, pretrained=False, img_size=img_size), 3)
    layer = explain.target_layer(built.model, built.preprocessing)
    assert layer.name == layer_name and (layer.reshape is not None) == name.startswith("vit")
    x = torch.randn(1, 3, built.preprocessing.img_size, built.preprocessing.img_size)
    heat, probs = explain.explain_tensor(built.model, built.preprocessing, x, 2, "gradcam", layer)
    assert heat.shape == (built.preprocessing.img_size,) * 2 and probs.shape == (3,)


def test_vit_tokens_become_a_grid_without_the_class_token():
    tokens = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)
    grid = explain._TokensToGrid(1)(tokens)
    assert grid.shape == (2, 3, 4, 4)
    assert torch.equal(grid[1, :, 0, 1], tokens[1, 2])  # row 0, column 1 is the second patch token
    with pytest.raises(ValueError, match="square"):
        explain._TokensToGrid(2)(tokens)


@pytest.mark.slow
def test_swin_keeps_its_map_channels_last_and_is_permuted():
    built = models.create(ModelConfig(name="swin_tiny_patch4_window7_224", pretrained=False), 2)
    layer = explain.target_layer(built.model, built.preprocessing)
    assert layer.reshape is explain._nhwc_to_nchw
    heat, _ = explain.explain_tensor(built.model, built.preprocessing, torch.randn(1, 3, 224, 224), 0, "gradcam", layer)
    assert heat.shape == (224, 224)


def test_crop_box_follows_resize_and_centre_crop():
    pre = Preprocessing(img_size=224, resize_size=256)
    assert explain.crop_box((256, 256), pre) == (16, 16, 240, 240)
    # 400x300: resized to 341x256 (int(256 * 400 / 300)), crop left round(117 / 2) = 58
    left, top, right, bottom = explain.crop_box((400, 300), pre)
    assert (left, right) == pytest.approx((58 * 400 / 341, 282 * 400 / 341))
    assert (top, bottom) == pytest.approx((16 * 300 / 256, 240 * 300 / 256))


def test_heat_goes_back_onto_the_original_pixels():
    pre = Preprocessing(img_size=224, resize_size=256)
    heat = np.zeros((224, 224), dtype=np.float32)
    heat[:112, :112] = 1.0  # the crop's top-left quarter
    full = explain.to_original(heat, (512, 512), pre)
    assert full.shape == (512, 512)
    assert full[:32].max() == 0 and full[:, :32].max() == 0  # outside the crop: never seen
    assert full[40:240, 40:240].min() > 0.9 and full[280:480, 280:480].max() < 0.1
    picture = explain.overlay(Image.new("RGB", (512, 512), (128, 128, 128)), heat, pre)
    assert picture.size == (512, 512)


def test_cli_method_names_match_the_library():
    assert explain_cli.METHODS == tuple(explain.METHODS)
    assert explain_cli.EVAL_METHODS == explain_eval.EVAL_METHODS
    assert explain_cli.DEFAULT_METHODS == explain.DEFAULT_METHODS


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    data = make_split_dataset(tmp_path_factory.mktemp("data"), train=8, val=3)
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["-q", "train", str(data), *SCRATCH_ARGS, "--epochs", "1", "--workers", "0", "--out", str(out)]) == 0
    return out, data


def test_explain_command_writes_an_overlay_per_image_and_method(run, tmp_path, capsys):
    out, data = run
    images = sorted((data / "val" / "red_circle").glob("*.png"))[:2]
    bad = write_unreadable(tmp_path / "broken.png")
    code = main(["explain", str(out), *map(str, images), str(bad), "--out", str(tmp_path / "x"), "--format", "json"])
    assert code == 3  # the unreadable file; the others were written
    rows = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in rows] == [*map(str, images), str(bad)]
    assert "error" in rows[2] and "files" not in rows[2]
    for row, image in zip(rows[:2], images):
        assert row["predicted"] in ("red_circle", "green_square", "blue_triangle")
        assert row["explained"] == row["predicted"]
        assert set(row["files"]) == set(explain.DEFAULT_METHODS)
        for path in row["files"].values():
            assert Path(path).parent == tmp_path / "x"
            with Image.open(path) as overlay, Image.open(image) as original:
                assert overlay.format == "PNG" and overlay.size == original.size


def test_explain_command_chosen_class_and_default_folder(run, capsys):
    out, data = run
    folder = data / "val" / "blue_triangle"
    assert main(["explain", str(out), str(folder), "--class", "green_square", "--method", "layercam",
                 "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and {r["explained"] for r in rows} == {"green_square"}
    assert all(Path(r["files"]["layercam"]).parent == out / "explanations" for r in rows)


def test_explain_command_same_stem_twice_keeps_both(run, tmp_path, capsys):
    out, data = run
    image = next((data / "val" / "red_circle").glob("*.png"))
    assert main(["explain", str(out), str(image), str(image), "--out", str(tmp_path), "--method", "gradcam",
                 "--format", "json"]) == 0
    first, second = (r["files"]["gradcam"] for r in json.loads(capsys.readouterr().out))
    assert first != second and Path(first).is_file() and Path(second).is_file()


def test_explain_command_errors(run, capsys):
    out, data = run
    image = str(next((data / "val" / "red_circle").glob("*.png")))
    assert main(["explain", str(out), image, "--class", "zebra"]) == 2
    assert "zebra" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: not one of the choices
        main(["explain", str(out), image, "--method", "saliency"])
    assert exit_info.value.code == 2
    assert main(["explain", str(out.parent / "missing"), image]) == 3
