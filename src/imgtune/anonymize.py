"""``--anonymize`` of ``imgtune report``, ``doctor`` and ``explain``: outputs that can leave the site.

Every file path and file name becomes a keyed token, ``file-<16 hex>`` (``folder-`` for folders): the
first 64 bits of HMAC-SHA256 of the file's absolute path under a secret key kept locally. Without the key,
a name cannot be guessed back by hashing candidate names (a plain hash of ``patient_SMITH_001.png``
could be); with it, the same file gets the same token in every output, and ``imgtune anonymize lookup``
finds the file again. Class names stay: they are the user's own labels, and the pages mean nothing
without them.

Every embedded or written image is decoded and encoded again from its pixels alone
(:meth:`Anonymizer.image_bytes`), so no EXIF (GPS, camera, dates), comment, ICC profile, XMP or PNG text
chunk survives, whatever produced it (the input photo, matplotlib's ``Software`` chunk). The pages are
finished by :meth:`Anonymizer.page`: every ``data:`` image re-encoded, any known path left in the text
replaced (a net under the structured replacement each command does), and a visible note added.

The key: ``--anonymize-key FILE`` (must exist), else ``$IMGTUNE_ANONYMIZE_KEY``, else
``$XDG_CONFIG_HOME/imgtune/anonymize.key`` (``~/.config/...``), created with 32 random bytes and mode
0600 on first use. A key that other users can read, or shorter than 16 bytes, is refused.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import html
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from hashlib import sha256
from pathlib import Path

from markupsafe import escape

from .encode import bare_image, map_embedded
from .errors import UsageError

log = logging.getLogger(__name__)

KEY_ENV = "IMGTUNE_ANONYMIZE_KEY"
KEY_NAME = "anonymize.key"
KEY_BYTES = 32
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 4096
TOKEN_HEX = 16
TOKEN_PATTERN = re.compile(r"(file|folder)-[0-9a-f]{16}")
JPEG_QUALITY = 90
NOTE = ("Anonymised: file names and paths are replaced by keyed tokens (file-…, folder-…; "
        "<code>imgtune anonymize lookup TOKEN DATA</code> finds the file with the same key), and every image "
        "on this page was re-encoded from its pixels, without EXIF, ICC, XMP or text metadata. "
        "Class names are kept.")
_PATH_TAIL = r"(?:/[^\s'\"<>,;:()\[\]{}]*)"  # the rest of a path below a known folder


def default_key_path() -> Path:
    """Where the key lives when ``--anonymize-key`` is not given (created there on first use)."""
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "imgtune" / KEY_NAME


def create_key(path: str | Path) -> Path:
    """A new random key at ``path`` (mode 0600, its folder 0700 when made here); never overwrites one."""
    path = Path(path).expanduser()
    if path.exists() or path.is_symlink():
        raise UsageError(f"{path} exists already; a key is never overwritten (tokens made with it could no "
                         "longer be looked up). Choose another file or delete it yourself")
    try:  # written whole under a temporary name (mode 0600), then linked: never half a key, never overwritten
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(KEY_BYTES) + "\n")
            os.link(tmp, path)
        finally:
            os.unlink(tmp)
    except OSError as exc:  # also a key made meanwhile by another process (the link fails: it exists)
        raise UsageError(f"cannot create the anonymisation key {path}: {exc.strerror}; pass --anonymize-key "
                         f"FILE or set {KEY_ENV} to a file in a folder you can write to") from exc
    log.info("created the anonymisation key %s (keep it: it turns tokens back into file names)", path)
    return path


def load_key(path: str | Path | None = None, create: bool = True) -> bytes:
    """The key in ``path`` (which must exist), or in :func:`default_key_path` (created when missing and
    ``create``). Refused, with what to do: not a regular file, readable or writable by others, shorter than
    :data:`MIN_KEY_BYTES` or longer than :data:`MAX_KEY_BYTES`."""
    if path is None:
        path = default_key_path()
        if create and not path.exists():
            try:
                create_key(path)
            except UsageError:
                if not path.exists():
                    raise
                # else another process made the key meanwhile: that one is read
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"anonymisation key {path}: no such file; make one with `imgtune anonymize key {path}`")
    found = path.stat()
    if not path.is_file():
        raise UsageError(f"anonymisation key {path} is not a regular file; pass the key file itself")
    if found.st_mode & 0o077:
        raise UsageError(f"anonymisation key {path} can be read or changed by other users (mode "
                         f"{found.st_mode & 0o777:o}); run `chmod 600 {path}`")
    try:
        with path.open("rb") as handle:
            key = handle.read(MAX_KEY_BYTES + 1).strip()
    except OSError as exc:
        raise UsageError(f"cannot read the anonymisation key {path}: {exc.strerror}") from exc
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise UsageError(f"anonymisation key {path} holds {len(key)} bytes; a key needs {MIN_KEY_BYTES} to "
                         f"{MAX_KEY_BYTES} (make a new one with `imgtune anonymize key FILE`)")
    return key


def canonical(path: str | os.PathLike) -> str:
    """What a token is computed from: the absolute path with links resolved (a URL stays as it is), so
    ``data/a.png`` and ``/home/me/data/a.png`` get one token. The folder is resolved once for all its
    files (a look-up over thousands of files would otherwise stat every part of every path)."""
    text = os.fspath(path)
    if "://" in text:
        return text
    folder, name = os.path.split(os.path.abspath(os.path.expanduser(text)))
    joined = os.path.join(_real_folder(folder), name)
    return os.path.realpath(joined) if name and os.path.islink(joined) else joined


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)


class Anonymizer:
    """Tokens for paths under one key, and the cleaning of texts, structures, images and pages.

    Every path tokenised is remembered with the spellings it may have in a text (as given, absolute,
    resolved, its file name); :meth:`scrub` replaces each of them. A folder given to :meth:`folder` is
    also replaced with whatever path follows it."""

    def __init__(self, key: bytes):
        self._key = key
        self._forms: dict[str, str] = {}  # spelling -> token (files)
        self._folders: dict[str, str] = {}  # spelling -> token (folders: the path below is replaced too)
        self._pattern: re.Pattern | None = None

    @classmethod
    def open(cls, key_file: str | Path | None = None) -> "Anonymizer":
        return cls(load_key(key_file))

    def digest(self, path: str | os.PathLike) -> str:
        return hmac.new(self._key, canonical(path).encode("utf-8", "surrogateescape"), sha256).hexdigest()[:TOKEN_HEX]

    def token(self, path: str | os.PathLike) -> str:
        """``file-<hex>`` (``folder-<hex>`` for a folder) for ``path``, remembered for :meth:`scrub`."""
        text = os.fspath(path)
        if TOKEN_PATTERN.fullmatch(text):
            return text  # already a token (a second pass over cleaned values)
        kind = "folder" if "://" not in text and Path(text).is_dir() else "file"
        token = f"{kind}-{self.digest(text)}"
        forms = self._folders if kind == "folder" else self._forms
        for form in _spellings(text):
            forms.setdefault(form, token)
        self._pattern = None
        return token

    def folder(self, path: str | os.PathLike) -> str:
        """The token of a folder whose paths below are replaced too (data roots, run folders, --out)."""
        text = os.fspath(path)
        token = f"folder-{self.digest(text)}"
        for form in _spellings(text, with_name=False):
            self._folders.setdefault(form, token)
        self._pattern = None
        return token

    def remember(self, paths: Iterable) -> None:
        for path in paths:
            self.token(str(path))

    def scrub(self, text: str) -> str:
        """``text`` with every known spelling of a path replaced by its token (longest first; a name
        only where it stands alone, not inside a longer name)."""
        if not text or not (self._forms or self._folders):
            return text
        return self._compiled().sub(self._replace, text)

    def scrub_path(self, text: str, path: str | os.PathLike) -> str:
        """``text`` with the spellings of ``path`` alone replaced by its token: for a message about one
        file, without rebuilding the pattern of every path (one error among thousands of files)."""
        token = self.token(path)
        for form in sorted(_spellings(os.fspath(path)), key=len, reverse=True):
            text = text.replace(form, token)
        return text

    def clean(self, value):
        """A copy of a JSON-like value (dicts, lists, tuples, strings, paths) with every string scrubbed
        and every path object tokenised; ``data:`` URIs and other values unchanged."""
        if isinstance(value, str):
            return value if value.startswith("data:") else self.scrub(value)
        if isinstance(value, os.PathLike):
            return self.token(value)
        if isinstance(value, dict):
            return {self.clean(k): self.clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.clean(v) for v in value)
        return value

    @contextlib.contextmanager
    def scrubbed_logging(self) -> Iterator[None]:
        """While the command runs, every log record (warnings name files as they are read) is scrubbed
        before any handler of the root logger writes it."""
        scrub = self.scrub

        class _Scrub(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                record.msg, record.args = scrub(record.getMessage()), None
                return True

        handlers, found = logging.getLogger().handlers, _Scrub()
        for handler in handlers:
            handler.addFilter(found)
        try:
            yield
        finally:
            for handler in handlers:
                handler.removeFilter(found)

    def image_bytes(self, data: bytes) -> bytes:
        """The image in ``data`` encoded again from its pixels alone (:func:`imgtune.encode.bare_image`)."""
        return bare_image(data, JPEG_QUALITY)

    def page(self, text: str) -> str:
        """An HTML page ready to leave the site: every embedded image re-encoded from its pixels, every
        known path in the text replaced, and the visible note after ``<body>``."""
        page = map_embedded(text, self.image_bytes, self.scrub)
        if "<body>" not in page:
            raise ValueError("an anonymised page needs a <body> for its note")
        return page.replace("<body>", f'<body>\n<p class="anonymised note" id="anonymised"><b>{NOTE}</b></p>', 1)

    def _compiled(self) -> re.Pattern:
        """One pattern of every spelling (also as HTML escapes it), as a trie so that its cost does not
        grow with the number of files: files first, then folders with the path below them (a folder's
        bare relative name, ``data``, only with a path below it, ``data/x.png``)."""
        if self._pattern is None:
            files = {**self._forms, **{str(escape(k)): v for k, v in self._forms.items()}}
            folders = {**self._folders, **{str(escape(k)): v for k, v in self._folders.items()}}
            self._lookup = {**folders, **files}
            rooted = [f for f in folders if "/" in f and f not in files]
            bare = [f for f in folders if "/" not in f and f not in files]
            # a file below a known folder is found by the folder's pattern: only its name needs one
            files = [f for f in files if not _below(f, rooted)]
            branches = [f"(?P<file>{_trie(files)})" if files else None,
                        f"(?P<folder>{_trie(rooted)}){_PATH_TAIL}?" if rooted else None,
                        f"(?P<below>{_trie(bare)}){_PATH_TAIL}" if bare else None]
            body = "|".join(b for b in branches if b)
            self._pattern = re.compile(rf"(?<![\w.\-])(?:{body})(?![\w\-]|\.\w)")
        return self._pattern

    def _replace(self, match: re.Match) -> str:
        found = match.group(0)
        if found in self._lookup:  # a file, or a folder itself
            return self._lookup[found]
        return self.token(html.unescape(found))  # a path below a known folder: its own token


def _below(path: str, folders: list[str]) -> bool:
    """Whether ``path`` lies below one of ``folders`` (spellings with a ``/``; few, so a plain scan)."""
    return "/" in path and any(path.startswith(folder + "/") for folder in folders)


def _trie(words: Iterable[str]) -> str:
    """A regular expression matching any of ``words``, the longest where several fit, built as a trie
    (an alternation of thousands of paths would be tried one by one at every position)."""
    root: dict = {}
    for word in words:
        node = root
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def build(node: dict) -> str:
        branches = [re.escape(char) + build(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        inner = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{inner})?" if "" in node else inner

    return build(root)


def _spellings(text: str, with_name: bool = True) -> set[str]:
    """The ways a path may be written in a message: as given, absolute, resolved, as a POSIX path, and
    (files) its bare name when it has an extension (a bare stem like ``1`` would match too much)."""
    if "://" in text:
        return {text}
    path = Path(text).expanduser()
    forms = {text, str(path), os.path.abspath(path), canonical(path), path.as_posix()}
    if with_name and path.suffix and len(path.name) >= 3:
        forms.add(path.name)
    return {f.rstrip("/") or f for f in forms if f and f not in (".", "/")}


def find_token(token: str, key: bytes, roots: Iterable[str | Path]) -> list[Path]:
    """Every file or folder under ``roots`` (and the roots themselves) whose token under ``key`` is
    ``token``: the local look-up of an anonymised name."""
    if not TOKEN_PATTERN.fullmatch(token):
        raise UsageError(f"{token!r} is not an imgtune token (file-<16 hex digits> or folder-<16 hex digits>)")
    anonymizer, digest, found = Anonymizer(key), token.partition("-")[2], []
    for root in roots:
        for path in _walk(Path(root)):
            if hmac.compare_digest(anonymizer.digest(path), digest):
                found.append(path)
    return found


def _walk(root: Path) -> Iterable[Path]:
    yield root
    for folder, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [*dirnames, *sorted(filenames)]:
            yield Path(folder) / name
