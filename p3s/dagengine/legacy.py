"""The older system's GraphML templates, converted to p3s templates (``p3s dag import --legacy``).

The older system named its attributes differently, and a mechanical rename
would import cleanly and then run the wrong thing, so each one is mapped:

========================  ===================================================
older system              p3s
========================  ===================================================
node ``payload``          ``command``; with ``P3S_EXECMODE=SHELL`` in its env,
                          an explicit ``/bin/sh -c '<payload>'``
node ``env`` (JSON)       ``env``, without ``P3S_EXECMODE``
node ``timelimit`` (s)    ``wall_s``
node ``priority`` 0-10    ``priority`` 0-9, both higher first:
                          ``floor(p * 9 / 10 + 1/2)`` (:func:`map_priority`)
node ``jobtype`` noop     a no-op node (``noop = true``)
other ``jobtype``         the node's ``label``
edge ``name``+``datatag`` ``env[datatag]`` of the edge's source and target =
                          ``{outdir}/name`` of the source (in the target:
                          ``{outdir:SOURCE}/name``); from a root no-op source,
                          the workflow's input (``{input}``)
edge ``dirpath``          ignored: p3s owns the output layout
edge ``datatype``,        the edge's ``description``
``comment``
========================  ===================================================

Trigger, budget and name come from the operator, not from the file.  A file
that cannot be converted is refused with one message listing every problem;
what the conversion decided on its own is said in its notes.  Pure logic like
the rest of ``dagengine``: text in, a :class:`Conversion` out.
"""

from __future__ import annotations

import json
import shlex
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from p3s.dagengine.graphml import scan_graphml, to_graphml
from p3s.dagengine.model import Node, Template
from p3s.dagengine.rules import ENV_KEY_RE, TemplateLimits, check_import, check_name, check_shell_syntax
from p3s.errors import TemplateError

__all__ = ["EXECMODE", "Conversion", "convert", "map_priority"]

#: The env key with which the older system asked for a shell, and the value that does.
EXECMODE = "P3S_EXECMODE"
SHELL_MODE = "SHELL"
SHELL = "/bin/sh"
NOOP_JOBTYPE = "noop"

NODE_ATTRS = ("payload", "env", "timelimit", "priority", "jobtype")
EDGE_ATTRS = ("name", "datatag", "dirpath", "datatype", "comment")
# Accepted besides: graph editors write them; a label is kept where there is no jobtype.
_EXTRA_ATTRS = ("label", "description")
OLD_PRIORITY_MAX = 10


def map_priority(old: int) -> int:
    """The older system's priority 0-10 on p3s's 0-9, both higher first: floor(old * 9 / 10 + 1/2).

    Integer arithmetic, so halves round up (5 -> 5) and order is kept: 0..10 ->
    0 1 2 3 4 5 5 6 7 8 9.
    """
    return (18 * old + 10) // 20


@dataclass(frozen=True)
class Conversion:
    """A converted template, what the conversion decided on its own, and the notes for the file's readers."""

    template: Template
    notes: tuple[str, ...]
    labels: Mapping[str, str] = field(default_factory=dict)
    edge_descriptions: Mapping[tuple[str, str], str] = field(default_factory=dict)

    def graphml(self) -> str:
        """p3s GraphML of the template, the notes in a comment at the top; it imports without --legacy."""
        text = to_graphml(self.template, self.labels, self.edge_descriptions)
        if not self.notes:
            return text
        # "--" may not appear inside an XML comment.
        lines = "".join(f"  - {n.replace('--', '- -')}\n" for n in self.notes)
        return f"<!-- converted from the older system's template; notes:\n{lines}-->\n{text}"


@dataclass
class _Item:
    """One element (node or edge) of the older file: its id or ends and its attribute values."""

    ident: str
    attrs: dict[str, str]
    ends: tuple[str, str] = ("", "")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _read(data: str | bytes, limits: TemplateLimits) -> tuple[dict[str, str], list[_Item], list[_Item], list[str]]:
    """Graph attributes, nodes, edges, and problems of the document's structure."""
    # Size, depth, counts and DOCTYPE first, exactly as for a p3s template; one data
    # item per edge means two edges may join the same two jobs.
    scan_graphml(data, limits, parallel_edges=True)
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise TemplateError(f"not a GraphML document: {exc}") from None
    if _local(root.tag) != "graphml":
        raise TemplateError(f"not a GraphML document: root element is {root.tag!r}")
    graphs = [el for el in root if _local(el.tag) == "graph"]
    if len(graphs) != 1:
        raise TemplateError(f"not a template: the document holds {len(graphs)} graphs, not one")
    graph = graphs[0]
    problems: list[str] = []
    if graph.get("edgedefault", "directed") != "directed":
        problems.append('graph: it is undirected; a template needs edgedefault="directed"')

    keys: dict[str, tuple[str, str]] = {}  # id -> (for, attr.name)
    defaults: dict[str, dict[str, str]] = {"graph": {}, "node": {}, "edge": {}}
    for key in root.iter():
        if _local(key.tag) != "key" or key.get("attr.name") is None:
            continue  # yEd's graphics keys have no attr.name
        scope, name = key.get("for", "all"), key.get("attr.name", "")
        keys[key.get("id", "")] = (scope, name)
        default = next((d for d in key if _local(d.tag) == "default"), None)
        if default is not None:
            for s in (scope,) if scope in defaults else tuple(defaults):
                defaults[s][name] = "".join(default.itertext()).strip()

    def values(el: ET.Element, scope: str, what: str) -> dict[str, str]:
        out = dict(defaults[scope])
        for d in el:
            if _local(d.tag) != "data":
                continue
            key = keys.get(d.get("key", ""))
            if key is None:
                # A key without attr.name (graphics) is skipped; an undeclared one is a mistake.
                if not any(k.get("id") == d.get("key") for k in root.iter() if _local(k.tag) == "key"):
                    problems.append(f"{what}: data for the undeclared key {d.get('key')!r}")
                continue
            out[key[1]] = "".join(d.itertext()).strip()
        return out

    nodes = [
        _Item(el.get("id", ""), values(el, "node", f"node {el.get('id', '')!r}"))
        for el in graph
        if _local(el.tag) == "node"
    ]
    edges = []
    for el in graph:
        if _local(el.tag) == "edge":
            ends = (el.get("source", ""), el.get("target", ""))
            edges.append(_Item(el.get("id", ""), values(el, "edge", f"edge {ends[0]!r} -> {ends[1]!r}"), ends))
    return values(graph, "graph", "graph"), nodes, edges, problems


@dataclass
class _Job:
    """What one older node becomes, gathered before the Node is built."""

    name: str
    noop: bool = False
    payload: str = ""
    shell: bool = False
    env: dict[str, str] = field(default_factory=dict)
    wall_s: float | None = None
    priority: int | None = None
    old_priority: str = ""
    label: str = ""


def _job(item: _Item, problems: list[str], notes: list[str]) -> _Job:
    n = item.ident
    where = f"node {n!r}"
    job = _Job(n)
    try:
        check_name("node", n)
    except TemplateError as exc:
        problems.append(f"{where}: {exc}")
    unknown = sorted(set(item.attrs) - set(NODE_ATTRS) - set(_EXTRA_ATTRS))
    if unknown:
        problems.append(
            f"{where}: unknown attribute(s) {', '.join(repr(u) for u in unknown)};"
            f" the older system's are {', '.join(NODE_ATTRS)}"
        )
    jobtype = item.attrs.get("jobtype", "")
    job.noop = jobtype == NOOP_JOBTYPE
    job.label = jobtype if jobtype and not job.noop else item.attrs.get("label", "")
    job.payload = item.attrs.get("payload", "")

    env_text = item.attrs.get("env", "")
    try:
        env = json.loads(env_text) if env_text else {}
    except ValueError:
        env = None
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        problems.append(f"{where}: attribute 'env' must be a JSON object of string values, got {env_text!r}")
        env = {}
    bad_keys = sorted(k for k in env if not ENV_KEY_RE.fullmatch(k))
    if bad_keys:
        problems.append(f"{where}: attribute 'env' has bad variable name(s) {', '.join(map(repr, bad_keys))}")
    mode = env.pop(EXECMODE, None)
    if mode is not None and mode != SHELL_MODE:
        problems.append(
            f"{where}: {EXECMODE}={mode!r} is not understood; only {SHELL_MODE!r} (a shell command line) is"
        )
    job.shell = mode == SHELL_MODE
    job.env = env

    if job.noop:
        dropped = [a for a in ("payload", "timelimit", "priority") if item.attrs.get(a)] + (["env"] if env else [])
        if dropped:
            notes.append(f"{where}: a no-op node runs nothing; its {', '.join(dropped)} ignored")
        job.env = {}
        return job
    if not job.payload:
        problems.append(f"{where}: has no payload and is not a no-op (jobtype {NOOP_JOBTYPE!r})")
    if job.shell:
        notes.append(f"{where}: {EXECMODE}={SHELL_MODE}: the payload runs as {SHELL} -c '<payload>'")

    limit = item.attrs.get("timelimit", "")
    if limit:
        try:
            job.wall_s = float(limit)
        except ValueError:
            job.wall_s = None
        if job.wall_s is None or not job.wall_s > 0 or job.wall_s == float("inf"):
            problems.append(f"{where}: attribute 'timelimit' must be a number of seconds > 0, got {limit!r}")
            job.wall_s = None
    else:
        notes.append(f"{where}: no timelimit; wall_s is p3s's default, {Node.wall_s:g} s")
    prio = item.attrs.get("priority", "")
    if prio:
        try:
            old = int(prio)
        except ValueError:
            old = -1
        if not 0 <= old <= OLD_PRIORITY_MAX:
            problems.append(
                f"{where}: attribute 'priority' must be an integer from 0 to {OLD_PRIORITY_MAX}, got {prio!r}"
            )
        else:
            job.priority, job.old_priority = map_priority(old), prio
    return job


def _file_name_problem(name: str) -> str:
    if "/" in name or name in (".", "..") or "\0" in name:
        return "must be a plain file name (no '/', not '.' or '..')"
    if "{" in name or "}" in name:
        return "must not hold braces (p3s would read them as a placeholder)"
    return ""


def convert(
    data: str | bytes,
    name: str,
    trigger: str,
    budget_s: float,
    limits: TemplateLimits | None = None,
) -> Conversion:
    """Convert one of the older system's GraphML templates; TemplateError lists every problem at once."""
    limits = limits or TemplateLimits()
    gattrs, items, edge_items, problems = _read(data, limits)
    notes: list[str] = []
    if gattrs:
        notes.append(
            f"graph: attribute(s) {', '.join(sorted(gattrs))} ignored; name, trigger and budget come from the command"
        )
    if not any(a in item.attrs for item in items for a in NODE_ATTRS):
        hint = (
            "; it looks like a p3s template: import it without --legacy"
            if any("command" in item.attrs for item in items)
            else ""
        )
        problems.append(
            f"not a template of the older system: no node has any of its job attributes"
            f" ({', '.join(NODE_ATTRS)}){hint}"
        )
        raise TemplateError(_refusal(problems))

    jobs: dict[str, _Job] = {}
    flawed: set[str] = set()  # nodes with a problem already said: not built, so not said twice
    for item in items:
        before = len(problems)
        jobs[item.ident] = _job(item, problems, notes)
        if len(problems) > before:
            flawed.add(item.ident)
    priorities = [f"{j.name} {j.old_priority} -> {j.priority}" for j in jobs.values() if j.priority is not None]
    if priorities:
        notes.append(
            "priorities mapped from the older 0-10 onto p3s's 0-9, both higher first, as"
            f" floor(p * 9 / 10 + 1/2): {', '.join(priorities)}"
        )

    parents: dict[str, set[str]] = {n: set() for n in jobs}
    for e in edge_items:
        src, dst = e.ends
        if src in parents and dst in parents:
            parents[dst].add(src)
    env_from: dict[tuple[str, str], str] = {}  # (node, variable) -> the edge that set it
    descriptions: dict[tuple[str, str], list[str]] = {}
    edges: set[tuple[str, str]] = set()
    for e in edge_items:
        src, dst = e.ends
        where = f"edge {src!r} -> {dst!r}"
        missing = [end for end in (src, dst) if end not in jobs]
        if missing:
            problems.append(f"{where}: unknown node(s) {', '.join(map(repr, missing))}")
            continue
        edges.add((src, dst))
        unknown = sorted(set(e.attrs) - set(EDGE_ATTRS) - set(_EXTRA_ATTRS))
        if unknown:
            problems.append(
                f"{where}: unknown attribute(s) {', '.join(repr(u) for u in unknown)};"
                f" the older system's are {', '.join(EDGE_ATTRS)}"
            )
        said = [f"{k}: {e.attrs[k]}" for k in ("datatype", "comment") if e.attrs.get(k)]
        if e.attrs.get("description"):
            said.append(e.attrs["description"])
        if said:
            descriptions.setdefault((src, dst), []).append("; ".join(said))
        fname, tag = e.attrs.get("name", ""), e.attrs.get("datatag", "")
        if not fname and not tag:
            continue  # an order between two jobs, with no data
        if not fname or not tag:
            problems.append(f"{where}: a data item needs both 'name' and 'datatag', got name={fname!r} datatag={tag!r}")
            continue
        if not ENV_KEY_RE.fullmatch(tag):
            problems.append(f"{where}: datatag {tag!r} is not a variable name (must match {ENV_KEY_RE.pattern})")
            continue
        if tag.startswith("P3S_"):
            problems.append(f"{where}: datatag {tag!r} would replace a variable p3s gives every payload")
            continue
        why = _file_name_problem(fname)
        if why:
            problems.append(f"{where}: name {fname!r} {why}")
            continue
        if e.attrs.get("dirpath"):
            notes.append(
                f"{where}: dirpath {e.attrs['dirpath']!r} ignored: p3s owns the output layout;"
                f" the file is {fname!r} in the output directory of {src!r}"
            )
        source = jobs[src]
        if source.noop and parents[src]:
            problems.append(
                f"{where}: its source is a no-op node that is not a root, which makes no file {fname!r}"
            )
            continue
        if source.noop:
            notes.append(
                f"{where}: {src!r} is a root no-op, so {tag} is the workflow's input file (name {fname!r} unused)"
            )
            settings = [(dst, "{input}")]
        else:
            settings = [(src, "{outdir}/" + fname), (dst, "{outdir:" + src + "}/" + fname)]
        for node, value in settings:
            job = jobs[node]
            if job.noop:
                notes.append(f"{where}: {node!r} is a no-op, so it gets no {tag}")
                continue
            old = job.env.get(tag)
            if old is not None and old != value:
                first = env_from.get((node, tag), "its env")
                problems.append(
                    f"node {node!r}: variable {tag} gets two values, {old!r} ({first}) and {value!r} ({where})"
                )
                continue
            job.env[tag] = value
            env_from[(node, tag)] = where

    # Built even after problems elsewhere, so the refusal also lists what a command breaks.
    nodes = []
    for job in jobs.values():
        if job.name in flawed:
            continue
        node = _node(job, problems)
        if node is not None:
            nodes.append(node)
    if problems:
        raise TemplateError(_refusal(problems))
    try:
        template = Template(
            name=name,
            trigger=trigger,
            budget_s=budget_s,
            nodes=tuple(nodes),
            edges=tuple(sorted(edges)),
            description="converted from the older system's template by p3s dag import --legacy",
        )
        check_import(template, limits)
    except TemplateError as exc:
        raise TemplateError(_refusal([str(exc)])) from None
    labels = {j.name: j.label for j in jobs.values() if j.label}
    return Conversion(
        template=template,
        notes=tuple(notes),
        labels=labels,
        edge_descriptions={k: " | ".join(v) for k, v in descriptions.items()},
    )


def _node(job: _Job, problems: list[str]) -> Node | None:
    kwargs: dict[str, Any] = {}
    if job.wall_s is not None:
        kwargs["wall_s"] = job.wall_s
    if job.priority is not None:
        kwargs["priority"] = job.priority
    try:
        if job.noop:
            return Node(name=job.name, noop=True, **kwargs)
        command = f"{SHELL} -c {shlex.quote(job.payload)}" if job.shell else job.payload
        node = Node(name=job.name, command=command, env=job.env, **kwargs)
        check_shell_syntax(job.name, node.command)
        return node
    except TemplateError as exc:
        shell_syntax = "shell syntax" in str(exc) and not job.shell
        hint = f" (in the older template: env {EXECMODE}={SHELL_MODE} for a shell command line)" if shell_syntax else ""
        problems.append(f"{exc}{hint}")
        return None


def _refusal(problems: list[str]) -> str:
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    return "cannot convert the older system's template, " + count + ":\n" + "\n".join(f"  - {p}" for p in problems)
