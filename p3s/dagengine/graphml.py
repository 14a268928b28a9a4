"""GraphML in and out: parse_graphml (scan, parse, validate) and to_graphml.

Parsing runs in three steps, each bounded by the one before:

1. the size of the document against ``max_bytes``, before any parsing;
2. a streaming scan (expat) that stops at the first element nested deeper than
   ``max_depth``, at a node or edge past ``max_nodes`` / ``max_edges``, at a
   DOCTYPE (entity tricks; a template has no use for one), at a second graph,
   and at a duplicate node id, edge id or edge, which networkx would merge;
3. the whole document, through ElementTree and networkx, into a Template,
   then the import rules (``rules.check_import``).

Pure logic: nothing here reads or writes a file; callers pass the text in and
get text back.
"""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any
from xml.parsers import expat

import networkx as nx

from p3s.dagengine.model import Node, Template
from p3s.dagengine.rules import (
    DECLARED_OK,
    GRAPH_SPEC,
    NODE_SPEC,
    TemplateLimits,
    check_import,
    check_name,
    coerce,
    refuse_unknown,
    where,
)
from p3s.errors import TemplateError

__all__ = ["parse_graphml", "scan_graphml", "to_graphml"]

log = logging.getLogger(__name__)

GRAPHML_NAMESPACE = "http://graphml.graphdrawing.org/xmlns"
_GRAPHML_NS = "{" + GRAPHML_NAMESPACE + "}"

_GRAPH_ATTRS = ("name", "trigger", "budget_s", "description")
_IGNORED_NODE_ATTRS = frozenset({"label", "description"})
_IGNORED_EDGE_ATTRS = frozenset({"label", "description"})
_CHUNK = 1 << 16


class _Scan:
    """Expat handlers that count and remember just enough to refuse early."""

    def __init__(self, limits: TemplateLimits, parallel_edges: bool = False) -> None:
        self.limits = limits
        self.parallel_edges = parallel_edges
        self.depth = 0
        self.graphs = 0
        self.nodes: set[str] = set()
        self.edge_ids: set[str] = set()
        self.edges: set[tuple[str, str]] = set()
        self.n_edges = 0

    def start(self, name: str, attrs: dict[str, str]) -> None:
        self.depth += 1
        if self.depth > self.limits.max_depth:
            raise TemplateError(
                f"not a GraphML template: elements are nested deeper than {self.limits.max_depth}"
                " (templates.max_depth)"
            )
        if not name.startswith(GRAPHML_NAMESPACE + " "):
            return
        tag = name[len(GRAPHML_NAMESPACE) + 1 :]
        if tag == "graph":
            self.graphs += 1
            if self.graphs > 1:
                raise TemplateError(
                    "not a GraphML template: a template is one graph; nested graphs and"
                    " further graphs are not supported"
                )
        elif tag == "node":
            node_id = attrs.get("id", "")
            if node_id in self.nodes:
                raise TemplateError(f"node {node_id!r}: defined twice (node ids must be unique)")
            self.nodes.add(node_id)
            if len(self.nodes) > self.limits.max_nodes:
                raise TemplateError(
                    f"template has more than {self.limits.max_nodes} nodes (templates.max_nodes)"
                )
        elif tag == "edge":
            edge_id = attrs.get("id")
            if edge_id is not None:
                if edge_id in self.edge_ids:
                    raise TemplateError(f"edge id {edge_id!r}: used twice (edge ids must be unique)")
                self.edge_ids.add(edge_id)
            ends = (attrs.get("source", ""), attrs.get("target", ""))
            if ends in self.edges and not self.parallel_edges:
                raise TemplateError(f"edge {ends[0]!r} -> {ends[1]!r}: given twice")
            self.edges.add(ends)
            self.n_edges += 1
            if self.n_edges > self.limits.max_edges:
                raise TemplateError(
                    f"template has more than {self.limits.max_edges} edges (templates.max_edges)"
                )

    def end(self, name: str) -> None:
        self.depth -= 1


def _refuse_doctype(*_: object) -> None:
    raise TemplateError(
        "not a GraphML template: it has a DOCTYPE; a template has no use for one, and its"
        " entity declarations can make a small file expand without end"
    )


def scan_graphml(data: str | bytes, limits: TemplateLimits | None = None, parallel_edges: bool = False) -> None:
    """Refuse a document over the size, depth or count limits, with a DOCTYPE or duplicate ids.

    Reads the document once as a stream and stops at the first refusal, so a
    document nested 100 000 deep or holding 100 000 nodes costs no more than
    the part read up to the limit.  ``parallel_edges`` lets two edges join the
    same two nodes (the older system's files carry one data item per edge).
    """
    limits = limits or TemplateLimits()
    size = len(data) if isinstance(data, bytes | bytearray) or len(data) > limits.max_bytes else len(data.encode())
    if size > limits.max_bytes:
        raise TemplateError(f"template is larger than {limits.max_bytes} bytes (templates.max_bytes)")
    scan = _Scan(limits, parallel_edges)
    parser = expat.ParserCreate(namespace_separator=" ")
    parser.StartElementHandler = scan.start
    parser.EndElementHandler = scan.end
    parser.StartDoctypeDeclHandler = _refuse_doctype
    parser.EntityDeclHandler = _refuse_doctype
    try:
        for offset in range(0, len(data), _CHUNK):
            parser.Parse(data[offset : offset + _CHUNK], False)
        parser.Parse(data[:0], True)
    except expat.ExpatError as exc:
        raise TemplateError(f"not a GraphML document: {exc}") from None


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
            f'(xmlns="{GRAPHML_NAMESPACE}")'
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
    if dtype not in DECLARED_OK[kind]:
        raise TemplateError(
            f"{where(node)}: attribute {attr!r} is declared as {dtype!r};"
            f" use one of {', '.join(sorted(DECLARED_OK[kind]))}"
        )


def parse_graphml(
    data: str | bytes, name: str | None = None, limits: TemplateLimits | None = None, default_name: str | None = None
) -> Template:
    """Parse and validate a GraphML template; TemplateError says what is wrong where.

    `limits` (default: TemplateLimits()) bounds the document and the values in it.
    The name is `name`, else the graph's `name` attribute, else `default_name`
    (an uploaded file's name, say).
    """
    limits = limits or TemplateLimits()
    scan_graphml(data, limits)
    text, declared = _stringly(data)
    try:
        g = nx.parse_graphml(text, node_type=str)
    except (nx.NetworkXError, ValueError, KeyError, TypeError) as exc:
        raise TemplateError(f"not a GraphML document networkx can read: {exc}") from None
    if not g.is_directed():
        raise TemplateError('graph is undirected; a template needs edgedefault="directed"')

    gattrs = {k: v for k, v in g.graph.items() if k not in ("node_default", "edge_default")}
    refuse_unknown(None, set(gattrs) - set(_GRAPH_ATTRS), _GRAPH_ATTRS)
    for attr in gattrs:
        _check_declared(None, "graph", attr, GRAPH_SPEC[attr][0], declared)
    tname = name if name is not None else gattrs.get("name", default_name)
    if tname is None:
        raise TemplateError("template has no name: pass one or set the graph attribute 'name'")
    for attr in ("trigger", "budget_s"):
        if attr not in gattrs:
            raise TemplateError(f"graph: attribute {attr!r} is required")
    graph_vals = {a: coerce(None, a, gattrs[a], GRAPH_SPEC) for a in ("trigger", "budget_s")}
    description = coerce(None, "description", gattrs.get("description", ""), GRAPH_SPEC)

    if g.number_of_nodes() == 0:
        raise TemplateError(f"template {tname!r}: has no nodes")
    node_default = g.graph.get("node_default", {})
    allowed = set(NODE_SPEC) | _IGNORED_NODE_ATTRS
    nodes = []
    for nname, data_ in g.nodes(data=True):
        check_name("node", nname)
        attrs = {**node_default, **data_}
        refuse_unknown(nname, set(attrs) - allowed, allowed)
        noop = "noop" in attrs and coerce(nname, "noop", attrs["noop"], NODE_SPEC)
        if "command" not in attrs and not noop:
            raise TemplateError(f"node {nname!r}: attribute 'command' is required (or noop = true)")
        kwargs: dict[str, Any] = {}
        for attr, value in attrs.items():
            if attr in _IGNORED_NODE_ATTRS:
                continue
            _check_declared(nname, "node", attr, NODE_SPEC[attr][0], declared)
            kwargs[attr] = coerce(nname, attr, value, NODE_SPEC)
        nodes.append(Node(name=nname, **kwargs))

    edge_default = g.graph.get("edge_default", {})
    edges = []
    for parent, child, data_ in g.edges(data=True):
        # networkx keeps an edge's XML id as data; the scan made sure ids are unique.
        unknown = set({**edge_default, **data_}) - _IGNORED_EDGE_ATTRS - {"id"}
        if unknown:
            raise TemplateError(
                f"edge {parent!r} -> {child!r}: unknown attribute(s)"
                f" {', '.join(repr(u) for u in sorted(unknown))};"
                f" allowed: {', '.join(sorted(_IGNORED_EDGE_ATTRS))} (both ignored)"
            )
        edges.append((parent, child))

    template = Template(
        name=tname,
        trigger=graph_vals["trigger"],
        budget_s=graph_vals["budget_s"],
        description=description,
        nodes=tuple(nodes),
        edges=tuple(sorted(edges)),
    )
    check_import(template, limits)
    log.debug("template %s: parsed %d nodes, %d edges", tname, len(nodes), len(template.edges))
    return template


def to_graphml(
    t: Template,
    labels: Mapping[str, str] | None = None,
    edge_descriptions: Mapping[tuple[str, str], str] | None = None,
) -> str:
    """GraphML carrying every attribute, so parse_graphml(to_graphml(t)) == t.

    ``labels`` (node -> text) and ``edge_descriptions`` ((parent, child) -> text)
    are written as the ``label`` and ``description`` attributes, which an import
    accepts and ignores: notes for the people who read and edit the file.
    """
    g = nx.DiGraph()
    g.graph["name"] = t.name
    g.graph["trigger"] = t.trigger
    g.graph["budget_s"] = t.budget_s
    if t.description:
        g.graph["description"] = t.description
    labels = labels or {}
    edge_descriptions = edge_descriptions or {}
    for node in t.nodes:
        attrs: dict[str, Any] = {"noop": True} if node.noop else {"command": node.command}
        attrs.update(priority=node.priority, wall_s=node.wall_s, queue=node.queue, stage_in=node.stage_in)
        if node.name in labels:
            attrs["label"] = labels[node.name]
        if node.env:
            attrs["env"] = json.dumps(dict(node.env), sort_keys=True)
        for attr in ("budget_s", "expected_s", "max_running"):
            value = getattr(node, attr)
            if value is not None:
                attrs[attr] = value
        g.add_node(node.name, **attrs)
    for edge in t.edges:
        described = edge_descriptions.get(edge)
        g.add_edge(*edge, **({"description": described} if described else {}))
    return "\n".join(nx.generate_graphml(g)) + "\n"
