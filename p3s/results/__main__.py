"""``python -m p3s.results``: write a results manifest from the command line (for shell or non-Python payloads).

Example, in a payload's output directory (``$P3S_OUTDIR`` by default)::

    python -m p3s.results --metric noise_rms 3.2 --unit noise_rms ADC --range noise_rms 0 5 \\
        --plot noise.png noise --caption noise.png "Noise per channel" --label detector tpc

Exit codes: 0 written, 2 refused (the message says why).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from p3s.results.manifest import ManifestError, write_manifest


def _bound(text: str) -> float | None:
    return None if text in ("-", "") else float(text)


def build_manifest(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of write_manifest from the parsed command line."""
    units = dict(args.unit)
    ranges = {name: [_bound(lo), _bound(hi)] for name, lo, hi in args.range}
    captions = dict(args.caption)
    metrics: dict[str, Any] = {}
    for name, value in args.metric:
        metrics[name] = {"value": float(value), "unit": units.get(name, "")}
        if name in ranges:
            metrics[name]["range"] = ranges[name]
    unknown = (set(units) | set(ranges)) - set(metrics)
    if unknown:
        raise ManifestError(f"--unit or --range for {sorted(unknown)[0]!r}, which no --metric names")

    def entries(pairs: list[list[str]]) -> list[dict[str, str]]:
        return [{"path": path, "category": category, "caption": captions.get(path, "")} for path, category in pairs]

    return {"metrics": metrics, "plots": entries(args.plot), "files": entries(args.file), "labels": dict(args.label)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p3s.results", description="write a p3s results manifest")
    parser.add_argument("--outdir", default=None, help="the output directory (default: $P3S_OUTDIR)")
    parser.add_argument("--metric", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    parser.add_argument("--unit", nargs=2, action="append", default=[], metavar=("NAME", "UNIT"))
    parser.add_argument("--range", nargs=3, action="append", default=[], metavar=("NAME", "LOW", "HIGH"),
                        help="expected range; - for an open end")
    parser.add_argument("--plot", nargs=2, action="append", default=[], metavar=("PATH", "CATEGORY"))
    parser.add_argument("--file", nargs=2, action="append", default=[], metavar=("PATH", "CATEGORY"))
    parser.add_argument("--caption", nargs=2, action="append", default=[], metavar=("PATH", "TEXT"))
    parser.add_argument("--label", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    args = parser.parse_args(argv)
    try:
        path = write_manifest(args.outdir, **build_manifest(args))
    except (ManifestError, ValueError) as exc:  # float("x") is a ValueError
        print(f"p3s.results: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"p3s.results: cannot write the manifest: {exc.strerror}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
