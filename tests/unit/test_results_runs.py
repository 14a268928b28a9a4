"""Run and subrun from a file's name: the default pattern, patterns per stream, and patterns refused."""

from __future__ import annotations

import json

import pytest

from p3s.config import load_settings
from p3s.errors import ConfigError
from p3s.results.runs import RunId, RunPatterns


@pytest.mark.parametrize(("name", "expected"), [
    ("np04_raw_run012345_0003_dl1.hdf5", RunId(12345, 3)),
    ("run42.hdf5", RunId(42, None)),
    ("run7-sub2.root", RunId(7, 2)),
    ("run7.subrun12.root", RunId(7, 12)),
    ("calib_0001.hdf5", RunId(None, None)),
    ("run" + "9" * 30 + ".hdf5", RunId(None, None)),  # too long to store: no run rather than a wrong one
])
def test_the_default_pattern(name: str, expected: RunId) -> None:
    assert RunPatterns({}).parse("raw", name) == expected


def test_a_stream_has_its_own_pattern_and_star_is_every_other_stream() -> None:
    patterns = RunPatterns({
        "calib": r"^c(?P<run>\d+)",
        "*": r"R(?P<run>\d+)S(?P<subrun>\d+)",
    })
    assert patterns.parse("calib", "c0815_R1S2.dat") == RunId(815, None)
    assert patterns.parse("raw", "c0815_R1S2.dat") == RunId(1, 2)
    assert patterns.parse("raw", "run5.hdf5") == RunId(None, None), "'*' replaces the default pattern"


def test_the_config_gives_patterns_and_refuses_bad_ones() -> None:
    settings = load_settings(None, {"P3S_RESULTS_RUN_PATTERNS": json.dumps({"raw": r"run(?P<run>\d+)"})})
    assert RunPatterns(settings.results.run_patterns).parse("raw", "run3_4.hdf5") == RunId(3, None)
    for pattern, words in [(r"run(\d+)", "needs a named group (?P<run>"), (r"run(?P<run>\d+", "not a regular expr"),
                           (r"(?P<run>\d+)_(?P<event>\d+)", "unknown named group 'event'")]:
        with pytest.raises(ConfigError) as err:
            load_settings(None, {"P3S_RESULTS_RUN_PATTERNS": json.dumps({"raw": pattern})})
        assert "results.run_patterns.raw" in str(err.value) and words in str(err.value)


def test_the_config_refuses_ranges_that_are_not_low_then_high() -> None:
    ok = load_settings(None, {"P3S_RESULTS_RANGES": json.dumps({"dqm": {"mean_adc": [50, 150]}})})
    assert ok.results.ranges == {"dqm": {"mean_adc": (50.0, 150.0)}}
    for bad in ([150, 50], [1], [1, 2, 3]):
        with pytest.raises(ConfigError, match="results.ranges.dqm.mean_adc"):
            load_settings(None, {"P3S_RESULTS_RANGES": json.dumps({"dqm": {"mean_adc": bad}})})
