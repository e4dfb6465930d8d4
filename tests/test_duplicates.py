"""Exact and near duplicates: perceptual fingerprints, duplicate groups and their kinds, splits that
keep copies together, and what ``imgtune train`` does about copies across splits and classes.
Generated photo-like images (``plantgen``), distinct look-alikes (``lookalike``: scikit-learn's digit
scans), hand-built Samples, and a tiny CNN from scratch."""

from __future__ import annotations

import random
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lookalike
import plantgen
from datagen import SCRATCH_ARGS
from imagegen import write_class_tree
from imgtune.cli import main
from imgtune.data.duplicates import exact_groups, leaks_into, near_groups
from imgtune.data.fingerprint import NEAR_BITS, ROWS, WORDS, _hash_pairs, fingerprint, near_pairs, stack
from imgtune.data.pixelcheck import THUMB
from imgtune.data.scan import Sample, assign_splits, load_splits

LABELS = list(plantgen.CLASSES)
FAST = (*SCRATCH_ARGS, "--epochs", "1", "--workers", "0")


def photos(n: int, seed: int = 0, size: int = 160) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [plantgen.make_image(LABELS[i % len(LABELS)], rng, size) for i in range(n)]


def crops(image: Image.Image) -> dict[str, Image.Image]:
    """Two crops beside the one in ``near_variants`` (10% off the right and bottom)."""
    w, h = image.size
    return {"offset-crop-10%": image.crop((int(w * 0.1), int(h * 0.1), w, h)),
            "centre-crop-5%": image.crop((round(w * 0.05), round(h * 0.05), round(w * 0.95), round(h * 0.95)))}


# ---- fingerprints -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_near_variant_is_found(seed):
    original = photos(1, seed)[0]
    variants = {**plantgen.near_variants(original), **crops(original)}
    assert len(variants) == 6
    base = fingerprint(original)
    for kind, variant in variants.items():
        pairs = near_pairs(stack([base, fingerprint(variant)]))
        assert len(pairs) == 1, f"{kind} not found (seed {seed})"
        i, j, bits = pairs[0]
        assert (i, j) == (0, 1) and 0 <= bits <= NEAR_BITS


def test_near_pairs_with_queries_index_queries_and_prints():
    images = photos(5, seed=3)
    prints = stack([fingerprint(im) for im in images])
    queries = stack([fingerprint(plantgen.near_variants(images[3])["half-size"]), fingerprint(photos(1, 9)[0])])
    found = near_pairs(prints, queries)
    assert [(i, j) for i, j, _ in found] == [(0, 3)]


def test_different_images_are_not_near_duplicates():
    prints = stack([fingerprint(im) for im in photos(60, seed=7)])
    assert near_pairs(prints) == []
    # and each image is still found among the 60 (the check above is not empty by construction)
    again = stack([fingerprint(im) for im in photos(60, seed=7)])
    assert sorted((i, j) for i, j, _ in near_pairs(prints, again)) == [(i, i) for i in range(60)]


# ---- groups and their kinds ---------------------------------------------------------------------------


def sample(name: str, label: str = "cat", split: str = "train", digest: str | None = None,
           image: Image.Image | None = None) -> Sample:
    return Sample(Path(name), label, split, digest or f"digest-{name}", fingerprint(image) if image else None)


def names(group) -> list[str]:
    return sorted(str(s.path) for s in group.members)


@pytest.mark.parametrize("b_label, b_split, kinds", [
    ("cat", "train", ["within-class"]),
    ("dog", "train", ["across-classes"]),
    ("cat", "val", ["across-splits"]),
    ("dog", "val", ["across-classes", "across-splits"]),
])
def test_exact_groups_and_their_kinds(b_label, b_split, kinds):
    samples = [sample("a.jpg", digest="same"), sample("b.jpg", b_label, b_split, digest="same"),
               sample("c.jpg"), sample("d.jpg", "dog", "val")]
    groups = exact_groups(samples)
    assert len(groups) == 1
    assert groups[0].match == "exact" and names(groups[0]) == ["a.jpg", "b.jpg"]
    assert groups[0].kinds() == kinds


def test_exact_groups_of_three_copies_and_files_without_digest():
    samples = [sample("a1", digest="x"), sample("a2", digest="x"), sample("a3", split="val", digest="x"),
               Sample(Path("u1"), "cat", "train"), Sample(Path("u2"), "cat", "train")]  # not read: no digest
    groups = exact_groups(samples)
    assert [names(g) for g in groups] == [["a1", "a2", "a3"]]
    assert groups[0].kinds() == ["across-splits"]


@pytest.fixture(scope="module")
def three_photos() -> list[Image.Image]:
    return photos(3, seed=11)


@pytest.mark.parametrize("b_label, b_split, kinds", [
    ("cat", "train", ["within-class"]),
    ("dog", "train", ["across-classes"]),
    ("cat", "val", ["across-splits"]),
    ("dog", "test", ["across-classes", "across-splits"]),
])
def test_near_groups_and_their_kinds(three_photos, b_label, b_split, kinds):
    original, other, third = three_photos
    variant = plantgen.near_variants(original)["jpeg-q70"]
    samples = [sample("orig", image=original), sample("variant", b_label, b_split, image=variant),
               sample("other", image=other), sample("third", "dog", "val", image=third)]
    groups = near_groups(samples)
    assert len(groups) == 1
    group = groups[0]
    assert group.match == "near" and names(group) == ["orig", "variant"] and group.kinds() == kinds
    assert 0 <= group.bits <= NEAR_BITS


def test_near_groups_link_transitively(three_photos):
    original = three_photos[0]
    variants = plantgen.near_variants(original)
    samples = [sample("orig", image=original), sample("half", split="val", image=variants["half-size"]),
               sample("crop", split="test", image=variants["crop-10%"]), sample("other", image=three_photos[1])]
    groups = near_groups(samples)
    assert [names(g) for g in groups] == [["crop", "half", "orig"]]


def test_exact_copies_are_not_reported_again_as_near(three_photos):
    original, other, _ = three_photos
    copies = [sample("a", image=original, digest="same"), sample("a-copy", "dog", "val", image=original,
                                                               digest="same"),
              sample("other", image=other)]
    assert near_groups(copies) == []
    assert [names(g) for g in exact_groups(copies)] == [["a", "a-copy"]]
    # with a near variant of the copied file, the near group holds the variant and both copies, once each
    variant = sample("variant", split="val", image=plantgen.near_variants(original)["brightness+10%"])
    groups = near_groups(copies + [variant])
    assert [names(g) for g in groups] == [["a", "a-copy", "variant"]]


def test_leaks_into_pairs_held_out_with_train_but_not_exact_copies(three_photos):
    original, other, _ = three_photos
    train = [sample("orig", image=original, digest="same"), sample("other", image=other)]
    held_out = [sample("copy", split="val", image=original, digest="same"),
                sample("half", split="val", image=plantgen.near_variants(original)["half-size"])]
    found = leaks_into(train, held_out)
    assert [(str(a.path), str(b.path)) for a, b, _ in found] == [("half", "orig")]


def test_near_groups_of_samples_without_digest(three_photos):
    original, other, _ = three_photos
    samples = [Sample(Path("orig"), "cat", "train", None, fingerprint(original)),
               Sample(Path("half"), "cat", "val", None, fingerprint(plantgen.near_variants(original)["half-size"])),
               Sample(Path("other"), "cat", "train", None, fingerprint(other))]
    assert [names(g) for g in near_groups(samples)] == [["half", "orig"]]


# ---- splits keep copies together ----------------------------------------------------------------------


def split_by_path(samples: list[Sample]) -> dict[str, str]:
    return {str(s.path): s.split for s in samples}


@pytest.mark.parametrize("seed", range(8))
def test_assign_splits_keeps_copies_in_one_split(seed):
    samples = [Sample(Path(f"{label}/{i}.jpg"), label, digest=f"{label}-{i}") for label in ("a", "b")
               for i in range(10)]
    copies = [Sample(Path(f"a/copy{k}_of_{i}.jpg"), "a", digest=f"a-{i}") for i in (0, 3, 7) for k in range(2)]
    copies.append(Sample(Path("b/copy_of_5.jpg"), "b", digest="b-5"))
    assigned = assign_splits(samples + copies, val_fraction=0.2, test_fraction=0.2, seed=seed)
    assert len(assigned) == len(samples) + len(copies)
    splits_of_digest: dict[str, set[str]] = {}
    for s in assigned:
        splits_of_digest.setdefault(s.digest, set()).add(s.split)
    assert all(len(splits) == 1 for splits in splits_of_digest.values()), splits_of_digest
    for label in ("a", "b"):
        assert {s.split for s in assigned if s.label == label} == {"train", "val", "test"}


@pytest.mark.parametrize("seed", range(4))
def test_copies_in_a_class_folder_tree_land_in_one_split(tmp_path, seed):
    write_class_tree(tmp_path, {"a": 8, "b": 8})
    for i in (1, 4):
        shutil.copyfile(tmp_path / "a" / f"{i}.png", tmp_path / "a" / f"copy_of_{i}.png")
    (tmp_path / "b" / "nested").mkdir()
    shutil.copyfile(tmp_path / "b" / "2.png", tmp_path / "b" / "nested" / "2.png")
    data = load_splits(tmp_path, val_fraction=0.25, seed=seed, progress=False)
    split = {str(s.path.relative_to(tmp_path)): s.split for s in data.samples}
    assert len(split) == 19
    assert split["a/copy_of_1.png"] == split["a/1.png"] and split["a/copy_of_4.png"] == split["a/4.png"]
    assert split["b/nested/2.png"] == split["b/2.png"]


def reference_assign_splits(samples: list[Sample], val_fraction: float, test_fraction: float, seed: int):
    """The split before copies were kept together (scan.py at commit 722f477^), for files without copies."""
    by_class: dict[str, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    rng = random.Random(seed)
    out = []
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda s: str(s.path))
        rng.shuffle(members)
        n_test = max(1, round(len(members) * test_fraction)) if test_fraction > 0 else 0
        n_val = max(1, round(len(members) * val_fraction))
        splits = ["test"] * n_test + ["val"] * n_val + ["train"] * (len(members) - n_test - n_val)
        out += [replace(s, split=split) for s, split in zip(members, splits)]
    return out


@pytest.mark.parametrize("counts, val, test", [({"a": 20, "b": 10, "c": 5}, 0.2, 0.2),
                                               ({"big": 40, "small": 3}, 0.1, 0.1), ({"x": 7, "y": 2}, 0.3, 0.0)])
@pytest.mark.parametrize("seed", [0, 1, 5])
def test_without_copies_the_split_is_unchanged(counts, val, test, seed):
    samples = [Sample(Path(f"{label}/{i}.png"), label, digest=f"{label}{i}") for label, n in counts.items()
               for i in range(n)]
    random.Random(seed).shuffle(samples)  # the order found must not matter
    assigned = assign_splits(samples, val, test, seed)
    assert split_by_path(assigned) == split_by_path(reference_assign_splits(samples, val, test, seed))
    # unread files (no digest) are split the same way
    unread = [replace(s, digest=None) for s in samples]
    assert split_by_path(assign_splits(unread, val, test, seed)) == split_by_path(assigned)


def test_without_copies_counts_match_test_scan(tmp_path):
    write_class_tree(tmp_path, {"a": 20, "b": 10, "c": 5})
    data = load_splits(tmp_path, val_fraction=0.2, test_fraction=0.2, seed=1, progress=False)
    counts = {name: Counter(s.label for s in data.split(name)) for name in ("train", "val", "test")}
    assert counts == {"train": Counter(a=12, b=6, c=3), "val": Counter(a=4, b=2, c=1),
                      "test": Counter(a=4, b=2, c=1)}


# ---- imgtune train refuses copies across splits and classes, warns about near-duplicates --------------


@pytest.fixture
def data(tmp_path) -> Path:
    """4 classes, 4 train and 2 val images each, no two of them near-duplicates."""
    root = (tmp_path / "data").resolve()
    plantgen.write_clean(root, {"train": 4, "val": 2}, seed=3, size=64)
    return root


def train(data: Path, out: Path, *args: str) -> int:
    return main(["train", str(data), *FAST, "--out", str(out), *args])


def test_clean_data_trains_without_duplicate_warnings(data, tmp_path, capsys):
    assert train(data, tmp_path / "run") == 0
    err = capsys.readouterr().err
    assert "near-duplicate" not in err and "more than once" not in err


def test_train_refuses_a_file_copied_from_train_to_val(data, tmp_path, capsys):
    source = data / "train" / "circle" / "circle_train_000.jpg"
    copy = data / "val" / "circle" / "copy.jpg"
    shutil.copyfile(source, copy)
    assert train(data, tmp_path / "run") == 3
    err = capsys.readouterr().err
    assert str(source) in err and str(copy) in err
    assert "across-splits" in err and "--allow-leakage" in err
    assert not (tmp_path / "run").exists()


def test_allow_leakage_trains_and_warns(data, tmp_path, capsys):
    source = data / "train" / "square" / "square_train_001.jpg"
    copy = data / "val" / "square" / "copy.jpg"
    shutil.copyfile(source, copy)
    assert train(data, tmp_path / "run", "--allow-leakage") == 0
    err = capsys.readouterr().err
    warning = next(line for line in err.splitlines() if line.startswith("WARNING") and "more than once" in line)
    assert str(source) in warning and str(copy) in warning and "training anyway (--allow-leakage)" in warning
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_train_refuses_a_copy_under_another_class(data, tmp_path, capsys):
    source = data / "train" / "star" / "star_train_002.jpg"
    copy = data / "train" / "circle" / "also_star.jpg"
    shutil.copyfile(source, copy)
    assert train(data, tmp_path / "run") == 3
    err = capsys.readouterr().err
    assert str(source) in err and str(copy) in err and "across-classes" in err
    assert "across-splits" not in err
    assert not (tmp_path / "run").exists()


def test_near_duplicate_across_splits_trains_with_a_warning(data, tmp_path, capsys):
    source = data / "train" / "triangle" / "triangle_train_003.jpg"
    near = data / "val" / "triangle" / "smaller.jpg"
    image = Image.open(source)
    image.resize((image.width // 2, image.height // 2), Image.LANCZOS).save(near, quality=90)
    assert train(data, tmp_path / "run") == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "near-duplicate across splits" in line]
    assert len(warnings) == 1, err
    assert warnings[0].startswith("WARNING")
    assert f"{near} (val/triangle) looks like {source} (train/triangle)" in warnings[0]
    assert (tmp_path / "run" / "model.safetensors").is_file()


# ---- distinct images of one kind are not near-duplicates (issue 12, item 9) ---------------------------


@pytest.fixture(scope="module")
def digit_samples() -> list[Sample]:
    """scikit-learn's 1,797 distinct 8x8 digit scans, upscaled to 32 px, split as ``train`` splits them."""
    images, labels = lookalike.digits()
    samples = [Sample(Path(f"{label}/{i}.png"), label, digest=f"digit-{i}", fingerprint=fingerprint(image))
               for i, (image, label) in enumerate(zip(images, labels))]
    return assign_splits(samples, val_fraction=0.2, test_fraction=0.0, seed=0)


def test_digit_scans_give_at_most_20_near_duplicate_warnings(digit_samples):
    train = [s for s in digit_samples if s.split == "train"]
    held_out = [s for s in digit_samples if s.split != "train"]
    found = leaks_into(train, held_out)
    assert len(found) <= 20, f"{len(found)} false near-duplicate pairs across splits among distinct scans"


def test_the_pixel_check_refuses_look_alikes_the_hash_accepts(digit_samples):
    prints = stack([s.fingerprint for s in digit_samples[:600]])
    candidates = _hash_pairs(prints.hashes, prints.hashes, True, 64)
    confirmed = near_pairs(prints)
    assert len(candidates) > 50  # the hash alone calls many distinct scans near-duplicates ...
    assert len(confirmed) <= len(candidates) // 10  # ... the pixels do not
    assert set(confirmed) <= set(candidates)


def test_blank_images_are_still_near_duplicates():
    black, dark = Image.new("RGB", (64, 64)), Image.new("RGB", (80, 80), (3, 3, 3))
    assert [(i, j) for i, j, _ in near_pairs(stack([fingerprint(black), fingerprint(dark)]))] == [(0, 1)]


def test_fingerprint_holds_hashes_and_a_thumbnail():
    image = photos(1, seed=4)[0]
    raw = fingerprint(image)
    assert len(raw) == ROWS * WORDS * 8 + THUMB * THUMB
    prints = stack([raw, fingerprint(image.resize((40, 40)))])
    assert prints.hashes.shape == (2, ROWS, WORDS) and prints.thumbs.shape == (2, THUMB * THUMB)
    assert len(stack([])) == 0 and near_pairs(stack([])) == []


# ---- the fast paths equal the plain ones -------------------------------------------------------------


def _scipy_hashes(image: Image.Image) -> np.ndarray:
    """The hashes as the full 64x64 DCT (scipy) gives them: what ``fingerprint``'s product must equal."""
    from scipy.fft import dctn

    from imgtune.data.fingerprint import WINDOWS, _fit

    grey = image.convert("L")
    if max(grey.size) > 128:
        grey = grey.resize(_fit(grey.size, 128), Image.LANCZOS, reducing_gap=2.0)
    w, h = grey.size
    views = [grey] + [grey.crop((round(ox * w), round(oy * h), round((ox + frac) * w), round((oy + frac) * h)))
                      for frac, ox, oy in WINDOWS]
    dct = dctn(np.stack([np.asarray(v.resize((64, 64), Image.LANCZOS), dtype=np.float64) for v in views]),
               type=2, axes=(1, 2))
    out = np.empty((ROWS, WORDS), dtype=np.uint64)
    for size, columns in ((8, slice(0, 1)), (16, slice(1, WORDS))):
        low = dct[:, :size, :size].reshape(ROWS, -1)
        bits = low > np.median(low, axis=1, keepdims=True)
        out[:, columns] = np.frombuffer(np.packbits(bits, axis=1).tobytes(), dtype=">u8").reshape(ROWS, -1)
    return out


def test_fingerprint_hashes_equal_the_full_dct():
    scans, _ = lookalike.digits()
    mirrored = Image.fromarray(np.hstack([np.arange(32), np.arange(32)[::-1]]).astype(np.uint8)[None].repeat(64, 0))
    images = [*photos(6, seed=5), *scans[:40], Image.new("RGB", (50, 40), (90, 90, 90)), mirrored.convert("RGB"),
              photos(1, seed=6, size=300)[0]]
    for k, image in enumerate(images):
        got = np.frombuffer(fingerprint(image)[:ROWS * WORDS * 8], dtype=np.uint64).reshape(ROWS, WORDS)
        assert np.array_equal(got, _scipy_hashes(image)), f"image {k}"


@pytest.mark.parametrize("same", [True, False])
def test_hash_pairs_equal_the_pairwise_check(digit_samples, same):
    """Digit scans: many first-pass candidates; every pair checked one by one gives the same list."""
    from imgtune.data.fingerprint import FIRST_PASS_BITS

    prints = stack([s.fingerprint for s in digit_samples[:300]]).hashes
    queries = prints if same else stack([s.fingerprint for s in digit_samples[300:450]]).hashes
    expected = []
    for i, x in enumerate(queries):
        for j, y in enumerate(prints):
            if same and j <= i:
                continue
            first = min(int(np.bitwise_count(x[0, 0] ^ y[:, 0]).min()), int(np.bitwise_count(y[0, 0] ^ x[:, 0]).min()))
            full = min(int(np.bitwise_count(x[0, 1:][None] ^ y[:, 1:]).sum(-1).min()),
                       int(np.bitwise_count(y[0, 1:][None] ^ x[:, 1:]).sum(-1).min()))
            if first <= FIRST_PASS_BITS and full <= NEAR_BITS:
                expected.append((i, j, full))
    assert len(expected) > 20
    assert _hash_pairs(prints, queries, same, 64) == expected
