"""Run one payload: its own work directory and process group, a wall-clock limit, a log file.

The payload is an argv list, never given to a shell.  It is waited for in
slices; between slices the pilot sends heartbeats.  At the wall limit the whole
process group gets SIGTERM, then SIGKILL after a grace period, so nothing the
payload started outlives it.
"""

from __future__ import annotations

import ctypes
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from p3s.dagengine import expand, expand_env
from p3s.messages import Task
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


def terminate_group(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the payload's group, wait up to ``grace_s``, then SIGKILL whatever is left."""
    killpg(proc.pid, signal.SIGTERM)
    end = time.monotonic() + grace_s
    while time.monotonic() < end:
        if proc.poll() is not None and not group_alive(proc.pid):
            return
        time.sleep(0.05)
    killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def payload_values(task: Task, workdir: str) -> dict[str, str | list[str]]:
    values: dict[str, str | list[str]] = {k: v for k, v in task.values.items() if isinstance(v, str | list)}
    values["workdir"] = workdir
    return values


def payload_env(task: Task, values: dict[str, str | list[str]]) -> dict[str, str]:
    """The payload's environment: the pilot's, the P3S_* values, then the node's ``env``."""
    env = dict(os.environ)
    # The pilot's own secrets (broker URL and passwords) are not the payload's business.
    for key in [k for k in env if k.startswith("P3S_")]:
        del env[key]
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


def run_payload(
    task: Task,
    *,
    work_root: str | None,
    log_root: Path,
    on_start: Callable[[float], None],
    between_slices: Callable[[], None],
    kill_requested: Callable[[], bool],
    kill_grace_s: float = 5.0,
    slice_s: float = 1.0,
    stage_in: Callable[[Task, str, dict[str, str | list[str]]], None] | None = None,
) -> Outcome:
    """Run ``task``'s payload to its end, its wall limit, or a kill request; clean up after it."""
    if work_root:
        Path(work_root).mkdir(parents=True, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix=f"p3s-job{task.job_id}-", dir=work_root or None)
    logfile = log_path(log_root, task)
    try:
        values = payload_values(task, workdir)
        outdir = values.get("outdir")
        if isinstance(outdir, str) and outdir:
            Path(outdir).mkdir(parents=True, exist_ok=True)
        logfile.parent.mkdir(parents=True, exist_ok=True)
        if stage_in is not None and task.stage_in:
            stage_in(task, workdir, values)
        argv = expand(task.argv, values)
        env = payload_env(task, values)
        with open(logfile, "wb") as out:
            prefix, hook = _pdeathsig()
            why = _startable(argv[0], env)
            if why is not None:
                out.write(f"p3s: cannot start {argv[0]!r}: {why}\n".encode())
                return Outcome(
                    JobState.FAILED, None, None, time.time(), str(logfile), f"cannot start {argv[0]!r}: {why}"
                )
            try:
                proc = subprocess.Popen(
                    [*prefix, *argv],
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group, so killpg reaches grandchildren
                    preexec_fn=hook,
                )
            except OSError as exc:
                out.write(f"p3s: cannot start {argv[0]!r}: {exc.strerror}\n".encode())
                return Outcome(
                    JobState.FAILED, None, None, time.time(), str(logfile), f"cannot start {argv[0]!r}: {exc.strerror}"
                )
            started = time.time()
            on_start(started)
            return _wait(task, proc, started, str(logfile), between_slices, kill_requested, kill_grace_s, slice_s)
    except OSError as exc:
        return Outcome(
            JobState.FAILED, None, None, time.time(), str(logfile), f"pilot could not prepare the job: {exc}"
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _wait(
    task: Task,
    proc: subprocess.Popen[bytes],
    started: float,
    logfile: str,
    between_slices: Callable[[], None],
    kill_requested: Callable[[], bool],
    kill_grace_s: float,
    slice_s: float,
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
                state = JobState.FINISHED if code == 0 else JobState.FAILED
                return Outcome(state, code, started, time.time(), logfile)
            if kill_requested():
                killpg(proc.pid, signal.SIGKILL)
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
                log.warning("job %s: wall limit of %.0fs reached, killing its process group", task.job_id, task.wall_s)
                terminate_group(proc, kill_grace_s)
                return Outcome(
                    JobState.TIMEOUT,
                    proc.returncode,
                    started,
                    time.time(),
                    logfile,
                    f"wall limit of {task.wall_s:g}s reached",
                )
            between_slices()
    finally:
        # The payload may have left children behind even when it exited by itself.
        if killpg(proc.pid, signal.SIGKILL):
            log.info("job %s: killed what the payload left running", task.job_id)
        if proc.poll() is None:
            proc.wait()
