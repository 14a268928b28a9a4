"""Plain-text tables for the command line and the demo, and text made safe for a terminal.

File names, commands, reasons and log lines come from outside: a newline in a
file name could forge a row or a log line, an ANSI escape could rewrite the
operator's screen.  Everything shown as text goes through :func:`safe`; the
``--json`` output stays exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
# C0 and C1 controls, DEL, and the bidirectional overrides that reorder what a terminal shows.
_ESCAPED = {
    c: _NAMED.get(chr(c), f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}")
    for c in [*range(0x20), *range(0x7F, 0xA0), 0x5C, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
}


def safe(text: str) -> str:
    """``text`` with control characters, backslashes and lone surrogates written as escapes, on one line."""
    text = text.translate(_ESCAPED)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def when(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _cell(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if key.endswith("_at") or key in ("deadline", "last_seen"):
        return when(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return safe(str(value))


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    cells = [[_cell(r.get(c), c) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
