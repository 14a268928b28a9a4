"""The results manifest: what is accepted, what is refused (whole or per entry), and the helpers that write it."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

from p3s.errors import InvalidMessage
from p3s.messages import JobReport, encode
from p3s.results import write_manifest
from p3s.results.__main__ import main as results_main
from p3s.results.manifest import (
    MANIFEST_NAME,
    ManifestError,
    collect,
    parse_manifest,
    parse_report_results,
    read_results,
)

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "config" / "p3s-results.schema.json"
PAYLOAD = ROOT / "config" / "templates" / "dqm_payload.py"

VALID: dict[str, Any] = {
    "p3s_results": 1,
    "metrics": {"noise_rms": {"value": 3.2, "unit": "ADC", "range": [0, 5]}, "dead_channels": 4,
                "occupancy": {"value": 0.9, "range": [0.5, None]}},
    "plots": [{"path": "plots/noise.png", "category": "noise", "caption": "Noise <b>per</b> channel"}],
    "files": [{"path": "summary.txt"}],
    "labels": {"detector": "tpc", "shift.crew": "<script>alert(1)</script>"},
}

# Each refused whole, and the words the refusal must contain.
BAD: list[tuple[Any, str]] = [
    ([1, 2], "expected an object"),
    ({"metrics": {"a": {"value": "3"}}}, "expected a number"),
    ({"metrics": {"a": {"value": True}}}, "expected a number"),
    ({"metrics": {"a": {"unit": "V"}}}, "no value"),
    ({"metrics": [{"name": "a", "value": 1}]}, "expected an object"),
    ({"metrics": {"a b": 1}}, "is not a name"),
    ({"metrics": {"": 1}}, "is not a name"),
    ({"metrics": {"a": {"value": 1, "range": [0]}}}, "expected [low, high]"),
    ({"metrics": {"a": {"value": 1, "range": [5, 0]}}}, "lower bound 5 above upper bound 0"),
    ({"metrics": {"a": {"value": 1, "range": ["0", 5]}}}, "expected a number"),
    ({"metrics": {"a": {"value": 1, "colour": "red"}}}, "unknown key 'colour'"),
    ({"metrics": {f"m{i}": i for i in range(101)}}, "101 metrics, over the limit of 100"),
    ({"metrics": {"a": {"value": 1, "unit": "x" * 33}}}, "over the limit of 32"),
    ({"plots": {"path": "a.png"}}, "expected a list"),
    ({"plots": [{"path": 7}]}, "expected a string"),
    ({"plots": [{"category": "noise"}]}, "no path"),
    ({"plots": [{"path": "a.png", "caption": "two\nlines"}]}, "control character"),
    ({"plots": [{"path": "a\u0000.png"}]}, "control character"),
    ({"plots": [{"path": "a.png", "category": "../x"}]}, "is not a name"),
    ({"files": [{"path": "f"}] * 101}, "101 entries, over the limit of 100"),
    ({"labels": {"run": 5}}, "expected a string"),
    ({"labels": ["a"]}, "expected an object"),
    ({"p3s_results": 2}, "p3s_results is 2, not 1"),
    ({"extra": 1}, "unknown key 'extra'"),
]


def test_a_valid_manifest_is_read_whole() -> None:
    manifest = parse_manifest(json.dumps(VALID))
    assert [(m.name, m.value, m.unit, m.lo, m.hi) for m in manifest.metrics] == [
        ("noise_rms", 3.2, "ADC", 0.0, 5.0), ("dead_channels", 4.0, "", None, None), ("occupancy", 0.9, "", 0.5, None)]
    assert [(e.kind, e.path, e.category) for e in manifest.entries] == [
        ("plot", "plots/noise.png", "noise"), ("file", "summary.txt", "file")]
    # Hostile text is kept as text: escaping is for whoever shows it.
    assert manifest.labels["shift.crew"] == "<script>alert(1)</script>"


@pytest.mark.parametrize(("data", "words"), BAD, ids=[w for _d, w in BAD])
def test_a_manifest_of_the_wrong_shape_is_refused_saying_why(data: Any, words: str) -> None:
    with pytest.raises(ManifestError) as err:
        parse_manifest(json.dumps(data))
    assert words in str(err.value)


@pytest.mark.parametrize("text", ['{"metrics": {"a": NaN}}', '{"metrics": {"a": Infinity}}', "{not json",
                                  "[" * 100_000, '{"metrics": {"a": 1' + "0" * 5000 + "}}", b"\xff\xfe"])
def test_what_json_cannot_give_as_a_finite_number_is_refused(text: str | bytes) -> None:
    with pytest.raises(ManifestError):
        parse_manifest(text)


def test_a_manifest_over_the_size_limit_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    text = json.dumps({"labels": {"pad": "x" * 200}}) + " " * 1000
    with pytest.raises(ManifestError, match="over the limit of 1000"):
        parse_manifest(text, max_bytes=1000)
    (tmp_path / MANIFEST_NAME).write_text(text)
    results = read_results(tmp_path, max_bytes=1000)
    assert results is not None and results["accepted"] is False
    assert "over the limit of 1000" in results["warnings"][0]


def _outdir(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "noise.png").write_bytes(b"\x89PNG fake")
    (out / "summary.txt").write_text("ok\n")
    (tmp_path / "secret").write_text("the pilot's password\n")
    return out


def test_files_are_recorded_where_they_are_with_size_and_sha256(tmp_path: Path) -> None:
    out = _outdir(tmp_path)
    write_manifest(out, metrics=VALID["metrics"], plots=VALID["plots"], files=VALID["files"], labels=VALID["labels"])
    results = read_results(out)
    assert results is not None and results["accepted"] and results["warnings"] == []
    by_path = {f["path"]: f for f in results["files"]}
    assert by_path["plots/noise.png"]["size"] == len(b"\x89PNG fake")
    assert by_path["plots/noise.png"]["sha256"] == hashlib.sha256(b"\x89PNG fake").hexdigest()
    assert by_path["summary.txt"]["kind"] == "file"
    assert {m["name"] for m in results["metrics"]} == {"noise_rms", "dead_channels", "occupancy"}
    assert (out / "plots" / "noise.png").exists(), "files stay where the payload wrote them"


def test_paths_that_leave_the_output_directory_are_refused_one_by_one(tmp_path: Path) -> None:
    out = _outdir(tmp_path)
    os.symlink(tmp_path / "secret", out / "link-out.txt")
    os.symlink(tmp_path, out / "dir-out")
    os.symlink(out / "summary.txt", out / "link-in.txt")
    (out / "subdir").mkdir()
    entries = ["../secret", "/etc/passwd", "plots/../../secret", "link-out.txt", "dir-out/secret", "missing.png",
               "subdir", "./summary.txt", "plots//noise.png", "link-in.txt", "plots/noise.png"]
    manifest = parse_manifest(json.dumps({"plots": [{"path": p, "category": "c"} for p in entries]}))
    results = collect(out, manifest)
    assert [f["path"] for f in results["files"]] == ["link-in.txt", "plots/noise.png"]
    warnings = "\n".join(results["warnings"])
    for path, why in [("../secret", "'..'"), ("/etc/passwd", "absolute"), ("plots/../../secret", "'..'"),
                      ("link-out.txt", "symlink that leaves"), ("dir-out/secret", "symlink that leaves"),
                      ("missing.png", "no such file"), ("subdir", "not a regular file"),
                      ("./summary.txt", "'.' part"), ("plots//noise.png", "empty")]:
        assert f"plot {path!r} refused: " in warnings and why in warnings, (path, warnings)
    assert "password" not in json.dumps(results)


def test_a_manifest_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    out = _outdir(tmp_path)
    os.symlink(tmp_path / "secret", out / MANIFEST_NAME)
    results = read_results(out)
    assert results is not None and not results["accepted"] and "not a regular file" in results["warnings"][0]


def test_no_manifest_means_no_results(tmp_path: Path) -> None:
    assert read_results(tmp_path) is None


def test_a_job_report_carries_results_checked_at_the_edge() -> None:
    old = json.dumps({"v": 1, "job_id": 1, "state": "finished", "pilot_id": "p", "sent_at": 1.7e9})
    assert JobReport.parse(old).results is None, "reports of pilots from before manifests still parse"
    results = parse_report_results({"metrics": [{"name": "a", "value": 1.0, "unit": "", "lo": None, "hi": 2}],
                                    "files": [{"kind": "plot", "path": "a.png", "category": "a", "size": 3,
                                               "sha256": "0" * 64}]})
    report = JobReport(1, "finished", "p", results=results)
    assert JobReport.parse(encode(report)).results == results
    for bad, words in [
        ({"files": [{"kind": "plot", "path": "../a.png", "category": "a", "size": 1}]}, "'..'"),
        ({"files": [{"kind": "plot", "path": "/a.png", "category": "a", "size": 1}]}, "absolute"),
        ({"files": [{"kind": "plot", "path": "a.png", "category": "a", "size": -1}]}, "size"),
        ({"files": [{"kind": "exe", "path": "a", "category": "a", "size": 1}]}, "kind"),
        ({"files": [{"kind": "plot", "path": "a", "category": "a", "size": 1, "sha256": "xyz"}]}, "sha256"),
        ({"metrics": [{"name": "a", "value": 1}, {"name": "a", "value": 2}]}, "'a' twice"),
        ({"warnings": ["w" * 513]}, "over the limit"),
        # Each part within its limits, the whole over the bound on a report's results.
        ({"files": [{"kind": "plot", "path": "p" * 1024, "category": "c", "caption": "\u00e9" * 512, "size": 1}] * 200},
         "bytes, over the limit"),
        ("all of it", "expected an object"),
    ]:
        body = json.dumps({"v": 1, "job_id": 1, "state": "finished", "pilot_id": "p", "sent_at": 1.7e9,
                           "results": bad})
        with pytest.raises(InvalidMessage) as err:
            JobReport.parse(body)
        assert words in str(err.value), (bad, str(err.value))


def test_the_shipped_schema_agrees_with_the_checks() -> None:
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    validator = jsonschema_rs.validator_for(json.loads(SCHEMA.read_text()))
    assert validator.is_valid(VALID)
    for data, words in BAD:
        if "lower bound" in words:
            continue  # JSON Schema cannot compare two values; its description says so
        assert not validator.is_valid(data), f"the schema accepts what p3s refuses ({words}): {data!r}"[:300]
    for path in ("../x", "/x", "a/../b", "./a", "a//b", "a/"):
        assert not validator.is_valid({"plots": [{"path": path}]}), path


def test_write_manifest_refuses_what_p3s_would(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot be written as JSON"):
        write_manifest(tmp_path, metrics={"a": float("nan")})
    with pytest.raises(ManifestError, match="'..'"):
        write_manifest(tmp_path, plots=[{"path": "../a.png", "category": "a"}])
    with pytest.raises(ManifestError, match="P3S_OUTDIR"):
        write_manifest(None, metrics={"a": 1})
    assert not (tmp_path / MANIFEST_NAME).exists()


def test_the_command_writes_a_manifest_and_refuses_a_bad_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    (tmp_path / "noise.png").write_bytes(b"png")
    assert results_main(["--outdir", str(tmp_path), "--metric", "noise", "3.5", "--unit", "noise", "ADC",
                         "--range", "noise", "-", "5", "--plot", "noise.png", "noise",
                         "--caption", "noise.png", "Noise", "--label", "crew", "a"]) == 0
    manifest = parse_manifest((tmp_path / MANIFEST_NAME).read_text())
    assert [(m.name, m.value, m.unit, m.lo, m.hi) for m in manifest.metrics] == [("noise", 3.5, "ADC", None, 5.0)]
    assert manifest.entries[0].caption == "Noise" and manifest.labels == {"crew": "a"}
    assert results_main(["--outdir", str(tmp_path), "--metric", "noise", "high"]) == 2
    assert results_main(["--outdir", str(tmp_path), "--range", "other", "0", "1"]) == 2
    assert "no --metric names" in capsys.readouterr().err


def test_the_example_payload_writes_a_png_and_two_metrics(tmp_path: Path) -> None:
    data = tmp_path / "np04_raw_run000042_0007.hdf5"
    data.write_bytes(bytes([100, 0, 200, 100]) * 1000)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(PAYLOAD), str(data), str(out)], check=True, env=env, timeout=60,
                   capture_output=True)
    png = (out / "adc_histogram.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    idat_len = struct.unpack(">I", png[33:37])[0]
    assert len(zlib.decompress(png[41 : 41 + idat_len])) == height * (width + 1)
    results = read_results(out)
    assert results is not None and results["accepted"] and not results["warnings"]
    assert {m["name"]: m["value"] for m in results["metrics"]} == {"mean_adc": 100.0, "occupancy": 0.75}
    assert {f["category"] for f in results["files"]} == {"adc", "summary"}
