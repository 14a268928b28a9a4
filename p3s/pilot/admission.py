"""The deadline check, in one place: may this task still start?"""

from __future__ import annotations

from p3s.messages import Task

DEADLINE_PASSED = "deadline"
TOO_LATE = "too_late"


def refusal(task: Task, now: float) -> str | None:
    """Why ``task`` must not start at ``now``, or None if it may.

    RabbitMQ expires a message only at the head of its queue, so a task can
    reach a pilot after its deadline: ``deadline``.  And a task whose time left
    is shorter than its stage's expected run time would finish late anyway,
    wasting the pilot on a stale result: ``too_late``.
    """
    left = task.deadline - now
    if left <= 0:
        return DEADLINE_PASSED
    if task.expected_s and left < task.expected_s:
        return TOO_LATE
    return None
