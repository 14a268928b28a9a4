"""Every state and decision p3s records, as string enums."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """Life of one job; the last six are terminal and never left."""

    PENDING = "pending"  # waits for its parents or for a free slot of its stage
    QUEUED = "queued"  # its task is in a broker queue
    RUNNING = "running"  # a pilot started the payload
    FINISHED = "finished"  # exit code 0
    FAILED = "failed"  # non-zero exit code, or the payload could not start
    TIMEOUT = "timeout"  # killed at its wall-clock limit
    EXPIRED = "expired"  # its deadline passed before it started
    LOST = "lost"  # its pilot stopped sending heartbeats
    DROPPED = "dropped"  # a parent did not finish, or shed under load

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_JOB_STATES


TERMINAL_JOB_STATES = frozenset(
    {
        JobState.FINISHED,
        JobState.FAILED,
        JobState.TIMEOUT,
        JobState.EXPIRED,
        JobState.LOST,
        JobState.DROPPED,
    }
)
ACTIVE_JOB_STATES = frozenset({JobState.PENDING, JobState.QUEUED, JobState.RUNNING})


class WorkflowState(StrEnum):
    """A workflow runs until every job is terminal, then ends in one of two states."""

    RUNNING = "running"
    FINISHED = "finished"  # every job finished
    INCOMPLETE = "incomplete"  # at least one job ended another way


class Decision(StrEnum):
    """What the dispatcher decided for a file it was told about; exactly one each."""

    ACCEPTED = "accepted"
    SAMPLED_OUT = "sampled_out"
    DUPLICATE = "duplicate"
    SHED = "shed"
    REFUSED = "refused"  # the event cannot be carried: a name that is not text, a path outside its roots


class PilotState(StrEnum):
    """A pilot as the dispatcher sees it through registrations and heartbeats."""

    IDLE = "idle"
    BUSY = "busy"
    BROKEN = "broken"  # alive, but cannot take tasks (its work root is unusable); its heartbeats say why
    DRAINING = "draining"  # alive, told by the operator to take no new task and to exit after its current job
    STOPPED = "stopped"  # said goodbye
    LOST = "lost"  # heartbeats stopped for longer than the timeout
