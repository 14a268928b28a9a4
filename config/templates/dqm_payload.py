#!/usr/bin/env python3
"""An example DQM payload: a histogram plot (PNG) and two metrics of a raw file, with a results manifest.

Run by the template dqm_results.graphml as ``dqm_payload.py INPUT OUTDIR``.
It reads a sample of the input (its first megabyte: a raw file may be large),
and writes into OUTDIR:

* ``adc_histogram.png``: the histogram of the sample's byte values, drawn
  with the standard library alone (zlib and struct make the PNG);
* ``summary.txt``: the numbers as text;
* ``p3s-results.json``: the manifest, written with ``p3s.results.write_manifest``:
  the metrics ``mean_adc`` (expected 10 to 200) and ``occupancy`` (the share
  of non-zero bytes, expected 0.5 to 1), the plot, the summary, and labels.

The config's ``[results.ranges.dqm_results]`` may set other ranges; they win.
"""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

from p3s.results import write_manifest

SAMPLE_BYTES = 1 << 20
WIDTH, HEIGHT = 256, 64


def png(width: int, height: int, rows: list[bytes]) -> bytes:
    """An 8-bit greyscale PNG of ``rows`` (each ``width`` bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + row for row in rows)  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def histogram_png(counts: list[int]) -> bytes:
    """One black bar per byte value on white, as tall as its share of the largest count."""
    top = max(counts) or 1
    heights = [round(HEIGHT * c / top) for c in counts]
    rows = [bytes(0 if heights[x] >= HEIGHT - y else 255 for x in range(WIDTH)) for y in range(HEIGHT)]
    return png(WIDTH, HEIGHT, rows)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: dqm_payload.py INPUT OUTDIR", file=sys.stderr)
        return 2
    source, outdir = Path(argv[1]), Path(argv[2])
    with open(source, "rb") as fh:
        sample = fh.read(SAMPLE_BYTES)
    counts = [0] * 256
    for byte in sample:
        counts[byte] += 1
    n = len(sample)
    mean = sum(v * c for v, c in enumerate(counts)) / n if n else 0.0
    occupancy = (n - counts[0]) / n if n else 0.0
    (outdir / "adc_histogram.png").write_bytes(histogram_png(counts))
    (outdir / "summary.txt").write_text(f"file {source.name}\nbytes sampled {n}\nmean_adc {mean:.3f}\n"
                                        f"occupancy {occupancy:.4f}\n")
    write_manifest(
        outdir,
        metrics={
            "mean_adc": {"value": round(mean, 3), "unit": "ADC", "range": [10, 200]},
            "occupancy": {"value": round(occupancy, 4), "unit": "", "range": [0.5, 1.0]},
        },
        plots=[{"path": "adc_histogram.png", "category": "adc", "caption": "ADC values of the first megabyte"}],
        files=[{"path": "summary.txt", "category": "summary", "caption": "The numbers as text"}],
        labels={"input": source.name[:256], "sampled_bytes": str(n)},
    )
    print(f"{source.name}: mean_adc {mean:.3f}, occupancy {occupancy:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
