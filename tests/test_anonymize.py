"""``--anonymize`` of report, doctor and explain: no input file name, no path and no absolute path of the
data's folder in any output (pages, JSON, terminal), every embedded or written image decoded and found
free of EXIF, ICC, XMP and text metadata although the inputs carried EXIF with GPS and a comment, a note
on each page; without the flag the names are there as before. And the key and its tokens: private,
stable, keyed, looked up again."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, PngImagePlugin

from datagen import CLASSES, SCRATCH_ARGS, draw, write_unreadable
from imgtune.anonymize import NOTE, Anonymizer, find_token, load_key
from imgtune.cli import main
from imgtune.errors import UsageError

SECRET = ("patient_SMITH", "SMITH", "ward_7", "hospital_north")  # in every input name and folder
DATA_URI = re.compile(r"data:image/(?:png|jpeg);base64,([A-Za-z0-9+/=]+)")
METADATA_BYTES = (b"Exif", b"GPS", b"tEXt", b"iTXt", b"zTXt", b"eXIf", b"iCCP", b"ICC_PROFILE", b"xmp", b"XMP",
                  b"Software", b"matplotlib", b"comment")
GPS_IFD = 0x8825


@pytest.fixture(autouse=True)
def _key(tmp_path_factory, monkeypatch):
    """The default key lives in a test folder, never in the user's ~/.config."""
    monkeypatch.setenv("IMGTUNE_ANONYMIZE_KEY", str(tmp_path_factory.getbasetemp() / "keys" / "anonymize.key"))


def private_image(path: Path, name: str, rng: np.random.Generator) -> Path:
    """A class image saved with EXIF (GPS position, description), a comment, an ICC profile and XMP."""
    image = draw(name, rng)
    exif = image.getexif()
    exif[0x010E] = "patient_SMITH scan, ward_7"  # ImageDescription
    exif.get_ifd(GPS_IFD).update({1: "N", 2: (51.0, 30.0, 0.0), 3: "W", 4: (0.0, 7.0, 0.0)})
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/">patient_SMITH</x:xmpmeta>'
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        text = PngImagePlugin.PngInfo()
        text.add_text("Comment", "patient_SMITH, GPS 51.5 N")
        text.add_itxt("XML:com.adobe.xmp", xmp.decode())
        image.save(path, exif=exif, icc_profile=icc, pnginfo=text)
    else:
        image.save(path, exif=exif, icc_profile=icc, comment=b"patient_SMITH, GPS 51.5 N", xmp=xmp, quality=95)
    return path


def private_dataset(root: Path, train: int = 6, val: int = 3) -> Path:
    """split/class/ward_7/patient_SMITH_<n>.{png,jpg}: every name and folder says who the image shows."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for name in CLASSES:
            for i in range(count):
                ext = ".png" if i % 2 else ".jpg"
                private_image(root / split / name / "ward_7" / f"patient_SMITH_{name}_{i:03d}{ext}", name, rng)
    return root


def assert_private(text: str, where: str, tmp: Path) -> None:
    outside = DATA_URI.sub("", text)
    for secret in (*SECRET, str(tmp), tmp.name):
        assert secret not in outside, f"{where} names {secret!r}"


def assert_bare(data: bytes, where: str) -> None:
    """An image that decodes, and carries no metadata at all (parsed and as raw bytes)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert not image.getexif(), f"{where}: EXIF left"
        assert not getattr(image, "text", {}), f"{where}: text chunks left"
        assert not {"exif", "icc_profile", "xmp", "XML:com.adobe.xmp", "comment"} & set(image.info), where
    for marker in METADATA_BYTES:
        assert marker not in data, f"{where}: {marker!r} in the bytes"


def embedded(text: str) -> list[bytes]:
    return [base64.b64decode(found) for found in DATA_URI.findall(text)]


def check_page(path: Path, tmp: Path) -> str:
    text = path.read_text()
    assert_private(text, path.name, tmp)
    assert NOTE.split(":")[0] in text and 'id="anonymised"' in text
    images = embedded(text)
    assert images, f"{path.name} embeds no image"
    for i, data in enumerate(images):
        assert_bare(data, f"{path.name} image {i}")
    return text


@pytest.fixture(scope="module")
def private_data(tmp_path_factory) -> Path:
    """tmp/hospital_north/data: the dataset."""
    top = tmp_path_factory.mktemp("hospital_north")
    private_dataset(top / "data")
    return top


@pytest.fixture(scope="module")
def private(private_data) -> Path:
    """... and a tiny run trained on it, tmp/hospital_north/study."""
    assert main(["-q", "train", str(private_data / "data"), *SCRATCH_ARGS, "--epochs", "1", "--workers", "0",
                 "--out", str(private_data / "study")]) == 0
    return private_data


def test_key_is_private_stable_and_keyed(tmp_path):
    key = load_key()  # the default (here: the test's), created on first use
    path = Path(os.environ["IMGTUNE_ANONYMIZE_KEY"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(key) == 64
    assert load_key() == key
    (tmp_path / "a b").mkdir()
    image = tmp_path / "a b" / "patient_SMITH_001.png"
    image.write_bytes(b"x")
    first, again, other = Anonymizer(key), Anonymizer(key), Anonymizer(b"another key of 32 bytes........!")
    token = first.token(image)
    assert re.fullmatch(r"file-[0-9a-f]{16}", token)
    assert again.token(os.path.relpath(image)) == token  # relative or absolute: one file, one token
    assert other.token(image) != token
    assert first.token(tmp_path).startswith("folder-")
    assert find_token(token, key, [tmp_path]) == [image]
    text = f"{image}: bad; see patient_SMITH_001.png and {tmp_path}/a b/other.png"
    assert_private(first.scrub(text), "scrubbed text", tmp_path)


def test_scrub_takes_the_longest_name_and_paths_below_known_folders(tmp_path):
    anonymizer = Anonymizer(b"0123456789abcdef0123456789abcdef")
    data = tmp_path / "ward_7"
    short, long = data / "img_1.png", data / "img_10.png"
    anonymizer.folder(data)
    tokens = {name: anonymizer.token(path) for name, path in (("short", short), ("long", long))}
    text = anonymizer.scrub(f"img_10.png, img_1.png; {long}: {data}/other/patient_SMITH.jpg and img_1.png.bak")
    assert text.startswith(f"{tokens['long']}, {tokens['short']}; {tokens['long']}: file-")
    assert text.endswith(" and img_1.png.bak")  # another name: not this file's
    assert_private(text.replace("img_1.png.bak", ""), "scrubbed text", tmp_path)
    assert anonymizer.scrub_path(f"cannot read {short}", short) == f"cannot read {tokens['short']}"


def test_anonymize_lookup_command(tmp_path, capsys):
    image = tmp_path / "ward_7" / "patient_SMITH_002.jpg"
    image.parent.mkdir()
    image.write_bytes(b"x")
    token = Anonymizer(load_key()).token(image)
    assert main(["anonymize", "lookup", token, str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(image)
    assert main(["anonymize", "lookup", "file-0000000000000000", str(tmp_path)]) == 3
    assert main(["anonymize", "key", str(tmp_path / "k")]) == 0
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert main(["anonymize", "key", str(tmp_path / "k")]) == 2  # never overwritten


def test_a_key_others_can_read_is_refused(tmp_path):
    key = tmp_path / "key"
    key.write_text("0123456789abcdef0123456789abcdef")
    key.chmod(0o644)
    with pytest.raises(UsageError, match="chmod 600"):
        load_key(key)


def test_doctor_anonymized(private_data, tmp_path, capsys):
    data = tmp_path / "hospital_north_copy"
    shutil.copytree(private_data / "data", data)
    first = sorted((data / "train" / "red_circle" / "ward_7").iterdir())[0]
    shutil.copy(first, data / "val" / "red_circle" / "ward_7" / "patient_SMITH_copy.png")  # leakage
    write_unreadable(data / "train" / "red_circle" / "ward_7" / "patient_SMITH_broken.png")
    out = tmp_path / "checked"
    assert main(["doctor", str(data), "--no-labels", "--out", str(out), "--anonymize"]) == 0
    printed = capsys.readouterr()
    assert_private(printed.out + printed.err, "the terminal", tmp_path)
    report = json.loads((out / "doctor.json").read_text())
    assert_private(json.dumps(report), "doctor.json", tmp_path)
    assert {"leakage", "unreadable"} <= {f["check"] for f in report["findings"]}
    assert all(re.fullmatch(r"file-[0-9a-f]{16}", p) for f in report["findings"] for p in f["paths"])
    check_page(out / "doctor.html", tmp_path)

    assert main(["doctor", str(data), "--no-labels", "--out", str(tmp_path / "plain")]) == 0
    plain = (tmp_path / "plain" / "doctor.html").read_text()
    assert "patient_SMITH_broken.png" in plain and "anonymised" not in plain


@pytest.mark.slow
def test_report_anonymized_and_not(private, tmp_path, capsys):
    """On other data where every image sits under every class, so there are mistakes to show."""
    mixed = tmp_path / "mixed"
    for i, image in enumerate(sorted((private / "data" / "val").rglob("patient_*"))):
        for name in CLASSES:
            target = mixed / name / "ward_7" / f"patient_SMITH_{i:03d}{image.suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, target)
    write_unreadable(mixed / "red_circle" / "ward_7" / "patient_SMITH_broken.png")  # listed as skipped
    out = tmp_path / "report.html"
    assert main(["report", str(private / "study"), str(mixed), "--out", str(out), "--gallery", "4",
                 "--anonymize"]) == 0
    printed = capsys.readouterr()
    assert_private(printed.out + printed.err, "the terminal", tmp_path)
    text = check_page(out, private)
    assert_private(text, "report.html", tmp_path)
    assert text.count("Grad-CAM overlay of file-") == 4
    assert re.search(r"<li><code>file-[0-9a-f]{16}</code>: ", text)  # the unreadable file, skipped

    assert main(["report", str(private / "study"), str(mixed), "--out", str(tmp_path / "plain.html"),
                 "--gallery", "4"]) == 0
    plain = (tmp_path / "plain.html").read_text()
    assert "patient_SMITH_broken.png" in plain and str(mixed) in plain and 'id="anonymised"' not in plain
    with pytest.raises(AssertionError, match="text chunks|Software|matplotlib"):  # the figures' own metadata
        for i, data in enumerate(embedded(plain)):
            assert_bare(data, f"plain image {i}")


@pytest.mark.slow
def test_explain_anonymized(private, tmp_path, capsys):
    run = private / "study"
    out = tmp_path / "overlays"
    images = private / "data" / "val" / "red_circle"
    assert main(["explain", str(run), str(images), "--out", str(out), "--format", "json", "--anonymize"]) == 0
    printed = capsys.readouterr()
    assert_private(printed.out + printed.err, "explain's output", private)
    rows = json.loads(printed.out)
    written = sorted(out.iterdir())
    assert len(rows) == len(written) == 3 and all(re.fullmatch(r"file-[0-9a-f]{16}\.gradcam\.png", p.name)
                                                  for p in written)
    for path in written:
        assert_bare(path.read_bytes(), path.name)

    assert main(["explain", str(run), "--evaluate", "--method", "gradcam", "--images", "3", "--sanity-images", "1",
                 "--anonymize"]) == 0  # into RUN, where the report finds it
    printed = capsys.readouterr()
    assert_private(printed.out + printed.err, "explain --evaluate's output", private)
    assert_private((run / "explain_eval.json").read_text(), "explain_eval.json", private)
    check_page(run / "explain_eval.html", private)
    assert main(["report", str(run), "--out", str(tmp_path / "report.html"), "--anonymize"]) == 0
    assert 'id="explanations"' in check_page(tmp_path / "report.html", private)
