"""On-disk caches that make repeated work free.

- **Features** of a frozen backbone: one float32 vector per image, keyed by the model (library, name,
  the weights file's hash, body cut, preprocessing) and by the image file's content hash. A changed or
  added file is computed again; nothing else is. A second run with other head settings reuses them.
- **Pixels**: each image decoded once and resized to the model's ``resize_size`` (shorter side), stored
  as uint8; training crops and augments these instead of decoding the original every epoch.
  Files are read one at a time (memory stays bounded whatever the dataset's size).

Location: ``--cache-dir``, else ``$IMGTUNE_CACHE``, else ``$XDG_CACHE_HOME/imgtune``.
Every file is written atomically, so concurrent processes and crashes leave no half files. Every entry
carries its dtype, shape and a CRC-32 of its bytes (zip's and PNG's checksum: it finds damage at a
fraction of a cryptographic hash's cost), and is checked against what its store expects on every read:
a damaged entry is named in a warning, treated as absent and computed again.

A cache folder holds ``IMGTUNE_CACHE.json`` (and ``CACHEDIR.TAG`` where imgtune created the folder):
:func:`clear` refuses a folder without it, and removes only files of the cache's own naming.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import finite
from .atomic import atomic_write, atomic_write_bytes
from .errors import UsageError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: entries with a header (dtype, shape, checksum); 1: bare .npy
SUFFIX = ".arr"
MARKER = "IMGTUNE_CACHE.json"
TAG = "CACHEDIR.TAG"  # https://bford.info/cachedir/: backup tools skip the folder
TAG_TEXT = ("Signature: 8a477f597d28d172789f06886806bc55\n"
            "# This file is a cache directory tag created by imgtune (feature and decoded-pixel caches).\n"
            "# For information about cache directory tags, see: https://bford.info/cachedir/\n")
_MAGIC = b"\x93IMGTUNE"  # then a format byte, a 4-byte header length, the JSON header, the array's bytes
_PREFIX = len(_MAGIC) + 5
_HEADER_LIMIT = 4096


def default_cache_dir() -> Path:
    if os.environ.get("IMGTUNE_CACHE"):
        return Path(os.environ["IMGTUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imgtune"


def file_sha256(path: Path, _memo: dict = {}) -> str:  # noqa: B006 (a deliberate per-process memo)
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _memo:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _memo[key] = digest.hexdigest()
    return _memo[key]


def key_of(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Expect:
    """What every entry of a store must be: its dtype, its shape (``None``: any length on that axis),
    the shorter of its first two axes (pixels: ``resize_size``); float entries must be finite."""

    dtype: str
    shape: tuple[int | None, ...]
    shorter_side: int | None = None

    def problem(self, dtype: np.dtype, shape: tuple[int, ...]) -> str | None:
        if dtype != np.dtype(self.dtype):
            return f"dtype {dtype}, expected {np.dtype(self.dtype)}"
        wanted = "x".join("*" if n is None else str(n) for n in self.shape)
        if len(shape) != len(self.shape) or any(n is not None and n != s for n, s in zip(self.shape, shape)):
            return f"shape {'x'.join(map(str, shape))}, expected {wanted}"
        if self.shorter_side is not None and min(shape[:2]) != self.shorter_side:
            return f"shape {'x'.join(map(str, shape))}, expected a shorter side of {self.shorter_side}"
        return None


class BadEntry(Exception):
    """A cache entry that cannot be used; the message says why."""


class ArrayStore:
    """Arrays by content digest under ``root``: ``root/ab/abcdef....arr``, checked on every read."""

    def __init__(self, root: Path, description: dict, expect: Expect | None = None):
        self.root = root
        self.expect = expect
        self.root.mkdir(parents=True, exist_ok=True)
        info = self.root / "key.json"  # what the folder's key stands for, for people looking at the cache
        text = finite.dumps(description, indent=2, default=str).encode()
        if not info.exists() or info.read_bytes() != text:
            atomic_write_bytes(info, text, fsync=False)

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / f"{digest}{SUFFIX}"

    def get(self, digest: str) -> np.ndarray | None:
        """The entry, or ``None`` when it is absent or damaged (then a warning names it)."""
        path = self.path(digest)
        try:
            return read_entry(path, self.expect)
        except FileNotFoundError:
            return None
        except (BadEntry, OSError) as exc:
            log.warning("damaged cache entry %s (%s): computing it again", path, exc)
            return None

    def put(self, digest: str, array: np.ndarray) -> None:
        target = self.path(digest)
        target.parent.mkdir(exist_ok=True)
        atomic_write(target, lambda tmp: write_entry(tmp, array), fsync=False)  # get() checks what it reads


def write_entry(path: Path, array: np.ndarray) -> None:
    data = np.ascontiguousarray(array)
    header = json.dumps({"dtype": data.dtype.str, "shape": list(data.shape),
                         "crc32": zlib.crc32(data)}).encode()
    with path.open("wb") as handle:
        handle.write(_MAGIC + bytes([FORMAT_VERSION]) + len(header).to_bytes(4, "little") + header)
        handle.write(data.data)


def read_entry(path: Path, expect: Expect | None = None) -> np.ndarray:
    """The array in ``path``, checked: header, dtype and shape (against ``expect``) before its bytes
    are read (so a damaged header cannot make it read much), then their checksum and finiteness."""
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise BadEntry("empty file")
        head = handle.read(_PREFIX)
        if len(head) < _PREFIX or not head.startswith(_MAGIC) or head[len(_MAGIC)] != FORMAT_VERSION:
            raise BadEntry(f"not an imgtune cache entry of format {FORMAT_VERSION}")
        length = int.from_bytes(head[-4:], "little")
        dtype, shape, checksum = _parse_header(handle.read(min(length, _HEADER_LIMIT)), length)
        problem = expect.problem(dtype, shape) if expect else None
        if problem:
            raise BadEntry(problem)
        expected = _PREFIX + length + dtype.itemsize * math.prod(shape)
        if size != expected:
            raise BadEntry(f"{size} bytes, expected {expected} for its header")
        data = bytearray(size - _PREFIX - length)  # writable, as torch.from_numpy wants
        handle.readinto(data)
    if zlib.crc32(data) != checksum:
        raise BadEntry("checksum mismatch")
    array = np.frombuffer(data, dtype).reshape(shape)
    if dtype.kind == "f" and not np.isfinite(array).all():
        raise BadEntry("non-finite values")
    return array


def _parse_header(raw: bytes, length: int) -> tuple[np.dtype, tuple[int, ...], int]:
    try:
        if len(raw) != length:
            raise ValueError("header too long or cut short")
        header = json.loads(raw)
        dtype = np.dtype(str(header["dtype"]))
        shape = tuple(int(n) for n in header["shape"])
        checksum = int(header["crc32"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BadEntry(f"unreadable header: {exc}") from None
    if dtype.kind not in "biuf" or dtype.fields or dtype.subdtype or any(n < 0 for n in shape):
        raise BadEntry(f"not a plain numeric array (dtype {dtype}, shape {shape})")
    return dtype, shape, checksum


def open_cache(root: Path) -> None:
    """Make ``root`` a cache folder: the marker (always) and ``CACHEDIR.TAG`` (only where imgtune creates
    the folder: a tag in a folder of the user's own would make backup tools skip all of it)."""
    fresh = not root.exists() or not any(root.iterdir())
    root.mkdir(parents=True, exist_ok=True)
    if fresh:
        atomic_write_bytes(root / TAG, TAG_TEXT.encode(), fsync=False)
    if not (root / MARKER).exists():
        about = {"imgtune_cache": FORMAT_VERSION,
                 "about": "imgtune's feature, decoded-pixel, file-check and probe caches; `imgtune cache clear` "
                          "removes only the files imgtune wrote here (features/<key>/..., "
                          "pixels/<size>-<interpolation>/..., checks/<key>/..., probes/<key>/...)"}
        atomic_write_bytes(root / MARKER, json.dumps(about, indent=2).encode(), fsync=False)


def feature_store(root: Path, model_description: dict, num_features: int | None = None) -> ArrayStore:
    description = {"kind": "features", "version": FORMAT_VERSION, **model_description}
    open_cache(root)
    expect = Expect("float32", (num_features,)) if num_features else None
    return ArrayStore(root / "features" / key_of(description), description, expect)


def activation_store(root: Path, model_description: dict, ndim: int, dtype: str = "float16") -> ArrayStore:
    """A frozen lower part's activations (imgtune.activations): one view of an image per entry, float16
    (the training views) or float32 (the validation images')."""
    description = {"kind": "activations", "version": FORMAT_VERSION, **model_description}
    open_cache(root)
    return ArrayStore(root / "activations" / key_of(description), description, Expect(dtype, (None,) * ndim))


def check_store(root: Path) -> ArrayStore:
    """What the file checks found for each file content (:mod:`imgtune.data.checked`); Pillow's and
    imgtune's versions are in the key, so an upgrade checks every file again."""
    import PIL

    from . import __version__

    description = {"kind": "checks", "version": FORMAT_VERSION, "imgtune": __version__, "pillow": PIL.__version__}
    open_cache(root)
    return ArrayStore(root / "checks" / key_of(description), description, Expect("uint8", (None,)))


def probe_store(root: Path) -> ArrayStore:
    """What ``imgtune rank``'s probe found for a set of features (:mod:`imgtune.probe`): a deterministic
    function of the features, labels and settings, which are in each entry's digest; scikit-learn's and
    imgtune's versions are in the store's key, so an upgrade scores again."""
    import sklearn

    from . import __version__

    description = {"kind": "probes", "version": FORMAT_VERSION, "imgtune": __version__,
                   "sklearn": sklearn.__version__}
    open_cache(root)
    return ArrayStore(root / "probes" / key_of(description), description, Expect("uint8", (None,)))


def pixel_store(root: Path, resize_size: int, interpolation: str) -> ArrayStore:
    description = {"kind": "pixels", "version": FORMAT_VERSION, "resize_size": resize_size,
                   "interpolation": interpolation}
    open_cache(root)
    expect = Expect("uint8", (None, None, 3), shorter_side=resize_size)
    return ArrayStore(root / "pixels" / f"{resize_size}-{interpolation}", description, expect)


# What imgtune writes under a cache folder, relative to it; anything else there is not imgtune's.
_ENTRY = r"(?P<ab>[0-9a-f]{2})/(?P=ab)[0-9a-f]+\.(?:arr|npy)"  # .npy: format 1
_STORES = (r"(?:features/[0-9a-f]{24}|activations/[0-9a-f]{24}|checks/[0-9a-f]{24}|probes/[0-9a-f]{24}"
           r"|pixels/[0-9]+-[a-z][a-z-]*)")
KINDS = ("features", "activations", "pixels", "checks", "probes")  # the folders of a cache
_WRITING = r"\.[^/]+\.[A-Za-z0-9_]+\.tmp"  # a write that a killed process left (see imgtune.atomic)
_BODY = r"features/[0-9a-f]{24}/body-[0-9a-f]{16}\.onnx"  # the exported body (imgtune.body_runtime)
_OWN = re.compile(rf"{_BODY}|{_STORES}/(?:{_ENTRY}|key\.json|(?:[0-9a-f]{{2}}/)?{_WRITING})")
_OWN_ENTRY = re.compile(rf"(?:.*/)?{_ENTRY}")


@dataclass
class Removed:
    entries: int = 0  # cached arrays
    others: int = 0  # key.json files, exported bodies and unfinished writes
    size: int = 0  # bytes


def cache_size(root: Path) -> tuple[int, int]:
    """(entries, bytes) of the cached arrays under ``root`` (a cache folder or one of its parts)."""
    files = total = 0
    for path, relative in _walk(root):
        if _OWN_ENTRY.fullmatch(relative):
            files += 1
            total += path.lstat().st_size
    return files, total


def clear(root: Path) -> Removed:
    """Remove the files imgtune's cache wrote under ``root``, and nothing else. A folder without the
    marker is refused unless it holds exactly what an older imgtune (format 1, before the marker) wrote."""
    removed = Removed()
    if not root.exists():
        return removed
    if not root.is_dir():
        raise UsageError(f"--cache-dir {root} is not a folder; nothing was removed")
    if not (root / MARKER).is_file():
        _check_unmarked(root)
    for path, relative in _walk(root, KINDS):
        if _OWN.fullmatch(relative):
            size = path.lstat().st_size
            path.unlink(missing_ok=True)
            removed.size += size
            if _OWN_ENTRY.fullmatch(relative):
                removed.entries += 1
            else:
                removed.others += 1
    _remove_empty_stores(root)
    return removed


def _check_unmarked(root: Path) -> None:
    """Refuse a folder without the marker unless everything in it is what imgtune format 1 wrote."""
    stranger = next((path for path in root.iterdir() if path.name not in KINDS), None)
    found_key = False
    for path, relative in _walk(root, KINDS) if stranger is None else ():
        if not _OWN.fullmatch(relative) or path.is_symlink():
            stranger = path
            break
        found_key = found_key or path.name == "key.json"
    if stranger is not None or not found_key:
        what = f"holds {stranger}, which imgtune did not write" if stranger else "holds no cache of imgtune's"
        raise UsageError(f"{root} is not an imgtune cache: it has no {MARKER} (which imgtune writes in every "
                         f"cache folder it uses) and {what}. Nothing was removed. Check --cache-dir and "
                         "$IMGTUNE_CACHE; to empty this folder anyway, delete its files yourself.")


def _walk(root: Path, parts: tuple[str, ...] = ("",)):
    """(path, path relative to ``root`` with ``/``) of every file under ``root``'s ``parts``, links not
    followed (a ``features`` that links elsewhere is not the cache's)."""
    tops = [root / part for part in parts if not (root / part).is_symlink()]
    for folder, dirs, files in (step for top in tops for step in os.walk(top)):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            yield path, path.relative_to(root).as_posix()


def _remove_empty_stores(root: Path) -> None:
    for kind in KINDS:
        for store in sorted((root / kind).glob("*")) if (root / kind).is_dir() else ():
            if store.is_dir() and not store.is_symlink() and re.fullmatch(_STORES, f"{kind}/{store.name}"):
                for part in sorted(store.glob("??")):
                    _rmdir_if_empty(part)
                _rmdir_if_empty(store)


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # not empty (files of someone else's), or not a folder
