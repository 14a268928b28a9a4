"""``p3s purge``: delete old records, outputs and logs, in short transactions.

Each batch of files is deleted in a transaction of its own (jobs, then
workflows, then files, explicitly: SQLite honours ON DELETE CASCADE only with
its foreign-keys pragma on, and an explicit order works everywhere), so the
dispatcher, writing new rows at the same time, never waits long on a lock.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, exists, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from p3s.db import FileRecord, Job, Pilot, StagePriority, TemplateRecord, Workflow
from p3s.errors import ConfigError
from p3s.results.retention import protected_workflows, purge_results
from p3s.states import PilotState, WorkflowState

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 5000
# Bound on the bind parameters of one IN list: SQLite allows 32 766 per
# statement and PostgreSQL 65 535, whatever the batch size asked for.
IN_CHUNK = 1000

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Seconds in ``30d``, ``12h``, ``90m``, ``3600s`` or a bare number of seconds."""
    match = _DURATION_RE.fullmatch(text)
    if not match:
        raise ConfigError(f"not a duration: {text!r} (expected e.g. 30d, 12h, 90m or 3600s)")
    seconds = float(match.group(1)) * _UNITS[(match.group(2) or "s").lower()]
    if seconds <= 0:
        raise ConfigError(f"a duration must be positive, got {text!r}")
    return seconds


@dataclass
class PurgeCounts:
    """What a purge removed (or, on a dry run, would remove), and what it set out to."""

    dry_run: bool = False
    cutoff: float = 0.0
    files: int = 0
    workflows: int = 0
    jobs: int = 0
    pilots: int = 0
    templates: int = 0
    output_dirs: int = 0
    log_files: int = 0
    log_dirs: int = 0
    results: int = 0  # DQM result records, and the files they list deleted ([results] delete_files)
    result_files: int = 0
    batches: int = 0
    total: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Progress = Callable[[PurgeCounts], None]


def _chunks(ids: Sequence[int]) -> Iterable[Sequence[int]]:
    for i in range(0, len(ids), IN_CHUNK):
        yield ids[i : i + IN_CHUNK]


def _old_files(cutoff: float) -> Any:
    """Files received before ``cutoff`` none of whose workflows still runs."""
    running = exists().where(Workflow.file_id == FileRecord.id, Workflow.state == WorkflowState.RUNNING)
    return select(FileRecord.id).where(FileRecord.received_at < cutoff, ~running)


def count_old(session: Session, cutoff: float) -> dict[str, int]:
    """How many files, workflows and jobs a purge at ``cutoff`` would delete."""
    old = _old_files(cutoff).subquery()
    wf = select(Workflow.id).where(Workflow.file_id.in_(select(old.c.id))).subquery()
    return {
        "files": session.scalar(select(func.count()).select_from(old)) or 0,
        "workflows": session.scalar(select(func.count()).select_from(wf)) or 0,
        "jobs": session.scalar(select(func.count(Job.id)).where(Job.workflow_id.in_(select(wf.c.id)))) or 0,
    }


def _purge_batch(session: Session, file_ids: Sequence[int], dry_run: bool) -> tuple[list[int], int, int]:
    """Delete one batch of files with their workflows and jobs; (workflow ids, workflows, jobs)."""
    wf_ids: list[int] = []
    for chunk in _chunks(file_ids):
        wf_ids += session.scalars(select(Workflow.id).where(Workflow.file_id.in_(chunk))).all()
    jobs = 0
    for chunk in _chunks(wf_ids):
        if dry_run:
            jobs += session.scalar(select(func.count(Job.id)).where(Job.workflow_id.in_(chunk))) or 0
        else:
            result: Any = session.execute(delete(Job).where(Job.workflow_id.in_(chunk)))
            jobs += result.rowcount
    if not dry_run:
        for chunk in _chunks(wf_ids):
            session.execute(delete(Workflow).where(Workflow.id.in_(chunk)))
        for chunk in _chunks(file_ids):
            session.execute(delete(FileRecord).where(FileRecord.id.in_(chunk)))
    return wf_ids, len(wf_ids), jobs


def _under(root: Path, name: str) -> Path | None:
    """``root/name`` if it is a direct child of ``root`` (no '..', no separators)."""
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        return None
    return root / name


def _remove_tree(path: Path) -> bool:
    """Remove ``path`` without following a symlink: a link is unlinked, never its target."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        path.unlink(missing_ok=True)
        return True
    # rmtree unlinks symlinks found inside instead of descending into them.
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=_log_rm_error)
    else:
        shutil.rmtree(path, onerror=lambda f, p, info: _log_rm_error(f, p, info[1]))
    return True


def _log_rm_error(_func: Any, path: str, exc: BaseException) -> None:
    if not isinstance(exc, FileNotFoundError):
        log.warning("purge: cannot remove %s: %s", path, exc)


def _remove_workflow_dirs(root: Path, wf_ids: Iterable[int], dry_run: bool) -> int:
    """Remove ``root/<id>`` of each workflow id; how many there were."""
    found = 0
    for wf_id in wf_ids:
        path = _under(root, str(wf_id))
        if path is None or not os.path.lexists(path):
            continue
        found += 1
        if not dry_run:
            _remove_tree(path)
    return found


def _old_logs_in(directory: Path, cutoff: float, dry_run: bool) -> tuple[int, int]:
    """Remove files older than ``cutoff`` under ``directory``; (removed, left)."""
    removed = left = 0
    # os.walk does not descend into symlinked directories (followlinks=False):
    # such a link is counted as left, and a symlinked file is unlinked by its
    # own age, never through its target.
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=False):
        here = Path(dirpath)
        left += sum(1 for d in dirnames if os.path.islink(here / d))
        for name in filenames:
            path = here / name
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if st.st_mtime >= cutoff:
                left += 1
                continue
            removed += 1
            if not dry_run:
                path.unlink(missing_ok=True)
    return removed, left


def _purge_old_logs(session: Session, log_root: Path, cutoff: float, dry_run: bool, skip: set[int]) -> tuple[int, int]:
    """Remove log files older than ``cutoff`` under ``log_root``, and per-workflow directories left empty.

    A directory goes only when it names no workflow still in the database: a
    pilot creates the directory of a new workflow just before its log file,
    and must not find it gone in between.  ``skip``: workflow directories a
    dry run counted already, as going with their workflow.
    """
    if not log_root.is_dir():
        return 0, 0
    files = 0
    emptied: dict[int, Path] = {}
    with os.scandir(log_root) as it:
        entries = list(it)
    for entry in entries:
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            if entry.name.isdigit() and int(entry.name) in skip:
                continue
            removed, left = _old_logs_in(path, cutoff, dry_run)
            files += removed
            if not left and entry.name.isdigit():
                emptied[int(entry.name)] = path
        elif entry.stat(follow_symlinks=False).st_mtime < cutoff:
            files += 1
            if not dry_run:
                path.unlink(missing_ok=True)
    live: set[int] = set()
    for chunk in _chunks(sorted(emptied)):
        live.update(session.scalars(select(Workflow.id).where(Workflow.id.in_(chunk))).all())
    dirs = 0
    for wf_id, path in emptied.items():
        if wf_id in live:
            continue
        dirs += 1
        if not dry_run:
            _remove_tree(path)
    return files, dirs


def purge(
    engine: Engine,
    cutoff: float,
    output_root: Path | None = None,
    log_root: Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dry_run: bool = False,
    progress: Progress | None = None,
    results_cutoff: float | None = None,
    delete_result_files: bool = False,
) -> PurgeCounts:
    """Delete records older than ``cutoff`` (epoch seconds), batch by batch; return the counts.

    Files received before the cutoff go with their workflows and jobs unless a
    workflow of theirs still runs; pilots last seen before the cutoff go
    unless idle or busy; deleted template versions go once no workflow points
    at them.  Output directories of purged workflows under ``output_root`` and
    log files older than the cutoff under ``log_root`` are removed as well,
    but for the output directories that hold the files of results still on
    record (see :mod:`p3s.results.retention`).  With ``results_cutoff``,
    result records older than it go too (and, with ``delete_result_files``,
    the files they list), always keeping the newest of each category.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    counts = PurgeCounts(dry_run=dry_run, cutoff=cutoff)
    with Session(engine) as s:
        counts.total = count_old(s, cutoff)
        protected = protected_workflows(s, cutoff if results_cutoff is None else results_cutoff, delete_result_files)

    # Keyset pagination on the file id: each batch starts after the last id of
    # the one before, so a dry run (which deletes nothing) also moves on, and
    # no batch rescans rows already dealt with.
    after = 0
    would_go: set[int] = set()  # a dry run's purged workflows, whose logs it must not count twice
    while True:
        with Session(engine) as s, s.begin():
            file_ids = list(
                s.scalars(_old_files(cutoff).where(FileRecord.id > after).order_by(FileRecord.id).limit(batch_size))
            )
            if not file_ids:
                break
            wf_ids, n_wf, n_jobs = _purge_batch(s, file_ids, dry_run)
        # Only once the rows are gone: a directory removed before a failed
        # commit would leave records pointing at nothing.
        if output_root is not None:
            counts.output_dirs += _remove_workflow_dirs(output_root, [w for w in wf_ids if w not in protected],
                                                        dry_run)
        if log_root is not None:
            counts.log_dirs += _remove_workflow_dirs(log_root, wf_ids, dry_run)
        if dry_run:
            would_go.update(wf_ids)
        after = file_ids[-1]
        counts.files += len(file_ids)
        counts.workflows += n_wf
        counts.jobs += n_jobs
        counts.batches += 1
        if progress is not None:
            progress(counts)

    with Session(engine) as s, s.begin():
        counts.pilots = _purge_pilots(s, cutoff, dry_run)
        counts.templates = _purge_templates(s, cutoff, dry_run)
    if results_cutoff is not None:
        # After the workflows: a result whose files stay waits for its workflow's records to go.
        gone = purge_results(engine, results_cutoff, delete_result_files, dry_run, batch_size)
        counts.results, counts.result_files = gone.results, gone.result_files
    if log_root is not None:
        with Session(engine) as s:
            files, dirs = _purge_old_logs(s, log_root, cutoff, dry_run, would_go)
        counts.log_files += files
        counts.log_dirs += dirs
    log.info(
        "purge%s: %d files, %d workflows, %d jobs, %d pilots, %d templates, %d output dirs, "
        "%d log files, %d results, %d result files in %d batch(es)",
        " (dry run)" if dry_run else "",
        counts.files,
        counts.workflows,
        counts.jobs,
        counts.pilots,
        counts.templates,
        counts.output_dirs,
        counts.log_files,
        counts.results,
        counts.result_files,
        counts.batches,
    )
    return counts


def _purge_pilots(session: Session, cutoff: float, dry_run: bool) -> int:
    old = (Pilot.last_seen < cutoff, Pilot.state.not_in([PilotState.IDLE, PilotState.BUSY]))
    if dry_run:
        return session.scalar(select(func.count()).select_from(Pilot).where(*old)) or 0
    result: Any = session.execute(delete(Pilot).where(*old))
    return int(result.rowcount)


def _purge_templates(session: Session, cutoff: float, dry_run: bool) -> int:
    used = exists().where(Workflow.template_id == TemplateRecord.id)
    if dry_run:
        # The workflows a real run would have deleted by now do not count.
        used = used.where(Workflow.file_id.not_in(_old_files(cutoff)))
    old = (TemplateRecord.deleted_at.is_not(None), TemplateRecord.deleted_at < cutoff, ~used)
    if dry_run:
        return session.scalar(select(func.count()).select_from(TemplateRecord).where(*old)) or 0
    result: Any = session.execute(delete(TemplateRecord).where(*old))
    # A stage priority of a name with no version left would surprise whoever
    # imports a new template of that name one day.
    named = exists().where(TemplateRecord.name == StagePriority.template)
    session.execute(delete(StagePriority).where(~named))
    return int(result.rowcount)
