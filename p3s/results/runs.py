"""The run and subrun of a file, parsed from its name by a pattern per stream.

A pattern is a regular expression with a named group ``run`` and, optionally,
``subrun``, searched in the file name (``[results] run_patterns`` in the
config, by stream; ``*`` for every stream without its own).  A name the
pattern does not match has no run: its results are still recorded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from p3s.errors import ConfigError

# np04_raw_run012345_0003_dl1.hdf5 -> run 12345, subrun 3; run42.hdf5 -> run 42.
DEFAULT_PATTERN = r"run(?P<run>\d+)(?:[_.-](?:sub(?:run)?)?(?P<subrun>\d+))?"
RUN_MAX = 2**63 - 1


@dataclass(frozen=True)
class RunId:
    run: int | None = None
    subrun: int | None = None


def compile_pattern(where: str, pattern: str) -> re.Pattern[str]:
    """``pattern`` compiled; ConfigError if it is not a regular expression with a ``run`` group."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{where}: not a regular expression: {exc}") from None
    if "run" not in compiled.groupindex:
        raise ConfigError(f"{where}: needs a named group (?P<run>...), and may have (?P<subrun>...)")
    unknown = sorted(set(compiled.groupindex) - {"run", "subrun"})
    if unknown:
        raise ConfigError(f"{where}: unknown named group {unknown[0]!r} (only run and subrun)")
    return compiled


class RunPatterns:
    """The configured patterns, compiled once; owned by whoever records results."""

    def __init__(self, patterns: Mapping[str, str]) -> None:
        self._by_stream = {stream: compile_pattern(f"results.run_patterns.{stream}", p)
                           for stream, p in patterns.items()}
        self._default = self._by_stream.get("*") or re.compile(DEFAULT_PATTERN)

    def parse(self, stream: str, name: str) -> RunId:
        """The run and subrun in file ``name`` of ``stream``; None for what the name does not give."""
        match = self._by_stream.get(stream, self._default).search(name)
        if match is None:
            return RunId()
        return RunId(_number(match.group("run")), _number(match.groupdict().get("subrun")))


def _number(text: str | None) -> int | None:
    """A run number from its digits; None for none, or for a number too long to store."""
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:  # a group that matched more than digits
        return None
    return value if 0 <= value <= RUN_MAX else None
