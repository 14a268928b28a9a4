"""SQLAlchemy 2.0 models and the engine factory; the schema itself is Alembic's.

Times are float seconds since the epoch (UTC), as in the messages, so latencies
are plain subtractions on both SQLite and PostgreSQL.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import sqlalchemy.exc
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from p3s import schema
from p3s.errors import ConfigError, DatabaseRefused, DatabaseUnavailable

log = logging.getLogger(__name__)


class Base(DeclarativeBase):
    pass


class FileRecord(Base):
    """One sighting of a file, with the one decision taken for it."""

    __tablename__ = "files"
    # The web pages' filters and counts (migration 0005 says why each).
    __table_args__ = (
        Index("ix_files_received_decision", "received_at", "decision"),
        Index("ix_files_decision_newest", "decision", "id"),
        # Not declared: ix_files_name_trgm, a trigram index for searching a part of the
        # name, made by migration 0005 on PostgreSQL where pg_trgm can be had.
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    name: Mapped[str] = mapped_column(String(512), index=True)
    # Set to the name for the first sighting only, so a unique index makes
    # de-duplication safe between two dispatchers; NULL on duplicates and forced runs.
    dedup_key: Mapped[str | None] = mapped_column(String(512), unique=True)
    path: Mapped[str] = mapped_column(Text)
    stream: Mapped[str] = mapped_column(String(128), index=True)
    source: Mapped[str] = mapped_column(String(128), default="")
    size: Mapped[int] = mapped_column(BigInteger, default=-1)
    seen_at: Mapped[float] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float)
    decision: Mapped[str] = mapped_column(String(16))
    by_hand: Mapped[bool] = mapped_column(Boolean, default=False)
    forced: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str] = mapped_column(Text, default="")


class TemplateRecord(Base):
    """One version of a DAG template; workflows point at the version they were made from."""

    __tablename__ = "templates"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[int] = mapped_column(Integer)
    trigger: Mapped[str] = mapped_column(String(512))
    budget_s: Mapped[float] = mapped_column(Float)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    deleted_at: Mapped[float | None] = mapped_column(Float)


class StagePriority(Base):
    """An operator's priority for one stage, applied to tasks enqueued from then on."""

    __tablename__ = "stage_priorities"

    template: Mapped[str] = mapped_column(String(128), primary_key=True)
    node: Mapped[str] = mapped_column(String(128), primary_key=True)
    priority: Mapped[int] = mapped_column(Integer)
    set_at: Mapped[float] = mapped_column(Float)


class Workflow(Base):
    """The jobs made from one template for one file."""

    __tablename__ = "workflows"
    __table_args__ = (
        Index("ix_workflows_state_newest", "state", "id"),
        Index("ix_workflows_template_state_newest", "template", "state", "id"),
        Index("ix_workflows_ended_at", "ended_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    file_id: Mapped[int] = mapped_column(ForeignKey("files.id", ondelete="CASCADE"), index=True)
    template_id: Mapped[int] = mapped_column(ForeignKey("templates.id"), index=True)
    template: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16))
    seen_at: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    deadline: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float)

    file: Mapped[FileRecord] = relationship()


class Job(Base):
    """One node of a workflow, from pending to one terminal state."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_state_deadline", "state", "deadline"),
        Index("ix_jobs_stage_state", "template", "node", "state"),
        Index("ix_jobs_state_newest", "state", "id"),
        Index("ix_jobs_template_newest", "template", "id"),
        Index("ix_jobs_pilot_newest", "pilot_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    workflow_id: Mapped[int] = mapped_column(ForeignKey("workflows.id", ondelete="CASCADE"), index=True)
    template: Mapped[str] = mapped_column(String(128))
    node: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16))
    # Ready to run but over its stage's max_running; enqueued as a slot frees.
    held: Mapped[bool] = mapped_column(Boolean, default=False)
    queue: Mapped[str] = mapped_column(String(128))
    priority: Mapped[int] = mapped_column(Integer)
    deadline: Mapped[float] = mapped_column(Float)
    wall_s: Mapped[float] = mapped_column(Float)
    pilot_id: Mapped[str | None] = mapped_column(String(64))
    exit_code: Mapped[int | None] = mapped_column(Integer)
    log: Mapped[str] = mapped_column(Text, default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float, index=True)
    queued_at: Mapped[float | None] = mapped_column(Float)
    # When the broker confirmed the job's task; NULL while queued means it may never have got there.
    published_at: Mapped[float | None] = mapped_column(Float)
    # sha256 of the secret its task carries; a report about the job must carry the secret.
    token_hash: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[float | None] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float)

    workflow: Mapped[Workflow] = relationship()


class Pilot(Base):
    """A pilot as known from its registration and heartbeats."""

    __tablename__ = "pilots"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), index=True)
    started_at: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float, index=True)  # the dispatcher's clock
    last_sent_at: Mapped[float | None] = mapped_column(Float)  # the pilot's clock, to order its reports
    job_id: Mapped[int | None] = mapped_column(BigInteger)
    jobs_done: Mapped[int] = mapped_column(Integer, default=0)
    problem: Mapped[str] = mapped_column(Text, default="")  # why a broken pilot takes no tasks
    user: Mapped[str] = mapped_column(String(128), default="")  # the broker account it registered with


class WatcherSource(Base):
    """The newest word of a watcher on one of its sources (a SourcesReport), for ``p3s status``."""

    __tablename__ = "watcher_sources"

    host: Mapped[str] = mapped_column(String(255), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    watcher_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    location: Mapped[str] = mapped_column(Text)
    stream: Mapped[str] = mapped_column(String(128))
    fallback_for: Mapped[str] = mapped_column(String(128))
    active: Mapped[bool] = mapped_column(Boolean)
    healthy: Mapped[bool] = mapped_column(Boolean)
    sent_at: Mapped[float] = mapped_column(Float)  # the watcher's clock: orders its reports
    reported_at: Mapped[float] = mapped_column(Float)  # the dispatcher's clock: says how fresh it is


class ResultRecord(Base):
    """What one finished job's results manifest said, tied to its file's run and subrun (migration 0006).

    Denormalised (template, node, file name, times) and without foreign keys
    to jobs, workflows or files: results have their own retention
    (``[results] retention_days``), and the newest of each category outlives
    the purge of its job's records.
    """

    __tablename__ = "results"
    __table_args__ = (Index("ix_results_template_run", "template", "run", "subrun"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[int] = mapped_column(BigInteger, unique=True)  # one result per job: a report twice is one
    workflow_id: Mapped[int] = mapped_column(BigInteger, index=True)
    template: Mapped[str] = mapped_column(String(128))
    node: Mapped[str] = mapped_column(String(128))
    file_name: Mapped[str] = mapped_column(String(512))
    stream: Mapped[str] = mapped_column(String(128))
    run: Mapped[int | None] = mapped_column(BigInteger)
    subrun: Mapped[int | None] = mapped_column(BigInteger)
    seen_at: Mapped[float] = mapped_column(Float)  # the input file's, by the watcher
    recorded_at: Mapped[float] = mapped_column(Float, index=True)  # the dispatcher's clock
    age_s: Mapped[float] = mapped_column(Float)  # recorded_at - seen_at
    budget_s: Mapped[float] = mapped_column(Float)  # the template's, when the workflow was made
    on_time: Mapped[bool] = mapped_column(Boolean)  # age_s <= budget_s
    outdir: Mapped[str] = mapped_column(Text)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON)
    warnings: Mapped[str] = mapped_column(Text, default="")


class ResultMetric(Base):
    """One named number of a result, with the range it was judged by (config over manifest)."""

    __tablename__ = "result_metrics"
    __table_args__ = (Index("ix_result_metrics_history", "template", "name", "result_id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"), index=True)
    template: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(128))
    value: Mapped[float] = mapped_column(Float)
    unit: Mapped[str] = mapped_column(String(32), default="")
    lo: Mapped[float | None] = mapped_column(Float)
    hi: Mapped[float | None] = mapped_column(Float)
    in_range: Mapped[bool | None] = mapped_column(Boolean)  # None: no range to judge by


class ResultFile(Base):
    """A plot or file a result lists: where it is, and its size and sha256 when the job finished."""

    __tablename__ = "result_files"
    __table_args__ = (Index("ix_result_files_category", "template", "category", "result_id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"), index=True)
    template: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(8))  # plot or file
    path: Mapped[str] = mapped_column(String(1024))  # relative to the result's outdir
    category: Mapped[str] = mapped_column(String(128))
    caption: Mapped[str] = mapped_column(String(512), default="")
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), default="")


class Alarm(Base):
    """A metric of a template out of its range: raised by one result, cleared by a later one in range."""

    __tablename__ = "alarms"

    template: Mapped[str] = mapped_column(String(128), primary_key=True)
    metric: Mapped[str] = mapped_column(String(128), primary_key=True)
    raised: Mapped[bool] = mapped_column(Boolean, index=True)
    value: Mapped[float] = mapped_column(Float)
    lo: Mapped[float | None] = mapped_column(Float)
    hi: Mapped[float | None] = mapped_column(Float)
    result_id: Mapped[int] = mapped_column(BigInteger)  # the result that last decided it (no key: purged later)
    # When the input file of that result was seen: a result of an older file arriving late decides nothing.
    seen_at: Mapped[float] = mapped_column(Float)
    raised_at: Mapped[float | None] = mapped_column(Float)
    cleared_at: Mapped[float | None] = mapped_column(Float)


def normalise_url(url: str) -> str:
    """Use psycopg (version 3) for PostgreSQL URLs that name no driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _sqlite_dir(url: str) -> None:
    parsed = make_url(normalise_url(url))
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


def make_engine(url: str, echo: bool = False, pre_ping: bool = True) -> Engine:
    """An engine for ``url``; for SQLite, WAL mode so readers never block the dispatcher.

    ``pre_ping``: test a pooled connection with a round trip each time it is
    taken, so a connection the server dropped is replaced before use.  The
    dispatcher does without: it takes a connection for every batch, and a
    batch that finds its connection dead is kept and tried again on a fresh
    one anyway (``DatabaseLost``), so the ping would only add a round trip
    to every transaction.
    """
    url = normalise_url(url)
    if make_url(url).get_backend_name() == "sqlite":
        _sqlite_dir(url)
        engine = create_engine(url, echo=echo, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, echo=echo, pool_pre_ping=pre_ping)


def _alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.attributes["url"] = normalise_url(url)
    return cfg


# SQLSTATEs that no waiting can cure: refused credentials, a database that does not exist.
REFUSED_SQLSTATES = frozenset({"28000", "28P01", "3D000"})
# libpq reports a refusal during the connection phase as text only (psycopg sets no
# sqlstate then): the server's FATAL messages for the same cases.
_REFUSED_TEXT = re.compile(
    r'FATAL:\s+(password authentication failed|role "[^"]*" does not exist|database "[^"]*" does not exist'
    r"|no pg_hba\.conf entry|Ident authentication failed|Peer authentication failed)"
)


def refused(exc: BaseException) -> bool:
    """True if the database answered and refused us (credentials, database name), as opposed to not answering."""
    orig = getattr(exc, "orig", exc)
    return getattr(orig, "sqlstate", None) in REFUSED_SQLSTATES or bool(_REFUSED_TEXT.search(str(orig)))


# Any fixed number: every p3s process asks PostgreSQL for the same lock.
_UPGRADE_LOCK = 0x7033735F7363686D  # "p3s_schm"


def upgrade(url: str, revision: str = "head") -> None:
    """Create or upgrade the schema at ``url`` to ``revision`` with Alembic.

    On PostgreSQL the upgrade runs under an advisory lock, so two dispatchers
    starting together on a new database take turns: the second finds the
    schema made and has nothing to do, instead of failing on a table the
    first one created an instant before.

    Raises DatabaseRefused where the server refused the credentials or the
    database name, DatabaseUnavailable where it could not be reached, and
    ConfigError for a URL no driver understands.
    """
    from alembic import command

    _sqlite_dir(url)
    masked = make_url(normalise_url(url)).render_as_string(hide_password=True)
    lock_engine = None
    try:
        if make_url(normalise_url(url)).get_backend_name() == "postgresql":
            from sqlalchemy import text
            from sqlalchemy.pool import NullPool

            lock_engine = create_engine(normalise_url(url), poolclass=NullPool)
            with lock_engine.connect() as lock:
                # A session-level lock, held by this connection while Alembic works on its own.
                lock.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _UPGRADE_LOCK})
                try:
                    command.upgrade(_alembic_config(url), revision)
                finally:
                    lock.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _UPGRADE_LOCK})
                    lock.commit()
        else:
            command.upgrade(_alembic_config(url), revision)
    except sqlalchemy.exc.OperationalError as exc:
        if refused(exc):
            raise DatabaseRefused(f"the database at {masked} refused the connection: {exc.orig}") from exc
        raise DatabaseUnavailable(f"cannot reach the database at {masked}: {exc.orig}") from exc
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError) as exc:
        raise ConfigError(f"database URL {masked} is not one p3s can use: {exc}") from exc
    finally:
        if lock_engine is not None:
            lock_engine.dispose()


def check_schema(url: str) -> None:
    """Make sure the schema at ``url`` is the one this p3s knows, changing nothing.

    For commands that only read or edit records: they never create or upgrade
    the schema (``p3s db upgrade`` does), and on an empty or outdated database
    they raise DatabaseUnavailable saying so.  An SQLite file that does not
    exist is not created.
    """
    from sqlalchemy import text
    from sqlalchemy.pool import NullPool

    parsed = make_url(normalise_url(url))
    masked = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        if not Path(parsed.database).is_file():
            raise schema.missing_file(masked)
    try:
        engine = create_engine(normalise_url(url), poolclass=NullPool, **_connect_timeout(parsed))
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError) as exc:
        raise ConfigError(f"database URL {masked} is not one p3s can use: {exc}") from exc
    try:
        with engine.connect() as conn:
            try:
                current = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            except (sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError) as exc:
                if _no_table(exc):
                    current = None
                else:
                    raise
    except sqlalchemy.exc.OperationalError as exc:
        if refused(exc):
            raise DatabaseRefused(f"the database at {masked} refused the connection: {exc.orig}") from exc
        raise DatabaseUnavailable(f"cannot reach the database at {masked}: {exc.orig}") from exc
    finally:
        engine.dispose()
    schema.require_current(masked, current)


def _no_table(exc: BaseException) -> bool:
    text = str(getattr(exc, "orig", exc))
    return "no such table" in text or "does not exist" in text or getattr(
        getattr(exc, "orig", None), "sqlstate", None
    ) == "42P01"


def _connect_timeout(parsed: Any) -> dict[str, Any]:
    """A deadline on connecting, so a command never hangs on a server that does not answer."""
    if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
        return {"connect_args": {"connect_timeout": 5}}
    return {}


def current_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config("sqlite://"))
    head = script.get_current_head()
    assert head is not None
    return head
