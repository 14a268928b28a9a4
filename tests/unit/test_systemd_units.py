"""The shipped systemd units pass ``systemd-analyze verify`` and say what an operator relies on."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import unavailable

UNITS = Path(__file__).resolve().parents[2] / "systemd"
SERVICES = sorted(UNITS.glob("*.service"))


def parse(unit: Path) -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(unit)
    return cp


def test_every_daemon_has_a_unit() -> None:
    names = {u.name for u in UNITS.iterdir()}
    assert {"p3s-dispatcher.service", "p3s-watcher.service", "p3s-pilot@.service", "p3s-purge.service",
            "p3s-purge.timer"} <= names


@pytest.mark.parametrize("unit", SERVICES, ids=lambda u: u.name)
def test_hardening_and_user(unit: Path) -> None:
    service = parse(unit)["Service"]
    assert service["User"] == "p3s"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["PrivateTmp"] == "yes"
    assert service.get("Restart") in ("on-failure", "always")
    assert "/p3s " in service["ExecStart"] or service["ExecStart"].split()[0].endswith("/p3s")


def test_only_the_dispatcher_reloads() -> None:
    reloads = {u.name for u in SERVICES if "ExecReload" in parse(u)["Service"]}
    assert reloads == {"p3s-dispatcher.service"}, "SIGHUP means something to the dispatcher alone"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """Verify each unit as shipped, with ExecStart pointed at this installation's p3s."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        unavailable("systemd-analyze", "Debian's systemd package provides it")
    p3s = shutil.which("p3s") or str(Path(sys.executable).with_name("p3s"))
    for unit in UNITS.iterdir():
        if unit.suffix in (".service", ".timer"):
            text = unit.read_text().replace("/opt/p3s/bin/p3s", p3s)
            (tmp_path / unit.name).write_text(text)
    targets = [str(tmp_path / u.name).replace("@.service", "@1.service") if "@." in u.name else str(tmp_path / u.name)
               for u in sorted(UNITS.iterdir()) if u.suffix in (".service", ".timer")]
    # A template unit is verified through an instance of it, next to its file.
    result = subprocess.run([analyze, "verify", *targets], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # Unknown keys and bad values are only warnings, with exit code 0: any output is a finding.
    assert not result.stderr.strip(), result.stderr
