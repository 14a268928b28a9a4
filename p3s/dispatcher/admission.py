"""Admission of new tasks to their queues: the place where work that cannot finish on time is dropped.

:meth:`Admission.admit` runs inside the dispatcher's transaction, after a
batch has made its tasks and before they are committed as queued, so what it
drops is ended in the same transaction and never published.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from p3s.dispatcher.context import Context
from p3s.messages import Task


class Admission:
    """Decides which new tasks join their queues; one per dispatcher."""

    def admit(self, session: Session, ctx: Context, tasks: list[Task]) -> list[Task]:
        """The tasks to publish; any other job of ``tasks`` must have been ended here, with a reason."""
        return tasks
