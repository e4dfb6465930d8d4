"""Where an image's bytes are: a file on disk, or bytes already in memory (a member of a WebDataset shard)
with the name of the file they came from. One way to read either (:meth:`ImageRef.open`), so code that
decodes images never asks which kind it holds."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .reading import open_regular


@dataclass(frozen=True)
class ImageRef:
    """Build with :meth:`file` or :meth:`in_memory`; ``str()`` is the name to show (the path)."""

    path: Path | None = None
    data: bytes | None = field(default=None, repr=False)
    name: str | None = None  # what to show for in-memory bytes (the original file's path)

    def __post_init__(self):
        if (self.path is None) == (self.data is None):
            raise ValueError("an ImageRef holds either a path or bytes, not both and not neither")
        if self.data is not None and not self.name:
            raise ValueError("in-memory image bytes need a name to show in messages")

    @classmethod
    def file(cls, path: str | Path) -> "ImageRef":
        return cls(path=Path(path))

    @classmethod
    def in_memory(cls, data: bytes, name: str) -> "ImageRef":
        return cls(data=bytes(data), name=str(name))

    def open(self) -> BinaryIO:
        """A new binary file object positioned at the start (the caller closes it); opening again
        starts again, so one reference can be read any number of times. Only a regular file is opened,
        and only under the size limit (:mod:`imgtune.data.reading`)."""
        if self.path is not None:
            return open_regular(self.path)
        return io.BytesIO(self.data)

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else str(self.name)


def as_image_ref(source: str | Path | ImageRef) -> ImageRef:
    """A path (``str`` or :class:`~pathlib.Path`) as a file reference; a reference as it is."""
    return source if isinstance(source, ImageRef) else ImageRef.file(source)
