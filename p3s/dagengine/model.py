"""The values of a template: Node (one stage), Template (the validated DAG) and FrozenEnv.

Building either checks every value rule (see ``rules``); a Template puts its
nodes in lexicographical topological order, so equal content compares equal.
"""

from __future__ import annotations

import functools
import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import networkx as nx

from p3s.dagengine import rules
from p3s.dagengine.placeholders import outdir_refs
from p3s.dagengine.rules import GRAPH_SPEC, NODE_SPEC, QUEUE_RE, bad, coerce
from p3s.errors import TemplateError

__all__ = ["SNAPSHOT_VERSION", "FrozenEnv", "Node", "Template"]

#: Version of the dict produced by Template.to_dict (the snapshot the database stores).
SNAPSHOT_VERSION = 1


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


@dataclass(frozen=True)
class Node:
    """One stage of a template: the command a job runs and how it is scheduled."""

    name: str
    command: str = ""
    priority: int = 5
    wall_s: float = 3600.0
    queue: str = "default"
    env: Mapping[str, str] = field(default_factory=FrozenEnv)
    budget_s: float | None = None
    expected_s: float | None = None
    max_running: int | None = None
    stage_in: bool = False
    #: A node that runs nothing: its job finishes as soon as its parents have, with no task and no pilot.
    noop: bool = False

    def __post_init__(self) -> None:
        rules.check_name("node", self.name)
        n = self.name
        for attr in NODE_SPEC:
            value = getattr(self, attr)
            if value is not None:
                value = coerce(n, attr, value, NODE_SPEC)
                object.__setattr__(self, attr, FrozenEnv(value) if attr == "env" else value)
        if self.noop:
            rules.check_noop(n, self.command, self.env, self.stage_in)
        else:
            rules.split_command(n, self.command)
        rules.check_placeholders(n, "command", self.command)
        for val in self.env.values():
            rules.check_placeholders(n, "env", val)
        if not 0 <= self.priority <= 9:
            raise bad(n, "priority", NODE_SPEC["priority"][1], self.priority)
        if self.wall_s <= 0:
            raise bad(n, "wall_s", NODE_SPEC["wall_s"][1], self.wall_s)
        if not QUEUE_RE.fullmatch(self.queue):
            raise bad(n, "queue", NODE_SPEC["queue"][1], self.queue)
        if self.budget_s is not None and self.budget_s <= 0:
            raise bad(n, "budget_s", NODE_SPEC["budget_s"][1], self.budget_s)
        if self.expected_s is not None and self.expected_s < 0:
            raise bad(n, "expected_s", NODE_SPEC["expected_s"][1], self.expected_s)
        if self.max_running is not None and self.max_running < 1:
            raise bad(n, "max_running", NODE_SPEC["max_running"][1], self.max_running)

    @functools.cached_property
    def argv(self) -> tuple[str, ...]:
        """The command split like a POSIX shell would, without running one (once per node)."""
        return tuple(shlex.split(self.command))

    @functools.cached_property
    def outdir_refs(self) -> frozenset[str]:
        """The other nodes whose output directory the command or env names with ``{outdir:NODE}``."""
        refs = set(outdir_refs(self.command))
        for val in self.env.values():
            refs |= outdir_refs(val)
        return frozenset(refs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; None-valued optional fields are omitted, and ``noop`` unless true."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            # noop only where true: snapshots of templates without no-op nodes read as before.
            if value is None or (f.name == "noop" and not value):
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
        rules.check_name("template", self.name)
        trigger = coerce(None, "trigger", self.trigger, GRAPH_SPEC)
        if not trigger.strip():
            raise bad(None, "trigger", GRAPH_SPEC["trigger"][1], trigger)
        budget = coerce(None, "budget_s", self.budget_s, GRAPH_SPEC)
        if budget <= 0:
            raise bad(None, "budget_s", GRAPH_SPEC["budget_s"][1], self.budget_s)
        description = coerce(None, "description", self.description, GRAPH_SPEC)
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
        for node in nodes:
            if node.outdir_refs:
                rules.check_outdir_refs(node.name, node.outdir_refs, nx.ancestors(g, node.name), by_name)
        order = list(nx.lexicographical_topological_sort(g))
        object.__setattr__(self, "nodes", tuple(by_name[n] for n in order))
        object.__setattr__(self, "edges", tuple(sorted(g.edges())))

    # -- lookups -------------------------------------------------------------

    @functools.cached_property
    def _index(self) -> tuple[dict[str, Node], dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
        # Built once per template: the dispatcher asks for parents node by node,
        # and a scan of every edge per question is quadratic in a big template.
        parents: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        children: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for parent, child in self.edges:
            parents[child].append(parent)
            children[parent].append(child)
        return (
            {n.name: n for n in self.nodes},
            {k: tuple(sorted(v)) for k, v in parents.items()},
            {k: tuple(sorted(v)) for k, v in children.items()},
        )

    def node(self, name: str) -> Node:
        """The node called `name`; TemplateError if there is none."""
        try:
            return self._index[0][name]
        except KeyError:
            raise TemplateError(f"template {self.name!r}: no node {name!r}") from None

    def parents(self, name: str) -> tuple[str, ...]:
        """Names of the direct parents of `name`, sorted."""
        self.node(name)
        return self._index[1][name]

    def children(self, name: str) -> tuple[str, ...]:
        """Names of the direct children of `name`, sorted."""
        self.node(name)
        return self._index[2][name]

    def roots(self) -> tuple[str, ...]:
        """Names of the nodes without parents, in topological order."""
        return tuple(n.name for n in self.nodes if not self._index[1][n.name])

    def descendants(self, name: str) -> frozenset[str]:
        """Every node reachable from `name` (not including it)."""
        self.node(name)
        seen: set[str] = set()
        todo = [name]
        while todo:
            for child in self._index[2][todo.pop()]:
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
        return frozenset(seen)

    def parents_map(self) -> dict[str, tuple[str, ...]]:
        """Every node -> its parents, in topological order (roots map to ())."""
        return dict(self._index[1])

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
        """Rebuild a Template from to_dict() output, validating it again.

        The value rules apply; the import rules (``rules.check_import``) do not:
        a stored snapshot passed them when it was imported, and a rule added
        since must not make the workflows made from it unreadable.
        """
        if not isinstance(d, Mapping):
            raise TemplateError(f"template snapshot must be a mapping, got {type(d).__name__}")
        if d.get("v", SNAPSHOT_VERSION) != SNAPSHOT_VERSION:
            raise TemplateError(f"template snapshot version {d.get('v')!r} is not supported")
        allowed = {"v", "name", "trigger", "budget_s", "description", "nodes", "edges"}
        rules.refuse_unknown(None, set(d) - allowed, allowed)
        for key in ("name", "trigger", "budget_s", "nodes"):
            if key not in d:
                raise TemplateError(f"template snapshot lacks {key!r}")
        node_fields = {f.name for f in fields(Node)}
        nodes = []
        for nd in d["nodes"]:
            if not isinstance(nd, Mapping) or "name" not in nd or ("command" not in nd and not nd.get("noop")):
                raise TemplateError(f"template snapshot: bad node {nd!r}")
            rules.refuse_unknown(str(nd["name"]), set(nd) - node_fields, node_fields)
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


def _refuse_cycle(g: nx.DiGraph) -> None:
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return
    path = [cycle[0][0]] + [edge[1] for edge in cycle]
    raise TemplateError(f"graph has a cycle: {' -> '.join(path)}")
