"""DAG templates: the Node and Template values, GraphML import/export, DOT and
Mermaid export, and placeholder expansion of a node's argv and environment.

Pure logic: nothing here reads or writes a file; callers pass the text in and
get text back.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import shlex
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import networkx as nx

from p3s.errors import TemplateError

__all__ = [
    "PLACEHOLDERS",
    "FrozenEnv",
    "Node",
    "Template",
    "expand",
    "expand_env",
    "parse_graphml",
    "to_dot",
    "to_graphml",
    "to_mermaid",
]

log = logging.getLogger(__name__)

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

#: Version of the dict produced by Template.to_dict (the snapshot the database stores).
SNAPSHOT_VERSION = 1

# Only lowercase identifiers in braces are placeholders; other brace text
# (``${HOME}``, ``{A}``, ``{}``) is left alone so awk/printf-like arguments pass.
_PLACEHOLDER_RE = re.compile(r"\{([a-z_]+)\}")
# Names end up in database keys, log lines and work-directory names.
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_QUEUE_RE = re.compile(r"[A-Za-z0-9_.-]+")
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_NAME = 128

_GRAPHML_NS = "{http://graphml.graphdrawing.org/xmlns}"

_GRAPH_ATTRS = ("name", "trigger", "budget_s", "description")
_IGNORED_NODE_ATTRS = frozenset({"label", "description"})
_IGNORED_EDGE_ATTRS = frozenset({"label", "description"})

# Which GraphML attr.type each kind of value may be declared with; a string
# declaration is always accepted and parsed here.
_DECLARED_OK = {
    "int": {"int", "long", "string"},
    "float": {"int", "long", "float", "double", "string"},
    "bool": {"boolean", "string"},
    "str": {"string"},
}


class FrozenEnv(Mapping[str, str]):
    """An immutable, hashable str -> str mapping, iterated in sorted key order."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | Sequence[tuple[str, str]] = ()) -> None:
        pairs = dict(items.items() if isinstance(items, Mapping) else items)
        self._items: tuple[tuple[str, str], ...] = tuple(sorted(pairs.items()))

    def __getitem__(self, key: str) -> str:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenEnv):
            return self._items == other._items
        if isinstance(other, Mapping):
            return dict(self._items) == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenEnv({dict(self._items)!r})"


# ---------------------------------------------------------------------------
# Value checks, shared by parse_graphml, from_dict and the dataclasses, so a
# refusal reads the same whichever way the value came in.


def _where(node: str | None) -> str:
    return "graph" if node is None else f"node {node!r}"


def _bad(node: str | None, attr: str, what: str, value: object) -> TemplateError:
    return TemplateError(f"{_where(node)}: attribute {attr!r} must be {what}, got {value!r}")


def _to_int(node: str | None, attr: str, value: object, what: str) -> int:
    if isinstance(value, bool):
        raise _bad(node, attr, what, value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise _bad(node, attr, what, value) from None
    raise _bad(node, attr, what, value)


def _to_float(node: str | None, attr: str, value: object, what: str) -> float:
    if isinstance(value, bool):
        raise _bad(node, attr, what, value)
    if isinstance(value, int | float):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            raise _bad(node, attr, what, value) from None
    else:
        raise _bad(node, attr, what, value)
    if not math.isfinite(result):
        raise _bad(node, attr, what, value)
    return result


def _to_bool(node: str | None, attr: str, value: object, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _bad(node, attr, what, value)


def _to_str(node: str | None, attr: str, value: object, what: str) -> str:
    if isinstance(value, str):
        return value
    raise _bad(node, attr, what, value)


def _check_name(kind: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value) or len(value) > _MAX_NAME:
        raise TemplateError(
            f"{kind} name must match {_NAME_RE.pattern} (at most {_MAX_NAME} characters), got {value!r}"
        )
    return value


def _check_placeholders(node: str, attr: str, text: str) -> None:
    unknown = sorted({m for m in _PLACEHOLDER_RE.findall(text) if m not in PLACEHOLDERS})
    if unknown:
        raise TemplateError(
            f"node {node!r}: attribute {attr!r} uses unknown placeholder(s)"
            f" {', '.join('{' + u + '}' for u in unknown)};"
            f" allowed: {', '.join(sorted(PLACEHOLDERS))}"
        )


def _split_command(node: str, command: object) -> tuple[str, ...]:
    what = "a non-empty command line that shlex can split"
    if not isinstance(command, str):
        raise _bad(node, "command", what, command)
    try:
        argv = tuple(shlex.split(command))
    except ValueError as exc:
        raise TemplateError(f"node {node!r}: attribute 'command' must be {what}, got {command!r} ({exc})") from None
    if not argv:
        raise _bad(node, "command", what, command)
    return argv


def _parse_env(node: str, value: object) -> FrozenEnv:
    what = "a JSON object of string values"
    if isinstance(value, FrozenEnv):
        env: object = dict(value)
    elif isinstance(value, str):
        try:
            env = json.loads(value) if value.strip() else {}
        except ValueError:
            raise _bad(node, "env", what, value) from None
    else:
        env = value
    if not isinstance(env, Mapping):
        raise _bad(node, "env", what, value)
    for key, val in env.items():
        if not isinstance(key, str) or not _ENV_KEY_RE.fullmatch(key):
            raise TemplateError(
                f"node {node!r}: attribute 'env' has a bad variable name {key!r} (must match {_ENV_KEY_RE.pattern})"
            )
        if not isinstance(val, str):
            raise TemplateError(f"node {node!r}: attribute 'env' must be {what}, got {val!r} for {key!r}")
    return FrozenEnv(env)


# Node attribute -> (kind, description used in refusals).
_NODE_SPEC: dict[str, tuple[str, str]] = {
    "command": ("str", "a non-empty command line that shlex can split"),
    "priority": ("int", "an integer from 0 to 9"),
    "wall_s": ("float", "a number > 0"),
    "queue": ("str", f"a queue name matching {_QUEUE_RE.pattern}"),
    "env": ("str", "a JSON object of string values"),
    "budget_s": ("float", "a number > 0, at most the graph's budget_s"),
    "expected_s": ("float", "a number >= 0"),
    "max_running": ("int", "an integer >= 1"),
    "stage_in": ("bool", "a boolean (true or false)"),
}
_GRAPH_SPEC: dict[str, tuple[str, str]] = {
    "name": ("str", "a template name"),
    "trigger": ("str", "a non-empty glob on the file name"),
    "budget_s": ("float", "a number > 0"),
    "description": ("str", "a string"),
}
_CONVERT = {"int": _to_int, "float": _to_float, "bool": _to_bool, "str": _to_str}


def _coerce(node: str | None, attr: str, value: object, spec: Mapping[str, tuple[str, str]]) -> Any:
    kind, what = spec[attr]
    if attr == "env" and node is not None:
        return _parse_env(node, value)
    return _CONVERT[kind](node, attr, value, what)


# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """One stage of a template: the command a job runs and how it is scheduled."""

    name: str
    command: str
    priority: int = 5
    wall_s: float = 3600.0
    queue: str = "default"
    env: Mapping[str, str] = field(default_factory=FrozenEnv)
    budget_s: float | None = None
    expected_s: float | None = None
    max_running: int | None = None
    stage_in: bool = False

    def __post_init__(self) -> None:
        _check_name("node", self.name)
        n = self.name
        for attr in _NODE_SPEC:
            value = getattr(self, attr)
            if value is not None:
                object.__setattr__(self, attr, _coerce(n, attr, value, _NODE_SPEC))
        _split_command(n, self.command)
        _check_placeholders(n, "command", self.command)
        for val in self.env.values():
            _check_placeholders(n, "env", val)
        if not 0 <= self.priority <= 9:
            raise _bad(n, "priority", _NODE_SPEC["priority"][1], self.priority)
        if self.wall_s <= 0:
            raise _bad(n, "wall_s", _NODE_SPEC["wall_s"][1], self.wall_s)
        if not _QUEUE_RE.fullmatch(self.queue):
            raise _bad(n, "queue", _NODE_SPEC["queue"][1], self.queue)
        if self.budget_s is not None and self.budget_s <= 0:
            raise _bad(n, "budget_s", _NODE_SPEC["budget_s"][1], self.budget_s)
        if self.expected_s is not None and self.expected_s < 0:
            raise _bad(n, "expected_s", _NODE_SPEC["expected_s"][1], self.expected_s)
        if self.max_running is not None and self.max_running < 1:
            raise _bad(n, "max_running", _NODE_SPEC["max_running"][1], self.max_running)

    @functools.cached_property
    def argv(self) -> tuple[str, ...]:
        """The command split like a POSIX shell would, without running one (once per node)."""
        return tuple(shlex.split(self.command))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; None-valued optional fields are omitted."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name] = dict(value) if f.name == "env" else value
        return out


@dataclass(frozen=True)
class Template:
    """A validated DAG of Nodes with its trigger and latency budget.

    Construction puts nodes in lexicographical topological order and sorts
    edges, so two templates with the same content compare equal.
    """

    name: str
    trigger: str
    budget_s: float
    nodes: tuple[Node, ...]
    edges: tuple[tuple[str, str], ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        _check_name("template", self.name)
        trigger = _coerce(None, "trigger", self.trigger, _GRAPH_SPEC)
        if not trigger.strip():
            raise _bad(None, "trigger", _GRAPH_SPEC["trigger"][1], trigger)
        budget = _coerce(None, "budget_s", self.budget_s, _GRAPH_SPEC)
        if budget <= 0:
            raise _bad(None, "budget_s", _GRAPH_SPEC["budget_s"][1], self.budget_s)
        description = _coerce(None, "description", self.description, _GRAPH_SPEC)
        object.__setattr__(self, "budget_s", budget)
        object.__setattr__(self, "description", description)

        nodes = tuple(self.nodes)
        if not nodes:
            raise TemplateError(f"template {self.name!r}: has no nodes")
        by_name: dict[str, Node] = {}
        for node in nodes:
            if not isinstance(node, Node):
                raise TemplateError(f"template {self.name!r}: not a Node: {node!r}")
            if node.name in by_name:
                raise TemplateError(f"node {node.name!r}: defined twice")
            by_name[node.name] = node
            if node.budget_s is not None and node.budget_s > budget:
                raise TemplateError(
                    f"node {node.name!r}: attribute 'budget_s' must be at most the graph's"
                    f" budget_s {budget:g}, got {node.budget_s:g}"
                )

        g = nx.DiGraph()
        g.add_nodes_from(by_name)
        for edge in self.edges:
            parent, child = edge
            for end in (parent, child):
                if end not in by_name:
                    raise TemplateError(f"edge {parent!r} -> {child!r}: unknown node {end!r}")
            g.add_edge(parent, child)
        _refuse_cycle(g)
        order = list(nx.lexicographical_topological_sort(g))
        object.__setattr__(self, "nodes", tuple(by_name[n] for n in order))
        object.__setattr__(self, "edges", tuple(sorted(g.edges())))

    # -- lookups -------------------------------------------------------------

    def node(self, name: str) -> Node:
        """The node called `name`; TemplateError if there is none."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise TemplateError(f"template {self.name!r}: no node {name!r}")

    def parents(self, name: str) -> tuple[str, ...]:
        """Names of the direct parents of `name`, sorted."""
        self.node(name)
        return tuple(sorted(p for p, c in self.edges if c == name))

    def children(self, name: str) -> tuple[str, ...]:
        """Names of the direct children of `name`, sorted."""
        self.node(name)
        return tuple(sorted(c for p, c in self.edges if p == name))

    def roots(self) -> tuple[str, ...]:
        """Names of the nodes without parents, in topological order."""
        has_parent = {c for _, c in self.edges}
        return tuple(n.name for n in self.nodes if n.name not in has_parent)

    def descendants(self, name: str) -> frozenset[str]:
        """Every node reachable from `name` (not including it)."""
        self.node(name)
        seen: set[str] = set()
        todo = [name]
        while todo:
            for child in self.children(todo.pop()):
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
        return frozenset(seen)

    def parents_map(self) -> dict[str, tuple[str, ...]]:
        """Every node -> its parents, in topological order (roots map to ())."""
        out: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for parent, child in self.edges:
            out[child].append(parent)
        return {n: tuple(sorted(ps)) for n, ps in out.items()}

    # -- snapshots -----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-able snapshot, as the database stores it."""
        return {
            "v": SNAPSHOT_VERSION,
            "name": self.name,
            "trigger": self.trigger,
            "budget_s": self.budget_s,
            "description": self.description,
            "nodes": [n.to_dict() for n in self.nodes],
            "edges": [list(e) for e in self.edges],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Template:
        """Rebuild a Template from to_dict() output, validating it again."""
        if not isinstance(d, Mapping):
            raise TemplateError(f"template snapshot must be a mapping, got {type(d).__name__}")
        if d.get("v", SNAPSHOT_VERSION) != SNAPSHOT_VERSION:
            raise TemplateError(f"template snapshot version {d.get('v')!r} is not supported")
        allowed = {"v", "name", "trigger", "budget_s", "description", "nodes", "edges"}
        _refuse_unknown(None, set(d) - allowed, allowed)
        for key in ("name", "trigger", "budget_s", "nodes"):
            if key not in d:
                raise TemplateError(f"template snapshot lacks {key!r}")
        node_fields = {f.name for f in fields(Node)}
        nodes = []
        for nd in d["nodes"]:
            if not isinstance(nd, Mapping) or "name" not in nd or "command" not in nd:
                raise TemplateError(f"template snapshot: bad node {nd!r}")
            _refuse_unknown(str(nd["name"]), set(nd) - node_fields, node_fields)
            nodes.append(Node(**nd))
        edges = []
        for e in d.get("edges", ()):
            if not isinstance(e, Sequence) or isinstance(e, str) or len(e) != 2:
                raise TemplateError(f"template snapshot: bad edge {e!r}")
            edges.append((str(e[0]), str(e[1])))
        return cls(
            name=d["name"],
            trigger=d["trigger"],
            budget_s=d["budget_s"],
            description=d.get("description", ""),
            nodes=tuple(nodes),
            edges=tuple(edges),
        )

    def with_name(self, name: str) -> Template:
        """The same template under another name."""
        return replace(self, name=name)


def _refuse_unknown(node: str | None, unknown: set[str], allowed: set[str] | Sequence[str]) -> None:
    if unknown:
        raise TemplateError(
            f"{_where(node)}: unknown attribute(s) {', '.join(repr(u) for u in sorted(unknown))};"
            f" allowed: {', '.join(sorted(allowed))}"
        )


def _refuse_cycle(g: nx.DiGraph) -> None:
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return
    path = [cycle[0][0]] + [edge[1] for edge in cycle]
    raise TemplateError(f"graph has a cycle: {' -> '.join(path)}")


# ---------------------------------------------------------------------------
# GraphML


def _stringly(data: str | bytes) -> tuple[bytes, dict[tuple[str, str], str]]:
    """Re-declare every GraphML key as a string, remembering the declared types.

    networkx converts typed values itself and fails with a bare ValueError that
    names neither the node nor the attribute; reading everything as text lets
    this module do the conversion and say where the bad value is.
    """
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise TemplateError(f"not a GraphML document: {exc}") from None
    if root.tag == "graphml":
        raise TemplateError(
            "not a GraphML document: the root element 'graphml' lacks the GraphML namespace "
            f"(xmlns=\"{_GRAPHML_NS.strip('{}')}\")"
        )
    if root.tag != f"{_GRAPHML_NS}graphml":
        raise TemplateError(f"not a GraphML document: root element is {root.tag!r}")
    declared: dict[tuple[str, str], str] = {}
    for key in root.iter(f"{_GRAPHML_NS}key"):
        name = key.get("attr.name")
        if name is None:
            continue
        declared[(key.get("for", "all"), name)] = key.get("attr.type", "string")
        key.set("attr.type", "string")
    return ET.tostring(root), declared


def _check_declared(
    node: str | None,
    scope: str,
    attr: str,
    kind: str,
    declared: Mapping[tuple[str, str], str],
) -> None:
    dtype = declared.get((scope, attr), declared.get(("all", attr), "string"))
    if dtype not in _DECLARED_OK[kind]:
        raise TemplateError(
            f"{_where(node)}: attribute {attr!r} is declared as {dtype!r};"
            f" use one of {', '.join(sorted(_DECLARED_OK[kind]))}"
        )


def parse_graphml(data: str | bytes, name: str | None = None) -> Template:
    """Parse and validate a GraphML template; TemplateError says what is wrong where."""
    text, declared = _stringly(data)
    try:
        g = nx.parse_graphml(text, node_type=str)
    except (nx.NetworkXError, ValueError, KeyError, TypeError) as exc:
        raise TemplateError(f"not a GraphML document networkx can read: {exc}") from None
    if not g.is_directed():
        raise TemplateError('graph is undirected; a template needs edgedefault="directed"')

    gattrs = {k: v for k, v in g.graph.items() if k not in ("node_default", "edge_default")}
    _refuse_unknown(None, set(gattrs) - set(_GRAPH_ATTRS), _GRAPH_ATTRS)
    for attr in gattrs:
        _check_declared(None, "graph", attr, _GRAPH_SPEC[attr][0], declared)
    tname = name if name is not None else gattrs.get("name")
    if tname is None:
        raise TemplateError("template has no name: pass one or set the graph attribute 'name'")
    for attr in ("trigger", "budget_s"):
        if attr not in gattrs:
            raise TemplateError(f"graph: attribute {attr!r} is required")
    graph_vals = {a: _coerce(None, a, gattrs[a], _GRAPH_SPEC) for a in ("trigger", "budget_s")}
    description = _coerce(None, "description", gattrs.get("description", ""), _GRAPH_SPEC)

    if g.number_of_nodes() == 0:
        raise TemplateError(f"template {tname!r}: has no nodes")
    node_default = g.graph.get("node_default", {})
    allowed = set(_NODE_SPEC) | _IGNORED_NODE_ATTRS
    nodes = []
    for nname, data_ in g.nodes(data=True):
        _check_name("node", nname)
        attrs = {**node_default, **data_}
        _refuse_unknown(nname, set(attrs) - allowed, allowed)
        if "command" not in attrs:
            raise TemplateError(f"node {nname!r}: attribute 'command' is required")
        kwargs: dict[str, Any] = {}
        for attr, value in attrs.items():
            if attr in _IGNORED_NODE_ATTRS:
                continue
            _check_declared(nname, "node", attr, _NODE_SPEC[attr][0], declared)
            kwargs[attr] = _coerce(nname, attr, value, _NODE_SPEC)
        nodes.append(Node(name=nname, **kwargs))

    edge_default = g.graph.get("edge_default", {})
    edges = []
    for parent, child, data_ in g.edges(data=True):
        unknown = set({**edge_default, **data_}) - _IGNORED_EDGE_ATTRS
        if unknown:
            raise TemplateError(
                f"edge {parent!r} -> {child!r}: unknown attribute(s)"
                f" {', '.join(repr(u) for u in sorted(unknown))};"
                f" allowed: {', '.join(sorted(_IGNORED_EDGE_ATTRS))} (both ignored)"
            )
        # A MultiDiGraph's parallel edges collapse here: the set below keeps one.
        edges.append((parent, child))

    template = Template(
        name=tname,
        trigger=graph_vals["trigger"],
        budget_s=graph_vals["budget_s"],
        description=description,
        nodes=tuple(nodes),
        edges=tuple(sorted(set(edges))),
    )
    log.debug("template %s: parsed %d nodes, %d edges", tname, len(nodes), len(template.edges))
    return template


def to_graphml(t: Template) -> str:
    """GraphML carrying every attribute, so parse_graphml(to_graphml(t)) == t."""
    g = nx.DiGraph()
    g.graph["name"] = t.name
    g.graph["trigger"] = t.trigger
    g.graph["budget_s"] = t.budget_s
    if t.description:
        g.graph["description"] = t.description
    for node in t.nodes:
        attrs: dict[str, Any] = {
            "command": node.command,
            "priority": node.priority,
            "wall_s": node.wall_s,
            "queue": node.queue,
            "stage_in": node.stage_in,
        }
        if node.env:
            attrs["env"] = json.dumps(dict(node.env), sort_keys=True)
        for attr in ("budget_s", "expected_s", "max_running"):
            value = getattr(node, attr)
            if value is not None:
                attrs[attr] = value
        g.add_node(node.name, **attrs)
    g.add_edges_from(t.edges)
    return "\n".join(nx.generate_graphml(g)) + "\n"


# ---------------------------------------------------------------------------
# Pictures


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(t: Template) -> str:
    """Graphviz DOT; each label shows name, queue, priority and wall_s."""
    lines = [f"digraph {_dot_quote(t.name)} {{", "  rankdir=TB;", "  node [shape=box];"]
    for n in t.nodes:
        label = f"{n.name}\nqueue={n.queue} priority={n.priority} wall_s={n.wall_s:g}"
        lines.append(f"  {_dot_quote(n.name)} [label={_dot_quote(label)}];")
    for parent, child in t.edges:
        lines.append(f"  {_dot_quote(parent)} -> {_dot_quote(child)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_mermaid(t: Template) -> str:
    """A Mermaid ``flowchart TD`` block; node ids are n0, n1... in topological order."""
    ids = {n.name: f"n{i}" for i, n in enumerate(t.nodes)}
    lines = ["flowchart TD"]
    for n in t.nodes:
        # Mermaid has no escape for '"' inside a quoted label; use its entity.
        label = f"{n.name}<br/>{n.queue} p{n.priority} {n.wall_s:g}s".replace('"', "#quot;")
        lines.append(f'    {ids[n.name]}["{label}"]')
    for parent, child in t.edges:
        lines.append(f"    {ids[parent]} --> {ids[child]}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Expansion


def _sub(text: str, values: Mapping[str, str | Sequence[str]], sep: str) -> str:
    def one(m: re.Match[str]) -> str:
        value = values.get(m.group(1))
        if value is None:
            return m.group(0)
        return value if isinstance(value, str) else sep.join(value)

    return _PLACEHOLDER_RE.sub(one, text)


def expand(argv: Sequence[str], values: Mapping[str, str | Sequence[str]]) -> list[str]:
    """Substitute ``{placeholder}`` tokens in each argv element.

    An element that is exactly a placeholder whose value is a sequence becomes
    one element per item (none if empty); inside a longer element a sequence
    is joined with ",". Unknown tokens are left as they are.
    """
    out: list[str] = []
    for arg in argv:
        m = _PLACEHOLDER_RE.fullmatch(arg)
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
