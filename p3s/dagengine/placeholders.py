"""Placeholders of a node's command and environment, and their expansion at run time.

A placeholder is a lowercase identifier in braces, e.g. ``{input}``, or
``{outdir:NODE}``, the output directory of another node of the same workflow
(an ancestor: the template rules check that); other brace text (``{A}``,
``{}``, ``{print $1}`` inside quotes) is left alone, so awk and printf
arguments pass unchanged.  Expansion happens on the argv words after the
command was split, so a value is never split or interpreted again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

__all__ = ["OUTDIR_OF", "PLACEHOLDERS", "PLACEHOLDER_RE", "expand", "expand_env", "is_placeholder", "outdir_refs"]

#: The placeholders a command or an env value may use, e.g. ``{input}``.
PLACEHOLDERS: frozenset[str] = frozenset(
    {
        "input",
        "input_name",
        "workdir",
        "job_id",
        "workflow_id",
        "outdir",
        "parent_outdirs",
    }
)

#: The prefix of the placeholder naming another node's output directory, ``{outdir:NODE}``;
#: the dispatcher gives its value under the key ``outdir:NODE``.
OUTDIR_OF = "outdir:"

# Only lowercase identifiers in braces are placeholders, and outdir: followed by a node name.
PLACEHOLDER_RE = re.compile(r"\{([a-z_]+|outdir:[A-Za-z0-9_][A-Za-z0-9_.-]*)\}")


def is_placeholder(name: str) -> bool:
    """True for a placeholder p3s gives a value: one of PLACEHOLDERS, or ``outdir:NODE``."""
    return name in PLACEHOLDERS or name.startswith(OUTDIR_OF)


def outdir_refs(text: str) -> frozenset[str]:
    """The nodes whose output directory ``text`` names with ``{outdir:NODE}``."""
    return frozenset(m[len(OUTDIR_OF) :] for m in PLACEHOLDER_RE.findall(text) if m.startswith(OUTDIR_OF))


def _sub(text: str, values: Mapping[str, str | Sequence[str]], sep: str) -> str:
    def one(m: re.Match[str]) -> str:
        value = values.get(m.group(1))
        if value is None:
            return m.group(0)
        return value if isinstance(value, str) else sep.join(value)

    return PLACEHOLDER_RE.sub(one, text)


def expand(argv: Sequence[str], values: Mapping[str, str | Sequence[str]]) -> list[str]:
    """Substitute ``{placeholder}`` tokens in each argv element.

    An element that is exactly a placeholder whose value is a sequence becomes
    one element per item (none if empty); inside a longer element a sequence
    is joined with ",". Unknown tokens are left as they are.
    """
    out: list[str] = []
    for arg in argv:
        m = PLACEHOLDER_RE.fullmatch(arg)
        if m is not None:
            value = values.get(m.group(1))
            if value is not None and not isinstance(value, str):
                out.extend(value)
                continue
        out.append(_sub(arg, values, ","))
    return out


def expand_env(env: Mapping[str, str], values: Mapping[str, str | Sequence[str]]) -> dict[str, str]:
    """Substitute ``{placeholder}`` tokens in env values; sequences are joined with ":"."""
    return {key: _sub(val, values, ":") for key, val in env.items()}
