"""Pictures of a template: Graphviz DOT and Mermaid, for `p3s dag show` and the web pages."""

from __future__ import annotations

from p3s.dagengine.model import Template

__all__ = ["to_dot", "to_mermaid"]


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(t: Template) -> str:
    """Graphviz DOT; each label shows name, queue, priority and wall_s; a no-op node is a dashed ellipse."""
    lines = [f"digraph {_dot_quote(t.name)} {{", "  rankdir=TB;", "  node [shape=box];"]
    for n in t.nodes:
        if n.noop:
            label = f"{n.name}\nno-op"
            lines.append(f"  {_dot_quote(n.name)} [label={_dot_quote(label)}, shape=ellipse, style=dashed];")
            continue
        label = f"{n.name}\nqueue={n.queue} priority={n.priority} wall_s={n.wall_s:g}"
        lines.append(f"  {_dot_quote(n.name)} [label={_dot_quote(label)}];")
    for parent, child in t.edges:
        lines.append(f"  {_dot_quote(parent)} -> {_dot_quote(child)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_mermaid(t: Template) -> str:
    """A Mermaid ``flowchart TD`` block; node ids are n0, n1... in topological order.

    A no-op node is drawn as a stadium ``([...])`` labelled ``no-op``.
    """
    ids = {n.name: f"n{i}" for i, n in enumerate(t.nodes)}
    lines = ["flowchart TD"]
    for n in t.nodes:
        # Mermaid has no escape for '"' inside a quoted label; use its entity.
        if n.noop:
            label = f"{n.name}<br/>no-op".replace('"', "#quot;")
            lines.append(f'    {ids[n.name]}(["{label}"])')
            continue
        label = f"{n.name}<br/>{n.queue} p{n.priority} {n.wall_s:g}s".replace('"', "#quot;")
        lines.append(f'    {ids[n.name]}["{label}"]')
    for parent, child in t.edges:
        lines.append(f"    {ids[parent]} --> {ids[child]}")
    return "\n".join(lines) + "\n"
