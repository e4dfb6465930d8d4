"""Does Grad-CAM point at the insect? 20 hand-drawn boxes on hymenoptera val photos (``gradcam_boxes.json``).

For each photo the run's model is explained for the photo's true class (``imgtune.explain``, the code
``imgtune explain`` and the report use), and the heatmap is put back onto the original pixels (zero
outside the model's centre crop, which it never sees). Per photo and method:

- heat share: the heat inside the box / all the heat;
- area share: the box's area / the image's area (the issue's criterion: the heat share must exceed it
  for at least 15 of the 20 photos);
- crop share: the area of the box inside the crop / the crop's area, the stricter baseline (uniform
  heat over what the model sees would score exactly this).

A reference map that knows nothing of the image is scored the same way: a centred Gaussian on the crop
(photographers centre their subject), so Grad-CAM has to beat the centre bias, not only the border: the
summary counts the photos where a method's heat share beats the prior's, and the pointing game (the
hottest pixel inside the box).

    python bench/gradcam_boxes.py [--run RUN] [--methods gradcam gradcam++ ...] [--photos N]

Without ``--run`` it first trains ``imgtune train HYMENOPTERA --model mobilenet_v2`` (the default strategy,
gradual) into a temporary folder (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import HYMENOPTERA, ROOT, child_env

BOXES = ROOT / "bench" / "gradcam_boxes.json"


def centre_prior(size: int) -> np.ndarray:
    axis = np.linspace(-1, 1, size)
    return np.exp(-(axis[None, :] ** 2 + axis[:, None] ** 2) / (2 * 0.5**2)).astype(np.float32)


def pointing_hit(heat: np.ndarray, box: list[int]) -> bool:
    row, column = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return box[0] <= column < box[2] and box[1] <= row < box[3]


def shares(heat: np.ndarray, box: list[int], crop: tuple[float, ...]) -> tuple[float, float, float]:
    left, top, right, bottom = box
    height, width = heat.shape
    heat_share = float(heat[top:bottom, left:right].sum() / max(heat.sum(), 1e-12))
    area_share = (right - left) * (bottom - top) / (width * height)
    cl, ct, cr, cb = crop
    inside = max(0.0, min(right, cr) - max(left, cl)) * max(0.0, min(bottom, cb) - max(top, ct))
    return heat_share, area_share, inside / ((cr - cl) * (cb - ct))


def alternate_classes(entries: list[dict]) -> list[dict]:
    """The entries with their classes (the path's second part) taken in turn, each in file order."""
    groups: dict[str, list[dict]] = {}
    for entry in entries:
        groups.setdefault(entry["path"].split("/")[1], []).append(entry)
    return [entry for turn in zip(*groups.values()) for entry in turn]


def train(out: Path) -> None:
    command = [sys.executable, "-m", "imgtune", "train", str(HYMENOPTERA), "--model", "mobilenet_v2", "--offline",
               "--out", str(out)]
    print("training:", " ".join(command[2:]), flush=True)
    subprocess.run(command, env=child_env(), check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path)
    parser.add_argument("--methods", nargs="+", default=["gradcam", "gradcam++"],
                        help="any of imgtune explain's methods (integrated-gradients, occlusion, lime, kernel-shap ...)")
    parser.add_argument("--photos", type=int, help="only N boxed photos, ants and bees alternately (default: all 20)")
    args = parser.parse_args()
    if args.run is None:
        args.run = Path(tempfile.mkdtemp(prefix="gradcam-boxes-")) / "run"
        train(args.run)

    from imgtune.data.decode import load_rgb
    from imgtune.explain import Explainer, crop_box, explain_tensor, model_input, to_original

    explainer = Explainer.from_run(args.run, "cpu")
    pre = explainer.preprocessing
    boxes = json.loads(BOXES.read_text())["images"]
    if args.photos:
        boxes = alternate_classes(boxes)[:args.photos]
    names = [*args.methods, "centre prior"]
    wins = {name: {"area": 0, "crop": 0, "prior": 0, "pointing": 0, "heat": []} for name in names}
    print(f"run {args.run} ({explainer.model.__class__.__name__}, {pre.img_size} px); heat share per photo, "
          f"[area share | crop share]")
    print(f"{'photo':38} {'area':>6} {'crop':>6} " + " ".join(f"{n:>13}" for n in names) + "  predicted")
    for entry in boxes:
        image = load_rgb(HYMENOPTERA / entry["path"])
        label = entry["path"].split("/")[1]
        batch = model_input(image, pre)
        crop = crop_box(image.size, pre)
        maps, probs = {}, None
        for method in args.methods:
            maps[method], probs = explain_tensor(explainer.model, pre, batch, explainer.class_index(label), method,
                                                 explainer.layer)
        maps["centre prior"] = centre_prior(pre.img_size)
        row, found = [], {}
        for name in names:
            full = to_original(maps[name], image.size, pre)
            found[name], area_share, crop_share = shares(full, entry["box"], crop)
            wins[name]["area"] += found[name] > area_share
            wins[name]["crop"] += found[name] > crop_share
            wins[name]["pointing"] += pointing_hit(full, entry["box"])
            wins[name]["heat"].append(found[name])
            row.append(f"{found[name]:13.3f}")
        for name in names:
            wins[name]["prior"] += found[name] > found["centre prior"]
        predicted = explainer.classes[int(np.argmax(probs))]
        print(f"{entry['path'][4:]:38} {area_share:6.3f} {crop_share:6.3f} " + " ".join(row)
              + f"  {predicted} {probs.max():.2f}", flush=True)
    print(f"\nphotos (of {len(boxes)}) whose heat share exceeds the box's share of the image area, of the crop, "
          "the centre prior's heat share; pointing-game hits; mean heat share")
    print(f"  {'':13} {'area':>5} {'crop':>5} {'prior':>6} {'pointing':>9} {'mean':>6}")
    for name in names:
        w = wins[name]
        print(f"  {name:13} {w['area']:5d} {w['crop']:5d} {w['prior'] if name != 'centre prior' else '-':>6} "
              f"{w['pointing']:9d} {np.mean(w['heat']):6.3f}")


if __name__ == "__main__":
    main()
