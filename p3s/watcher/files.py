"""What a source reports, and which names it reports at all."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from p3s.config import SourceSettings
from p3s.messages import DataEvent


@dataclass(frozen=True)
class FileSeen:
    """A complete file noticed on a source."""

    path: Path
    size: int
    mtime: float
    seen_at: float


@dataclass(frozen=True)
class Selector:
    """The file pattern of a source, less temporary and hidden names."""

    pattern: str
    ignore: Sequence[str]

    def wanted(self, name: str) -> bool:
        if any(fnmatchcase(name, p) for p in self.ignore):
            return False
        return fnmatchcase(name, self.pattern)

    def wanted_dir(self, name: str) -> bool:
        return not name.startswith(".")


def to_event(source: SourceSettings, seen: FileSeen) -> DataEvent:
    """The data event for a file: pilots read it by its path, or under the source's URL prefix."""
    if source.url_prefix:
        relative = seen.path.relative_to(source.location).as_posix()
        where = source.url_prefix.rstrip("/") + "/" + relative
    else:
        where = str(seen.path)
    return DataEvent(
        name=seen.path.name,
        path=where,
        stream=source.stream,
        seen_at=seen.seen_at,
        source=source.name,
        size=seen.size,
    )
