"""Pictures drawn on the server as SVG text: the latency plot and a template's or a workflow's DAG.

No JavaScript draws anything.  Every piece of text from outside (node
names, template names) goes through :func:`esc`, so a name cannot close an
element or open a script.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any
from xml.sax.saxutils import quoteattr
from xml.sax.saxutils import escape as _escape

from markupsafe import Markup

# Colours per job state; the stylesheet uses the same data-state values.
STATE_COLOURS = {
    "pending": "#d0d4da",
    "queued": "#9cc3e6",
    "running": "#f2c14e",
    "finished": "#7bc47f",
    "failed": "#e0605e",
    "timeout": "#e08a5e",
    "expired": "#b08ad0",
    "lost": "#8d8d8d",
    "dropped": "#c8b8a8",
}
TEMPLATE_COLOUR = "#e8eef6"


def esc(text: object) -> str:
    """Text safe inside an SVG element: ``& < >`` and both quotes escaped, control characters dropped."""
    raw = "".join(ch for ch in str(text) if ch >= " " or ch in "\t")
    return _escape(raw, {'"': "&quot;", "'": "&#x27;"})


def attr(text: object) -> str:
    """A quoted attribute value (with its quotes)."""
    return quoteattr("".join(ch for ch in str(text) if ch >= " "))


def _nice_max(value: float) -> float:
    """A round upper bound for an axis: 1, 2 or 5 times a power of ten."""
    if value <= 0:
        return 1.0
    power = 1.0
    while power * 10 <= value:
        power *= 10
    while power > value:
        power /= 10
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power


def latency_plot(series: Mapping[str, Any], width: int = 720, height: int = 220) -> Markup:
    """Median latency per bucket over the last hours: file seen → job started, and → workflow complete."""
    left, right, top, bottom = 56, 16, 14, 34
    pw, ph = width - left - right, height - top - bottom
    t0, t1 = float(series["from"]), float(series["to"])
    lines = {"seen_to_started": ("#3c78c3", "seen → job started"),
             "seen_to_complete": ("#c3503c", "seen → workflow complete")}
    ymax = _nice_max(max([y for key in lines for _, y in series.get(key, [])] or [0.0]))

    def x(t: float) -> float:
        return left + (t - t0) / max(t1 - t0, 1.0) * pw

    def y(v: float) -> float:
        return top + ph - v / ymax * ph

    out = [f'<svg id="latency-plot" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" role="img" aria-label="latency plot">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafbfc" stroke="#c8ccd2"/>']
    for i in range(5):
        v = ymax * i / 4
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e4e7eb"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="11">{v:g}s</text>')
    hours = max(1, round((t1 - t0) / 3600))
    for i in range(hours + 1):
        t = t0 + i * (t1 - t0) / hours
        label = time.strftime("%H:%M", time.gmtime(t))
        out.append(f'<text x="{x(t):.1f}" y="{top + ph + 16}" text-anchor="middle" font-size="11">{label}</text>')
    for n, (key, (colour, label)) in enumerate(lines.items()):
        points = series.get(key, [])
        if points:
            path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points)
            out.append(f'<polyline class="series" data-series="{key}" points="{path}" fill="none" '
                       f'stroke="{colour}" stroke-width="2"/>')
            out += [f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="2.5" fill="{colour}"/>' for t, v in points]
        lx = left + 8 + n * 220
        out.append(f'<rect x="{lx}" y="{height - 12}" width="10" height="4" fill="{colour}"/>')
        out.append(f'<text x="{lx + 14}" y="{height - 7}" font-size="11">{esc(label)} (median, UTC)</text>')
    if not any(series.get(key) for key in lines):
        out.append(f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle" font-size="13" '
                   'fill="#6b7280">no latencies in this window</text>')
    out.append("</svg>")
    # Markup: every outside string in it went through esc() or attr() above.
    return Markup("\n".join(out))


def layers(nodes: Sequence[str], edges: Sequence[tuple[str, str]]) -> list[list[str]]:
    """The nodes in layers: each node one layer below its deepest parent (networkx's topological generations)."""
    import networkx as nx

    graph = nx.DiGraph()
    graph.add_nodes_from(nodes)
    graph.add_edges_from(edges)
    order = {name: i for i, name in enumerate(nodes)}
    return [sorted(layer, key=order.__getitem__) for layer in nx.topological_generations(graph)]


def dag(
    nodes: Sequence[str],
    edges: Sequence[tuple[str, str]],
    states: Mapping[str, str] | None = None,
    links: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> Markup:
    """A DAG, top to bottom, one ``<g class="node" data-node=.. data-state=..>`` per node.

    ``states`` colours each node by its job's state (a template has none);
    ``links`` makes a node a link (to its job's page); ``labels`` adds a second line.
    """
    states = states or {}
    links = links or {}
    labels = labels or {}
    box_w, box_h, gap_x, gap_y, margin = 150, 44, 24, 46, 12
    rows = layers(nodes, edges)
    widest = max((len(r) for r in rows), default=1)
    width = margin * 2 + widest * box_w + (widest - 1) * gap_x
    height = margin * 2 + len(rows) * box_h + max(0, len(rows) - 1) * gap_y
    pos: dict[str, tuple[float, float]] = {}
    for depth, row in enumerate(rows):
        row_w = len(row) * box_w + (len(row) - 1) * gap_x
        x0 = (width - row_w) / 2
        for i, name in enumerate(row):
            pos[name] = (x0 + i * (box_w + gap_x), margin + depth * (box_h + gap_y))
    out = [f'<svg id="dag" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" role="img" aria-label="workflow graph">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#6b7280"/></marker></defs>']
    for parent, child in edges:
        (px, py), (cx, cy) = pos[parent], pos[child]
        out.append(f'<line class="edge" x1="{px + box_w / 2:.1f}" y1="{py + box_h:.1f}" x2="{cx + box_w / 2:.1f}" '
                   f'y2="{cy:.1f}" stroke="#6b7280" stroke-width="1.5" marker-end="url(#arrow)"/>')
    for name in nodes:
        x, y = pos[name]
        state = states.get(name, "")
        fill = STATE_COLOURS.get(state, TEMPLATE_COLOUR)
        shown = name if len(name) <= 22 else name[:21] + "…"
        sub = labels.get(name, state)
        body = [f'<title>{esc(name)}{(" — " + esc(state)) if state else ""}</title>',
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{box_w}" height="{box_h}" rx="6" fill="{fill}" '
                'stroke="#4b5563"/>',
                f'<text x="{x + box_w / 2:.1f}" y="{y + 18:.1f}" text-anchor="middle" font-size="13" '
                f'font-weight="600">{esc(shown)}</text>']
        if sub:
            body.append(f'<text x="{x + box_w / 2:.1f}" y="{y + 34:.1f}" text-anchor="middle" font-size="11">'
                        f'{esc(sub)}</text>')
        group = f'<g class="node" data-node={attr(name)} data-state={attr(state)}>{"".join(body)}</g>'
        if name in links:
            group = f'<a href={attr(links[name])}>{group}</a>'
        out.append(group)
    out.append("</svg>")
    # Markup: every outside string in it went through esc() or attr() above.
    return Markup("\n".join(out))
