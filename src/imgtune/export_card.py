"""What an export folder says about itself: ``export.json`` (the run's metrics, calibration,
preprocessing, parity figures) and ``model_card.md`` (the same for people, with the few lines of
Python that use the model with only onnxruntime, numpy and Pillow)."""

from __future__ import annotations

import json
from pathlib import Path

from . import __version__, artifact

EXPORT_DIR = "export"  # the default export folder inside a run folder
MODEL_FILE, INT8_FILE, CARD_FILE, REPORT_FILE = "model.onnx", "model.int8.onnx", "model_card.md", "export.json"
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
LARGE_PHOTO_SIZE = (3024, 4032)  # width, height of the synthetic phone photos added to every parity check


def build_report(run: artifact.RunInfo, predictor, metadata: dict[str, str], opset: int, parity: dict) -> dict:
    import onnx
    import onnxruntime
    import torch

    size = predictor.preprocessing.img_size
    return {
        "format": "onnx", "file": MODEL_FILE, "opset": opset,
        "exporter": "torch.onnx.export, TorchScript-based (dynamo=False)",
        "versions": {"imgtune": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
        "run": str(run.path), "model": run.meta.get("model", {}).get("name", run.config.model.name),
        "classes": run.classes,
        "input": {"name": INPUT_NAME, "shape": ["batch", size, size, 3], "dtype": "uint8"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(run.classes)], "dtype": "float32"},
        "preprocessing": json.loads(metadata["preprocessing"]),
        "temperature": predictor.temperature, "weights_sha256": metadata["weights_sha256"],
        "metrics": run_metrics(run.path), "calibration": run_calibration(run.path), "parity": parity,
    }


def run_metrics(run_path: Path) -> dict:
    """Val (and test) figures with their 95% intervals from metrics.json; empty when it is missing."""
    try:
        values = json.loads((run_path / artifact.METRICS_JSON).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    keep = ("n", "accuracy", "balanced_accuracy", "macro_f1", "loss", "ci95")
    found = {"val": {k: values[k] for k in keep if k in values}}
    if isinstance(values.get("test"), dict):
        found["test"] = {k: values["test"][k] for k in keep if k in values["test"]}
    return found


def run_calibration(run_path: Path) -> dict | None:
    try:
        return json.loads((run_path / artifact.CALIBRATION).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def model_card(report: dict) -> str:
    """Markdown: classes, contract, metrics, calibration, parity and the runnable consumer code."""
    pre, parity = report["preprocessing"], report["parity"]
    lines = [f"# {report['model']}: ONNX export by imgtune {report['versions']['imgtune']}", "",
             f"Classes, in output order: {', '.join(f'`{c}`' for c in report['classes'])}.", "",
             "## Input and output", "",
             f"- input `{INPUT_NAME}`: uint8, `N x {pre['input_size']} x {pre['input_size']} x 3` (NHWC, RGB): "
             f"images with EXIF orientation applied, alpha on white, the shorter side resized to "
             f"{pre['resize_size']} ({pre['interpolation']}, antialiased), then centre-cropped; any batch size",
             f"- inside the graph: /255, mean {pre['mean']}, std {pre['std']}, the model, "
             + (f"logits / {report['temperature']:.6g} (temperature), " if report["temperature"] else "")
             + "softmax",
             f"- output `{OUTPUT_NAME}`: float32 `N x {len(report['classes'])}` class probabilities", "",
             "## Metrics of the run", "", *metrics_table(report["metrics"]), "",
             "## Calibration", "", _calibration_text(report), "",
             "## Parity with `imgtune predict`", "",
             f"On {parity['images']} image(s) ({parity['images'] - parity['synthetic_large_photos']} from the "
             f"{parity['source']} and {parity['synthetic_large_photos']} synthetic "
             f"{LARGE_PHOTO_SIZE[0]}x{LARGE_PHOTO_SIZE[1]} EXIF-rotated JPEGs), decoded by the code below and run "
             f"with onnxruntime {report['versions']['onnxruntime']}: top-1 agreement "
             f"{parity['top1_agreement']:.1%}, largest |probability difference| {parity['max_abs_prob_diff']:.2e} "
             f"(limit {parity['tolerance']:.0e}); the uint8 input equals imgtune's own in "
             f"{parity['input_pixels_identical']} of {parity['images']}.", "",
             *_int8_section(report.get("int8")),
             "## Use it with onnxruntime, numpy and Pillow only", "",
             "Save this as `classify.py` and run `python classify.py model.onnx photo.jpg ...`:", "",
             "```python", consumer_snippet().rstrip(), "```", ""]
    return "\n".join(lines)


def consumer_snippet() -> str:
    """The model card's code: the consumer recipe module, verbatim, and a few lines that call the model."""
    from . import consumer_recipe

    return Path(consumer_recipe.__file__).read_text() + _CALL


_CALL = '''

if __name__ == "__main__":
    import json
    import sys

    import onnxruntime as ort

    session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    classes, pre = json.loads(meta["classes"]), json.loads(meta["preprocessing"])
    batch = np.stack([preprocess(path, pre) for path in sys.argv[2:]])  # N x H x W x 3, uint8
    probabilities = session.run(None, {"images": batch})[0]
    for path, row in zip(sys.argv[2:], probabilities):
        print(path, classes[int(row.argmax())], f"{row.max():.4f}")
'''


def _int8_section(block: dict | None) -> list[str]:
    """The int8 file's quantisation and its accuracy against model.onnx, when exported with --int8."""
    if not block:
        return []
    q = block["quantization"]
    lines = ["## int8 model", "",
             f"`{block['file']}` takes the same input and gives the same output, quantised statically with "
             f"ONNX Runtime ({q['format']}, {q['calibration_method']} calibration on {q['calibration_images']} "
             f"training images, {'per-channel' if q['per_channel'] else 'per-tensor'} {q['weights']} weights, "
             f"{q['activations']} activations; kept in float: {q['kept_float']}). Against `model.onnx`, "
             "both fed by the code below:", "",
             "| split | images | fp32 top-1 | int8 top-1 | change (points) | top-1 agreement | max abs prob diff |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in block["splits"].items():
        change = (s["int8_accuracy"] - s["fp32_accuracy"]) * 100
        lines.append(f"| {name} | {s['images']} | {s['fp32_accuracy']:.4f} | {s['int8_accuracy']:.4f} | "
                     f"{change:+.2f} | {s['top1_agreement']:.1%} | {s['max_abs_prob_diff']:.2e} |")
    if block["warning"]:
        lines += ["", f"**Warning:** {block['warning']}."]
    return lines + [""]


def metrics_table(metrics: dict) -> list[str]:
    if not metrics:
        return ["(the run has no metrics.json)"]
    rows = ["| split | images | accuracy (95% CI) | macro F1 (95% CI) |", "| --- | --- | --- | --- |"]
    for split, values in metrics.items():
        ci = values.get("ci95", {})
        cells = [_with_interval(values.get(k), ci.get(k)) for k in ("accuracy", "macro_f1")]
        rows.append(f"| {split} | {values.get('n', '?')} | {cells[0]} | {cells[1]} |")
    return rows


def _with_interval(value, interval) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f} ({interval[0]:.3f}-{interval[1]:.3f})" if interval else f"{value:.4f}"


def _calibration_text(report: dict) -> str:
    calibration = report["calibration"]
    applied = (f"The graph divides the logits by the fitted temperature {report['temperature']:.6g} "
               "(exported with --calibrated)." if report["temperature"] else
               "The graph gives the model's own probabilities (no temperature; export with --calibrated "
               "to include the fitted one).")
    if not calibration:
        return applied + " The run has no calibration.json."
    return (f"{applied} Temperature fitted on {calibration.get('fitted_on')} "
            f"({calibration.get('n_fit')} images): {calibration['temperature']:.6g}; ECE on "
            f"{calibration.get('assessed_on')} {calibration.get('ece_before', float('nan')):.4f} before, "
            f"{calibration.get('ece_after', float('nan')):.4f} after.")
