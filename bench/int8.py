"""int8 against fp32 ONNX Runtime: val accuracy and images per second, in one run.

Exports RUN (``imgtune export RUN --int8 --out OUT``), then times both files in fresh
``onnxruntime.InferenceSession``s (CPU, default options) on the run's val images, fed by the consumer
recipe, batch 32: the whole val set ``--repeats`` times per file, alternating fp32 and int8 so the shared
machine's load hits both alike; the median images per second of each and their ratio are printed. With
``--variants`` it also quantises the other settings (per-tensor; the normalisation and softmax quantised
too) and prints their accuracy and speed, which is how the defaults in imgtune/export_int8.py were chosen.

    python bench/int8.py RUN [--out DIR] [--repeats 7] [--variants]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from imgtune import artifact
from imgtune.cli import main as imgtune
from imgtune.export_int8 import BATCH, INT8_FILE, calibration_inputs, compare_split, quantize


def val_batch(run, pre: dict) -> np.ndarray:
    from imgtune.consumer_recipe import preprocess
    from imgtune.evaluation import select_images

    batch = []
    for ref in select_images(run, None, "val").images:
        with ref.open() as handle:
            batch.append(preprocess(handle, pre))
    return np.stack(batch)


def images_per_second(session, batch: np.ndarray) -> float:
    name = session.get_inputs()[0].name
    start = time.perf_counter()
    for i in range(0, len(batch), BATCH):
        session.run(None, {name: batch[i:i + BATCH]})
    return len(batch) / (time.perf_counter() - start)


def timed(paths: dict[str, Path], batch: np.ndarray, repeats: int) -> dict[str, list[float]]:
    import onnxruntime as ort

    sessions = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    for session in sessions.values():  # warm-up
        images_per_second(session, batch[:BATCH])
    rates = {k: [] for k in paths}
    for _ in range(repeats):
        for k, session in sessions.items():
            rates[k].append(images_per_second(session, batch))
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--out", help="export folder (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--variants", action="store_true")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="imgtune-int8-"))
    start = time.perf_counter()
    assert imgtune(["-q", "export", args.run, "--int8", "--out", str(out)]) == 0
    print(f"export with --int8: {time.perf_counter() - start:.0f} s")
    report = json.loads((out / "export.json").read_text())
    run = artifact.read_run(args.run)
    pre = report["preprocessing"]
    batch = val_batch(run, pre)
    paths = {"fp32": out / "model.onnx", "int8": out / INT8_FILE}
    rows = {"int8": report["int8"]["splits"]["val"]}
    if args.variants:
        calibration = calibration_inputs(run, pre)
        for name, per_channel, keep_float in [("int8 per-tensor", False, True),
                                              ("int8 all quantised", True, False),
                                              ("int8 per-tensor, all quantised", False, False)]:
            paths[name] = out.parent / f".{out.name}.{name.replace(' ', '_').replace(',', '')}.onnx"
            quantize(paths["fp32"], paths[name], calibration, per_channel, keep_float)
            rows[name] = compare_split(paths["fp32"], paths[name], run, "val", pre)
    rates = timed(paths, batch, args.repeats)
    fp32 = statistics.median(rates["fp32"])
    print(f"model {report['model']}, {len(batch)} val images, batch {BATCH}, {args.repeats} repeats (median)")
    print(f"fp32: val top-1 {rows['int8']['fp32_accuracy']:.4f}, {fp32:.1f} images/s "
          f"(all: {', '.join(f'{r:.1f}' for r in rates['fp32'])})")
    for name, row in rows.items():
        rate = statistics.median(rates[name])
        change = (row["int8_accuracy"] - row["fp32_accuracy"]) * 100
        print(f"{name}: val top-1 {row['int8_accuracy']:.4f} ({change:+.2f} points), agreement "
              f"{row['top1_agreement']:.1%}, max |dprob| {row['max_abs_prob_diff']:.3f}, "
              f"{rate:.1f} images/s = {rate / fp32:.2f}x fp32 (all: {', '.join(f'{r:.1f}' for r in rates[name])})")
    for name, path in paths.items():
        if name not in ("fp32", "int8"):
            path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
