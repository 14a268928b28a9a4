"""Admission of new tasks to their queues: the place where work that cannot finish on time is dropped.

:meth:`Admission.admit` runs inside the dispatcher's transaction, after a
batch has made its tasks and before they are committed as queued, so what it
drops is ended in the same transaction and never published.

The bound on waiting sets itself.  Each task queue is modelled as RabbitMQ
serves it: its live pilots (idle or busy, from the pilots table) take tasks in
priority order, first in first out within a priority, one at a time, each task
keeping its pilot for the stage's mean run time.  A new task is admitted only
if, behind everything that keeps its place ahead of it, it would start soon
enough to finish within :data:`SHARE` of its budget from the file being seen
(on a free pilot it may always start if it can finish by its deadline); otherwise it
is dropped at once, reason ``overload: ...``.  A stage whose run time is not
known yet gets about :data:`MIN_SAMPLES` tasks per pilot until it is.  A task already in the broker
cannot be taken back: if a newer, higher-priority task pushes it past its
deadline, the model stops counting its run time (the pilot's receipt check
will refuse it, ``too_late``, or its deadline will expire it).

The model is read from the database at most every :data:`REFRESH_S` and
advanced by its own predictions in between, so a batch costs no query per
task.  A hand-set ``broker.max_queue_length`` wins: the model is then off.  A
queue that no live pilot serves is not bounded by the model (its tasks wait
under their deadlines, as they would without it): a pilot restarting must not
make p3s drop everything it is given meanwhile.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from p3s.db import Job, Pilot
from p3s.dispatcher.context import Context
from p3s.dispatcher.jobs import move_job
from p3s.messages import Task
from p3s.states import JobState, PilotState

log = logging.getLogger(__name__)

REFRESH_S = 1.0  # the queue model is re-read from the database at most this often
STATS_REFRESH_S = 10.0  # a stage's run-time statistics, at most this often
MIN_SAMPLES = 5  # finished jobs before a stage's learned run times are used
OVERLOAD = "overload"
# A new task must be predicted to finish within this share of its budget: the
# rest is the margin for what the model cannot foresee, and it keeps results in
# the first half of their budget.
SHARE = 0.5

EPSILON_S = 1e-6  # sums of epoch seconds are not exact
ALIVE = (PilotState.IDLE, PilotState.BUSY)

# What the model is re-read from, each second: built once, run on the session's connection.
_LIVE_PILOTS = select(Pilot.id, Pilot.queues).where(Pilot.state.in_(ALIVE))
_QUEUED = select(Job.id, Job.queue, Job.priority, Job.deadline, Job.queued_at, Job.template, Job.node).where(
    Job.state == JobState.QUEUED, Job.deadline > bindparam("now")
)
_RUNNING = select(Job.pilot_id, Job.started_at, Job.template, Job.node).where(Job.state == JobState.RUNNING)


@dataclass
class Entry:
    """A task in the model of its queue."""

    job_id: int
    priority: int
    seq: float  # position within its priority: the time it was queued
    deadline: float
    run: float  # its expected run time: does it finish in time?
    occupy: float  # the pilot time it takes from the queue: the stage's mean run time
    limit: float = 0.0  # it must finish by this time, or go: its deadline, or a new task's bound


@dataclass
class Server:
    """A live pilot as seen from one queue."""

    free_at: float
    # A pilot that serves several queues with work gives each a share of its time.
    slowdown: float = 1.0


@dataclass
class Verdict:
    """What one decision on a queue found."""

    admitted: list[Entry] = field(default_factory=list)
    dropped: list[tuple[Entry, float]] = field(default_factory=list)  # new tasks, with their predicted finish
    doomed: list[Entry] = field(default_factory=list)  # queued tasks pushed past their deadlines


class QueueModel:
    """One task queue as its live pilots serve it: by priority, first in first out within a priority."""

    def __init__(self, name: str, servers: Sequence[Server], entries: Iterable[Entry] = (),
                 priorities: bool = True) -> None:
        self.name = name
        self.servers = list(servers)
        self.priorities = priorities
        self.entries = sorted(entries, key=self._order)

    def _order(self, e: Entry) -> tuple[float, ...]:
        # RabbitMQ's priority queue: higher first, then in publish order.
        return (-e.priority, e.seq, e.job_id) if self.priorities else (e.seq, e.job_id)

    def advance(self, now: float) -> None:
        """Let the modelled pilots take what they would have taken by ``now``."""
        if not self.servers:
            return
        heap = [(s.free_at, i) for i, s in enumerate(self.servers)]
        heapq.heapify(heap)
        taken = 0
        while taken < len(self.entries) and heap[0][0] <= now:
            free_at, i = heapq.heappop(heap)
            entry = self.entries[taken]
            taken += 1
            self.servers[i].free_at = free_at + entry.occupy * self.servers[i].slowdown
            heapq.heappush(heap, (self.servers[i].free_at, i))
        del self.entries[:taken]
        self.entries = [e for e in self.entries if e.deadline > now]

    def decide(self, now: float, new: Sequence[Entry]) -> Verdict:
        """Admit or drop each of ``new``; queued tasks pushed past their deadlines stop counting.

        In service order, a task keeps its place if it can still finish by its
        limit behind everything that kept its place ahead of it; a new task
        that cannot is dropped, a queued one that cannot is doomed.
        """
        verdict = Verdict()
        fresh = {id(e) for e in new}
        if not self.servers:
            verdict.admitted = list(new)
            self.entries = sorted([*self.entries, *new], key=self._order)
            return verdict
        heap = [(max(s.free_at, now), i) for i, s in enumerate(self.servers)]
        heapq.heapify(heap)
        kept: list[Entry] = []
        for entry in sorted([*self.entries, *new], key=self._order):
            start, i = heap[0]
            finish = start + entry.run
            if finish > entry.limit + EPSILON_S:
                if id(entry) in fresh:
                    verdict.dropped.append((entry, finish))
                else:
                    verdict.doomed.append(entry)
                continue
            heapq.heapreplace(heap, (start + entry.occupy * self.servers[i].slowdown, i))
            kept.append(entry)
            if id(entry) in fresh:
                verdict.admitted.append(entry)
                # Admitted, it keeps its place while it can finish by its deadline.
                entry.limit = entry.deadline
        self.entries = kept
        return verdict

    def backlog(self) -> int:
        return len(self.entries)


def _mean_gap(runs: Sequence[tuple[str | None, float, float]], mean: float) -> float:
    """Mean time from a run's end to the next start on the same pilot, counting only busy spells."""
    by_pilot: dict[str | None, list[tuple[float, float]]] = {}
    for pilot, started, ended in runs:
        by_pilot.setdefault(pilot, []).append((started, ended))
    gaps = []
    for spans in by_pilot.values():
        spans.sort()
        for (_s0, e0), (s1, _e1) in zip(spans, spans[1:]):
            if 0 <= s1 - e0 <= mean:  # longer: the pilot was idle, not busy between tasks
                gaps.append(s1 - e0)
    return sum(gaps) / len(gaps) if gaps else 0.0


def new_task_limit(now: float, seen_at: float, deadline: float, run: float, share: float, root: bool) -> float:
    """By when a new task must be predicted to finish to be admitted.

    A root stage (new work) must finish within ``share`` of its budget, counted
    from the file being seen, so the rest is left for what the model cannot
    foresee (a run time's tail, a pilot lost) and results stay fresh; but it
    may always start on a free pilot at once if it can finish by its deadline.
    A later stage, whose parents' work is already spent, may wait as long as it
    can still finish by its deadline.
    """
    if not root:
        return deadline
    return min(deadline, max(seen_at + share * (deadline - seen_at), now + run))


@dataclass
class StageStats:
    mean: float = 0.0
    p95: float = 0.0
    at: float = float("-inf")


class Admission:
    """Decides which new tasks join their queues; one per dispatcher, its queue models kept between batches."""

    def __init__(self, share: float = SHARE) -> None:
        """``share``: of its budget, within which a new task must finish (0: admit everything)."""
        self.share = share
        self._models: dict[str, QueueModel] = {}
        self._refreshed = float("-inf")
        self._stats: dict[tuple[str, str], StageStats] = {}
        # (template, node) -> (is a root stage, the node's own expected_s or 0)
        self._stages: dict[tuple[str, str], tuple[bool, float]] = {}
        self._unserved: set[str] = set()

    def admit(self, session: Session, ctx: Context, tasks: list[Task]) -> list[Task]:
        """The tasks to publish; any other job of ``tasks`` must have been ended here, with a reason."""
        share = self.share
        if not tasks or share <= 0 or ctx.settings.broker.max_queue_length > 0:
            return tasks
        now = ctx.now
        if now - self._refreshed >= REFRESH_S or any(t.queue not in self._models for t in tasks):
            self._refresh(session, ctx, {t.job_id for t in tasks})
        else:
            for model in self._models.values():
                model.advance(now)
        out: list[Task] = []
        entries: dict[str, list[Entry]] = {}
        by_entry: dict[int, Task] = {}
        for task in tasks:
            task = self._with_expected(session, ctx, task)
            model = self._models.get(task.queue)
            if model is None or not model.servers or task.expected_s <= 0:
                # No pilot to model, or a stage whose run time is not known yet (no
                # expected_s, too few finished jobs): nothing to judge by, so nothing is
                # dropped here.  The pilot's own check on receipt still refuses a task
                # that cannot finish, and the stage's run time is learned within seconds.
                out.append(task)
                continue
            stats = self._stage(session, ctx, task.template, task.node)
            root = self._stages.get((task.template, task.node), (False, 0.0))[0]
            entry = Entry(task.job_id, self._priority(ctx, task.priority), now, task.deadline, task.expected_s,
                          stats.mean or task.expected_s)
            entry.limit = new_task_limit(now, min(task.seen_at, now), task.deadline, task.expected_s, share, root)
            entries.setdefault(task.queue, []).append(entry)
            by_entry[id(entry)] = task
        for queue, new in entries.items():
            model = self._models[queue]
            # A task published again (handed back, never confirmed) goes to the back.
            again = {e.job_id for e in new}
            model.entries = [e for e in model.entries if e.job_id not in again]
            verdict = model.decide(now, new)
            out.extend(by_entry[id(e)] for e in verdict.admitted)
            for entry, finish in verdict.dropped:
                out.extend(self._drop(session, ctx, by_entry[id(entry)], entry, finish))
            for entry in verdict.doomed:
                job_id = entry.job_id
                ctx.later(lambda job_id=job_id, queue=queue: log.debug(
                    "job %s: pushed past its deadline on queue %s by higher-priority work; "
                    "its pilot will refuse it", job_id, queue))
        return out

    # -- decisions ------------------------------------------------------------------

    def _drop(self, session: Session, ctx: Context, task: Task, entry: Entry, finish: float) -> list[Task]:
        now = ctx.now
        reason = (f"{OVERLOAD}: on queue {task.queue} it would finish in {finish - now:.1f}s, later than the "
                  f"{entry.limit - now:.1f}s it may take of the {task.deadline - now:.1f}s left before its deadline")
        _moved, more = move_job(session, task.job_id, JobState.DROPPED, ctx, reason=reason)
        job_id = task.job_id
        ctx.later(lambda: log.info("job %s: dropped at admission, %s", job_id, reason))
        return more

    @staticmethod
    def _priority(ctx: Context, priority: int) -> int:
        # The embedded transport has no priorities: its queues are plain FIFO.
        return 0 if ctx.settings.broker.embedded else priority

    def _with_expected(self, session: Session, ctx: Context, task: Task) -> Task:
        """The task, with the stage's learned p95 run time where it gives none yet.

        The catalogue keeps a stage's p95 for a while, 0 until 5 jobs finished;
        this one is read more often, so a pilot's own receipt check (time left
        below the expected run time) works from the first minute on.
        """
        if task.expected_s > 0:
            return task
        p95 = self._stage(session, ctx, task.template, task.node).p95
        return dataclasses.replace(task, expected_s=p95) if p95 > 0 else task

    def _stage(self, session: Session, ctx: Context, template: str, node: str) -> StageStats:
        """A stage's pilot time per task and p95 run time from its recent finished jobs, re-read at times.

        The pilot time per task is the mean run time plus the mean gap between
        one run's end and the next start on the same pilot (the report, the
        next delivery, the fork): under load, that is what drains the queue.
        """
        key = (template, node)
        stats = self._stats.setdefault(key, StageStats())
        # Re-read often while the stage has too few finished jobs to go by.
        if ctx.now - stats.at >= (STATS_REFRESH_S if stats.p95 > 0 else REFRESH_S):
            rows = session.execute(
                select(Job.pilot_id, Job.started_at, Job.ended_at)
                .where(Job.template == template, Job.node == node, Job.state == JobState.FINISHED)
                .order_by(Job.id.desc())
                .limit(ctx.settings.dispatcher.expected_sample)
            ).all()
            runs = [(p, s0, e) for p, s0, e in rows if s0 is not None and e is not None and e >= s0]
            if len(runs) >= MIN_SAMPLES:
                times = sorted(e - s0 for _p, s0, e in runs)
                mean = sum(times) / len(times)
                stats.p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
                stats.mean = mean + _mean_gap(runs, mean)
            stats.at = ctx.now
        return stats

    # -- the models, from the database --------------------------------------------

    def _refresh(self, session: Session, ctx: Context, batch: set[int]) -> None:
        """Re-read pilots, queued and running jobs: three statements for every queue."""
        now = ctx.now
        self._refreshed = now
        self._learn_stages(session, ctx)
        session.flush()  # the batch's own changes, which a connection's statement would not see otherwise
        connection = session.connection()
        pilots = connection.execute(_LIVE_PILOTS).all()
        queued = connection.execute(_QUEUED, {"now": now}).all()
        running = connection.execute(_RUNNING).all()
        entries: dict[str, list[Entry]] = {}
        for job_id, queue, priority, deadline, queued_at, template, node in queued:
            if job_id in batch:
                continue  # this batch's own, decided below
            run, occupy = self._times(session, ctx, template, node)
            entries.setdefault(queue, []).append(
                Entry(job_id, self._priority(ctx, priority), queued_at or now, deadline, run, occupy, deadline))
        busy_until: dict[str, float] = {}
        for pilot_id, started_at, template, node in running:
            if pilot_id is None or started_at is None:
                continue
            _run, occupy = self._times(session, ctx, template, node)
            elapsed = max(0.0, now - started_at)
            # Past its mean, a run is expected to last about as long again (run times have long tails).
            busy_until[pilot_id] = now + (occupy - elapsed if elapsed < occupy else elapsed)
        # Pilots mostly serve the same few lists of queues: each list is read and
        # weighed once per refresh, not once per pilot (a thousand pilots, every second).
        served: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
        parsed: dict[str, tuple[str, ...]] = {}
        for pilot_id, queues in pilots:
            queues = queues or ""
            names = parsed.get(queues)
            if names is None:
                names = parsed[queues] = tuple(q.strip() for q in queues.split(",") if q.strip())
            for name in names:
                served.setdefault(name, []).append((pilot_id, names))
        with_work = {q for q, e in entries.items() if e}
        models: dict[str, QueueModel] = {}
        for name in set(served) | set(entries) | set(self._models):
            servers = []
            slowdowns: dict[tuple[str, ...], float] = {}
            for pilot_id, names in served.get(name, []):
                slowdown = slowdowns.get(names)
                if slowdown is None:
                    busy_queues = sum(1 for n in names if n in with_work or n == name)
                    slowdown = slowdowns[names] = float(max(1, busy_queues))
                servers.append(Server(busy_until.get(pilot_id, now), slowdown))
            models[name] = QueueModel(name, servers, entries.get(name, []), not ctx.settings.broker.embedded)
        self._models = models
        unserved = {name for name, model in models.items() if not model.servers}
        for name in sorted(unserved - self._unserved):
            ctx.later(lambda name=name: log.warning(
                "queue %s: no live pilot serves it; its tasks are admitted and wait under their deadlines", name))
        self._unserved = unserved

    def _times(self, session: Session, ctx: Context, template: str, node: str) -> tuple[float, float]:
        """(expected run time, mean pilot time) of a stage, for tasks read back from the database."""
        given = self._stages.get((template, node), (False, 0.0))[1]
        stats = self._stage(session, ctx, template, node)
        run = given or stats.p95
        return run, stats.mean or run

    def _learn_stages(self, session: Session, ctx: Context) -> None:
        stages: dict[tuple[str, str], tuple[bool, float]] = {}
        for _ref, tpl in ctx.catalogue.active(session).templates:
            roots = set(tpl.roots())
            for node in tpl.nodes:
                stages[(tpl.name, node.name)] = (node.name in roots, float(node.expected_s or 0.0))
        self._stages = stages

