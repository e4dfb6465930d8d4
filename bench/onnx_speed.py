"""fp32 ONNX Runtime against imgtune's PyTorch path and plain PyTorch eager, in one run, on hymenoptera val.

(a) The mobilenet_v2 body (offline pretrained weights, 224 px) on the val photos already preprocessed
    (``eval_transform``), batch 32, images per second of: plain eager (``model.eval()``,
    ``torch.inference_mode``, NCHW contiguous); imgtune's PyTorch path (batch norm folded by
    ``imgtune.predict._fuse_batch_norm``, channels-last, through ``imgtune.inference.forward``); ONNX
    Runtime on the body exported here (``torch.onnx.export(dynamo=False)``), once with a default
    ``SessionOptions`` and once with ``intra_op_num_threads`` = cores and ``ORT_ENABLE_ALL`` set explicitly.
(b) Whole-image prediction from the files (decode + preprocess + model) of a linear-probe run trained
    here for one epoch and exported: ``Predictor.probabilities`` (``--engine torch``) against
    ``OrtPredictor.probabilities`` (``--engine onnxruntime``), in process, start-up excluded.
(c) The fraction of this machine's FP32 peak each body path reaches: FLOPs counted with
    ``torch.utils.flop_counter.FlopCounterMode`` on one image (multiply-add = 2 FLOPs; convolutions and
    the matrix products only), peak = cores x GHz x FLOPs/cycle/core (``--flops-per-cycle``; the
    default, 32, is two 256-bit FMA pipes: AMD Zen 4 runs AVX-512 on them in two halves).

Every path is warmed up, then all are timed ``--repeats`` times, alternated, so the shared machine's load
hits them alike; medians and ratios are printed as a markdown table.

    python bench/onnx_speed.py [--repeats 5] [--flops-per-cycle 32]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import HYMENOPTERA, child_env

from imgtune import models
from imgtune.config import ModelConfig
from imgtune.data.decode import load_rgb
from imgtune.data.transforms import eval_transform
from imgtune.inference import forward
from imgtune.predict import Predictor, _fuse_batch_norm

BATCH = 32


def lscpu() -> dict[str, str]:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


def cpu_ghz(info: dict[str, str]) -> tuple[float, str]:
    if info.get("CPU max MHz"):
        return float(info["CPU max MHz"]) / 1000, "lscpu 'CPU max MHz'"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return float(line.split(":")[1]) / 1000, "/proc/cpuinfo 'cpu MHz' (lscpu gives no max MHz under this hypervisor)"
    raise RuntimeError("no clock frequency found")


def val_tensors(pre) -> torch.Tensor:
    transform = eval_transform(pre)
    files = sorted((HYMENOPTERA / "val").glob("*/*"))
    return torch.stack([transform(load_rgb(f, pre.resize_size)) for f in files])


def body_flops(body: torch.nn.Module, size: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        body(torch.zeros(1, 3, size, size))
    return counter.get_total_flops()


def export_body(body: torch.nn.Module, size: int, path: Path) -> None:
    torch.onnx.export(body, (torch.zeros(1, 3, size, size),), str(path), dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["features"],
                      dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})


def body_paths(body: torch.nn.Module, onnx_path: Path, cores: int) -> dict:
    import onnxruntime as ort

    eager = body.eval()
    fused = _fuse_batch_norm(body.to(memory_format=torch.channels_last).eval())
    cpu = torch.device("cpu")

    def run_eager(batch: torch.Tensor):
        with torch.inference_mode():
            return eager(batch.contiguous())

    default = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = cores
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    tuned = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return {
        "PyTorch eager (NCHW)": run_eager,
        "imgtune PyTorch (channels_last, BN folded)": lambda batch: forward(fused, batch, cpu),
        "ONNX Runtime fp32 (default session)": lambda batch: default.run(None, {"images": batch.numpy()}),
        f"ONNX Runtime fp32 (intra_op={cores}, ORT_ENABLE_ALL)":
            lambda batch: tuned.run(None, {"images": batch.numpy()}),
    }


def images_per_second(run, images: torch.Tensor) -> float:
    start = time.perf_counter()
    for i in range(0, len(images), BATCH):
        run(images[i:i + BATCH])
    return len(images) / (time.perf_counter() - start)


def body_features(run, images: torch.Tensor) -> np.ndarray:
    """The features a body path gives for ``images`` (to check the paths agree)."""
    outs = [run(images[i:i + BATCH]) for i in range(0, len(images), BATCH)]
    return np.concatenate([np.asarray(out[0] if isinstance(out, list) else out) for out in outs])


def alternate(paths: dict, work, repeats: int) -> dict[str, float]:
    for run in paths.values():  # warm-up
        work(run, warm=True)
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, run in paths.items():
            rates[name].append(work(run, warm=False))
    return {name: statistics.median(values) for name, values in rates.items()}


def train_and_export(folder: Path) -> Path:
    run = folder / "run"
    imgtune = [sys.executable, "-m", "imgtune", "-q"]
    subprocess.run(imgtune + ["train", str(HYMENOPTERA), "--model", "mobilenet_v2", "--offline",
                              "--strategy", "linear-probe", "--epochs", "1", "--out", str(run)],
                   env=child_env(), check=True, stdout=subprocess.DEVNULL)
    subprocess.run(imgtune + ["export", str(run)], env=child_env(), check=True, stdout=subprocess.DEVNULL)
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--flops-per-cycle", type=float, default=32.0,
                        help="FP32 FLOPs per cycle per core (32: two 256-bit FMA pipes; 64: two 512-bit)")
    args = parser.parse_args()
    from imgtune.ort_predict import OrtPredictor

    info = lscpu()
    cores = int(info["Core(s) per socket"]) * int(info.get("Socket(s)", "1"))
    ghz, clock_source = cpu_ghz(info)
    peak = cores * ghz * args.flops_per_cycle * 1e9
    torch.set_num_threads(cores)

    built = models.create(ModelConfig(name="mobilenet_v2"), 2, offline=True)
    body, pre = built.model.body, built.preprocessing
    size = pre.img_size
    images = val_tensors(pre)
    flops = body_flops(body.eval(), size)

    with tempfile.TemporaryDirectory(prefix="imgtune-onnxspeed-") as scratch:
        onnx_path = Path(scratch) / "body.onnx"
        export_body(body.eval(), size, onnx_path)
        paths = body_paths(body, onnx_path, cores)
        body_rates = alternate(paths, lambda run, warm: images_per_second(run, images[:BATCH] if warm else images),
                               args.repeats)
        features = {name: body_features(run, images) for name, run in paths.items()}

        start = time.perf_counter()
        run_dir = train_and_export(Path(scratch))
        prepare = time.perf_counter() - start
        files = sorted((HYMENOPTERA / "val").glob("*/*"))
        engines = {"imgtune predict, torch engine": Predictor.from_run(run_dir, device="cpu"),
                   "imgtune predict, onnxruntime engine": OrtPredictor.from_run(run_dir)}
        probs = {}

        def whole(predictor, warm: bool) -> float:
            chosen = files[:BATCH] if warm else files
            start = time.perf_counter()
            out, errors = predictor.probabilities(chosen)
            seconds = time.perf_counter() - start
            assert not any(errors), errors
            probs[id(predictor)] = out
            return len(chosen) / seconds

        whole_rates = alternate(engines, whole, args.repeats)
        torch_probs, ort_probs = (probs[id(p)] for p in engines.values())

    print(f"\nmachine: {info.get('Model name')} (family {info.get('CPU family')}, model {info.get('Model')}), "
          f"{cores} cores, {ghz:.3f} GHz ({clock_source}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; onnxruntime {__import__('onnxruntime').__version__}")
    print(f"FP32 peak: {cores} cores x {ghz:.3f} GHz x {args.flops_per_cycle:g} FLOPs/cycle = {peak / 1e9:.1f} GFLOP/s")
    print(f"mobilenet_v2 body at {size} px: {flops / 1e9:.3f} GFLOPs per image (FlopCounterMode, multiply-add = 2)")
    print(f"{len(images)} val images, batch {BATCH}, {args.repeats} repeats alternated (median); "
          f"linear-probe run trained and exported in {prepare:.0f} s (not timed below)\n")
    eager = body_rates["PyTorch eager (NCHW)"]
    ours = body_rates["imgtune PyTorch (channels_last, BN folded)"]
    print("| path | images/s | vs imgtune PyTorch | GFLOP/s | of FP32 peak |")
    print("|---|---:|---:|---:|---:|")
    for name, rate in body_rates.items():
        print(f"| body: {name} | {rate:.1f} | {rate / ours:.2f}x | {rate * flops / 1e9:.1f} | "
              f"{rate * flops / peak:.1%} |")
    torch_rate, ort_rate = whole_rates.values()
    for name, rate in whole_rates.items():
        print(f"| whole image from file: {name} | {rate:.1f} | {rate / torch_rate:.2f}x | | |")
    best_ort = max(rate for name, rate in body_rates.items() if name.startswith("ONNX"))
    print(f"\nbody: imgtune PyTorch / eager = {ours / eager:.2f}x; ONNX Runtime (default) / imgtune PyTorch = "
          f"{body_rates['ONNX Runtime fp32 (default session)'] / ours:.2f}x; best ONNX Runtime / imgtune PyTorch = "
          f"{best_ort / ours:.2f}x (target >= 1.7x: {'met' if best_ort / ours >= 1.7 else 'not met'})")
    reference = features["PyTorch eager (NCHW)"]
    for name, values in features.items():
        if name != "PyTorch eager (NCHW)":
            print(f"features of {name} against eager: max |diff| {np.abs(values - reference).max():.2e} "
                  f"(largest |feature| {np.abs(reference).max():.2f})")
    print(f"whole image: onnxruntime engine / torch engine = {ort_rate / torch_rate:.2f}x; top-1 agreement "
          f"{np.mean(torch_probs.argmax(1) == ort_probs.argmax(1)):.1%}, max |dprob| "
          f"{np.abs(torch_probs - ort_probs).max():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
