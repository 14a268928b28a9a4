"""The one ``p3s`` command: ``main(argv) -> int``; logging is configured here and nowhere else."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from p3s import __version__
from p3s.errors import ConfigError
from p3s.tables import print_table, safe, when

EXIT_OK = 0
EXIT_FAILURE = 1  # the command ran and found something wrong (a failed job, a broken audit)
EXIT_USAGE = 2  # bad arguments or configuration
EXIT_UNAVAILABLE = 3  # the broker or the database cannot be reached
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it

log = logging.getLogger("p3s")


# -- output helpers ---------------------------------------------------------------


class SafeFormatter(logging.Formatter):
    """Log lines with the message's control characters escaped: a file name cannot forge a line.

    Only the message is escaped; a traceback keeps its lines.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = safe(record.message)
        return super().formatMessage(record)


def emit(args: argparse.Namespace, rows: list[dict[str, Any]], columns: Sequence[str]) -> int:
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, columns)
    return EXIT_OK


# -- settings and the database --------------------------------------------------------


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def settings_of(args: argparse.Namespace) -> Any:
    """The settings, loaded once per command; their ``log_level`` applies unless --log-level was given."""
    cached = getattr(args, "_settings", None)
    if cached is not None:
        return cached
    from p3s.config import load_settings

    settings = load_settings(args.config)
    if not getattr(args, "log_level", None):
        logging.getLogger().setLevel(settings.log_level)
    args._settings = settings
    return settings


def engine_of(args: argparse.Namespace, edits: bool = False) -> Any:
    """An engine on the configured database, whose schema must already be current.

    Read-only commands never create or upgrade the schema (``p3s db upgrade``
    does): on an empty or outdated database this raises DatabaseUnavailable
    saying so.  Commands that edit records (``edits``) bring the schema of
    the embedded default's SQLite file up to date, as ``p3s run`` would, so
    a laptop needs no ``p3s db upgrade``; a server's schema is its operator's.
    """
    from p3s import db

    settings = settings_of(args)
    if edits and not settings.database.url:
        db.upgrade(settings.database_url)
    else:
        db.check_schema(settings.database_url)
    return db.make_engine(settings.database_url)


def session_of(args: argparse.Namespace, edits: bool = False) -> Any:
    """A session on the configured database (see engine_of)."""
    from sqlalchemy.orm import Session

    return Session(engine_of(args, edits))


# -- commands ---------------------------------------------------------------------------


def cmd_config_show(args: argparse.Namespace) -> int:
    from p3s.config import to_toml

    settings = settings_of(args)
    if args.json:
        print(json.dumps(settings.to_dict(masked=True), indent=2))
        return EXIT_OK
    # A TOML file that loads back to these settings (URL passwords masked: keep them in password files).
    sys.stdout.write(to_toml(settings, masked=True))
    return EXIT_OK


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from p3s import db
    from p3s.config import mask_url

    settings = settings_of(args)
    db.upgrade(settings.database_url, args.revision)
    print(f"database {mask_url(settings.database_url)} is at revision {args.revision}")
    return EXIT_OK


def cmd_dag_import(args: argparse.Namespace) -> int:
    import dataclasses

    from p3s.dagengine import TemplateLimits, parse_graphml
    from p3s.dispatcher import admin
    from p3s.errors import TemplateError

    limits = TemplateLimits(**dataclasses.asdict(settings_of(args).templates))
    legacy_only = [opt for opt, value in (("--trigger", args.trigger), ("--budget", args.budget),
                                          ("--dry-run", args.dry_run or None)) if value is not None]
    templates = []
    if args.legacy is not None:
        from p3s.dagengine.legacy import convert

        if args.files or not args.name or args.trigger is None or args.budget is None:
            raise TemplateError("--legacy FILE takes no other file and needs --name, --trigger and --budget")
        try:
            with open(args.legacy, "rb") as fh:
                data = fh.read(limits.max_bytes + 1)
        except OSError as exc:
            raise TemplateError(f"cannot read template file {args.legacy}: {exc.strerror}") from None
        try:
            conversion = convert(data, args.name, args.trigger, args.budget, limits)
        except TemplateError as exc:
            raise TemplateError(f"{args.legacy}: {exc}") from None
        if args.dry_run:
            sys.stdout.write(conversion.graphml())
        for note in conversion.notes:
            print(f"note: {note}", file=sys.stderr)
        if args.dry_run:
            return EXIT_OK
        templates.append(conversion.template)
    elif legacy_only:
        raise TemplateError(f"{', '.join(legacy_only)}: only with --legacy FILE")
    elif not args.files:
        raise TemplateError("give a template file to import (or --legacy FILE)")
    if args.name and len(args.files) > 1:
        raise TemplateError("--name names one template: give one file with it")
    # Every file is read and checked before anything is stored: all of them or none.
    for path in args.files:
        try:
            with open(path, "rb") as fh:
                # One byte past the limit is enough to refuse: a huge file is never read whole.
                data = fh.read(limits.max_bytes + 1)
        except OSError as exc:
            raise TemplateError(f"cannot read template file {path}: {exc.strerror}") from None
        try:
            templates.append(parse_graphml(data, name=args.name, limits=limits))
        except TemplateError as exc:
            raise TemplateError(f"{path}: {exc}" if len(args.files) > 1 else str(exc)) from None
    names = [t.name for t in templates]
    if len(set(names)) != len(names):
        raise TemplateError(f"two files name the same template: {sorted(n for n in set(names) if names.count(n) > 1)}")
    with session_of(args, edits=True) as s, s.begin():
        lines = admin.import_templates(s, templates)
    for line in lines:
        print(line)
    return EXIT_OK


def cmd_dag_list(args: argparse.Namespace) -> int:
    rows = listing(args, "templates", include_deleted=args.all)
    return emit(args, rows, ["name", "version", "state", "nodes", "trigger", "budget_s"])


def _load_template(args: argparse.Namespace) -> Any:
    from p3s.dagengine import Template
    from p3s.dispatcher import admin

    with session_of(args) as s:
        return Template.from_dict(admin.find_template(s, args.name, args.version).spec)


def cmd_dag_export(args: argparse.Namespace) -> int:
    from p3s.dagengine import to_graphml

    sys.stdout.write(to_graphml(_load_template(args)))
    return EXIT_OK


def cmd_dag_show(args: argparse.Namespace) -> int:
    from p3s.dagengine import to_dot, to_mermaid

    tpl = _load_template(args)
    if args.format == "dot":
        sys.stdout.write(to_dot(tpl))
        return EXIT_OK
    if args.format == "mermaid":
        sys.stdout.write(to_mermaid(tpl))
        return EXIT_OK
    print(f"template {tpl.name}: trigger {tpl.trigger!r}, budget {tpl.budget_s:g}s")
    if tpl.description:
        print(tpl.description)
    print()
    rows = [{"node": n.name, **{k: v for k, v in n.to_dict().items() if k != "name"}} for n in tpl.nodes]
    for row in rows:
        row["parents"] = ",".join(tpl.parents(row["node"])) or None
    print_table(
        rows,
        [
            "node",
            "parents",
            "queue",
            "priority",
            "wall_s",
            "budget_s",
            "expected_s",
            "max_running",
            "stage_in",
            "noop",
            "command",
        ],
    )
    if tpl.edges:
        print()
        for parent, child in tpl.edges:
            print(f"{parent} -> {child}")
    return EXIT_OK


def cmd_dag_delete(args: argparse.Namespace) -> int:
    from p3s.dispatcher import admin

    with session_of(args, edits=True) as s, s.begin():
        admin.delete_template(s, args.name)
    print(f"template {args.name}: deleted; no new workflows will be made from it")
    return EXIT_OK


def cmd_priority_set(args: argparse.Namespace) -> int:
    from p3s.dispatcher import admin

    with session_of(args, edits=True) as s, s.begin():
        admin.set_priority(s, args.template, args.node, args.priority)
    print(f"stage {args.template}/{args.node}: priority {args.priority} for tasks enqueued from now on")
    return EXIT_OK


def cmd_priority_list(args: argparse.Namespace) -> int:
    from p3s.dispatcher import admin

    with session_of(args) as s:
        rows = admin.list_priorities(s)
    return emit(args, rows, ["template", "node", "priority", "template_priority", "set_at"])


def listing(args: argparse.Namespace, name: str, **filters: Any) -> list[dict[str, Any]]:
    """``admin.list_<name>(session, **filters)``; on the embedded default read with sqlite3 where it can.

    A listing is what an operator types most: on a laptop's SQLite file it
    skips SQLAlchemy's import, the larger part of its time (p3s.listings).
    """
    from p3s import listings

    rows = listings.read(settings_of(args).database_url, name, **filters)
    if rows is not None:
        return rows
    from p3s.dispatcher import admin

    with session_of(args) as s:
        return getattr(admin, f"list_{name}")(s, **filters)


def cmd_files(args: argparse.Namespace) -> int:
    rows = listing(args, "files", limit=args.limit)
    return emit(args, rows, ["id", "name", "stream", "decision", "workflows", "seen_at", "path"])


def cmd_workflows(args: argparse.Namespace) -> int:
    rows = listing(args, "workflows", limit=args.limit, state=args.state)
    return emit(args, rows, ["id", "template", "state", "latency_s", "created_at", "file"])


def cmd_jobs(args: argparse.Namespace) -> int:
    rows = listing(args, "jobs", limit=args.limit, state=args.state, workflow_id=args.workflow)
    return emit(args, rows, ["id", "workflow_id", "node", "state", "exit_code", "latency_s", "reason", "log"])


def cmd_results(args: argparse.Namespace) -> int:
    from p3s.results import query

    with session_of(args) as s:
        if args.alarms:
            return emit(args, query.list_alarms(s, template=args.template),
                        ["template", "metric", "value", "lo", "hi", "result_id", "raised_at"])
        rows = query.list_results(s, template=args.template, run=args.run, limit=args.limit)
        alarms = [] if args.json else query.list_alarms(s, template=args.template)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for row in rows:
        row["metrics"] = ", ".join(
            f"{m['name']}={m['value']:g}{m['unit'] and ' ' + m['unit']}{' ALARM' if m['alarm'] else ''}"
            for m in row["metrics"])
        row["files"] = ", ".join(f["path"] for f in row["files"])
    print_table(rows, ["id", "template", "run", "subrun", "age_s", "on_time", "metrics", "files", "file"])
    for a in alarms:
        print(f"ALARM {a['template']} {a['metric']} = {a['value']:g}, expected "
              f"[{'-' if a['lo'] is None else format(a['lo'], 'g')}, {'-' if a['hi'] is None else format(a['hi'], 'g')}]"
              f" (result {a['result_id']})")
    return EXIT_OK


def cmd_pilots(args: argparse.Namespace) -> int:
    from p3s.dispatcher import admin

    with session_of(args) as s:
        rows = admin.list_pilots(s, limit=args.limit)
    return emit(args, rows, ["id", "state", "host", "queues", "job_id", "jobs_done", "last_seen", "problem"])


def cmd_logs(args: argparse.Namespace) -> int:
    """A job's log, read where the log root is reachable from this host; --follow until the job ends."""
    from sqlalchemy.orm import Session

    from p3s.dispatcher import admin
    from p3s.states import JobState

    settings = settings_of(args)
    engine = engine_of(args)
    out = sys.stdout.buffer
    offset = 0
    try:
        while True:
            with Session(engine) as s:
                job = admin.job_log_info(s, args.job)
            ended = JobState(job["state"]).terminal
            candidates = admin.log_candidates(job, settings.log_path)
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                if ended or not args.follow:
                    return _no_log(job, candidates, settings.log_path)
            else:
                with found.open("rb") as fh:
                    fh.seek(offset)
                    while chunk := fh.read(1 << 16):
                        out.write(chunk)
                        offset += len(chunk)
                out.flush()
                if not args.follow or ended:
                    # A job's last lines are written before it is reported ended: nothing is missed.
                    return EXIT_OK
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        engine.dispose()


def _no_log(job: dict[str, Any], candidates: Sequence[Path], log_root: Path) -> int:
    if job["state"] in ("pending", "queued") or (not job["log"] and job["state"] in ("expired", "dropped")):
        print(f"p3s: job {job['id']} is {job['state']}: it never ran, so it has no log", file=sys.stderr)
        return EXIT_FAILURE
    tried = ", ".join(safe(str(c)) for c in candidates)
    print(
        f"p3s: job {job['id']}: its log is not reachable from this host (tried {tried}); "
        f"read it on the pilot's host {safe(job['host'] or '?')}, or set log_root (now {safe(str(log_root))}) "
        "to where the pilots' log root is mounted here",
        file=sys.stderr,
    )
    return EXIT_FAILURE


def cmd_audit(args: argparse.Namespace) -> int:
    from p3s.dispatcher.audit import run_audit

    settings = settings_of(args)
    grace = args.grace if args.grace is not None else settings.dispatcher.audit_grace_s
    with session_of(args) as s:
        report = run_audit(s, time.time(), grace)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print_table(report.streams, ["stream", "seen", "accepted", "sampled_out", "duplicate", "shed"])
        print()
        print("jobs: " + (", ".join(f"{k} {v}" for k, v in sorted(report.jobs.items())) or "none"))
        print()
        for problem in report.problems:
            print(f"PROBLEM {problem}")
        print("audit: " + ("the books balance" if report.ok else f"{len(report.problems)} problem(s)"))
    return EXIT_OK if report.ok else EXIT_FAILURE


def _purge_line(counts: Any) -> str:
    total = counts.total
    return (
        f"purge: {counts.jobs}/{total.get('jobs', 0)} jobs, {counts.workflows}/{total.get('workflows', 0)} workflows, "
        f"{counts.files}/{total.get('files', 0)} files, batch {counts.batches}"
        + (" (dry run)" if counts.dry_run else "")
    )


def cmd_purge(args: argparse.Namespace) -> int:
    from p3s.dispatcher.purge import parse_duration, purge

    settings = settings_of(args)
    cutoff = time.time() - parse_duration(args.older_than)
    engine = engine_of(args, edits=True)
    tty = sys.stderr.isatty()

    def progress(counts: Any) -> None:
        if tty:
            print(_purge_line(counts), file=sys.stderr, flush=True)
        else:
            log.info("%s", _purge_line(counts))

    try:
        counts = purge(
            engine,
            cutoff,
            output_root=settings.output_path,
            log_root=settings.log_path,
            batch_size=args.batch_size,
            dry_run=args.dry_run,
            progress=progress,
            results_cutoff=time.time() - settings.results.retention_days * 86400,
            delete_result_files=settings.results.delete_files,
        )
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(counts.to_dict(), indent=2))
        return EXIT_OK
    verb = "would delete" if counts.dry_run else "deleted"
    print(
        f"purge: {verb} {counts.files} files, {counts.workflows} workflows, {counts.jobs} jobs, "
        f"{counts.pilots} pilots, {counts.templates} template versions, {counts.output_dirs} output dirs, "
        f"{counts.log_files} log files, {counts.log_dirs} log dirs older than {when(cutoff)} UTC, "
        f"{counts.results} results and {counts.result_files} result files older than "
        f"{settings.results.retention_days:g} days "
        f"in {counts.batches} batch(es)"
    )
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from p3s.dispatcher import status

    settings = settings_of(args)
    with session_of(args) as s:
        data = status.collect(s, settings)
    print(json.dumps(data, indent=2) if args.json else status.render(data))
    if data.get("broker_unreachable"):
        # The picture above is the database's half; the exit code says the other half is missing.
        print(f"p3s: {data['queues_note']}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return EXIT_OK


def cmd_top(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from p3s.dispatcher import status

    settings = settings_of(args)
    engine = engine_of(args)
    shown = 0
    try:
        while True:
            with Session(engine) as s:
                text = status.render(status.collect(s, settings))
            # Home the cursor and clear the screen, then draw the whole picture at once.
            sys.stdout.write(f"\x1b[H\x1b[2J{text}\n\n(every {args.interval:g}s; Ctrl-C to quit)\n")
            sys.stdout.flush()
            shown += 1
            if args.iterations and shown >= args.iterations:
                return EXIT_OK
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        engine.dispose()


def cmd_submit(args: argparse.Namespace) -> int:
    from p3s import topology
    from p3s.broker import Publisher
    from p3s.messages import DataEvent
    from p3s.watcher.service import event_message

    settings = settings_of(args)
    if settings.broker.embedded:
        print("p3s submit needs a broker shared with a dispatcher: set P3S_BROKER_URL", file=sys.stderr)
        return EXIT_USAGE
    if args.template:
        from p3s.dispatcher import admin

        # Checked here: the dispatcher would record the file and make no workflow, silently.
        with session_of(args) as s:
            admin.find_active_template(s, args.template)
    events = []
    for raw in args.paths:
        if raw.startswith(("root://", "xroot://")):
            name, size = raw.rstrip("/").rsplit("/", 1)[-1], -1
        else:
            path = Path(raw).resolve()
            if not path.is_file():
                print(f"not a file: {raw}", file=sys.stderr)
                return EXIT_USAGE
            name, size, raw = path.name, path.stat().st_size, str(path)
        events.append(
            DataEvent(
                name=name,
                path=raw,
                stream=args.stream,
                seen_at=time.time(),
                source="submit",
                size=size,
                force=args.force,
                by_hand=True,
                template=args.template or "",
            )
        )
    publisher = Publisher(
        settings.broker, exchanges=[topology.events_exchange], queues=[topology.invalid_queue, topology.events_queue]
    )
    try:
        publisher.publish(event_message(e) for e in events)
    finally:
        publisher.close()
    print(f"submitted {len(events)} file(s)" + (" (forced)" if args.force else ""))
    return EXIT_OK


def _sources_for(args: argparse.Namespace, settings: Any) -> list[Any]:
    from p3s.config import SourceSettings

    if getattr(args, "watch", None):
        return [
            SourceSettings(
                name=f"watch{i}" if i else "watch",
                kind="inotify",
                location=str(Path(d).resolve()),
                pattern=args.pattern,
                stream=args.stream,
            )
            for i, d in enumerate(args.watch)
        ]
    return list(settings.sources)


def _run_group(group: Any, reload_settings: Callable[[], Any] | None, until: Callable[[], bool] | None = None) -> int:
    from p3s.app import Signals

    def reload() -> None:
        if group.dispatcher is not None:
            group.dispatcher.reload_requested = True

    Signals(group.stop, group.kill, reload if reload_settings else None).install()
    group.start()
    while group.alive():
        if until is not None and until():
            group.stop()
        time.sleep(0.2)
    group.join()
    return EXIT_FAILURE if group.errors else EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    import dataclasses

    from p3s import metrics
    from p3s.app import build_group
    from p3s.config import load_settings

    settings = settings_of(args)
    sources = _sources_for(args, settings)
    if settings.broker.embedded:
        log.info(
            "embedded mode: in-process broker (no priorities, no TTL, one process), SQLite at %s", settings.database_url
        )
    if args.pilots:
        settings = dataclasses.replace(
            settings, pilot=dataclasses.replace(settings.pilot, queues=_run_queues(args, settings))
        )
    metrics.serve(settings.metrics)
    group = build_group(settings, sources, args.pilots, reload_settings=lambda: load_settings(args.config))
    if args.web:
        from p3s.web.app import WebServer

        group.web = WebServer(settings, args.bind, engine=group.dispatcher.engine if group.dispatcher else None,
                              beside_pipeline=True)
    try:
        return _run_group(group, reload_settings=lambda: load_settings(args.config))
    finally:
        _record_pilots_stopped(group)


def _run_queues(args: argparse.Namespace, settings: Any) -> tuple[str, ...]:
    """The pilots' queues: --queues, or every queue the active templates use (and the configured ones)."""
    if args.queues is not None:
        queues = tuple(dict.fromkeys(q.strip() for q in args.queues.split(",") if q.strip()))
        if not queues:
            raise ConfigError("--queues: name at least one queue")
        return queues
    from sqlalchemy.orm import Session

    from p3s import db
    from p3s.app import wait_for_database
    from p3s.dispatcher import admin

    # The dispatcher brings the schema up to date anyway, a moment later.
    wait_for_database(settings.database_url)
    engine = db.make_engine(settings.database_url)
    try:
        with Session(engine) as s:
            used = admin.template_queues(s)
    finally:
        engine.dispose()
    queues = tuple(sorted(set(settings.pilot.queues) | set(used)))
    log.info("run: pilots serve queue(s) %s", ", ".join(queues))
    return queues


def _record_pilots_stopped(group: Any) -> None:
    """Pilots that stopped with the process are recorded ``stopped``.

    Their goodbyes may never be read: the dispatcher of the same process
    stops with them, and the embedded broker's queues die with the process.
    """
    if not group.pilots or group.dispatcher is None:
        return
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.orm import Session

    from p3s.dispatcher import admin

    ids = [p.id for p in group.pilots]
    try:
        with Session(group.dispatcher.engine) as s, s.begin():
            admin.mark_pilots_stopped(s, ids, time.time())
    except SQLAlchemyError as exc:
        log.warning("run: could not record %d pilot(s) stopped: %s", len(ids), exc)


def cmd_dispatcher(args: argparse.Namespace) -> int:
    from p3s import metrics
    from p3s.app import Group, make_dispatcher
    from p3s.config import load_settings

    settings = settings_of(args)
    if settings.broker.embedded:
        print(
            "p3s dispatcher alone needs a broker (P3S_BROKER_URL); `p3s run` runs all parts in one process",
            file=sys.stderr,
        )
        return EXIT_USAGE
    metrics.serve(settings.metrics)
    group = Group(dispatcher=make_dispatcher(settings, lambda: load_settings(args.config)))
    return _run_group(group, reload_settings=lambda: load_settings(args.config))


def cmd_watcher(args: argparse.Namespace) -> int:
    from p3s import metrics
    from p3s.app import Group
    from p3s.watcher.service import Watcher

    settings = settings_of(args)
    if settings.broker.embedded:
        print("p3s watcher alone needs a broker (P3S_BROKER_URL)", file=sys.stderr)
        return EXIT_USAGE
    sources = _sources_for(args, settings)
    if not sources:
        print("no sources: configure [[sources]] or give --watch DIR", file=sys.stderr)
        return EXIT_USAGE
    metrics.serve(settings.metrics)
    return _run_group(Group(watcher=Watcher(settings, sources)), reload_settings=None)


def cmd_pilot(args: argparse.Namespace) -> int:
    import dataclasses

    from p3s import metrics
    from p3s.app import Group, make_pilot
    from p3s.pilot.service import Limits

    settings = settings_of(args)
    if settings.broker.embedded:
        print(
            "p3s pilot alone needs a broker (P3S_BROKER_URL); `p3s run --pilots N` runs pilots in-process",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.metrics_port is not None:
        settings = dataclasses.replace(settings, metrics=dataclasses.replace(settings.metrics, port=args.metrics_port))
    queues = tuple(q for q in (args.queues or ",".join(settings.pilot.queues)).split(",") if q)
    limits = Limits(
        max_jobs=args.max_jobs if args.max_jobs is not None else settings.pilot.max_jobs,
        idle_exit_s=args.idle_exit if args.idle_exit is not None else settings.pilot.idle_exit_s,
        lifetime_s=args.lifetime if args.lifetime is not None else settings.pilot.lifetime_s,
    )
    metrics.serve(settings.metrics)
    pilot = make_pilot(settings, queues=queues, limits=limits, pilot_id=args.id)
    return _run_group(Group(pilots=[pilot]), reload_settings=None)


def cmd_demo(args: argparse.Namespace) -> int:
    from p3s.demo import run_demo

    web = (args.bind or "") if args.web else None
    return run_demo(files=args.files, pilots=args.pilots, keep=args.keep, web=web)


def cmd_web(args: argparse.Namespace) -> int:
    from p3s import metrics
    from p3s.web.app import serve

    settings = settings_of(args)
    metrics.serve(settings.metrics)
    return serve(settings, args.bind)


# -- the parser ---------------------------------------------------------------------


def _listing(
    sub: Any, name: str, func: Callable[[argparse.Namespace], int], help: str, states: Sequence[str] = ()
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--json", action="store_true", help="a JSON list of objects instead of a table")
    p.add_argument("--limit", type=int, default=100, help="newest N rows (default 100)")
    if states:
        p.add_argument("--state", choices=list(states), metavar="STATE", help=f"only rows in this state: {', '.join(states)}")
    p.set_defaults(func=func)
    return p


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage is one --help away)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _formatter(prog: str) -> argparse.HelpFormatter:
    # Wide enough that every command's description stays on its one line.
    return argparse.HelpFormatter(prog, max_help_position=16, width=max(100, _columns()))


def _columns() -> int:
    import shutil

    return shutil.get_terminal_size((100, 24)).columns


def build_parser() -> argparse.ArgumentParser:
    from p3s.states import JobState, WorkflowState

    parser = _Parser(
        prog="p3s", description="Prompt processing for detector data quality monitoring.", formatter_class=_formatter
    )
    parser.add_argument("--version", action="version", version=f"p3s {__version__}")
    parser.add_argument("--config", "-c", default=None, help="TOML settings file (default: $P3S_CONFIG)")
    parser.add_argument("--log-level", type=_log_level, default=None, metavar="LEVEL",
                        help="DEBUG, INFO, WARNING or ERROR (default: log_level from settings)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="config show: print the effective settings as TOML, passwords masked")
    p = p.add_subparsers(dest="what", required=True, metavar="ACTION")
    show = p.add_parser("show", help="print every setting as a TOML file that loads back, passwords masked")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_config_show)

    p = sub.add_parser("db", help="db upgrade: create or upgrade the database schema (the only command that does)")
    p = p.add_subparsers(dest="what", required=True, metavar="ACTION")
    up = p.add_parser("upgrade", help="create or upgrade the schema (Alembic)")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=cmd_db_upgrade)

    dag = sub.add_parser("dag", help="dag import|list|show|export|delete: the DAG templates")
    dag = dag.add_subparsers(dest="what", required=True, metavar="ACTION")
    q = dag.add_parser("import", help="import GraphML templates (a new version of a name only if its content changed)")
    q.add_argument("files", nargs="*", metavar="FILE")
    q.add_argument("--name", help="template name (default: the graph's name attribute)")
    q.add_argument("--legacy", metavar="FILE", default=None,
                   help="convert a template of the older system (needs --name, --trigger, --budget)")
    q.add_argument("--trigger", metavar="GLOB", default=None, help="with --legacy: the glob of file names")
    q.add_argument("--budget", metavar="SECONDS", type=float, default=None, help="with --legacy: the latency budget")
    q.add_argument("--dry-run", action="store_true",
                   help="with --legacy: print the converted GraphML and the notes; import nothing")
    q.set_defaults(func=cmd_dag_import)
    q = dag.add_parser("list", help="list templates")
    q.add_argument("--json", action="store_true")
    q.add_argument("--all", action="store_true", help="include superseded versions and deleted templates")
    q.set_defaults(func=cmd_dag_list)
    for name, func, help in (
        ("export", cmd_dag_export, "print a template as GraphML"),
        ("show", cmd_dag_show, "print a template's nodes, edges and attributes"),
    ):
        q = dag.add_parser(name, help=help)
        q.add_argument("name")
        q.add_argument("--version", type=int, default=None, help="a given version (default: the newest)")
        if name == "show":
            q.add_argument("--format", choices=["text", "dot", "mermaid"], default="text")
        q.set_defaults(func=func)
    q = dag.add_parser("delete", help="stop new workflows from a template; history stays")
    q.add_argument("name")
    q.set_defaults(func=cmd_dag_delete)

    pr = sub.add_parser("priority", help="priority set|list: stage priorities for tasks enqueued from now on")
    pr = pr.add_subparsers(dest="what", required=True, metavar="ACTION")
    q = pr.add_parser("set", help="set a stage's priority for tasks enqueued from now on")
    q.add_argument("template")
    q.add_argument("node")
    q.add_argument("priority", type=int)
    q.set_defaults(func=cmd_priority_set)
    q = pr.add_parser("list", help="every stage's effective priority")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_priority_list)

    _listing(sub, "files", cmd_files, "the files seen, newest first, and the decision taken for each")
    _listing(sub, "workflows", cmd_workflows, "workflows, newest first", [s.value for s in WorkflowState])
    jobs = _listing(sub, "jobs", cmd_jobs, "jobs, newest first, with the reason of each ending", [s.value for s in JobState])
    jobs.add_argument("--workflow", type=int, default=None, help="only the jobs of this workflow")
    _listing(sub, "pilots", cmd_pilots, "pilots: state, queues and the job each is running")
    q = _listing(sub, "results", cmd_results, "DQM results, newest first: run, subrun, age, metrics and plots")
    q.add_argument("--template", default=None, help="only this template's results")
    q.add_argument("--run", type=int, default=None, help="only the results of this run")
    q.add_argument("--alarms", action="store_true", help="the alarms raised now instead")

    q = sub.add_parser("logs", help="print a job's log (--follow: and what it adds, until the job ends)")
    q.add_argument("job", type=int, metavar="JOB", help="job id (from p3s jobs)")
    q.add_argument("--follow", "-f", action="store_true", help="keep printing what is added until the job ends")
    q.add_argument("--interval", type=float, default=0.5, metavar="S", help=argparse.SUPPRESS)
    q.set_defaults(func=cmd_logs)

    q = sub.add_parser("audit", help="prove every file and job is accounted for; exit 1 if not")
    q.add_argument("--json", action="store_true")
    q.add_argument("--grace", type=float, default=None, help="seconds past a deadline before an active job is stale")
    q.set_defaults(func=cmd_audit)

    q = sub.add_parser("purge", help="delete old files, workflows, jobs, pilots, outputs and logs, in batches")
    q.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 30d, 12h, 90m or 3600s")
    q.add_argument("--dry-run", action="store_true", help="count what would go; delete nothing")
    q.add_argument("--batch-size", type=int, default=5000, metavar="N", help="files per transaction (default 5000)")
    q.add_argument("--json", action="store_true", help="the summary as a JSON object")
    q.set_defaults(func=cmd_purge)

    for name, func, help in (
        ("status", cmd_status, "queues and their consumers, pilots, the last hour's outcomes and latencies, sources"),
        ("top", cmd_top, "p3s status, redrawn until Ctrl-C"),
    ):
        q = sub.add_parser(name, help=help)
        if name == "status":
            q.add_argument("--json", action="store_true", help="one JSON object instead of text")
        else:
            q.add_argument("--interval", type=float, default=2.0, metavar="S", help="seconds between redraws")
            q.add_argument("--iterations", "-n", type=int, default=0, metavar="N", help="stop after N redraws")
        q.set_defaults(func=func)

    q = sub.add_parser("submit", help="publish data events for existing files, by hand")
    q.add_argument("paths", nargs="+")
    q.add_argument("--template", help="use this template only, whatever its trigger")
    q.add_argument("--force", action="store_true", help="bypass sampling and de-duplication")
    q.add_argument("--stream", default="raw")
    q.set_defaults(func=cmd_submit)

    def watch_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--watch", action="append", metavar="DIR", help="follow DIR with inotify (repeatable)")
        q.add_argument("--pattern", default="*", help="glob of file names to publish (with --watch)")
        q.add_argument("--stream", default="raw", help="stream of the files (with --watch)")

    def web_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--web", action="store_true", help="serve the web monitor beside the pipeline")
        q.add_argument("--bind", default=None, metavar="HOST:PORT", help="with --web: where (default: web.bind)")

    q = sub.add_parser("run", help="watcher, dispatcher and pilots in one process")
    watch_options(q)
    q.add_argument("--pilots", type=int, default=2, help="pilots to run in-process (0: they run elsewhere)")
    q.add_argument("--queues", default=None,
                   help="comma-separated task queues of the pilots (default: every queue the templates use)")
    web_options(q)
    q.set_defaults(func=cmd_run)

    q = sub.add_parser("demo", help="a self-contained demonstration on the embedded default")
    q.add_argument("--files", type=int, default=5)
    q.add_argument("--pilots", type=int, default=2)
    q.add_argument("--keep", action="store_true", help="keep the temporary directory")
    web_options(q)
    q.set_defaults(func=cmd_demo)

    q = sub.add_parser("web", help="the web monitor: live pages and a JSON API; operator actions behind a login")
    q.add_argument("--bind", default=None, metavar="HOST:PORT", help="where to listen (default: web.bind)")
    q.set_defaults(func=cmd_web)

    q = sub.add_parser("dispatcher", help="run the dispatcher daemon")
    q.set_defaults(func=cmd_dispatcher)
    q = sub.add_parser("watcher", help="run the watcher daemon")
    watch_options(q)
    q.set_defaults(func=cmd_watcher)
    q = sub.add_parser("pilot", help="run a pilot daemon")
    q.add_argument("--queues", default=None, help="comma-separated task queues (default from settings)")
    q.add_argument("--max-jobs", type=int, default=None, help="stop after N tasks")
    q.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS", help="stop after idling this long")
    q.add_argument("--lifetime", type=float, default=None, metavar="SECONDS", help="stop after this long")
    q.add_argument("--id", default=None, help="pilot id (default: host-pid-random)")
    q.add_argument("--metrics-port", type=int, default=None, help="serve metrics on this port")
    q.set_defaults(func=cmd_pilot)
    from p3s.cli_control import add_commands  # cancel; pilots stop|drain

    add_commands(sub)
    _everywhere(parser)
    return parser


def _log_level(text: str) -> str:
    """An argparse type: a logging level name, in any case."""
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a log level: one of {', '.join(LOG_LEVELS)}")
    return text.upper()


def _everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept --config and --log-level after any subcommand too (``p3s run --config FILE``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                # SUPPRESS: a subcommand that does not see the option leaves the main parser's value.
                sub.add_argument("--config", "-c", default=argparse.SUPPRESS, help="TOML settings file")
                sub.add_argument("--log-level", type=_log_level, default=argparse.SUPPRESS, metavar="LEVEL",
                                 help="DEBUG, INFO, WARNING or ERROR")
                _everywhere(sub)


class _NoHostnameFilter(logging.Filter):
    """kombu warns that the in-process transport has no host name each time it clones a connection."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No hostname was supplied")


def log_to_stderr(level: str) -> None:
    """Every command's logging (and each ``p3s web`` worker's): one line per record, control characters escaped."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s[%(threadName)s]: %(message)s"))
    handler.addFilter(_NoHostnameFilter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # Alembic narrates every step at INFO; an operator wants only its warnings.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))


def main(argv: Sequence[str] | None = None) -> int:
    from p3s.errors import BrokerUnavailable, ConfigError, DatabaseUnavailable, NotFound, P3SError, TemplateError

    parser = build_parser()
    args = parser.parse_args(argv)
    # Until the settings are read (their log_level), the environment's word, if it is a level.
    env_level = (os.environ.get("P3S_LOG_LEVEL") or "").upper()
    level = args.log_level or (env_level if env_level in LOG_LEVELS else "INFO")
    if args.command == "demo" and not args.log_level:
        level = "WARNING"  # the demo prints its own progress; INFO lines would drown it
    log_to_stderr(level)
    try:
        return int(args.func(args))
    except (ConfigError, TemplateError, NotFound) as exc:
        print(f"p3s: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (BrokerUnavailable, DatabaseUnavailable) as exc:
        print(f"p3s: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except P3SError as exc:
        print(f"p3s: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:
        return EXIT_OK
    except KeyboardInterrupt:
        # Ctrl-C before a daemon's signal handlers are in place (waiting for a server, say).
        return EXIT_INTERRUPTED
