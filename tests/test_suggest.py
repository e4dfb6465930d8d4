"""imgtune suggest (which unlabelled images to label next) and train --extra-labels."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datagen import PRETRAINED_ARGS, make_split_dataset, write_images, write_unreadable
from imgtune import acquire, suggest
from imgtune.cli import main
from imgtune.cli import suggest as suggest_cli


def test_diverse_takes_one_of_a_group_of_near_copies_margin_takes_them_all(tmp_path):
    rng = np.random.default_rng(0)
    write_images(tmp_path / "pool", "red_circle", 6, rng)
    first = sorted((tmp_path / "pool").glob("*"))[0]
    image = np.array(Image.open(first)).astype(np.int16)
    for k in range(1, 4):  # three near-copies of the first image
        Image.fromarray(np.clip(image + k, 0, 255).astype(np.uint8)).save(tmp_path / "pool" / f"near{k}.png")
    shutil.copy(first, tmp_path / "pool" / "exact.png")
    samples = sorted(suggest.unlabelled_images(tmp_path / "pool"), key=lambda s: s.path.name != first.name and
                     not s.path.name.startswith(("near", "exact")))
    group = [i for i, s in enumerate(samples) if s.path == first or s.path.name.startswith(("near", "exact"))]
    assert len(group) == 5
    uncertainty = np.array([0.9 - i * 1e-3 for i in range(len(samples))])  # the copies are the least sure
    order = suggest._one_per_group(samples, list(np.argsort(-uncertainty, kind="stable")), 4)
    assert order[0] == 0 and len(set(order)) == 4
    assert sum(i in group for i in order) == 1  # one of the five copies, then other images
    assert list(np.argsort(-uncertainty, kind="stable")[:4]) == group[:4]  # what margin alone would list


def test_uncertainty_measures_rank_the_boundary_first():
    probs = np.array([[0.98, 0.01, 0.01], [0.5, 0.45, 0.05], [0.34, 0.33, 0.33], [0.7, 0.2, 0.1]])
    assert list(np.argsort(-acquire.one_minus_margin(probs))) == [2, 1, 3, 0]
    assert list(np.argsort(-acquire.entropy(probs))) == [2, 1, 3, 0]
    assert suggest_cli.STRATEGIES == suggest.STRATEGIES and suggest_cli.CSV_NAME == suggest.CSV_NAME
    assert suggest_cli.DEFAULT_STRATEGY == suggest.DEFAULT_STRATEGY
    samples = [suggest.Sample(Path(f"{i}.png"), "") for i in range(len(probs))]
    for strategy in ("margin", "entropy", "diverse"):  # no near-copies here: all three list by uncertainty
        chosen = suggest.choose(samples, probs, np.eye(4), None, ["a", "b", "c"], 2, strategy)
        assert [c.path.name for c in chosen] == ["2.png", "1.png"]


def _clusters(rng, sizes, spread=0.05, dim=16):
    """Well-separated clusters of feature vectors (one centre per axis), their cluster numbers, and
    which row of each cluster lies nearest its centre."""
    vectors, owner = [], []
    for c, size in enumerate(sizes):
        centre = np.zeros(dim)
        centre[c] = 1.0
        vectors.append(centre + rng.normal(0, spread, (size, dim)))
        owner += [c] * size
    vectors = np.vstack(vectors)
    return vectors, np.array(owner)


def test_typical_labels_every_uncovered_cluster_once_from_its_dense_middle():
    rng = np.random.default_rng(0)
    sizes = (30, 25, 20, 15, 12, 10)
    vectors, owner = _clusters(rng, sizes)
    labelled, _ = _clusters(np.random.default_rng(1), (1, 1))  # clusters 0 and 1 hold a label already
    picked = acquire.typical_clusters(vectors, labelled, 4)  # 2 + 4 k-means clusters: the six above
    assert sorted(owner[picked]) == [2, 3, 4, 5]  # one of each cluster without labels, none of 0 and 1
    for i in picked:  # the most typical of its cluster: nearer its centre than most of the cluster
        members = vectors[owner == owner[i]]
        centre = members.mean(axis=0)
        distances = np.linalg.norm(members - centre, axis=1)
        assert np.linalg.norm(vectors[i] - centre) <= np.quantile(distances, 0.25)
    none = acquire.typical_clusters(vectors, np.empty((0, 16)), 6)  # no labels yet: one of each cluster
    assert sorted(owner[none]) == [0, 1, 2, 3, 4, 5]
    more = acquire.typical_clusters(vectors, labelled, 40)  # more than the clusters: still distinct rows
    assert len(set(more)) == 40 and set(owner[more]) == set(range(6))


def test_badge_takes_uncertain_images_of_different_directions():
    rng = np.random.default_rng(0)
    vectors, owner = _clusters(rng, (10, 10, 10))
    probs = np.tile([[0.999, 0.0005, 0.0005]], (30, 1))  # sure of everything ...
    probs[owner == 1] = [0.5, 0.5, 0.0]  # ... except clusters 1 and 2
    probs[owner == 2] = [0.4, 0.3, 0.3]
    picked = acquire.badge(probs, vectors, 2, seed=0)
    assert sorted(owner[picked]) == [1, 2]  # both uncertain clusters, not two images of one
    assert len(set(acquire.badge(probs, vectors, 30))) == 30


def test_hybrid_is_typical_with_few_labels_then_diverse():
    assert suggest.concrete("hybrid", 10 * 3 - 1, 3) == "typical"
    assert suggest.concrete("hybrid", 10 * 3, 3) == "diverse"
    assert suggest.concrete("margin", 0, 3) == "margin"


@pytest.mark.parametrize("strategy", ["typical", "badge"])
def test_set_strategies_take_one_of_a_group_of_near_copies(tmp_path, strategy):
    rng = np.random.default_rng(0)
    write_images(tmp_path / "pool", "red_circle", 6, rng)
    first = sorted((tmp_path / "pool").glob("*"))[0]
    image = np.array(Image.open(first)).astype(np.int16)
    for k in range(1, 4):
        Image.fromarray(np.clip(image + k, 0, 255).astype(np.uint8)).save(tmp_path / "pool" / f"near{k}.png")
    samples = sorted(suggest.unlabelled_images(tmp_path / "pool"), key=lambda s: s.path.name)
    copies = [i for i, s in enumerate(samples) if s.path == first or s.path.name.startswith("near")]
    vectors, _ = _clusters(rng, (len(samples),), spread=0.3)
    vectors[copies] = vectors[copies[0]]  # the copies: one dense (very typical) spot, the same gradient
    probs = np.tile([[0.5, 0.5]], (len(samples), 1))
    chosen = suggest.choose(samples, probs, vectors, None, ["a", "b"], len(samples), strategy)
    paths = [c.path for c in chosen]
    assert len(paths) == len(samples) - 3 == len(set(paths))  # all but three of the four copies
    assert sum(samples[i].path in paths for i in copies) == 1


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("suggest")
    data = make_split_dataset(root / "data", train=6, val=3)
    run = root / "run"
    assert main(["-q", "train", str(data), "--out", str(run), "--strategy", "linear-probe",
                 "--cache-dir", str(root / "cache"), *PRETRAINED_ARGS]) == 0
    return data, run


def _pool(folder, data):
    rng = np.random.default_rng(7)
    for name in ("red_circle", "green_square", "blue_triangle"):
        write_images(folder / name, name, 3, rng)
    first = sorted((folder / "red_circle").glob("*"))[0]
    image = np.array(Image.open(first)).astype(np.int16)
    image[0, 0] = (image[0, 0] + 1) % 256
    Image.fromarray(image.astype(np.uint8)).save(folder / "near_copy.png")
    shutil.copy(sorted((data / "val" / "red_circle").glob("*"))[0], folder / "copy_of_val.png")
    write_unreadable(folder / "broken.jpg")
    return first


def _read(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_suggest_writes_a_csv_to_fill_in_and_extra_labels_trains_on_it(trained, tmp_path, capsys):
    data, run = trained
    pool = tmp_path / "pool"
    original = _pool(pool, data)
    assert main(["suggest", str(run), str(pool), "--n", "5"]) == 0
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "copy_of_val.png: a copy of" in err and "val split" in err
    rows = _read(pool / "suggestions.csv")
    assert list(rows[0]) == ["path", "label", "guess", "prob"] and len(rows) == 5
    assert all(r["label"] == "" and 0 < float(r["prob"]) <= 1 for r in rows)
    paths = [r["path"] for r in rows]
    assert "copy_of_val.png" not in paths and "broken.jpg" not in paths
    assert not {original.relative_to(pool).as_posix(), "near_copy.png"} <= set(paths)  # not both near-copies
    assert main(["suggest", str(run), str(pool)]) == 2  # the CSV (maybe filled in) is kept
    assert "exists" in capsys.readouterr().err
    rows[0]["label"], rows[1]["label"] = "red_circle", "green_square"
    with open(pool / "suggestions.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    args = ["-q", "train", str(data), "--strategy", "linear-probe", "--cache-dir", str(tmp_path / "cache"),
            *PRETRAINED_ARGS, "--extra-labels", str(pool / "suggestions.csv")]
    assert main([*args, "--out", str(tmp_path / "more")]) == 0
    meta = json.loads((tmp_path / "more" / "meta.json").read_text())
    assert sum(meta["data"]["counts"]["train"].values()) == 18 + 2


@pytest.mark.slow
def test_bad_unlabelled_folders_and_bad_extra_labels(trained, tmp_path, capsys):
    data, run = trained
    (tmp_path / "empty").mkdir()
    assert main(["suggest", str(run), str(tmp_path / "empty")]) == 3
    assert "holds no image files" in capsys.readouterr().err
    write_unreadable(tmp_path / "broken" / "a.jpg")
    assert main(["suggest", str(run), str(tmp_path / "broken")]) == 3
    assert "none of its 1 image file(s) can be read" in capsys.readouterr().err
    shutil.copytree(data / "val", tmp_path / "only_val")
    assert main(["suggest", str(run), str(tmp_path / "only_val")]) == 3
    assert "every image given is a copy" in capsys.readouterr().err
    labels = tmp_path / "labels.csv"
    image = sorted((data / "train" / "red_circle").glob("*"))[0]
    labels.write_text(f"path,label,guess\n{image},,red_circle\n{image},purple_star,red_circle\n")
    args = ["-q", "train", str(data), "--out", str(tmp_path / "x"), *PRETRAINED_ARGS, "--allow-outside-paths"]
    assert main([*args, "--extra-labels", str(labels)]) == 3
    assert f"--extra-labels {labels} line 3: class 'purple_star' is not one of" in capsys.readouterr().err
    val_copy = sorted((data / "val" / "red_circle").glob("*"))[0]
    labels.write_text(f"path,label\n{val_copy},red_circle\n")
    assert main([*args, "--extra-labels", str(labels)]) == 3  # a val image added to train: leakage
    assert "leak" in capsys.readouterr().err.lower()
    assert not (tmp_path / "x" / "model.safetensors").exists()


@pytest.mark.slow
def test_typical_counts_the_runs_training_images_as_labelled(trained, tmp_path, caplog):
    data, run = trained
    pool = tmp_path / "pool"
    original = _pool(pool, data)
    found = suggest.suggest(run, pool, 4, "typical")
    paths = {f.path.name for f in found}
    assert len(found) == 4 and not {original.name, "near_copy.png"} <= paths
    assert "not at their recorded paths" not in caplog.text
    moved = tmp_path / "moved"
    data.rename(moved)  # the run's training images are gone: warned, and every cluster counts as unlabelled
    try:
        assert len(suggest.suggest(run, pool, 4, "typical")) == 4
    finally:
        moved.rename(data)
    assert "18 of the run's 18 training images are not at their recorded paths" in caplog.text
