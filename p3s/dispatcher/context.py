"""One unit of work of the dispatcher: what the record functions need besides the session.

The record functions run inside the caller's transaction.  What must happen
only once the transaction has committed (counters, histograms, log lines that
announce an outcome) is gathered with :meth:`Context.later` and applied by
:meth:`Context.committed`, so a retried or split batch never counts twice.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from p3s.config import Settings
from p3s.dispatcher.catalogue import Catalogue

log = logging.getLogger(__name__)

ID_BLOCK = 200


class IdAllocator:
    """Fresh primary keys, taken before the rows are inserted; one per dispatcher.

    Knowing the ids up front lets a batch be inserted with one cached
    executemany per table instead of ORM flushes with INSERT ... RETURNING,
    which are several times slower.  PostgreSQL hands out its sequences in
    blocks kept here (one statement for all tables when a block runs out), so
    two dispatchers never collide and a one-file batch usually costs no round
    trip for its ids; ids lost with a stopped dispatcher are gaps, nothing more.
    SQLite (the embedded default, one dispatcher) continues after the largest id.
    """

    def __init__(self) -> None:
        self._pools: dict[str, deque[int]] = {}

    def take(self, session: Session, counts: Sequence[tuple[Any, int]]) -> list[list[int]]:
        if session.get_bind().dialect.name != "postgresql":
            out = []
            for table, n in counts:
                start = (session.scalar(select(func.max(table.c.id))) or 0) + 1 if n else 0
                out.append(list(range(start, start + n)))
            return out
        pools = [self._pools.setdefault(table.name, deque()) for table, _n in counts]
        short = [(table, max(ID_BLOCK, n)) for (table, n), pool in zip(counts, pools, strict=True) if len(pool) < n]
        if short:
            columns = ", ".join(
                f"(SELECT array_agg(nextval('{table.name}_id_seq')) FROM generate_series(1, {int(n)}))"
                for table, n in short
            )
            row = session.execute(text(f"SELECT {columns}")).one()
            # Numbers taken from a sequence are never given back, even if this
            # transaction rolls back: a retried batch simply takes more.
            for (table, _n), ids in zip(short, row, strict=True):
                self._pools[table.name].extend(ids)
        return [[pool.popleft() for _ in range(n)] for (_table, n), pool in zip(counts, pools, strict=True)]


@dataclass
class Context:
    """Settings, clock, the dispatcher's catalogue and ids, and the effects waiting for the commit."""

    settings: Settings
    now: float = field(default_factory=time.time)
    # Set by the dispatcher when queues are past their limit: new files are shed.
    overloaded: bool = False
    catalogue: Catalogue = field(default_factory=Catalogue)
    ids: IdAllocator = field(default_factory=IdAllocator)
    output_root: str = ""
    effects: list[Callable[[], None]] = field(default_factory=list)
    # Orders to pilots (p3s.messages.Control), sent once the transaction has committed.
    orders: list[Any] = field(default_factory=list)
    # A job of a stage with max_running ended: jobs held for a slot may go now.
    slots_freed: bool = False

    def __post_init__(self) -> None:
        self.output_root = str(self.settings.output_path)

    def later(self, effect: Callable[[], None]) -> None:
        """Run ``effect`` once the transaction has committed, and not at all if it does not."""
        self.effects.append(effect)

    def committed(self) -> None:
        effects, self.effects = self.effects, []
        for effect in effects:
            effect()

    def outdir(self, workflow_id: int, node: str) -> str:
        return f"{self.output_root}/{workflow_id}/{node}"
