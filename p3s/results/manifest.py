"""The results manifest a payload writes into its output directory: validate, collect, write.

A payload may leave ``{outdir}/p3s-results.json`` (see
``config/p3s-results.schema.json``): named metrics (a number, a unit, an
optional expected range), plots and files (paths relative to the output
directory, a category, a caption) and free labels.  Three steps, each its own
function:

* :func:`parse_manifest` checks the file's text (size, types, counts, lengths)
  and refuses it whole, with one clear message, when its shape is wrong;
* :func:`collect` (on the pilot) checks each plot and file against the output
  directory, refusing per entry, with a warning, a path that leaves it
  (``..``, absolute, a symlink out) or names no regular file, and records the
  size and sha256 of the others: files stay where they are;
* :func:`parse_report_results` checks the collected form again where it
  arrives in a job report (the dispatcher's edge), against what the database
  stores.

This module imports no server library: payload authors call
:func:`write_manifest` with p3s installed and nothing else running.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p3s.errors import InvalidMessage

MANIFEST_NAME = "p3s-results.json"
MANIFEST_VERSION = 1
MANIFEST_MAX_BYTES = 256 * 1024  # a manifest lists things; it never carries them

# What the database stores (p3s/db.py: results, result_metrics, result_files).
NAME_MAX = 128  # metric names, categories, label keys
UNIT_MAX = 32
PATH_MAX = 1024
CAPTION_MAX = 512
LABEL_VALUE_MAX = 256
WARNING_MAX = 512
METRICS_MAX = 100
ENTRIES_MAX = 100  # plots, and files, each
LABELS_MAX = 32
WARNINGS_MAX = 50
# A name is a Prometheus label value, part of a URL and a heading: plain characters only.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
KINDS = ("plot", "file")
# Hashing reads the files: bounded in time, as every blocking call (a slow shared disk).
HASH_BUDGET_S = 30.0
HASH_CHUNK = 1 << 20


class ManifestError(InvalidMessage):
    """A manifest (or the results of a job report) that p3s cannot take; the message says why."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _text(where: str, value: Any, max_len: int, *, name: bool = False, empty: bool = True) -> str:
    """``value`` if it is text p3s can store and show: a string, no NUL or control characters, not too long."""
    if not isinstance(value, str):
        raise ManifestError(f"{where}: expected a string, got {_show(value)}")
    if len(value) > max_len:
        raise ManifestError(f"{where}: {len(value)} characters, over the limit of {max_len}")
    if not value and not empty:
        raise ManifestError(f"{where}: empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ManifestError(f"{where}: contains a control character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(f"{where}: not valid Unicode text") from None
    if name and not NAME_RE.match(value):
        raise ManifestError(f"{where}: {_show(value)} is not a name (letters, digits and _ . : -, first a letter "
                            "or digit)")
    return value


def _number(where: str, value: Any, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ManifestError(f"{where}: expected a number, got {_show(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise ManifestError(f"{where}: out of range") from None
    if not math.isfinite(number):
        raise ManifestError(f"{where}: not a finite number")
    return number


def _object(where: str, value: Any, allowed: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: expected an object, got {_show(value)}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ManifestError(f"{where}: unknown key {_show(unknown[0])} (known: {', '.join(allowed)})")
    return value


def _list(where: str, value: Any, limit: int) -> list[Any]:
    if not isinstance(value, list):
        raise ManifestError(f"{where}: expected a list, got {_show(value)}")
    if len(value) > limit:
        raise ManifestError(f"{where}: {len(value)} entries, over the limit of {limit}")
    return value


def check_range(where: str, lo: float | None, hi: float | None) -> tuple[float | None, float | None]:
    if lo is not None and hi is not None and lo > hi:
        raise ManifestError(f"{where}: lower bound {lo:g} above upper bound {hi:g}")
    return lo, hi


def lexical_path_problem(path: str) -> str:
    """Why ``path`` cannot name a file under an output directory, judged on its text alone; "" if it may."""
    if not path:
        return "an empty path"
    if path.startswith("/") or path.startswith("\\"):
        return "an absolute path"
    parts = path.split("/")
    if ".." in parts:
        return "a path with '..'"
    if any(p in ("", ".") for p in parts):
        return "a path with an empty or '.' part"
    return ""


@dataclass(frozen=True)
class Metric:
    name: str
    value: float
    unit: str = ""
    lo: float | None = None
    hi: float | None = None


@dataclass(frozen=True)
class Entry:
    """A plot or a file the manifest lists, relative to the output directory."""

    kind: str  # "plot" or "file"
    path: str
    category: str
    caption: str = ""


@dataclass(frozen=True)
class Manifest:
    metrics: tuple[Metric, ...] = ()
    entries: tuple[Entry, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)


def _labels(where: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: expected an object, got {_show(value)}")
    if len(value) > LABELS_MAX:
        raise ManifestError(f"{where}: {len(value)} labels, over the limit of {LABELS_MAX}")
    return {_text(f"{where} key", k, NAME_MAX, name=True): _text(f"{where}.{k}", v, LABEL_VALUE_MAX)
            for k, v in value.items()}


def _metric(where: str, name: Any, spec: Any) -> Metric:
    name = _text(f"{where} name", name, NAME_MAX, name=True)
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        spec = {"value": spec}  # "metrics": {"noise": 3.2}
    spec = _object(f"{where} {name!r}", spec, ("value", "unit", "range"))
    if "value" not in spec:
        raise ManifestError(f"{where} {name!r}: no value")
    value = _number(f"{where} {name!r} value", spec["value"])
    unit = _text(f"{where} {name!r} unit", spec.get("unit", ""), UNIT_MAX)
    lo = hi = None
    if spec.get("range") is not None:
        bounds = _list(f"{where} {name!r} range", spec["range"], 2)
        if len(bounds) != 2:
            raise ManifestError(f"{where} {name!r} range: expected [low, high], either may be null")
        lo = _number(f"{where} {name!r} range low", bounds[0], optional=True)
        hi = _number(f"{where} {name!r} range high", bounds[1], optional=True)
        check_range(f"{where} {name!r} range", lo, hi)
    assert value is not None
    return Metric(name, value, unit, lo, hi)


def _entry(where: str, kind: str, spec: Any) -> Entry:
    spec = _object(where, spec, ("path", "category", "caption"))
    if "path" not in spec:
        raise ManifestError(f"{where}: no path")
    return Entry(
        kind=kind,
        path=_text(f"{where} path", spec["path"], PATH_MAX, empty=False),
        category=_text(f"{where} category", spec.get("category", kind), NAME_MAX, name=True),
        caption=_text(f"{where} caption", spec.get("caption", ""), CAPTION_MAX),
    )


def parse_manifest(text: bytes | str, max_bytes: int = MANIFEST_MAX_BYTES) -> Manifest:
    """The manifest in ``text``; ManifestError naming the first thing wrong with it."""
    from p3s.messages import load_json  # here: p3s.messages imports this module to check job reports

    data = load_json(text, max_bytes, "manifest", ManifestError)
    data = _object("manifest", data, ("p3s_results", "metrics", "plots", "files", "labels"))
    if data.get("p3s_results", MANIFEST_VERSION) != MANIFEST_VERSION:
        raise ManifestError(f"manifest: p3s_results is {_show(data.get('p3s_results'))}, not {MANIFEST_VERSION}")
    raw_metrics = data.get("metrics", {})
    if not isinstance(raw_metrics, dict):
        raise ManifestError(f"manifest metrics: expected an object of name: {{value, unit, range}}, "
                            f"got {_show(raw_metrics)}")
    if len(raw_metrics) > METRICS_MAX:
        raise ManifestError(f"manifest metrics: {len(raw_metrics)} metrics, over the limit of {METRICS_MAX}")
    metrics = tuple(_metric("manifest metric", name, spec) for name, spec in raw_metrics.items())
    entries: list[Entry] = []
    for kind, key in (("plot", "plots"), ("file", "files")):
        for i, spec in enumerate(_list(f"manifest {key}", data.get(key, []), ENTRIES_MAX)):
            entries.append(_entry(f"manifest {key}[{i}]", kind, spec))
    return Manifest(metrics, tuple(entries), _labels("manifest labels", data.get("labels", {})))


# -- on the pilot: the files, checked where they are ---------------------------------


def resolve_entry(outdir: str | os.PathLike[str], path: str) -> tuple[Path | None, str]:
    """The regular file ``path`` names under ``outdir``, or None and why not.

    Refused: a path that leaves ``outdir`` by its text (absolute, ``..``) or
    through a symlink anywhere on the way, and anything but a regular file.
    """
    problem = lexical_path_problem(path)
    if problem:
        return None, f"{problem}, which may leave the output directory"
    root = Path(os.path.realpath(outdir))
    try:
        real = Path(os.path.realpath(Path(outdir) / path, strict=True))
    except (OSError, RuntimeError):
        return None, "no such file"
    if real != root and root not in real.parents:
        return None, "a symlink that leaves the output directory"
    try:
        st = os.stat(real)
    except OSError as exc:
        return None, f"cannot stat it: {os.strerror(exc.errno or 0).lower()}"
    if not stat.S_ISREG(st.st_mode):
        return None, "not a regular file"
    return real, ""


def sha256_of(path: Path, until: float) -> str:
    """The sha256 of ``path``, or "" if the monotonic clock reaches ``until`` first."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
            if time.monotonic() > until:
                return ""
    return digest.hexdigest()


def refused_results(warning: str) -> dict[str, Any]:
    """The results of a job whose manifest was refused whole: nothing recorded, the warning kept."""
    return {"accepted": False, "metrics": [], "files": [], "labels": {}, "warnings": [warning[:WARNING_MAX]]}


def collect(outdir: str | os.PathLike[str], manifest: Manifest, budget_s: float = HASH_BUDGET_S) -> dict[str, Any]:
    """The results a pilot sends: the manifest's metrics and labels, and each listed file that is safe to name.

    Each plot or file is refused on its own, with a warning, when its path is
    not one under ``outdir``; the others get their size and sha256 (no
    checksum, and a warning, for those the hashing budget did not reach).
    """
    until = time.monotonic() + budget_s
    warnings: list[str] = []
    files = []
    for entry in manifest.entries:
        real, why = resolve_entry(outdir, entry.path)
        if real is None:
            warnings.append(f"{entry.kind} {entry.path!r} refused: {why}")
            continue
        size = real.stat().st_size
        digest = sha256_of(real, until) if time.monotonic() <= until else ""
        if not digest:
            warnings.append(f"{entry.kind} {entry.path!r}: no checksum, the hashing budget of {budget_s:g}s ran out")
        files.append({"kind": entry.kind, "path": entry.path, "category": entry.category, "caption": entry.caption,
                      "size": size, "sha256": digest})
    return {
        "accepted": True,
        "metrics": [{"name": m.name, "value": m.value, "unit": m.unit, "lo": m.lo, "hi": m.hi}
                    for m in manifest.metrics],
        "files": files,
        "labels": dict(manifest.labels),
        "warnings": [w[:WARNING_MAX] for w in warnings[:WARNINGS_MAX]],
    }


def read_results(outdir: str | os.PathLike[str], max_bytes: int = MANIFEST_MAX_BYTES,
                 budget_s: float = HASH_BUDGET_S) -> dict[str, Any] | None:
    """What a finished job's report carries of ``outdir/p3s-results.json``; None if there is no manifest.

    Never raises for a bad manifest: it becomes a refused result with the
    reason as its warning, so the job still finishes.
    """
    path = Path(outdir) / MANIFEST_NAME
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return refused_results(f"manifest {MANIFEST_NAME} refused: {os.strerror(exc.errno or 0).lower()}")
    if not stat.S_ISREG(st.st_mode):
        return refused_results(f"manifest {MANIFEST_NAME} refused: not a regular file (a symlink?)")
    if st.st_size > max_bytes:
        return refused_results(f"manifest {MANIFEST_NAME} refused: {st.st_size} bytes, over the limit of {max_bytes}")
    try:
        with open(path, "rb") as fh:
            text = fh.read(max_bytes + 1)
        results = collect(outdir, parse_manifest(text, max_bytes), budget_s)
        # What the dispatcher will check, checked here: a pilot never sends results it would refuse.
        return parse_report_results(results)
    except ManifestError as exc:
        return refused_results(f"manifest {MANIFEST_NAME} refused: {exc}")
    except OSError as exc:
        return refused_results(f"manifest {MANIFEST_NAME} refused: {os.strerror(exc.errno or 0).lower()}")


# -- at the dispatcher's edge: a job report's results ----------------------------------


RESULTS_MAX_BYTES = 512 * 1024


def parse_report_results(data: Any) -> dict[str, Any]:
    """The ``results`` of a job report, checked against what the database stores; ManifestError if not."""
    where = "field 'results'"
    data = _object(where, data, ("accepted", "metrics", "files", "labels", "warnings"))
    size = len(json.dumps(data, separators=(",", ":")))
    if size > RESULTS_MAX_BYTES:
        raise ManifestError(f"{where}: {size} bytes, over the limit of {RESULTS_MAX_BYTES}")
    accepted = data.get("accepted", True)
    if not isinstance(accepted, bool):
        raise ManifestError(f"{where} accepted: expected true or false")
    metrics = []
    seen: set[str] = set()
    for i, m in enumerate(_list(f"{where} metrics", data.get("metrics", []), METRICS_MAX)):
        m = _object(f"{where} metrics[{i}]", m, ("name", "value", "unit", "lo", "hi"))
        name = _text(f"{where} metrics[{i}] name", m.get("name"), NAME_MAX, name=True)
        if name in seen:
            raise ManifestError(f"{where} metrics: {name!r} twice")
        seen.add(name)
        lo, hi = check_range(f"{where} metrics[{i}]", _number(f"{where} metrics[{i}] lo", m.get("lo"), optional=True),
                             _number(f"{where} metrics[{i}] hi", m.get("hi"), optional=True))
        metrics.append({"name": name, "value": _number(f"{where} metrics[{i}] value", m.get("value")),
                        "unit": _text(f"{where} metrics[{i}] unit", m.get("unit", ""), UNIT_MAX), "lo": lo, "hi": hi})
    files = []
    for i, f in enumerate(_list(f"{where} files", data.get("files", []), 2 * ENTRIES_MAX)):
        f = _object(f"{where} files[{i}]", f, ("kind", "path", "category", "caption", "size", "sha256"))
        path = _text(f"{where} files[{i}] path", f.get("path"), PATH_MAX, empty=False)
        problem = lexical_path_problem(path)
        if problem:
            raise ManifestError(f"{where} files[{i}] path: {problem}")
        kind = f.get("kind")
        if kind not in KINDS:
            raise ManifestError(f"{where} files[{i}] kind: not one of {', '.join(KINDS)}: {_show(kind)}")
        size_of = f.get("size")
        if isinstance(size_of, bool) or not isinstance(size_of, int) or not 0 <= size_of < 2**63:
            raise ManifestError(f"{where} files[{i}] size: expected a size in bytes, got {_show(size_of)}")
        digest = f.get("sha256", "")
        if not isinstance(digest, str) or (digest and not SHA256_RE.match(digest)):
            raise ManifestError(f"{where} files[{i}] sha256: not a sha256 in hex")
        files.append({"kind": kind, "path": path,
                      "category": _text(f"{where} files[{i}] category", f.get("category"), NAME_MAX, name=True),
                      "caption": _text(f"{where} files[{i}] caption", f.get("caption", ""), CAPTION_MAX),
                      "size": size_of, "sha256": digest})
    warnings = [_text(f"{where} warnings[{i}]", w, WARNING_MAX)
                for i, w in enumerate(_list(f"{where} warnings", data.get("warnings", []), WARNINGS_MAX))]
    return {"accepted": accepted, "metrics": metrics, "files": files,
            "labels": _labels(f"{where} labels", data.get("labels", {})), "warnings": warnings}


# -- for payload authors -----------------------------------------------------------------


def write_manifest(
    outdir: str | os.PathLike[str] | None = None,
    *,
    metrics: Mapping[str, Any] | None = None,
    plots: Sequence[Mapping[str, str]] = (),
    files: Sequence[Mapping[str, str]] = (),
    labels: Mapping[str, str] | None = None,
) -> Path:
    """Write ``outdir/p3s-results.json`` (``outdir``: ``$P3S_OUTDIR`` by default) and return its path.

    ``metrics`` maps a name to a number or to ``{"value": v, "unit": "...",
    "range": [low, high]}`` (either bound may be None); ``plots`` and
    ``files`` are ``{"path": "relative/to/outdir.png", "category": "...",
    "caption": "..."}``.  The manifest is checked as p3s will check it
    (ManifestError if p3s would refuse it) and written under a temporary name
    first, so a pilot never reads half of it.
    """
    if outdir is None:
        outdir = os.environ.get("P3S_OUTDIR") or ""
        if not outdir:
            raise ManifestError("no output directory: pass outdir, or run under a pilot (P3S_OUTDIR)")
    data: dict[str, Any] = {"p3s_results": MANIFEST_VERSION, "metrics": dict(metrics or {}),
                            "plots": [dict(p) for p in plots], "files": [dict(f) for f in files],
                            "labels": dict(labels or {})}
    try:
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"manifest cannot be written as JSON: {exc}") from None
    parse_manifest(text)
    for entry in (*plots, *files):
        problem = lexical_path_problem(str(entry.get("path", "")))
        if problem:
            raise ManifestError(f"path {entry.get('path')!r}: {problem}; give a path relative to the output directory")
    target = Path(outdir) / MANIFEST_NAME
    partial = target.with_name(f".{MANIFEST_NAME}.{os.getpid()}.tmp")
    partial.write_text(text)
    os.replace(partial, target)
    return target
