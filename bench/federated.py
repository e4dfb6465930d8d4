"""Federated against centralised training on hymenoptera, split into three sites with skewed class shares.

Data: hymenoptera's train split divided into three sites of (nearly) equal size whose ants/bees shares
are 80/20, 50/50 and 20/80 (every training image in exactly one site); its val split divided evenly
(stratified) among the sites, so the pooled val of a federation is exactly the val split the
centralised run measures. Files are symlinked, not copied.

Runs, each a fresh process on this machine (loopback only):
- centralised: ``imgtune train HYMENOPTERA --model mobilenet_v2 --strategy linear-probe --offline`` with
  ``--head-fit sgd --epochs E`` (the federated sites' local optimiser) and with the default L-BFGS head fit;
- federated FedAvg: ``imgtune federate simulate S1 S2 S3 --strategy linear-probe --rounds R
  --local-epochs L --model mobilenet_v2 --offline`` with R x L = E;
- the same with central differential privacy (``--dp-noise Z --dp-clip C``), reporting (epsilon, delta);
- the same with secure aggregation (``--secure-aggregation --secagg-max-weight W``, Flower's SecAgg+),
  reporting how far its final model lies from plain FedAvg's (relative L2 difference of the head): the
  sites' training is seeded, so the difference is SecAgg+'s quantisation, carried through the rounds.

Prints val accuracy of each run, the federated minus centralised difference in points, wall seconds,
epsilon for the DP run and the SecAgg+ difference.

    python bench/federated.py [--rounds 4] [--local-epochs 2] [--dp-noise 1.0] [--dp-clip 0.5]
                              [--secagg-max-weight 100] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HYMENOPTERA, child_env, run_measured, warm_imports  # noqa: E402

SHARES = (0.8, 0.5, 0.2)  # share of ants at each site
BASE = ("--model", "mobilenet_v2", "--strategy", "linear-probe", "--offline")


def images(split: str, label: str) -> list[Path]:
    return sorted(p for p in (HYMENOPTERA / split / label).iterdir() if p.is_file())


def make_sites(root: Path, seed: int = 0) -> list[Path]:
    """Three site folders of symlinks: skewed train shares, val split evenly."""
    rng = random.Random(seed)
    ants, bees = images("train", "ants"), images("train", "bees")
    rng.shuffle(ants), rng.shuffle(bees)
    size = (len(ants) + len(bees)) / len(SHARES)
    wanted = [round(share * size) for share in SHARES]
    wanted[-1] = len(ants) - sum(wanted[:-1])  # every ant somewhere
    sites = []
    for i, n_ants in enumerate(wanted):
        site = root / f"site{i + 1}"
        n_bees = len(bees) if i == len(SHARES) - 1 else round(size) - n_ants
        _link(site / "train" / "ants", ants[:n_ants])
        _link(site / "train" / "bees", bees[:n_bees])
        ants, bees = ants[n_ants:], bees[n_bees:]
        for label in ("ants", "bees"):
            _link(site / "val" / label, images("val", label)[i::len(SHARES)])
        sites.append(site)
    return sites


def _link(folder: Path, files: list[Path]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        (folder / file.name).symlink_to(file)


def counts(site: Path) -> str:
    return ", ".join(f"{split} {label} {len(list((site / split / label).iterdir()))}"
                     for split in ("train", "val") for label in ("ants", "bees"))


def imgtune(*args: str) -> tuple[float, dict]:
    out = Path(args[args.index("--out") + 1])
    seconds, _, _ = run_measured([sys.executable, "-m", "imgtune", "-q", *args], child_env())
    return seconds, json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--dp-noise", type=float, default=1.0)
    parser.add_argument("--dp-clip", type=float, default=0.5)
    parser.add_argument("--secagg-max-weight", type=float, default=100.0,
                        help="SecAgg+'s largest site weight (just above the largest site's 82 training images)")
    parser.add_argument("--keep", help="keep the sites and run folders here")
    args = parser.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-federated-"))
    sites = make_sites(root / "sites")
    for site in sites:
        print(f"{site.name}: {counts(site)}")
    warm_imports()
    epochs = str(args.rounds * args.local_epochs)
    fed = ("federate", "simulate", *map(str, sites), "--rounds", str(args.rounds), "--local-epochs",
           str(args.local_epochs), *BASE)
    runs = {
        f"centralised, SGD head, {epochs} epochs": ("train", str(HYMENOPTERA), *BASE, "--head-fit", "sgd",
                                                    "--epochs", epochs, "--out", str(root / "central-sgd")),
        "centralised, L-BFGS head (default)": ("train", str(HYMENOPTERA), *BASE, "--out", str(root / "central")),
        f"federated FedAvg, {args.rounds} rounds x {args.local_epochs} local epochs":
            (*fed, "--out", str(root / "fedavg")),
        f"federated FedAvg + central DP (noise {args.dp_noise:g}, clip {args.dp_clip:g})":
            (*fed, "--dp-noise", str(args.dp_noise), "--dp-clip", str(args.dp_clip), "--out", str(root / "fedavg-dp")),
        f"federated FedAvg + SecAgg+ (max weight {args.secagg_max_weight:g})":
            (*fed, "--secure-aggregation", "--secagg-max-weight", str(args.secagg_max_weight), "--out",
             str(root / "fedavg-secagg")),
    }
    results = {name: imgtune(*argv) for name, argv in runs.items()}
    reference = next(iter(results.values()))[1]["accuracy"]
    print(f"\n{'run':<66} {'val acc':>8} {'vs SGD':>8} {'seconds':>8}  privacy")
    for name, (seconds, metrics) in results.items():
        privacy = metrics.get("privacy")
        spent = f"epsilon {privacy['epsilon']:.3g} at delta {privacy['delta']:g}" if privacy else ""
        print(f"{name:<66} {metrics['accuracy']:>8.4f} {100 * (metrics['accuracy'] - reference):>+8.2f} "
              f"{seconds:>8.1f}  {spent}")
    print(f"(val: {next(iter(results.values()))[1]['n']} images)")
    print(f"SecAgg+ final model vs plain FedAvg's: relative L2 difference {relative_difference(root):.3g}")


def relative_difference(root: Path) -> float:
    """||secure - plain|| / ||plain|| over the model's weights (only the head trains in linear-probe)."""
    import numpy as np
    from safetensors.numpy import load_file

    plain, secure = (load_file(str(root / name / "model.safetensors")) for name in ("fedavg", "fedavg-secagg"))
    diff = sum(float(np.sum((secure[k].astype(np.float64) - plain[k]) ** 2)) for k in plain if k.startswith("head"))
    norm = sum(float(np.sum(plain[k].astype(np.float64) ** 2)) for k in plain if k.startswith("head"))
    return (diff / norm) ** 0.5


if __name__ == "__main__":
    main()
