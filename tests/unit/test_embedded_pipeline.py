"""The Phase I end-to-end scenarios on the embedded default: in-process broker and SQLite."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import scenarios
from tests.stack import Stack, make_settings


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Stack, Path]]:
    watch = tmp_path / "incoming"
    watch.mkdir()
    s = Stack(make_settings(tmp_path), watch=watch, pilots=1).start()
    try:
        yield s, watch
    finally:
        s.stop()


@pytest.mark.parametrize(
    "scenario",
    scenarios.PHASE_ONE,
    ids=lambda f: f.__name__,
)
def test_embedded(stack: tuple[Stack, Path], scenario: Callable[[Stack, Path], None]) -> None:
    scenario(*stack)
