"""Prediction throughput on phone-sized photos: ``imgtune predict`` against a plain per-image loop.

The photos: hymenoptera images upscaled to 4000x3000 and saved as JPEG quality 90 (500 of them,
generated once into --images). The model: an imgtune linear-probe run on hymenoptera (trained here
unless --run is given). The plain loop, in its own process, loads the same model and, per image:
PIL open, full decode (convert RGB), torchvision Resize(256)/CenterCrop(224)/ToTensor/Normalize,
a batch of one, softmax. Both are timed as whole processes; images per second and the ratio printed.

    python bench/predict.py [--images /tmp/imgtune-phone-photos] [--count 500] [--run RUN]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from common import HYMENOPTERA, child_env, run_measured

PLAIN = """
import sys, torch
from pathlib import Path
from PIL import Image
from torchvision import transforms
import imgtune
predictor = imgtune.load(sys.argv[1], device='cpu')
model, classes = predictor.model.eval(), predictor.classes
tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                         transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
count = 0
with torch.no_grad():
    for path in sorted(Path(sys.argv[2]).glob('*.jpg')):
        image = Image.open(path).convert('RGB')
        probs = torch.softmax(model(tf(image).unsqueeze(0)), 1)[0]
        count += 1
print(count)
"""


def make_photos(folder: Path, count: int) -> None:
    sources = sorted(HYMENOPTERA.glob("*/*/*.jp*g"))
    folder.mkdir(parents=True, exist_ok=True)

    def write(item):
        i, source = item
        target = folder / f"photo_{i:04d}.jpg"
        if not target.exists():
            with Image.open(source) as image:
                image.convert("RGB").resize((4000, 3000), Image.BICUBIC).save(target, quality=90)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, zip(range(count), itertools.cycle(sources))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=Path(tempfile.gettempdir()) / "imgtune-phone-photos")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--run", type=Path, help="a run folder (default: train a linear probe on hymenoptera)")
    args = parser.parse_args()
    make_photos(args.images, args.count)
    run = args.run
    if run is None:
        run = Path(tempfile.mkdtemp()) / "run"
        run_measured([sys.executable, "-m", "imgtune", "-q", "train", str(HYMENOPTERA), "--strategy", "linear-probe",
                      "--out", str(run), "--offline"], child_env())
    plain_s, plain_mem, _ = run_measured([sys.executable, "-c", PLAIN, str(run), str(args.images)], child_env())
    ours_s, ours_mem, result = run_measured([sys.executable, "-m", "imgtune", "predict", str(run), str(args.images),
                                             "--format", "csv"], child_env())
    assert result.stdout.count("\n") == args.count + 1, "imgtune predict did not give one row per photo"
    print(f"plain per-image loop: {args.count / plain_s:.2f} images/s ({plain_s:.1f} s, peak {plain_mem / 2**20:.0f} MiB)")
    print(f"imgtune predict:      {args.count / ours_s:.2f} images/s ({ours_s:.1f} s, peak {ours_mem / 2**20:.0f} MiB)")
    print(f"speed-up: {plain_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
