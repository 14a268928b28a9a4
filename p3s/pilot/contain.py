"""Everything a payload started, found and killed: a mark in the environment, a cgroup, the process tree.

A payload runs in a process group of its own, but a daemon that forks twice
and calls ``setsid()`` leaves that group, and a killpg no longer reaches it.
So, as HTCondor does, every payload gets a mark in its environment
(``P3S_PAYLOAD_MARK=<pilot>.<job>.<random>``, not a secret) that every
descendant inherits; where the pilot may create a child of its own cgroup
(cgroup v2), the payload runs in it too, which no unprivileged process can
leave.  The pilot makes itself a child subreaper, so orphans of the payload
are reparented to it instead of to init, and it reaps those it adopted.

At the end of the job, at its wall limit and when the pilot stops,
:meth:`Containment.kill` signals every process in the cgroup (or, where there
is none, carrying the mark) or descending from the payload, until none is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

MARK_VARIABLE = "P3S_PAYLOAD_MARK"
PR_SET_CHILD_SUBREAPER = 36
PROC = Path("/proc")


@functools.cache
def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux 3.4+); False where it cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        ok = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        ok = False
    if not ok:
        log.info("pilot process %d: cannot become a child subreaper; payload orphans go to init", os.getpid())
    return ok


@functools.cache
def _own_cgroup() -> Path | None:
    """This process's cgroup v2 directory, or None (no unified hierarchy mounted, or not found)."""
    try:
        lines = (PROC / "self" / "cgroup").read_text().splitlines()
        mounts = (PROC / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        return None
    relative = next((line[3:] for line in lines if line.startswith("0::")), None)
    if relative is None:
        return None
    for line in mounts:
        # <id> <parent> <major:minor> <root> <mount point> <options> ... - <fstype> <source> <super options>
        before, _, after = line.partition(" - ")
        if after.split(" ", 1)[0] != "cgroup2":
            continue
        root, mount_point = before.split(" ")[3:5]
        if root != "/" and not relative.startswith(root):
            continue
        inner = relative[len(root):] if root != "/" else relative
        path = Path(mount_point.replace("\\040", " ")) / inner.lstrip("/")
        if (path / "cgroup.procs").exists():
            return path
    return None


def _children_of_this_process() -> set[int]:
    pids: set[int] = set()
    try:
        tasks = list((PROC / "self" / "task").iterdir())
    except OSError:
        return pids
    for task in tasks:
        with contextlib.suppress(OSError, ValueError):
            pids.update(int(p) for p in (task / "children").read_text().split())
    return pids


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process on the host (those that vanish meanwhile are skipped)."""
    parents: dict[int, int] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields follow the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        with contextlib.suppress(IndexError, ValueError):
            parents[int(entry.name)] = int(fields[1])
    return parents


def _parent(pid: int) -> int | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
        return int(stat[stat.rfind(")") + 2:].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _is_zombie(pid: int) -> bool:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return True  # gone altogether
    return stat[stat.rfind(")") + 2:][:1] in ("Z", "X")


def _carries(pid: int, needle: bytes) -> bool:
    try:
        return needle in (PROC / str(pid) / "environ").read_bytes()
    except OSError:  # gone, or not ours to read
        return False


class Containment:
    """The processes of one payload: its mark, its cgroup (when there is one), its tree."""

    def __init__(self, pilot_id: str, job_id: int) -> None:
        self.mark = f"{pilot_id}.{job_id}.{secrets.token_hex(4)}"
        self._needle = f"{MARK_VARIABLE}={self.mark}\0".encode()
        self.root: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.cgroup: Path | None = None
        self._adopted: set[int] = set()  # payload processes reparented to this one, to be reaped
        self._me = os.getpid()
        self._job_id = job_id
        become_subreaper()
        own = _own_cgroup()
        if own is not None:
            path = own / f"p3s-job{job_id}-{secrets.token_hex(3)}"
            try:
                path.mkdir()
            except OSError as exc:
                log.debug("job %s: no cgroup for the payload under %s: %s", job_id, own, exc)
            else:
                self.cgroup = path

    def environ(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` with the mark, set last so no node setting can take it away."""
        return {**env, MARK_VARIABLE: self.mark}

    def prefix(self) -> list[str]:
        """An argv prefix that moves the payload into the cgroup before it starts (empty without one).

        From the pilot, after the start, the move would race with a payload
        that forks at once (under load the pilot may not run for tens of
        milliseconds); a shell that joins and execs costs about a millisecond,
        less than a Python preexec hook, which forbids the fast vfork start.
        """
        if self.cgroup is None:
            return []
        return ["/bin/sh", "-c", '{ echo 0 > "$0"; } 2>/dev/null; exec "$@"', str(self.cgroup / "cgroup.procs")]

    def attach(self, proc: subprocess.Popen[bytes]) -> None:
        """Note the payload just started, and make sure it is in the cgroup."""
        self.root = proc.pid
        self._proc = proc
        # Not moved into the cgroup from here: the prefix did it before exec, and a
        # write to cgroup.procs costs milliseconds that every start would pay.

    def members(self) -> set[int]:
        """Every live process of the payload but its first (the caller's Popen waits for that one).

        With a cgroup, its member list is the answer (a payload would have to
        move itself out on purpose, and one that can could as well scrub its
        environment); without one, every process on the host that carries the
        mark.  Either way, while the payload lives, everything under it.
        Reading each process's environment costs about as much as the rest of
        a job's end together on a busy host, so it is done only without a cgroup.
        """
        found: set[int] = set()
        if self.cgroup is not None:
            with contextlib.suppress(OSError, ValueError):
                found.update(int(p) for p in (self.cgroup / "cgroup.procs").read_text().split())
        root_alive = self._proc is not None and self._proc.returncode is None
        parents = _parents() if self.cgroup is None or root_alive else {}
        if self.cgroup is None:
            found.update(pid for pid in parents if _carries(pid, self._needle))
        if root_alive:
            # Descendants that cleared their environment still hang under the payload
            # (only while it is not reaped: after that its pid may be another's).
            children: dict[int, list[int]] = {}
            for pid, ppid in parents.items():
                children.setdefault(ppid, []).append(pid)
            todo = list(children.get(self.root, []))  # type: ignore[arg-type]
            while todo:
                pid = todo.pop()
                found.add(pid)
                todo.extend(children.get(pid, []))
        found.discard(self._me)
        found.discard(self.root)  # type: ignore[arg-type]
        for pid in found:
            if (parents.get(pid) if parents else _parent(pid)) == self._me:
                self._adopted.add(pid)
        return {pid for pid in found if not _is_zombie(pid)}

    def track(self) -> None:
        """Between slices: note orphans adopted meanwhile, so they can be reaped even if they exit first."""
        for pid in _children_of_this_process() - self._adopted - {self.root}:
            if _carries(pid, self._needle):
                self._adopted.add(pid)
        self.reap()

    def signal(self, sig: int) -> int:
        """Send ``sig`` to every process of the payload but its first; how many were signalled."""
        members = self.members()
        if members and sig == signal.SIGKILL and self.cgroup is not None:
            # Only when something is left: the write costs milliseconds, and most jobs leave nothing.
            with contextlib.suppress(OSError):
                (self.cgroup / "cgroup.kill").write_text("1")  # Linux 5.14+; the loop below does the rest
        sent = 0
        for pid in members:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
            except PermissionError:
                log.warning("job %s: not allowed to signal payload process %d", self._job_id, pid)
                continue
            sent += 1
        return sent

    def kill(self, rounds: int = 50, pause_s: float = 0.02) -> int:
        """SIGKILL what is left of the payload until nothing is; reap what was adopted; how many were killed.

        Several rounds, as a process may fork between a scan and its signal.
        """
        killed = 0
        for _ in range(rounds):
            sent = self.signal(signal.SIGKILL)
            if not sent:
                break
            killed += sent
            time.sleep(pause_s)
            self.reap()
        else:
            log.error("job %s: payload processes still appear after %d rounds of SIGKILL", self._job_id, rounds)
        self.reap()
        return killed

    def reap(self) -> None:
        """Wait for the adopted payload processes that have exited."""
        for pid in list(self._adopted):
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                self._adopted.discard(pid)  # not (or no longer) this process's child
                continue
            if done:
                self._adopted.discard(pid)

    def close(self) -> int:
        """Kill what is left, reap it, and remove the cgroup; how many were killed."""
        killed = self.kill()
        self._drop_cgroup()
        return killed

    def _drop_cgroup(self) -> None:
        if self.cgroup is None:
            return
        end = time.monotonic() + 1.0
        while True:
            try:
                self.cgroup.rmdir()
            except OSError as exc:
                # EBUSY while the killed processes are still being torn down.
                if exc.errno == errno.EBUSY and time.monotonic() < end:
                    time.sleep(0.01)
                    continue
                if exc.errno != errno.ENOENT:
                    log.warning("job %s: cannot remove cgroup %s: %s", self._job_id, self.cgroup, exc)
            break
        self.cgroup = None
