"""``imgtune export``: the ONNX file, its metadata, the consumer recipe (pixel-exact against imgtune's own
decoding and eval transform, large EXIF-rotated JPEGs included), the parity check, the model card's code
run as a user would, dynamic batch, and the errors. A small CNN from scratch and the real pretrained
MobileNetV2 at 64 px; the timm models only in the slow test."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datagen import CLASSES, PRETRAINED_ARGS, SCRATCH_ARGS, make_split_dataset
from imgtune import export as export_lib
from imgtune import runlock
from imgtune import models
from imgtune.cli import main
from imgtune.consumer_recipe import preprocess as consumer_preprocess
from imgtune.data.decode import load_rgb
from imgtune.data.transforms import Preprocessing, eval_transform
from imgtune.predict import Predictor

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

PREPROCESSING_KEYS = {"input_size", "resize_size", "interpolation", "mean", "std", "input_dtype", "input_layout",
                      "normalised_in_graph"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_split_dataset(tmp_path_factory.mktemp("data"), train=10, val=5)


def train(data: Path, out: Path, *args: str) -> Path:
    assert main(["-q", "train", str(data), "--workers", "0", "--out", str(out), *args]) == 0
    return out


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    return train(data, tmp_path_factory.mktemp("runs") / "small", *SCRATCH_ARGS, "--epochs", "2")


@pytest.fixture(scope="module")
def exported(run) -> Path:
    assert main(["-q", "export", str(run)]) == 0
    return run / "export"


def leftovers(folder: Path) -> list[str]:
    """Anything an export leaves beside its target besides the target: temporary or failed folders."""
    return sorted(p.name for p in folder.iterdir()
                  if (p.name.startswith(".") or p.name.endswith(".failed")) and p.name != runlock.LOCK_FILE)


def large_photos(folder: Path, rng: np.random.Generator) -> list[Path]:
    """Phone-size JPEGs with EXIF rotations (drawn from a generated image, so they have structure),
    plus one landscape without EXIF, one CMYK JPEG and one progressive JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    base = Image.fromarray(rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)).resize((3000, 4000),
                                                                                     Image.Resampling.BICUBIC)
    paths = []
    for orientation in (1, 3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        paths.append(folder / f"portrait_o{orientation}.jpg")
        base.save(paths[-1], quality=88, exif=exif)
    paths.append(folder / "landscape.jpg")
    base.transpose(Image.Transpose.ROTATE_90).save(paths[-1], quality=80)
    paths.append(folder / "cmyk.jpg")
    base.resize((1500, 2000)).convert("CMYK").save(paths[-1], quality=90)
    paths.append(folder / "progressive.jpg")
    base.save(paths[-1], quality=85, progressive=True)
    return paths


def odd_images(folder: Path, rng: np.random.Generator) -> list[Path]:
    """Modes load_rgb converts: alpha, palette with transparency, greyscale with alpha, 16-bit, float."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (70, 90), dtype=np.uint8)))
    palette = rgb.convert("P")
    palette.info["transparency"] = 3
    files = {"rgba.png": rgba, "la.png": rgba.convert("LA"), "palette.png": palette, "grey.png": rgb.convert("L"),
             "grey16.png": Image.fromarray(rng.integers(0, 65536, (70, 90), dtype=np.uint16)),
             "float.tiff": Image.fromarray(rng.random((70, 90), dtype=np.float32)),
             "small.png": rgb.resize((20, 30))}  # smaller than the crop: torchvision pads
    paths = []
    for name, image in files.items():
        paths.append(folder / name)
        image.save(paths[-1], transparency=3) if name == "palette.png" else image.save(paths[-1])
    return paths


def imgtune_pixels(path: Path, pre: Preprocessing) -> np.ndarray:
    """What predict gives the model before scaling: load_rgb as predict calls it, eval resize and crop."""
    resize, crop = eval_transform(pre).transforms[:2]
    return np.asarray(crop(resize(load_rgb(path, pre.resize_size))))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest", "nearest-exact", "lanczos", "box",
                                           "hamming"])
def test_consumer_recipe_gives_imgtune_pixels_exactly(tmp_path, interpolation):
    rng = np.random.default_rng(1)
    paths = large_photos(tmp_path / "large", rng) + odd_images(tmp_path / "odd", rng)
    pre = Preprocessing(img_size=56, resize_size=64, interpolation=interpolation)
    contract = {"input_size": 56, "resize_size": 64, "interpolation": interpolation}
    for path in paths:
        ours, theirs = consumer_preprocess(path, contract), imgtune_pixels(path, pre)
        assert ours.dtype == np.uint8 and ours.shape == (56, 56, 3), path.name
        assert np.array_equal(ours, theirs), f"{path.name}: max difference {np.abs(ours - theirs.astype(int)).max()}"


def test_export_passes_parity_and_writes_the_folder(exported, run):
    assert sorted(p.name for p in exported.iterdir()) == ["export.json", "model.onnx", "model_card.md"]
    assert leftovers(run) == []
    report = json.loads((exported / "export.json").read_text())
    parity = report["parity"]
    assert parity["passed"] and parity["top1_agreement"] == 1.0
    assert parity["max_abs_prob_diff"] <= 1e-4
    assert parity["images"] == 5 * len(CLASSES) + 2 and parity["synthetic_large_photos"] == 2
    assert parity["input_pixels_identical"] == parity["images"]
    assert report["classes"] == sorted(CLASSES) and report["temperature"] is None
    assert report["metrics"]["val"]["ci95"]["accuracy"]
    card = (exported / "model_card.md").read_text()
    assert "top-1 agreement 100.0%" in card and "| val | 15 |" in card


def test_metadata_round_trips(exported, run):
    model = onnx.load(str(exported / "model.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    session_props = ort.InferenceSession(str(exported / "model.onnx")).get_modelmeta().custom_metadata_map
    assert set(props) == set(export_lib.METADATA_KEYS) and session_props == props
    meta = json.loads((run / "meta.json").read_text())
    assert json.loads(props["classes"]) == meta["classes"]
    pre = json.loads(props["preprocessing"])
    assert PREPROCESSING_KEYS <= set(pre)
    assert (pre["input_size"], pre["resize_size"]) == (meta["preprocessing"]["img_size"],
                                                       meta["preprocessing"]["resize_size"])
    assert pre["mean"] == meta["preprocessing"]["mean"] and pre["std"] == meta["preprocessing"]["std"]
    assert (pre["input_dtype"], pre["input_layout"], pre["normalised_in_graph"]) == ("uint8", "NHWC", True)
    assert json.loads(props["temperature"]) is None
    assert props["imgtune_version"] == meta["versions"]["imgtune"]
    assert props["weights_sha256"] == hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()
    (graph_input,), first_output = model.graph.input, model.graph.output[0]
    dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    assert dims == ["batch", 32, 32, 3] and graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert first_output.name == "probabilities"


def test_dynamic_batch_matches_predictor(exported, run, data):
    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    pre = json.loads(session.get_modelmeta().custom_metadata_map["preprocessing"])
    paths = sorted((data / "val").rglob("*.png"))[:5]
    reference, _ = Predictor.from_run(run, "cpu").probabilities(paths)
    for batch in (paths[:1], paths):
        out = session.run(None, {"images": np.stack([consumer_preprocess(p, pre) for p in batch])})[0]
        assert out.shape == (len(batch), len(CLASSES))
        np.testing.assert_allclose(out, reference[:len(batch)], atol=1e-5)
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)


def card_code(card: Path) -> str:
    (code,) = re.findall(r"```python\n(.*?)```", card.read_text(), flags=re.S)
    return code


def test_model_card_code_runs_without_torch_and_agrees_with_predict(exported, run, data, tmp_path, capsys):
    script = tmp_path / "classify.py"
    script.write_text(card_code(exported / "model_card.md"))
    photos = large_photos(tmp_path / "large", np.random.default_rng(2))[:3]
    paths = [str(p) for p in sorted((data / "val").rglob("*.png"))] + [str(p) for p in photos]
    # run as a user would, and prove torch was never imported
    guard = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
             "assert not {'torch', 'torchvision', 'timm', 'imgtune'} & set(sys.modules), 'imported torch'")
    done = subprocess.run([sys.executable, "-c", guard, str(script), str(exported / "model.onnx"), *paths],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    labels = {line.rsplit(" ", 2)[0]: line.rsplit(" ", 2)[1] for line in done.stdout.splitlines()}
    assert main(["predict", str(run), *paths, "--format", "json", "--engine", "torch"]) == 0
    predicted = {row["path"]: row["label"] for row in json.loads(capsys.readouterr().out)}
    assert labels == predicted


def test_large_exif_jpegs_and_odd_modes_pass_the_check(run, tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "check"
    large_photos(folder, rng), odd_images(folder, rng)
    out = tmp_path / "exported"
    assert main(["-q", "export", str(run), "--check-images", str(folder), "--out", str(out)]) == 0
    parity = json.loads((out / "export.json").read_text())["parity"]
    assert parity["images"] == 14 + 2 and parity["input_pixels_identical"] == parity["images"]
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_prob_diff"] <= 1e-4


def test_pretrained_mobilenet_calibrated_export(data, tmp_path):
    run = train(data, tmp_path / "mobilenet", *PRETRAINED_ARGS, "--strategy", "linear-probe", "--epochs", "2")
    assert main(["-q", "export", str(run), "--calibrated"]) == 0
    report = json.loads((run / "export" / "export.json").read_text())
    temperature = json.loads((run / "calibration.json").read_text())["temperature"]
    assert report["temperature"] == temperature and report["parity"]["passed"]
    props = ort.InferenceSession(str(run / "export" / "model.onnx")).get_modelmeta().custom_metadata_map
    assert json.loads(props["temperature"]) == temperature
    calibrated, _ = Predictor.from_run(run, "cpu", calibrated=True).probabilities(
        sorted((data / "val").rglob("*.png")))
    assert report["parity"]["max_abs_prob_diff"] <= 1e-4 and np.isfinite(calibrated).all()


def test_reexport_replaces_the_previous_export(run, tmp_path):
    out = tmp_path / "again"
    for _ in range(2):
        assert main(["-q", "export", str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.onnx", "model_card.md"]
    assert leftovers(tmp_path) == []


def test_incomplete_run_folder_is_a_data_error(run, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(run, broken, ignore=shutil.ignore_patterns("export*"))
    (broken / "model.safetensors").unlink()
    assert main(["export", str(broken)]) == 3
    assert "model.safetensors" in capsys.readouterr().err
    assert not (broken / "export").exists() and leftovers(broken) == []


def test_missing_onnxruntime_says_how_to_install(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "pip install 'imgtune[export]'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unexportable_op_names_the_op_and_model(run, tmp_path, monkeypatch, capsys):
    plain = models.SmallCNN.forward
    monkeypatch.setattr(models.SmallCNN, "forward", lambda self, x: plain(self, torch.fft.fft2(x).real))
    out = tmp_path / "out"
    assert main(["export", str(run), "--out", str(out)]) == 4
    err = capsys.readouterr().err
    assert "aten::fft_fft2" in err and "small_cnn" in err
    assert list(tmp_path.iterdir()) == []


def test_failed_parity_leaves_only_a_failed_folder(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export_lib, "PROB_TOLERANCE", -1.0)  # no export can pass
    out = tmp_path / "out"
    assert main(["export", str(run), "--out", str(out)]) == 4
    assert "disagrees with imgtune predict" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.failed"]
    assert not json.loads((tmp_path / "out.failed" / "export.json").read_text())["parity"]["passed"]
    monkeypatch.undo()
    assert main(["-q", "export", str(run), "--out", str(out)]) == 0  # a later success supersedes it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_out_that_is_not_an_export_and_bad_opset_are_refused(run, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["export", str(run), "--out", str(tmp_path)]) == 2
    assert main(["export", str(run), "--out", str(tmp_path / "x"), "--opset", "99"]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_cli_defaults_are_the_library_s_and_help_imports_no_torch():
    from imgtune.cli import export as cli_export

    assert (cli_export.FORMATS, cli_export.DEFAULT_OPSET, cli_export.OPSETS) == (
        export_lib.FORMATS, export_lib.DEFAULT_OPSET, export_lib.OPSETS)
    done = subprocess.run([sys.executable, "-c", "import sys; from imgtune.cli import build_parser; build_parser(); "
                           "assert 'torch' not in sys.modules"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("model", ["timm:resnet18", "timm:efficientnet_b0", "timm:vit_tiny_patch16_224"])
def test_timm_models_export_with_parity(data, tmp_path, model):
    run = train(data, tmp_path / "run", "--model", model, "--no-pretrained", "--img-size", "64",
                "--strategy", "scratch", "--epochs", "1")
    assert main(["-q", "export", str(run)]) == 0
    parity = json.loads((run / "export" / "export.json").read_text())["parity"]
    assert parity["passed"] and parity["input_pixels_identical"] == parity["images"]


def session_outputs(path: Path, inputs: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": inputs})[0]


def test_int8_export_writes_the_file_its_metadata_and_recomputable_figures(run, data, tmp_path, capsys):
    out = tmp_path / "int8"
    assert main(["export", str(run), "--int8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "int8 (QDQ, per-channel, calibrated on 30 training images)" in printed and "WARNING" not in printed
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.int8.onnx", "model.onnx", "model_card.md"]
    assert leftovers(tmp_path) == []
    # metadata: the fp32 file's keys and values, plus quantization
    fp32_props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    int8_model = onnx.load(str(out / "model.int8.onnx"))
    props = {p.key: p.value for p in int8_model.metadata_props}
    assert set(props) == set(export_lib.METADATA_KEYS) | {"quantization"}
    assert {k: props[k] for k in fp32_props} == fp32_props
    quantization = json.loads(props["quantization"])
    assert (quantization["method"], quantization["format"], quantization["per_channel"]) == (
        "onnxruntime.quantization.quantize_static", "QDQ", True)
    assert quantization["calibration_images"] == 10 * len(CLASSES)
    ops = {node.op_type for node in int8_model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Softmax"} <= ops
    # the figures, recomputed from the two files with the consumer recipe
    block = json.loads((out / "export.json").read_text())["int8"]
    assert block["quantization"] == quantization and block["warning"] is None and list(block["splits"]) == ["val"]
    pre = json.loads(fp32_props["preprocessing"])
    paths = sorted((data / "val").rglob("*.png"))
    inputs = np.stack([consumer_preprocess(p, pre) for p in paths])
    labels = np.array([sorted(CLASSES).index(p.parent.name) for p in paths])
    fp32, int8 = session_outputs(out / "model.onnx", inputs), session_outputs(out / "model.int8.onnx", inputs)
    val = block["splits"]["val"]
    assert val["images"] == len(paths) and val["unreadable"] == 0
    assert val["fp32_accuracy"] == float(np.mean(fp32.argmax(1) == labels))
    assert val["int8_accuracy"] == float(np.mean(int8.argmax(1) == labels))
    assert val["drop_points"] == pytest.approx((val["fp32_accuracy"] - val["int8_accuracy"]) * 100)
    assert val["top1_agreement"] == float(np.mean(fp32.argmax(1) == int8.argmax(1)))
    assert val["max_abs_prob_diff"] == pytest.approx(float(np.abs(fp32 - int8).max()), abs=1e-6)
    assert 0 < val["max_abs_prob_diff"] < 0.5  # quantised, and still the same model
    assert "## int8 model" in (out / "model_card.md").read_text()


def test_int8_drop_over_the_limit_is_a_stored_warning(run, tmp_path, monkeypatch, capsys):
    from imgtune import export_int8

    monkeypatch.setattr(export_int8, "MAX_DROP_POINTS", -1.0)  # any result is "too large a drop"
    out = tmp_path / "out"
    assert main(["export", str(run), "--int8", "--out", str(out)]) == 0
    assert "WARNING: int8 top-1 accuracy is" in capsys.readouterr().out
    block = json.loads((out / "export.json").read_text())["int8"]
    assert block["max_drop_points"] == -1.0 and "prefer model.onnx" in block["warning"]
    assert "**Warning:** int8 top-1 accuracy" in (out / "model_card.md").read_text()


def test_failed_quantisation_leaves_nothing_and_keeps_the_previous_export(run, tmp_path, monkeypatch, capsys):
    import onnxruntime.quantization as quantization

    out = tmp_path / "out"
    assert main(["-q", "export", str(run), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise ValueError("no kernel for this op")

    monkeypatch.setattr(quantization, "quantize_static", broken)
    assert main(["export", str(run), "--int8", "--out", str(out)]) == 4
    err = capsys.readouterr().err
    assert "small_cnn failed: no kernel for this op" in err and "without --int8" in err
    assert "symbolic shape inference" not in err  # onnxruntime.quantization's INFO lines are kept out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
