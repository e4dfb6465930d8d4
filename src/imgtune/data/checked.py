"""What the file checks found, remembered by content: a file whose bytes were checked before is not
decoded again (``imgtune.cache.check_store``).

A check decodes the whole image (that is what finds truncated and corrupt files) and computes its
perceptual fingerprint: most of a warm run's data scan. Its outcome depends only on the file's bytes (and on Pillow and imgtune, which are in the
store's key), so it is stored under the digest the check computes anyway, and reused when the same bytes
come again, under any name. Only readable images are remembered: a broken file is checked every time.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np

from ..cache import ArrayStore
from .decode import ImageInfo


def known(store: ArrayStore | None, digest: str) -> ImageInfo | None:
    """The stored outcome for ``digest``, or None (absent, damaged, or no store)."""
    entry = store.get(digest) if store is not None else None
    if entry is None:
        return None
    try:
        fields = json.loads(entry.tobytes().decode())
        fingerprint = fields.pop("fingerprint")
        return ImageInfo(**fields, fingerprint=bytes.fromhex(fingerprint) if fingerprint is not None else None)
    except (ValueError, TypeError, KeyError, AttributeError):  # a valid entry of another layout: check again
        return None


def remember(store: ArrayStore | None, digest: str, info: ImageInfo) -> None:
    if store is None:
        return
    fields = asdict(info)
    fields["fingerprint"] = info.fingerprint.hex() if info.fingerprint is not None else None
    store.put(digest, np.frombuffer(json.dumps(fields, sort_keys=True).encode(), dtype=np.uint8).copy())
