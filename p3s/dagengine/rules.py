"""Every rule a template must follow, in one place.

Two kinds of rule live here:

* value rules (types, ranges, names, placeholders), checked whenever a Node or
  Template is built, so a refusal reads the same whether the value came from
  GraphML, a stored snapshot or Python;
* import rules (:func:`check_import`, with :class:`TemplateLimits`): upper
  bounds, the node and edge counts, and no shell syntax in a command.  They are
  checked when a template is imported, not when a stored snapshot is read back,
  so a rule added later never makes a running workflow unreadable.

The size and depth of a GraphML document are checked by ``graphml`` while it is
scanned, before anything is built from it, with the same limits.

Every refusal is a TemplateError that names the node (or the graph) and the attribute.
"""

from __future__ import annotations

import json
import math
import os.path
import re
import shlex
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from p3s.dagengine.placeholders import OUTDIR_OF, PLACEHOLDER_RE, PLACEHOLDERS, is_placeholder
from p3s.errors import TemplateError

if TYPE_CHECKING:
    from p3s.dagengine.model import Template

__all__ = ["MAX_RUNNING", "TemplateLimits", "check_import", "check_shell_syntax"]

WEEK_S = 7 * 24 * 3600.0
#: Upper bound of a node's max_running: more jobs of one stage at once than any site has slots.
MAX_RUNNING = 10_000

# Names end up in database keys, log lines and work-directory names.
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
QUEUE_RE = re.compile(r"[A-Za-z0-9_.-]+")
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_NAME = 128


@dataclass(frozen=True)
class TemplateLimits:
    """How big a template may be and how long its numbers may say; the ``[templates]`` settings.

    The defaults are far above any real DQM template (tens of nodes, minutes of
    run time) and far below what hurts the importer or the dispatcher.
    """

    max_bytes: int = 5_000_000  # size of the GraphML document
    max_nodes: int = 2000
    max_edges: int = 20_000
    max_depth: int = 32  # XML element nesting; GraphML needs 4, editors' extras a few more
    max_wall_s: float = WEEK_S  # bound of every node's wall_s and expected_s
    max_budget_s: float = WEEK_S  # bound of the graph's and every node's budget_s

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_nodes", "max_edges", "max_depth", "max_wall_s", "max_budget_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise TemplateError(f"templates.{name}: must be a positive number, got {value!r}")


# ---------------------------------------------------------------------------
# Value rules: coercion of attribute values, shared by every way a template comes in.


def where(node: str | None) -> str:
    return "graph" if node is None else f"node {node!r}"


def bad(node: str | None, attr: str, what: str, value: object) -> TemplateError:
    return TemplateError(f"{where(node)}: attribute {attr!r} must be {what}, got {value!r}")


def _to_int(node: str | None, attr: str, value: object, what: str) -> int:
    if isinstance(value, bool):
        raise bad(node, attr, what, value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:  # also a string of more digits than int() takes
            raise bad(node, attr, what, value) from None
    raise bad(node, attr, what, value)


def _to_float(node: str | None, attr: str, value: object, what: str) -> float:
    if isinstance(value, bool):
        raise bad(node, attr, what, value)
    try:
        if isinstance(value, int | float):
            result = float(value)
        elif isinstance(value, str):
            result = float(value.strip())
        else:
            raise bad(node, attr, what, value)
    except (ValueError, OverflowError):
        raise bad(node, attr, what, value) from None
    if not math.isfinite(result):
        raise bad(node, attr, what, value)
    return result


def _to_bool(node: str | None, attr: str, value: object, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise bad(node, attr, what, value)


def _to_str(node: str | None, attr: str, value: object, what: str) -> str:
    if isinstance(value, str):
        return value
    raise bad(node, attr, what, value)


def check_name(kind: str, value: object) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or len(value) > MAX_NAME:
        raise TemplateError(
            f"{kind} name must match {NAME_RE.pattern} (at most {MAX_NAME} characters), got {value!r}"
        )
    return value


def check_placeholders(node: str, attr: str, text: str) -> None:
    unknown = sorted({m for m in PLACEHOLDER_RE.findall(text) if not is_placeholder(m)})
    if unknown:
        raise TemplateError(
            f"node {node!r}: attribute {attr!r} uses unknown placeholder(s)"
            f" {', '.join('{' + u + '}' for u in unknown)};"
            f" allowed: {', '.join(sorted(PLACEHOLDERS))}, {{{OUTDIR_OF}NODE}}"
        )


def check_noop(node: str, command: str, env: Mapping[str, str], stage_in: bool) -> None:
    """A no-op node runs nothing, so it has no command, env or stage_in to give a payload."""
    given = [name for name, value in (("command", command.strip()), ("env", env), ("stage_in", stage_in)) if value]
    if given:
        raise TemplateError(
            f"node {node!r}: a no-op node (noop = true) runs nothing, so it takes no"
            f" {', '.join(repr(g) for g in given)}; remove them, or set noop to false"
        )


def check_outdir_refs(
    node: str, refs: Iterable[str], ancestors: Collection[str], nodes: Mapping[str, Any]
) -> None:
    """Every ``{outdir:NODE}`` of a node names an ancestor that runs something."""
    for ref in sorted(refs):
        if ref not in ancestors:
            raise TemplateError(
                f"node {node!r}: placeholder {{{OUTDIR_OF}{ref}}} names {ref!r}, which is not an ancestor of"
                f" {node!r}; a node may read the output only of a node it waits for"
            )
        if nodes[ref].noop:
            raise TemplateError(
                f"node {node!r}: placeholder {{{OUTDIR_OF}{ref}}} names a no-op node, which writes nothing"
            )


def split_command(node: str, command: object) -> tuple[str, ...]:
    what = "a non-empty command line that shlex can split"
    if not isinstance(command, str):
        raise bad(node, "command", what, command)
    try:
        argv = tuple(shlex.split(command))
    except ValueError as exc:
        raise TemplateError(f"node {node!r}: attribute 'command' must be {what}, got {command!r} ({exc})") from None
    if not argv:
        raise bad(node, "command", what, command)
    return argv


def parse_env(node: str, value: object) -> dict[str, str]:
    what = "a JSON object of string values"
    env: object
    if isinstance(value, str):
        try:
            env = json.loads(value) if value.strip() else {}
        except ValueError:
            raise bad(node, "env", what, value) from None
    else:
        env = value
    if not isinstance(env, Mapping):
        raise bad(node, "env", what, value)
    for key, val in env.items():
        if not isinstance(key, str) or not ENV_KEY_RE.fullmatch(key):
            raise TemplateError(
                f"node {node!r}: attribute 'env' has a bad variable name {key!r} (must match {ENV_KEY_RE.pattern})"
            )
        if not isinstance(val, str):
            raise TemplateError(f"node {node!r}: attribute 'env' must be {what}, got {val!r} for {key!r}")
    return dict(env)


# Node attribute -> (kind, description used in refusals).
NODE_SPEC: dict[str, tuple[str, str]] = {
    "command": ("str", "a non-empty command line that shlex can split"),
    "priority": ("int", "an integer from 0 to 9"),
    "wall_s": ("float", "a number > 0"),
    "queue": ("str", f"a queue name matching {QUEUE_RE.pattern}"),
    "env": ("str", "a JSON object of string values"),
    "budget_s": ("float", "a number > 0, at most the graph's budget_s"),
    "expected_s": ("float", "a number >= 0"),
    "max_running": ("int", "an integer >= 1"),
    "stage_in": ("bool", "a boolean (true or false)"),
    "noop": ("bool", "a boolean (true or false)"),
}
GRAPH_SPEC: dict[str, tuple[str, str]] = {
    "name": ("str", "a template name"),
    "trigger": ("str", "a non-empty glob on the file name"),
    "budget_s": ("float", "a number > 0"),
    "description": ("str", "a string"),
}
_CONVERT = {"int": _to_int, "float": _to_float, "bool": _to_bool, "str": _to_str}

# Which GraphML attr.type each kind of value may be declared with; a string
# declaration is always accepted and parsed here.
DECLARED_OK = {
    "int": {"int", "long", "string"},
    "float": {"int", "long", "float", "double", "string"},
    "bool": {"boolean", "string"},
    "str": {"string"},
}


def coerce(node: str | None, attr: str, value: object, spec: Mapping[str, tuple[str, str]]) -> Any:
    """The value of `attr` converted to its kind; TemplateError naming node and attribute."""
    kind, what = spec[attr]
    if attr == "env" and node is not None:
        return parse_env(node, value)
    return _CONVERT[kind](node, attr, value, what)


def refuse_unknown(node: str | None, unknown: set[str], allowed: set[str] | Sequence[str]) -> None:
    if unknown:
        raise TemplateError(
            f"{where(node)}: unknown attribute(s) {', '.join(repr(u) for u in sorted(unknown))};"
            f" allowed: {', '.join(sorted(allowed))}"
        )


# ---------------------------------------------------------------------------
# Import rules.


def _at_most(node: str | None, attr: str, value: float | None, limit: float, setting: str) -> None:
    if value is not None and value > limit:
        raise TemplateError(
            f"{where(node)}: attribute {attr!r} must be at most {limit:g} ({setting}), got {value:g}"
        )


def check_import(template: Template, limits: TemplateLimits | None = None) -> None:
    """Refuse a template that a value rule lets through but that should not be imported."""
    limits = limits or TemplateLimits()
    if len(template.nodes) > limits.max_nodes:
        raise TemplateError(
            f"template {template.name!r}: has more than {limits.max_nodes} nodes (templates.max_nodes)"
        )
    if len(template.edges) > limits.max_edges:
        raise TemplateError(
            f"template {template.name!r}: has more than {limits.max_edges} edges (templates.max_edges)"
        )
    _at_most(None, "budget_s", template.budget_s, limits.max_budget_s, "templates.max_budget_s")
    for n in template.nodes:
        _at_most(n.name, "wall_s", n.wall_s, limits.max_wall_s, "templates.max_wall_s")
        _at_most(n.name, "expected_s", n.expected_s, limits.max_wall_s, "templates.max_wall_s")
        _at_most(n.name, "budget_s", n.budget_s, limits.max_budget_s, "templates.max_budget_s")
        if n.max_running is not None and n.max_running > MAX_RUNNING:
            raise TemplateError(
                f"node {n.name!r}: attribute 'max_running' must be at most {MAX_RUNNING}, got {n.max_running}"
            )
        if not n.noop:
            check_shell_syntax(n.name, n.command)


# ---------------------------------------------------------------------------
# No shell syntax in a command.
#
# A command is split like a POSIX shell splits words (shlex) and run as an argv
# list, with no shell.  So anything a shell would act on outside quotes
# (operators, expansions, globs, comments, leading assignments) would reach the
# program as a plain argument and silently do something else than it says.
# Such a command is refused; quoting the text passes it on as it is, and an
# explicit shell (`/bin/sh -c '...'`) gets the shell.

_SHELLS = frozenset({"sh", "bash", "dash", "ash", "ksh", "mksh", "zsh"})
_OPERATORS = frozenset(";&|<>()")
_WHITESPACE = frozenset(" \t\r\n")
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_SPECIAL_PARAMS = frozenset("@*#?$!-")
# What makes a "$" inside double quotes an expansion: a name, a digit, a special parameter, ${ or $(.
_EXPANDS_AFTER_DOLLAR = _NAME_CHARS | _SPECIAL_PARAMS | frozenset("{(")
_SHELL_HINT = "ask for a shell explicitly: command = \"/bin/sh -c '...'\""
_QUOTE_OR_SHELL = "Quote it to pass it on as it is, or " + _SHELL_HINT

# How a character of a word was written.
_BARE, _SINGLE, _DOUBLE, _ESCAPED = "bare", "single", "double", "escaped"


@dataclass(frozen=True)
class _Char:
    ch: str
    how: str
    pos: int  # index in the command text


def _words(command: str) -> tuple[list[list[_Char]], int | None]:
    """Split like a POSIX shell, keeping how each character was quoted.

    Returns the words, and the position of the first unquoted newline between
    words (in a shell it ends the command), if any.  Unbalanced quotes were
    refused before this is called.
    """
    words: list[list[_Char]] = []
    word: list[_Char] | None = None
    newline: int | None = None
    quote: str | None = None
    start = len(command) - len(command.lstrip())
    end = len(command.rstrip())
    i = start
    while i < end:
        ch = command[i]
        if quote is None:
            if ch in _WHITESPACE:
                if ch == "\n" and newline is None:
                    newline = i
                if word is not None:
                    words.append(word)
                    word = None
            else:
                word = [] if word is None else word
                if ch == "\\" and i + 1 < end:
                    i += 1
                    word.append(_Char(command[i], _ESCAPED, i))
                elif ch in "'\"":
                    quote = ch
                else:
                    word.append(_Char(ch, _BARE, i))
        elif quote == "'":
            if ch == "'":
                quote = None
            else:
                word.append(_Char(ch, _SINGLE, i))  # type: ignore[union-attr]
        elif ch == '"':
            quote = None
        elif ch == "\\" and i + 1 < end and command[i + 1] in '\\"$`\n':
            i += 1
            word.append(_Char(command[i], _ESCAPED, i))  # type: ignore[union-attr]
        else:
            word.append(_Char(ch, _DOUBLE, i))  # type: ignore[union-attr]
        i += 1
    if word is not None:
        words.append(word)
    return words, newline


def _script_index(argv: Sequence[str]) -> int | None:
    """Index of the script word in `sh -c SCRIPT ...` (any POSIX-like shell), else None."""
    if not argv or os.path.basename(argv[0]) not in _SHELLS:
        return None
    has_c = False
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if arg in ("-o", "+o", "-O", "+O"):
            i += 2
            continue
        if arg.startswith("--"):
            i += 1
            continue
        if len(arg) > 1 and arg[0] in "-+":
            has_c = has_c or (arg[0] == "-" and "c" in arg[1:])
            i += 1
            continue
        break
    return i if has_c and i < len(argv) else None


def _refuse(node: str, construct: str, pos: int, what: str, fix: str) -> TemplateError:
    return TemplateError(
        f"node {node!r}: attribute 'command' has shell syntax: {construct!r} at character {pos} is {what};"
        f" p3s runs a command as an argv list without a shell, so it would reach the program as a plain"
        f" argument. {fix}"
    )


def _expansion(word: list[_Char], j: int) -> str:
    """The text of the ``$...`` expansion starting at word[j], for the message."""
    rest = "".join(c.ch for c in word[j + 1 :])
    if rest.startswith("{"):
        close = rest.find("}")
        return "$" + (rest[: close + 1] if close >= 0 else rest)
    if rest.startswith("("):
        return "$("
    m = re.match(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]", rest)
    return "$" + (m.group(0) if m else rest[:1])


def check_shell_syntax(node: str, command: str) -> None:
    """Refuse a command that a shell would interpret differently from its argv words.

    Outside quotes: the operators ``; & | < > ( )`` (so ``&&``, ``||``, ``2>``),
    ``$`` expansions and backticks (also inside double quotes), the globs
    ``*``, ``?`` and ``[...]``, ``~`` and ``#`` at the start of a word, a
    newline between words, and a leading ``NAME=value``.  A backslash or quotes
    pass any of them on as text.  In ``sh -c SCRIPT`` (or bash, dash, ksh, zsh)
    the script is the shell's business, but a placeholder inside it is refused:
    a file name would be read as shell code there, so it goes in as an argument.
    """
    quoted = _QUOTE_OR_SHELL
    words, newline = _words(command)
    if newline is not None:
        raise _refuse(node, "\n", newline, "a newline, which ends a command in a shell", quoted)
    script = _script_index(["".join(c.ch for c in w) for w in words])
    for w, word in enumerate(words):
        in_script = w == script
        for j, c in enumerate(word):
            after = word[j + 1] if j + 1 < len(word) else None
            if c.how == _BARE and c.ch in _OPERATORS:
                run = c.ch
                for d in word[j + 1 :]:
                    if d.how != _BARE or d.ch not in _OPERATORS:
                        break
                    run += d.ch
                raise _refuse(node, run, c.pos, "a shell operator (a redirection, pipe, list or subshell)", quoted)
            expands = c.how == _BARE or (c.how == _DOUBLE and not in_script)
            if c.ch == "$" and expands and after is not None:
                follows = after.how == c.how and after.ch in _EXPANDS_AFTER_DOLLAR
                if c.how == _BARE or follows:
                    raise _refuse(node, _expansion(word, j), c.pos, "a shell expansion", quoted)
            if c.ch == "`" and expands:
                raise _refuse(node, "`", c.pos, "a command substitution", quoted)
            if c.how != _BARE:
                continue
            if c.ch in "*?" or (c.ch == "[" and any(d.how == _BARE and d.ch == "]" for d in word[j + 1 :])):
                raise _refuse(node, c.ch, c.pos, "a glob that a shell would expand to file names", quoted)
            if j == 0 and c.ch == "~":
                raise _refuse(node, "~", c.pos, "a home directory a shell would expand", quoted)
            if j == 0 and c.ch == "#":
                raise _refuse(node, "#", c.pos, "the start of a shell comment", quoted)
            if w == 0 and c.ch == "=" and j > 0:
                name = "".join(d.ch for d in word[:j])
                if ENV_KEY_RE.fullmatch(name) and all(d.how == _BARE for d in word[:j]):
                    raise _refuse(
                        node, name + "=", word[0].pos, "a variable assignment",
                        "Set the variable in the node's env attribute, or " + _SHELL_HINT,
                    )
        if in_script:
            used = sorted({m for m in PLACEHOLDER_RE.findall("".join(c.ch for c in word)) if is_placeholder(m)})
            if used:
                raise TemplateError(
                    f"node {node!r}: attribute 'command' puts {{{used[0]}}} inside the shell's script,"
                    f" where a file name would be read as shell code; pass it as an argument instead:"
                    f" /bin/sh -c '... \"$1\" ...' sh {{{used[0]}}}"
                )
