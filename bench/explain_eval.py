"""Which explanation reflects the model? ``imgtune explain RUN --evaluate`` on hymenoptera, every method.

For the default gradual mobilenet_v2 run: deletion and insertion AUC (95% bootstrap intervals over the
images) against a random ordering of the same images, the model-randomisation sanity check (Spearman
rank correlation after re-initialising the head, then the top blocks) and seconds per image, for the
CAM methods (all but Score-CAM: one forward pass per channel, minutes per image on a CPU), integrated
gradients, occlusion, LIME and Kernel SHAP. The reference path is the random ordering itself: each
method's paired gain over it is printed as a ratio of AUCs. It runs :func:`imgtune.explain_eval.evaluate_run`,
the code of the command, and writes explain_eval.json and explain_eval.html to ``--out``.

    python bench/explain_eval.py [--run RUN] [--images 50] [--slow-images 20] [--sanity-images 8] [--steps 16]

Without ``--run`` it first trains ``imgtune train HYMENOPTERA --model mobilenet_v2 --offline`` into a
temporary folder. The hand-drawn boxes check for the same methods: ``python bench/gradcam_boxes.py --run RUN
--methods ...``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from gradcam_boxes import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path)
    parser.add_argument("--out", type=Path, help="where explain_eval.json/html go (default: a temporary folder)")
    parser.add_argument("--methods", nargs="+")
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--slow-images", type=int, default=20)
    parser.add_argument("--sanity-images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    if args.run is None:
        args.run = Path(tempfile.mkdtemp(prefix="explain-eval-")) / "run"
        train(args.run)
    out = args.out or Path(tempfile.mkdtemp(prefix="explain-eval-out-"))

    from imgtune.explain import Explainer
    from imgtune.explain_eval import EVAL_METHODS, EvalSettings, evaluate_run
    from imgtune.explain_page import write_evaluation
    from imgtune.predict import Predictor

    predictor = Predictor.from_run(args.run, "cpu")
    explainer = Explainer.from_predictor(predictor)
    settings = EvalSettings(images=args.images, slow_images=args.slow_images, sanity_images=args.sanity_images,
                            steps=args.steps)
    started = time.perf_counter()
    result = evaluate_run(explainer, predictor.run, methods=tuple(args.methods or EVAL_METHODS), settings=settings)
    write_evaluation(result, explainer, out)
    print_table(result.summary)
    print(f"\n{time.perf_counter() - started:.0f} s in all; files in {out}")


def print_table(summary: dict) -> None:
    def ci(value: dict) -> str:
        return f"{value['mean']:.3f} [{value['ci95'][0]:.3f}, {value['ci95'][1]:.3f}]"

    print(f"{'method':21} {'n':>3} {'s/img':>6}  {'deletion AUC':24} {'random':24} {'ratio':>5}  "
          f"{'insertion AUC':24} {'random':24} {'ratio':>5}  {'sanity rho head / top':24} passed")
    for name, m in summary["methods"].items():
        rho = " / ".join(ci(s) for s in m["sanity"]["stages"].values())
        print(f"{name:21} {m['images']:3d} {m['seconds_per_image']:6.2f}  {ci(m['deletion_auc']):24} "
              f"{ci(m['random_deletion_auc']):24} {m['deletion_auc']['mean'] / m['random_deletion_auc']['mean']:5.2f}  "
              f"{ci(m['insertion_auc']):24} {ci(m['random_insertion_auc']):24} "
              f"{m['insertion_auc']['mean'] / m['random_insertion_auc']['mean']:5.2f}  {rho:24} "
              f"{m['sanity']['passed']}{' (beats random on deletion)' if m['beats_random_deletion'] else ''}")
    print(f"best: {summary['best']} ({summary['best_rule']})")


if __name__ == "__main__":
    main()
