"""Does the deletion test's grid reward maps of the model, or any blob? (issue 18, docs/benchmarks.md)

On a run's val images: the paired deletion gain over a random ordering (random AUC minus the map's, with a
95% bootstrap interval over the images) of Grad-CAM and of a centred Gaussian that ignores the model, with
the removed cells set to the mean colour (the metric) or blurred, at one grid size. The reference path is the
random ordering itself, on the same images.

    python bench/deletion_grid.py --run RUN [--images 50] [--cells 8] [--methods gradcam,centre]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from common import ROOT

sys.path.insert(0, str(ROOT / "src"))


def centre(side: int) -> np.ndarray:
    y, x = np.mgrid[:side, :side]
    c = (side - 1) / 2
    return np.exp(-((x - c) ** 2 + (y - c) ** 2) / (2 * (side / 4) ** 2))


def main() -> None:
    from imgtune.evaluation import select_images
    from imgtune.explain import Explainer
    from imgtune.explain_eval import auc, blurred, cell_order, load_images, perturbed
    from imgtune.explain_methods import probabilities
    from imgtune.metrics import bootstrap_mean_ci
    from imgtune.predict import Predictor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--cells", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--methods", default="gradcam,centre", help="explain methods, and centre (the Gaussian)")
    args = parser.parse_args()
    predictor = Predictor.from_run(args.run, "cpu")
    explainer = Explainer.from_predictor(predictor)
    loaded, _ = load_images(explainer, select_images(predictor.run, None, None).images, args.images, 0)
    fills = {"mean colour": torch.zeros_like, "blurred": blurred}
    methods = args.methods.split(",")
    rng = np.random.default_rng(0)
    gains = {(m, f): [] for m in methods for f in fills}
    started = time.perf_counter()
    for i, item in enumerate(loaded):
        random_order = np.random.default_rng(i).permutation(args.cells ** 2)
        for method in methods:
            if method == "centre":
                heat = centre(item.batch.shape[-1])
            else:
                explainer.prepare(method)
                heat = explainer.heatmap(item.batch, item.class_index, method)[0]
            order = cell_order(heat, args.cells, rng)
            for name, fill in fills.items():
                start = fill(item.batch.cpu().float())
                images = torch.cat([perturbed(start, order, args.steps, item.batch, args.cells),
                                    perturbed(start, random_order, args.steps, item.batch, args.cells)])
                p = probabilities(explainer.model, images)[:, item.class_index].numpy()
                gains[(method, name)].append(auc(p[args.steps + 1:]) - auc(p[:args.steps + 1]))
    print(f"{len(loaded)} images, {args.cells} x {args.cells} cells, {time.perf_counter() - started:.0f} s")
    for (method, name), values in gains.items():
        low, high = bootstrap_mean_ci(np.array(values), 1000, seed=0)
        print(f"{method:12} {name:12} paired deletion gain {np.mean(values):.3f} [{low:.3f}, {high:.3f}]")


if __name__ == "__main__":
    main()
