"""Which fraction of files to process: deterministic per file name."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from fnmatch import fnmatchcase


def fraction_for(sampling: Mapping[str, float], stream: str, name: str) -> float:
    """The configured fraction for a file: its stream's, else the first matching glob, else 1."""
    if stream in sampling:
        return sampling[stream]
    for pattern, fraction in sampling.items():
        if fnmatchcase(name, pattern):
            return fraction
    return 1.0


def keep(name: str, fraction: float) -> bool:
    """True if ``name`` falls inside ``fraction``.

    A hash of the name, not a random draw, so that two dispatchers (or one
    dispatcher and an audit) always take the same decision for the same file.
    """
    if fraction >= 1.0:
        return True
    if fraction <= 0.0:
        return False
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction
