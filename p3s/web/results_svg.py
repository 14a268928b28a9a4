"""A metric's history across runs, drawn on the server as SVG, with its expected range as a band.

One ``<circle class="point">`` per result, oldest on the left, each with its
run, subrun and value as data attributes; a point out of range is red.  The
range drawn is the newest result's (the one the metric is judged by now).
Every string from a manifest goes through :func:`p3s.web.svg.esc` or
:func:`p3s.web.svg.attr`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from markupsafe import Markup

from p3s.web.svg import attr, esc

IN_COLOUR = "#3c78c3"
OUT_COLOUR = "#d03c3c"
BAND_COLOUR = "#dff0df"


def _run_label(point: Mapping[str, Any]) -> str:
    run, subrun = point.get("run"), point.get("subrun")
    if run is None:
        return "?"
    return f"{run}" if subrun is None else f"{run}.{subrun}"


def _axis(values: Sequence[float]) -> tuple[float, float]:
    """Bounds of the y axis holding every value (and the band), with a margin; never empty."""
    lo, hi = min(values), max(values)
    if hi == lo:
        pad = abs(hi) * 0.1 or 1.0
    else:
        pad = (hi - lo) * 0.08
    return lo - pad, hi + pad


def metric_history(name: str, points: Sequence[Mapping[str, Any]], width: int = 720, height: int = 240) -> Markup:
    """``points`` are :func:`p3s.results.query.metric_history`'s rows, oldest first."""
    left, right, top, bottom = 64, 16, 24, 44
    pw, ph = width - left - right, height - top - bottom
    newest = points[-1] if points else {}
    lo, hi = newest.get("lo"), newest.get("hi")
    unit = newest.get("unit") or ""
    values = [float(p["value"]) for p in points]
    y0, y1 = _axis([*values, *(b for b in (lo, hi) if b is not None)] or [0.0])

    def x(i: int) -> float:
        return left + (pw / 2 if len(points) < 2 else i / (len(points) - 1) * pw)

    def y(v: float) -> float:
        return top + ph - (v - y0) / (y1 - y0) * ph

    title = f"{name}" + (f" ({unit})" if unit else "")
    out = [f'<svg class="metric-history" data-metric={attr(name)} xmlns="http://www.w3.org/2000/svg" '
           f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
           f'aria-label={attr("history of " + name)}>',
           f'<text x="{left}" y="{top - 8}" font-size="13" font-weight="600">{esc(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafbfc" stroke="#c8ccd2"/>']
    if lo is not None or hi is not None:
        band_top = y(min(hi, y1)) if hi is not None else top
        band_bottom = y(max(lo, y0)) if lo is not None else top + ph
        out.append(f'<rect class="range" x="{left}" y="{band_top:.1f}" width="{pw}" '
                   f'height="{max(0.0, band_bottom - band_top):.1f}" fill="{BAND_COLOUR}" '
                   f'data-lo={attr("" if lo is None else f"{lo:g}")} data-hi={attr("" if hi is None else f"{hi:g}")}/>')
    for i in range(5):
        v = y0 + (y1 - y0) * i / 4
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e4e7eb"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="11">{v:.4g}</text>')
    if points:
        path = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
        out.append(f'<polyline points="{path}" fill="none" stroke="{IN_COLOUR}" stroke-width="1.5"/>')
    step = max(1, len(points) // 12)  # at most a dozen run labels under the axis
    for i, (p, v) in enumerate(zip(points, values, strict=True)):
        bad = p.get("in_range") is False
        label = _run_label(p)
        out.append(
            f'<circle class="point{" alarm" if bad else ""}" cx="{x(i):.1f}" cy="{y(v):.1f}" r="4" '
            f'fill="{OUT_COLOUR if bad else IN_COLOUR}" data-run={attr("" if p.get("run") is None else p["run"])} '
            f'data-subrun={attr("" if p.get("subrun") is None else p["subrun"])} data-value={attr(f"{v:g}")} '
            f'data-result={attr(p.get("result_id", ""))}><title>run {esc(label)}: {v:g}'
            f'{esc(" " + unit) if unit else ""}{" (out of range)" if bad else ""}</title></circle>')
        if i % step == 0 or i == len(points) - 1:
            out.append(f'<text x="{x(i):.1f}" y="{top + ph + 16}" text-anchor="middle" font-size="11">'
                       f'{esc(label)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle" font-size="11" fill="#6b7280">'
               'run.subrun, oldest to newest; band: expected range</text>')
    if not points:
        out.append(f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle" font-size="13" '
                   'fill="#6b7280">no values of this metric</text>')
    out.append("</svg>")
    # Markup: every outside string in it went through esc() or attr() above.
    return Markup("\n".join(out))
