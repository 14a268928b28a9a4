"""Scheduling decisions over a DAG's job states: which jobs are ready, which
must be dropped, what a workflow's state is, which state changes are allowed.

Pure functions over node names and JobState; the dispatcher applies the answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from p3s.states import TERMINAL_JOB_STATES, JobState, WorkflowState

__all__ = ["Plan", "can_transition", "plan", "workflow_state"]

# pending < queued < running < every terminal state.
_RANK = {JobState.PENDING: 0, JobState.QUEUED: 1, JobState.RUNNING: 2}
_TERMINAL_RANK = 3
# A pending job never ran, so it cannot have finished, failed, timed out or
# lost its pilot; it can only expire or be dropped.
_NOT_FROM_PENDING = frozenset({JobState.FINISHED, JobState.FAILED, JobState.TIMEOUT, JobState.LOST})


@dataclass(frozen=True)
class Plan:
    """What to do next: jobs to enqueue, and jobs to drop with the reason for each."""

    ready: tuple[str, ...] = ()
    dropped: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


def _ancestors_by_distance(node: str, parents: Mapping[str, Sequence[str]]) -> list[tuple[int, str]]:
    """(distance, name) for every ancestor of `node`, nearest first."""
    seen: dict[str, int] = {}
    frontier = list(parents[node])
    dist = 1
    while frontier:
        nxt: list[str] = []
        for p in sorted(set(frontier)):
            if p not in seen:
                seen[p] = dist
                nxt.extend(parents.get(p, ()))
        frontier = nxt
        dist += 1
    return sorted((d, n) for n, d in seen.items())


def plan(parents: Mapping[str, Sequence[str]], states: Mapping[str, JobState]) -> Plan:
    """Decide which PENDING jobs are ready and which must be dropped.

    `parents` maps every node to its parents (roots to an empty sequence) and
    `states` gives every node's state. A PENDING node is dropped when any
    ancestor ended in a terminal state other than FINISHED; the reason names
    the nearest such ancestor that was not itself dropped (the origin of the
    failure), else the nearest dropped one. A PENDING node that is not dropped
    is ready when all its parents FINISHED. Both keep the order of `parents`.
    """
    # Callers may hold plain strings from the database; normalise once.
    states = {name: JobState(state) for name, state in states.items()}
    named = set(parents) | {p for ps in parents.values() for p in ps}
    orphans = sorted(named - set(parents))
    if orphans:
        raise ValueError(f"parent(s) {', '.join(orphans)} missing from the parents map")
    missing = sorted(named - set(states))
    if missing:
        raise ValueError(f"no state for node(s) {', '.join(missing)}")
    unknown = sorted(set(states) - named)
    if unknown:
        raise ValueError(f"state for unknown node(s) {', '.join(unknown)}")

    ready: list[str] = []
    dropped: dict[str, str] = {}
    for node, node_parents in parents.items():
        if states[node] is not JobState.PENDING:
            continue
        bad = [
            (d, a)
            for d, a in _ancestors_by_distance(node, parents)
            if states[a] in TERMINAL_JOB_STATES and states[a] is not JobState.FINISHED
        ]
        if bad:
            # A dropped ancestor only passes a failure on; name where it began.
            origin = [(d, a) for d, a in bad if states[a] is not JobState.DROPPED] or bad
            dist, cause = origin[0]
            kind = "parent" if dist == 1 else "upstream"
            dropped[node] = f"{kind} {cause!r} ended {states[cause].value}"
        elif all(states[p] is JobState.FINISHED for p in node_parents):
            ready.append(node)
    return Plan(ready=tuple(ready), dropped=MappingProxyType(dropped))


def workflow_state(states: Iterable[JobState]) -> WorkflowState:
    """RUNNING while any job is not terminal; FINISHED if all finished; else INCOMPLETE.

    An empty workflow counts as FINISHED (nothing is left to do).
    """
    all_finished = True
    for state in states:
        if state not in TERMINAL_JOB_STATES:
            return WorkflowState.RUNNING
        if state is not JobState.FINISHED:
            all_finished = False
    return WorkflowState.FINISHED if all_finished else WorkflowState.INCOMPLETE


def can_transition(old: JobState, new: JobState) -> bool:
    """Whether a job in `old` may move to `new`.

    Order: pending < queued < running < terminal. A move is allowed only
    forward, so a late 'running' after 'finished' is refused while
    queued -> finished is allowed (reports may arrive out of order). A terminal
    state is never left, not even to itself: a repeated report returns False
    so the caller can count it as a no-op. Pending may only go to queued,
    running, expired or dropped, since a pending job never ran.
    """
    if old in TERMINAL_JOB_STATES:
        return False
    if old is JobState.PENDING and new in _NOT_FROM_PENDING:
        return False
    return _RANK.get(new, _TERMINAL_RANK) > _RANK[old]
