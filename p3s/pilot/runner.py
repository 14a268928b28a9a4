"""Run one payload: its own work directory and process group, a wall-clock limit, a log file.

The payload is an argv list, never given to a shell.  It is waited for in
slices; between slices the pilot sends heartbeats.  At the wall limit the whole
process group, and every process the payload started (see
:mod:`p3s.pilot.contain`), gets SIGTERM, then SIGKILL after a grace period;
at the end of the job whatever is left gets SIGKILL, so nothing the payload
started outlives it.

A pilot started as root with ``pilot.payload_user`` runs the payload (and its
stage-in copy) as that user and its primary group, in a work directory and an
output directory made that user's; the log file stays the pilot's, opened by
the pilot and handed to the payload as its standard output.
"""

from __future__ import annotations

import ctypes
import dataclasses
import ctypes.util
import errno
import functools
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from p3s.dagengine import expand, expand_env
from p3s.messages import Task
from p3s.pilot.contain import Containment
from p3s.pilot.identity import RunAs
from p3s.pilot.stagein import StageIn, StageInError
from p3s.states import JobState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """How a payload ended."""

    state: JobState
    exit_code: int | None
    started_at: float | None
    ended_at: float
    log: str
    reason: str = ""
    ran_s: float | None = None  # how long the payload ran, by the monotonic clock


@dataclass(frozen=True)
class KillRequest:
    """Why a running payload must end now, and the state its job then ends in (an operator's stop or cancel).

    Unlike a second SIGTERM (kill at once), the payload gets its grace: TERM,
    ``kill_grace_s``, then KILL, to every process it contains.
    """

    state: JobState
    reason: str


PR_SET_PDEATHSIG = 1


@functools.cache
def _pdeathsig() -> tuple[list[str], Callable[[], None] | None]:
    """How to have the kernel SIGKILL a payload whose pilot dies: an argv prefix or a preexec hook.

    Without it a pilot killed by SIGKILL (or the OOM killer) leaves its payload
    running on the node, unseen, while the dispatcher calls the job lost.
    util-linux's setpriv does it with one more exec; a Python preexec hook
    forces a full fork of the pilot instead of a vfork, which costs
    milliseconds on every start, so it is the fallback.
    """
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "KILL", "--"], None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return [], None
    prctl = libc.prctl

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return [], hook


def _launch(run_as: RunAs | None) -> tuple[list[str], Callable[[], None] | None, dict[str, Any]]:
    """The argv prefix, preexec hook and Popen arguments that start a payload as ``run_as`` (None: as the pilot).

    With setpriv, one exec changes the user, then sets the parent-death
    signal: the kernel clears that signal when the user changes, so the order
    matters (setpriv applies its options in that order whatever the order on
    its command line).  Without it, Popen changes the user and the hook runs
    after.  The cgroup prefix runs before either, as the pilot: the payload's
    user may not write to the cgroup.
    """
    prefix, hook = _pdeathsig()
    if run_as is None:
        return prefix, hook, {}
    if prefix:
        drop = [f"--reuid={run_as.uid}", f"--regid={run_as.gid}", "--clear-groups"]
        return [prefix[0], *drop, *prefix[1:]], None, {}
    return [], hook, {"user": run_as.uid, "group": run_as.gid, "extra_groups": []}


def _startable(program: str, env: dict[str, str]) -> str | None:
    """Why ``program`` cannot be started, or None (checked here: behind setpriv it would be its error)."""
    if "/" in program:
        return None if os.access(program, os.X_OK) and os.path.isfile(program) else "not an executable file"
    return None if shutil.which(program, path=env.get("PATH")) else "not found on PATH"


def killpg(pgid: int, sig: int) -> bool:
    """Signal a process group; False if it is already gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError as exc:  # a zombie group on some kernels
        if exc.errno == errno.EPERM:
            return False
        raise
    return True


def group_alive(pgid: int) -> bool:
    return killpg(pgid, 0)


def terminate_group(proc: subprocess.Popen[bytes], grace_s: float, contain: Containment | None = None) -> None:
    """SIGTERM the payload and all its processes, wait up to ``grace_s``, then SIGKILL whatever is left."""
    killpg(proc.pid, signal.SIGTERM)
    if contain is not None:
        contain.signal(signal.SIGTERM)
    end = time.monotonic() + grace_s
    while time.monotonic() < end:
        if proc.poll() is not None and not group_alive(proc.pid) and (contain is None or not contain.members()):
            return
        time.sleep(0.05)
    killpg(proc.pid, signal.SIGKILL)
    if contain is not None:
        contain.kill()
    proc.wait()


def payload_values(task: Task, workdir: str) -> dict[str, str | list[str]]:
    values: dict[str, str | list[str]] = {k: v for k, v in task.values.items() if isinstance(v, str | list)}
    values["workdir"] = workdir
    return values


def payload_env(task: Task, values: dict[str, str | list[str]], run_as: RunAs | None = None) -> dict[str, str]:
    """The payload's environment: the pilot's, its user's HOME, the P3S_* values, then the node's ``env``.

    Nothing of the task but its placeholder values and these fields: not its
    token, which proves the pilot's reports and is not the payload's to know.
    """
    env = dict(os.environ)
    # The pilot's own secrets (broker URL and passwords) are not the payload's business.
    for key in [k for k in env if k.startswith("P3S_")]:
        del env[key]
    if run_as is not None:
        env.update(run_as.environ())
    parents = values.get("parent_outdirs", [])
    env.update(
        {
            "P3S_INPUT": str(values.get("input", "")),
            "P3S_INPUT_NAME": str(values.get("input_name", "")),
            "P3S_JOB_ID": str(task.job_id),
            "P3S_WORKFLOW_ID": str(task.workflow_id),
            "P3S_WORKDIR": str(values["workdir"]),
            "P3S_OUTDIR": str(values.get("outdir", "")),
            "P3S_PARENT_OUTDIRS": ":".join(parents) if isinstance(parents, list) else str(parents),
            "P3S_NODE": task.node,
            "P3S_TEMPLATE": task.template,
            "P3S_DEADLINE": f"{task.deadline:.3f}",
        }
    )
    env.update(expand_env(task.env, values))
    return env


def log_path(log_root: Path, task: Task) -> Path:
    return log_root / str(task.workflow_id) / f"{task.job_id}-{task.node}.log"


def outside_output_root(outdir: str, output_root: str) -> str:
    """Why ``outdir`` (the dispatcher's path) cannot be this pilot's, or "" when it lies under ``output_root``.

    The dispatcher names every output directory under its own output root,
    and a pilot on another host writes there; if the two settings differ,
    the outputs would land where this host alone sees them (its local disk,
    say), and the jobs after it, ``p3s purge`` and the operator's host would
    never find them.  An empty ``output_root`` (not set for this pilot) checks
    nothing.
    """
    if not output_root:
        return ""
    root = os.path.normpath(os.path.expanduser(output_root))
    if os.path.commonpath([root, os.path.normpath(outdir)]) == root:
        return ""
    return (f"its output directory {outdir} is not under this pilot's output_root {root}: the dispatcher and "
            "every pilot must name the same shared storage, at the same path")


class PrepareError(Exception):
    """A job could not be prepared; the message is the reason reported for it."""


@contextmanager
def _step(what: str) -> Iterator[None]:
    """Turn an OSError while doing ``what`` into a PrepareError naming both."""
    try:
        yield
    except OSError as exc:
        raise PrepareError(f"{describe(exc)} {what}") from exc


def describe(exc: OSError) -> str:
    """``no space left on device``, ``read-only file system``: the error's text, in lower case."""
    if exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


def exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def run_payload(
    task: Task,
    *,
    work_root: str | None,
    log_root: Path,
    on_start: Callable[[float], None],
    between_slices: Callable[[], None],
    kill_requested: Callable[[], bool | KillRequest | None],
    kill_grace_s: float = 5.0,
    slice_s: float = 1.0,
    stage_in: StageIn | None = None,
    contain: Containment | None = None,
    run_as: RunAs | None = None,
    output_root: str = "",
) -> Outcome:
    """Run ``task``'s payload to its end, its wall limit, or a kill request; clean up after it.

    Whatever fails while the job is prepared (a full or read-only disk, a
    missing input) ends it ``failed`` with a reason that names the cause; no
    OSError leaves this function.  With ``run_as`` the payload runs as that
    user, in a work and an output directory made its own.  With
    ``output_root`` (the pilot's own setting, when it names one), a job whose
    output directory lies elsewhere fails before anything is made.
    """
    contain = contain or Containment("pilot", task.job_id)
    root = work_root or tempfile.gettempdir()
    logfile = log_path(log_root, task)
    workdir: str | None = None
    try:
        with _step(f"creating the work directory under {root}"):
            if work_root:
                Path(work_root).mkdir(parents=True, exist_ok=True)
            workdir = tempfile.mkdtemp(prefix=f"p3s-job{task.job_id}-", dir=work_root or None)
        if run_as is not None:
            with _step(f"giving the work directory {workdir} to user {run_as.name}"):
                run_as.give(workdir)
        values = payload_values(task, workdir)
        outdir = values.get("outdir")
        if isinstance(outdir, str) and outdir:
            elsewhere = outside_output_root(outdir, output_root)
            if elsewhere:
                raise PrepareError(elsewhere)
            with _step(f"creating the output directory {outdir}"):
                Path(outdir).mkdir(parents=True, exist_ok=True)
            if run_as is not None:
                with _step(f"giving the output directory {outdir} to user {run_as.name}"):
                    run_as.give(outdir)
        if run_as is not None:
            for where in (workdir, outdir):
                closed = run_as.can_enter(where) if isinstance(where, str) and where else ""
                if closed:
                    raise PrepareError(f"payload user {run_as.name} may not enter {closed}, on the way to {where}")
        with _step(f"creating the log directory {logfile.parent}"):
            logfile.parent.mkdir(parents=True, exist_ok=True)
        if stage_in is not None and task.stage_in:
            try:
                stage_in(task, workdir, values, between_slices, contain, run_as=run_as)
            except OSError as exc:  # StageInError among them
                raise PrepareError(str(exc) if isinstance(exc, StageInError) else f"stage-in: {describe(exc)}") from exc
        argv = expand(task.argv, values)
        env = contain.environ(payload_env(task, values, run_as))
        with _step(f"opening the log file {logfile}"):
            out = open(logfile, "wb")  # noqa: SIM115 -- closed below, after the start
        with out:
            prefix, hook, as_user = _launch(run_as)
            why = _startable(argv[0], env)
            if why is not None:
                _note(out, f"p3s: cannot start {argv[0]!r}: {why}\n")
                return Outcome(
                    JobState.FAILED, None, None, time.time(), str(logfile), f"cannot start {argv[0]!r}: {why}"
                )
            try:
                proc = subprocess.Popen(
                    [*contain.prefix(), *prefix, *argv],
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group, so killpg reaches grandchildren
                    preexec_fn=hook,
                    **as_user,
                )
            except OSError as exc:
                _note(out, f"p3s: cannot start {argv[0]!r}: {exc.strerror}\n")
                return Outcome(
                    JobState.FAILED, None, None, time.time(), str(logfile), f"cannot start {argv[0]!r}: {exc.strerror}"
                )
            contain.attach(proc)
        started, began = time.time(), time.monotonic()
        on_start(started)
        outcome = _wait(task, proc, started, str(logfile), between_slices, kill_requested, kill_grace_s, slice_s,
                        contain)
        return dataclasses.replace(outcome, ran_s=time.monotonic() - began)
    except PrepareError as exc:
        log.warning("job %s: not started: %s", task.job_id, exc)
        return Outcome(JobState.FAILED, None, None, time.time(), str(logfile) if logfile.exists() else "", str(exc))
    finally:
        # Whatever the payload (or a stage-in copy) left running goes with the job.
        if contain.close():
            log.info("job %s: killed what the payload left running", task.job_id)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _note(out: IO[bytes], text: str) -> None:
    """A line of p3s's own in the job's log, if the disk takes it."""
    try:
        out.write(text.encode())
        out.flush()
    except OSError as exc:
        log.warning("cannot write to the job log %s: %s", out.name, describe(exc))


def _wait(
    task: Task,
    proc: subprocess.Popen[bytes],
    started: float,
    logfile: str,
    between_slices: Callable[[], None],
    kill_requested: Callable[[], bool | KillRequest | None],
    kill_grace_s: float,
    slice_s: float,
    contain: Containment,
) -> Outcome:
    limit = time.monotonic() + task.wall_s
    try:
        while True:
            left = limit - time.monotonic()
            try:
                code = proc.wait(timeout=max(0.0, min(slice_s, left)))
            except subprocess.TimeoutExpired:
                pass
            else:
                if code == 0:
                    return Outcome(JobState.FINISHED, code, started, time.time(), logfile)
                return Outcome(JobState.FAILED, code, started, time.time(), logfile, exit_reason(code))
            kill = kill_requested()
            if isinstance(kill, KillRequest):
                log.warning("job %s: %s; ending its processes", task.job_id, kill.reason)
                terminate_group(proc, kill_grace_s, contain)
                return Outcome(kill.state, proc.returncode, started, time.time(), logfile, kill.reason)
            if kill:
                killpg(proc.pid, signal.SIGKILL)
                contain.kill()
                proc.wait()
                log.warning("job %s: payload killed on request (second SIGTERM)", task.job_id)
                return Outcome(
                    JobState.FAILED,
                    proc.returncode,
                    started,
                    time.time(),
                    logfile,
                    "killed: the pilot was told to stop at once",
                )
            if time.monotonic() >= limit:
                log.warning("job %s: wall limit of %.0fs reached, killing its processes", task.job_id, task.wall_s)
                terminate_group(proc, kill_grace_s, contain)
                return Outcome(
                    JobState.TIMEOUT,
                    proc.returncode,
                    started,
                    time.time(),
                    logfile,
                    f"wall limit of {task.wall_s:g}s reached",
                )
            contain.track()
            between_slices()
    finally:
        # The payload may have left children behind even when it exited by itself.
        if killpg(proc.pid, signal.SIGKILL):
            log.info("job %s: killed what the payload's process group left running", task.job_id)
        if proc.poll() is None:
            proc.wait()


def root_problem(work_root: str, log_root: Path, run_as: RunAs | None = None) -> str:
    """Why no job can be prepared here now, or "": a small file made and removed under each root.

    A directory alone is not enough of a test: a full filesystem may still
    have an inode left for it, and fail the first write of the payload.  With
    ``run_as``, that user must also be able to reach the work root.
    """
    if run_as is not None:
        where = work_root or tempfile.gettempdir()
        closed = run_as.can_enter(where)
        if closed:
            return f"the work root {where} is unusable: payload user {run_as.name} may not enter {closed}"
    for what, where in (("work root", work_root or tempfile.gettempdir()), ("log root", str(log_root))):
        try:
            Path(where).mkdir(parents=True, exist_ok=True)
            probe = tempfile.mkdtemp(prefix=".p3s-check-", dir=where)
            try:
                with open(os.path.join(probe, "probe"), "wb") as fh:
                    fh.write(b"p3s\n")
                    fh.flush()
            finally:
                shutil.rmtree(probe, ignore_errors=True)
        except OSError as exc:
            return f"the {what} {where} is unusable: {describe(exc)}"
    return ""
