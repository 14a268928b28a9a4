"""Every Prometheus metric p3s exports, declared once, in seconds.

Latencies are computed from timestamps carried in the messages (``seen_at``,
``enqueued_at``, ``started_at``, ``ended_at``), so the dispatcher alone can
observe every hop of a file's journey.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from p3s.config import MetricsSettings
from p3s.states import TERMINAL_JOB_STATES, WorkflowState

if TYPE_CHECKING:
    from p3s.dagengine import Template

log = logging.getLogger(__name__)

# From a few milliseconds (an idle system) to the tens of minutes after which
# a DQM plot is worthless.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)

FILES = Counter("p3s_files", "Files the dispatcher was told about, by decision.", ["stream", "decision"])
JOBS = Counter("p3s_jobs", "Jobs that reached a terminal state, by state and stage.", ["template", "node", "state"])
WORKFLOWS = Counter("p3s_workflows", "Workflows that ended, by template and state.", ["template", "state"])
# Against p3s_workflows_total: the share of a template's results that were ready in time.
WORKFLOWS_ON_TIME = Counter(
    "p3s_workflows_on_time", "Workflows that finished within their deadline (file seen + budget), by template.",
    ["template"],
)
INVALID_MESSAGES = Counter(
    "p3s_invalid_messages", "Message bodies refused and dead-lettered to p3s.invalid.", ["queue"]
)
TASKS_ENQUEUED = Counter("p3s_tasks_enqueued", "Tasks published to a task queue.", ["queue"])
TASKS_UNCONFIRMED = Counter(
    "p3s_tasks_unconfirmed", "Tasks the broker did not confirm: published again later, or their jobs ended."
)
REPORTS_REFUSED = Counter(
    "p3s_reports_refused",
    "Reports and events not believed: no or a wrong token (token), another pilot's job (pilot), "
    "or sent from an account not allowed to (account).",
    ["reason"],
)
DUPLICATE_STARTS = Counter("p3s_jobs_started_twice", "Running reports for a job another pilot already runs.")
DISPATCHER_ERRORS = Counter(
    "p3s_dispatcher_errors", "Batches the dispatcher could not record and handed back.", ["kind"]
)

SEEN_TO_CREATED = Histogram(
    "p3s_seen_to_created_seconds",
    "From the file being seen to its workflow being created and its roots enqueued.",
    ["template"],
    buckets=LATENCY_BUCKETS,
)
QUEUED_TO_STARTED = Histogram(
    "p3s_queued_to_started_seconds",
    "From a task being enqueued to its payload starting.",
    ["template", "node"],
    buckets=LATENCY_BUCKETS,
)
RUN_TIME = Histogram(
    "p3s_run_seconds",
    "From a payload starting to it ending.",
    ["template", "node"],
    buckets=LATENCY_BUCKETS,
)
SEEN_TO_DONE = Histogram(
    "p3s_seen_to_done_seconds",
    "From the file being seen to its workflow ending (finished or incomplete).",
    ["template", "state"],
    buckets=LATENCY_BUCKETS,
)

QUEUE_DEPTH = Gauge("p3s_queue_depth", "Messages ready in a p3s queue.", ["queue"])
OLDEST_QUEUED_AGE = Gauge("p3s_oldest_queued_task_age_seconds", "Age of the oldest task still queued.")
PILOTS = Gauge("p3s_pilots", "Pilots known to the dispatcher, by state.", ["state"])
TEMPLATE_BUDGET = Gauge(
    "p3s_template_budget_seconds",
    "A template's latency budget (file seen to workflow done), to compare p95 latencies with.",
    ["template"],
)

# 1 while a DQM metric of a template is out of its expected range (config over manifest), 0 once a later
# result has it back in range; set from the alarms table, so every dispatcher exports the same.
DQM_ALARM = Gauge(
    "p3s_dqm_alarm", "1 while a template's DQM metric is out of its expected range, 0 once back in range.",
    ["template", "metric"],
)

RESULTS_REFUSED = Counter(
    "p3s_results_refused",
    "Parts of payloads' results manifests that p3s refused: a manifest whole (manifest), or one plot "
    "or file it lists (entry).",
    ["template", "what"],
)

# The watcher's own.
EVENTS_PUBLISHED = Counter("p3s_watcher_events_published", "Data events published and confirmed.", ["source"])
WATCHER_BACKLOG = Gauge("p3s_watcher_backlog", "Data events waiting for the broker.")
WATCHER_RESCANS = Counter("p3s_watcher_rescans", "Full rescans of a source (start-up or inotify overflow).", ["source"])
WATCHER_FILES_REFUSED = Counter(
    "p3s_watcher_files_refused",
    "Files a source found but did not publish: special files, symlinks that leave its root.",
    ["source", "reason"],
)
SOURCE_SWITCHES = Counter("p3s_watcher_source_switches", "A fallback source became active or idle.", ["source", "to"])
# ``role`` is "primary" or "fallback": an alert fires while a fallback source is active.
SOURCE_ACTIVE = Gauge(
    "p3s_watcher_source_active", "1 while a source publishes, 0 while it stands by.", ["source", "role"]
)

# A pilot's own few.
PILOT_TASKS = Counter("p3s_pilot_tasks", "Tasks this pilot took, by outcome.", ["outcome"])
PILOT_BUSY_SECONDS = Counter("p3s_pilot_busy_seconds", "Seconds this pilot spent running payloads.")


_BUDGETS: set[str] = set()


def export_templates(templates: Iterable[Template]) -> None:
    """Export each active template's budget and start its series at zero; forget deleted templates' budgets.

    A labelled series appears only when first observed, and ``rate()`` needs a
    sample from before an observation to see it: series made here, at start-up,
    let the first workflow of a template (and the first expired job of a stage)
    count in rates and alerts.
    """
    names = set()
    for tpl in templates:
        names.add(tpl.name)
        TEMPLATE_BUDGET.labels(tpl.name).set(tpl.budget_s)
        SEEN_TO_CREATED.labels(tpl.name)
        WORKFLOWS_ON_TIME.labels(tpl.name)
        for state in (WorkflowState.FINISHED, WorkflowState.INCOMPLETE):
            SEEN_TO_DONE.labels(tpl.name, state)
            WORKFLOWS.labels(tpl.name, state)
        for node in tpl.nodes:
            QUEUED_TO_STARTED.labels(tpl.name, node.name)
            RUN_TIME.labels(tpl.name, node.name)
            for job_state in TERMINAL_JOB_STATES:
                JOBS.labels(tpl.name, node.name, job_state)
    for gone in _BUDGETS - names:
        TEMPLATE_BUDGET.remove(gone)
    _BUDGETS.clear()
    _BUDGETS.update(names)


def serve(settings: MetricsSettings) -> int | None:
    """Serve /metrics if a port is configured; returns the port or None."""
    if not settings.port:
        return None
    start_http_server(settings.port, addr=settings.address)
    log.info("metrics: serving on http://%s:%d/metrics", settings.address, settings.port)
    return settings.port
