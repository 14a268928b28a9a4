"""Results' part of ``p3s purge``: old result records and, where the config allows, the files they list.

The newest result of each category of each template (and the newest of each
template, for results with numbers only) is always kept, however old, so the
results page never goes blank.  With ``[results] delete_files = false``, no
file a result lists is ever deleted: the output directories of workflows with
results are left in place, and a result record goes only once its workflow's
records have gone.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete, exists, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from p3s.db import ResultFile, ResultMetric, ResultRecord, Workflow
from p3s.results.manifest import resolve_entry
from p3s.results.query import chunks

log = logging.getLogger(__name__)


@dataclass
class ResultsPurged:
    results: int = 0
    result_files: int = 0  # files on disk deleted (or, on a dry run, that would be)


def kept_results(session: Session) -> set[int]:
    """Ids of the results purge never removes: the newest of each template's categories, and of each template."""
    by_category = select(func.max(ResultFile.result_id)).group_by(ResultFile.template, ResultFile.category)
    by_template = select(func.max(ResultRecord.id)).group_by(ResultRecord.template)
    return set(session.scalars(by_category)) | set(session.scalars(by_template))


def protected_workflows(session: Session, cutoff: float, delete_files: bool) -> set[int]:
    """Workflows whose output directories the records' purge must leave: their results' files live there.

    Without ``delete_files``, every workflow with a result; with it, those of
    results kept or younger than ``cutoff``.
    """
    if not delete_files:
        return set(session.scalars(select(ResultRecord.workflow_id).distinct()))
    kept = sorted(kept_results(session))
    young = set(session.scalars(select(ResultRecord.workflow_id).where(ResultRecord.recorded_at >= cutoff)
                                .distinct()))
    for chunk in chunks(kept):
        young.update(session.scalars(select(ResultRecord.workflow_id).where(ResultRecord.id.in_(chunk))))
    return young


def _unlink_listed(outdir: str, path: str) -> bool:
    """Delete one listed file if it is still a regular file inside ``outdir`` (never through a symlink)."""
    real, _why = resolve_entry(outdir, path)
    if real is None:
        return False
    try:
        st = os.lstat(Path(outdir) / path)
        if not stat.S_ISREG(st.st_mode):
            return False
        os.unlink(Path(outdir) / path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("purge: cannot remove result file %s/%s: %s", outdir, path, exc.strerror)
        return False
    return True


def purge_results(engine: Engine, cutoff: float, delete_files: bool, dry_run: bool = False,
                  batch_size: int = 5000) -> ResultsPurged:
    """Remove result records older than ``cutoff`` but the kept ones, batch by batch; with ``delete_files``,
    their listed files too, once the records are gone."""
    counts = ResultsPurged()
    with Session(engine) as s:
        kept = kept_results(s)
    after = 0
    while True:
        with Session(engine) as s, s.begin():
            query = select(ResultRecord.id, ResultRecord.outdir).where(
                ResultRecord.recorded_at < cutoff, ResultRecord.id > after)
            if not delete_files:
                # Its files stay, so the record waits for its workflow: the records' purge leaves
                # the directory of a workflow with results, and must not find it without them.
                query = query.where(~exists().where(Workflow.id == ResultRecord.workflow_id))
            rows = s.execute(query.order_by(ResultRecord.id).limit(batch_size)).all()
            if not rows:
                break
            after = rows[-1][0]
            ids = [rid for rid, _ in rows if rid not in kept]
            outdirs = {rid: outdir for rid, outdir in rows}
            listed: list[tuple[str, str]] = []
            for chunk in chunks(ids):
                if delete_files:
                    listed += [(outdirs[rid], path) for rid, path in
                               s.execute(select(ResultFile.result_id, ResultFile.path)
                                         .where(ResultFile.result_id.in_(chunk)))]
                if not dry_run:
                    s.execute(delete(ResultMetric).where(ResultMetric.result_id.in_(chunk)))
                    s.execute(delete(ResultFile).where(ResultFile.result_id.in_(chunk)))
                    s.execute(delete(ResultRecord).where(ResultRecord.id.in_(chunk)))
        counts.results += len(ids)
        # Only once the records are gone: a file removed before a failed commit would leave a record of nothing.
        for outdir, path in listed:
            if dry_run:
                counts.result_files += resolve_entry(outdir, path)[0] is not None
            else:
                counts.result_files += _unlink_listed(outdir, path)
    return counts
