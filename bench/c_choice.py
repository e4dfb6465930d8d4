"""How the head fit chooses its regularisation C (imgtune.head_fit.choose_c): the one-standard-error rule
against the best mean cross-validated log loss, on the same features, in one invocation.

Features: the default model's (``mobilenet_v2`` at 224 px), from ``imgtune train --strategy linear-probe
--size-from pretrained`` into a fresh cache, read back from it. For each dataset: the val accuracy of
the head fitted (as imgtune fits it: standardised features, L-BFGS) at every C of the grid on the whole
training split; then, for fold seeds 0-3, the C each rule picks on 5 stratified folds and its val
accuracy. Datasets: bench/default.py's (hymenoptera, its few-shot draws of 10 images a class, digits
64 px, the small 28-48 px shapes, 28 px MNIST).

    python bench/c_choice.py [--datasets hymenoptera few-shot digits small mnist] [--seeds 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from common import child_env, run_measured, warm_imports
from default import datasets

from imgtune.cache import read_entry
from imgtune.data.scan import load_splits
from imgtune.head_fit import CS, MAX_ITER


def features(data: Path, work: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train x, train y, val x, val y) from the feature cache of one linear-probe run."""
    cache = work / "cache"
    command = [sys.executable, "-m", "imgtune", "-q", "train", str(data), "--model", "mobilenet_v2", "--offline",
               "--strategy", "linear-probe", "--size-from", "pretrained", "--out", str(work / "run"), "--overwrite",
               "--allow-outside-paths"]
    _, _, result = run_measured(command, child_env(IMGTUNE_CACHE=str(cache)))
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    (store,) = (cache / "features").iterdir()
    splits = load_splits(data, progress=False, allow_outside_paths=True)

    def read(split: str):
        found = [(read_entry(store / s.digest[:2] / f"{s.digest}.arr"), splits.classes.index(s.label))
                 for s in splits.split(split) if (store / s.digest[:2] / f"{s.digest}.arr").exists()]
        return np.stack([x for x, _ in found]).astype(np.float64), np.array([y for _, y in found])

    return (*read("train"), *read("val"))


def compare(name: str, data: Path, work: Path, seeds: int) -> None:
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    x, y, xv, yv = features(data, work)
    mean, scale = x.mean(0), x.std(0)
    scale[scale < 1e-12] = 1.0
    z, zv = (x - mean) / scale, (xv - mean) / scale
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")
        accuracy = {c: float((LogisticRegression(C=c, max_iter=MAX_ITER).fit(z, y).predict(zv) == yv).mean())
                    for c in CS}
        print(f"{name} ({len(y)} training, {len(yv)} val images): val accuracy by C: "
              + ", ".join(f"{c:g} {a:.4f}" for c, a in accuracy.items()), flush=True)
        folds = min(5, int(np.bincount(y).min()))
        for seed in range(seeds):
            search = LogisticRegressionCV(Cs=CS, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                                          max_iter=MAX_ITER, refit=False, scoring="neg_log_loss").fit(z, y)
            scores = np.asarray(next(iter(search.scores_.values()))).reshape(folds, -1)
            means, error = scores.mean(0), scores.std(0, ddof=1) / np.sqrt(folds)
            top = int(np.argmax(means))
            rule = CS[int(np.flatnonzero(means >= means[top] - error[top] - 1e-9)[0])]
            print(f"  fold seed {seed}: best mean C {CS[top]:g} -> {accuracy[CS[top]]:.4f}; "
                  f"one standard error C {rule:g} -> {accuracy[rule]:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["hymenoptera", "few-shot", "digits", "small", "mnist"],
                        choices=["hymenoptera", "few-shot", "digits", "small", "mnist"])
    parser.add_argument("--seeds", type=int, default=4, help="fold seeds per dataset")
    args = parser.parse_args()
    warm_imports()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for k, (name, data) in enumerate(datasets(work, args.datasets, False, 10, range(3)).items()):
            compare(name, data, work / f"run-{k}", args.seeds)


if __name__ == "__main__":
    main()
