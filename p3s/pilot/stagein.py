"""Copy a job's input into its work directory before the payload starts.

The copy is a subprocess (``xrdcp`` for ``root://`` URLs, ``cp`` for a path),
waited for in slices like a payload: the pilot's heartbeats go on while a large
file or a slow mount is read, and at its deadline the copy is killed and the
job fails with a reason that says so.  A copy in a thread could not be stopped
on a hung mount or a pipe that never ends.  Under ``pilot.payload_user`` the
copy runs as the payload's user: a root pilot reads nothing on a payload's
behalf that the payload could not read itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol

from p3s.messages import Task

if TYPE_CHECKING:
    from p3s.pilot.contain import Containment
    from p3s.pilot.identity import RunAs

STAGE_IN_TIMEOUT_S = 600.0
SLICE_S = 0.5


class StageInError(OSError):
    """The input could not be copied into the work directory."""


class StageIn(Protocol):
    def __call__(
        self,
        task: Task,
        workdir: str,
        values: dict[str, str | list[str]],
        between_slices: Callable[[], None],
        contain: Containment | None = None,
        *,
        run_as: RunAs | None = None,
    ) -> None: ...


def stage_in_timeout(task: Task, now: float | None = None) -> float:
    """How long a stage-in may take: within the job's wall limit and its deadline, at most 600 s."""
    left = task.deadline - (time.time() if now is None else now)
    return max(1.0, min(STAGE_IN_TIMEOUT_S, task.wall_s, left))


def stage_in(
    task: Task,
    workdir: str,
    values: dict[str, str | list[str]],
    between_slices: Callable[[], None] = lambda: None,
    contain: Containment | None = None,
    timeout_s: float | None = None,
    *,
    run_as: RunAs | None = None,
) -> None:
    """Copy ``values['input']`` into ``workdir`` and point ``{input}`` at the copy.

    ``root://`` URLs go through ``xrdcp``; anything else is a path.  The copy
    lives in the work directory, so it goes when the work directory goes.
    """
    source = str(values.get("input", ""))
    name = PurePosixPath(source.split("?", 1)[0]).name or f"input-{task.job_id}"
    target = Path(workdir) / name
    timeout_s = stage_in_timeout(task) if timeout_s is None else timeout_s
    if source.startswith(("root://", "xroot://")):
        argv = ["xrdcp", "--nopbar", "--force", source, str(target)]
    else:
        argv = ["cp", "--", source, str(target)]
    _copy(argv, source, timeout_s, between_slices, contain, run_as)
    values["input"] = str(target)


def _copy(
    argv: list[str],
    source: str,
    timeout_s: float,
    between_slices: Callable[[], None],
    contain: Containment | None,
    run_as: RunAs | None = None,
) -> None:
    env = dict(os.environ) if contain is None else contain.environ(dict(os.environ))
    # The pilot's own settings (broker URL, passwords) are not the copy's business.
    for key in [k for k in env if k.startswith("P3S_") and k != "P3S_PAYLOAD_MARK"]:
        del env[key]
    as_user: dict[str, Any] = {}
    if run_as is not None:
        env.update(run_as.environ())
        as_user = {"user": run_as.uid, "group": run_as.gid, "extra_groups": []}
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=env, start_new_session=True, **as_user)
    except OSError as exc:
        raise StageInError(f"stage-in of {source} failed: cannot run {argv[0]}: {exc.strerror}") from exc
    end = time.monotonic() + timeout_s
    err = b""
    try:
        while True:
            try:
                _out, err = proc.communicate(timeout=max(0.0, min(SLICE_S, end - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= end:
                    raise StageInError(f"stage-in of {source} timed out after {timeout_s:g}s") from None
                between_slices()
    finally:
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            # A copy stuck on a hung mount may not die at once; the job's
            # containment sweeps it later, the pilot does not wait for it here.
            try:
                proc.communicate(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
    if proc.returncode != 0:
        detail = err.decode(errors="replace").strip() or f"exit code {proc.returncode}"
        raise StageInError(f"stage-in of {source} failed: {detail}")
