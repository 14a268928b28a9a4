"""Who a payload runs as: the pilot's own user, or ``pilot.payload_user`` for a pilot started as root.

A payload of the pilot's own user can read whatever the pilot can, its broker
password file among them, and so could forge its reports (which the job's
token and the broker's user_id check then limit to that one job).  A pilot
started as root runs each payload as another user and its primary group, with
no supplementary groups: the password file, readable by root only, is out of
the payload's reach.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from p3s.errors import ConfigError


@dataclass(frozen=True)
class RunAs:
    """A user (and its primary group) a root pilot runs payloads as."""

    name: str
    uid: int
    gid: int
    home: str

    def environ(self) -> dict[str, str]:
        """The variables that name the user, as a login would set them (root's HOME is not the payload's)."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}

    def give(self, path: str | Path) -> None:
        """Make ``path`` (a directory made for the job) the payload user's."""
        os.chown(path, self.uid, self.gid)

    def can_enter(self, path: str | Path) -> str:
        """The first directory on the way to ``path`` this user may not search, or "" if none.

        Judged from the mode bits (no ACLs): owner, group (its primary group
        only, as it runs without supplementary groups), or others.
        """
        where = Path(os.path.abspath(path))
        for directory in [*reversed(where.parents), where]:
            try:
                st = directory.stat()
            except FileNotFoundError:
                return ""  # made later, by the pilot, with its umask
            if st.st_uid == self.uid:
                bit = stat.S_IXUSR
            elif st.st_gid == self.gid:
                bit = stat.S_IXGRP
            else:
                bit = stat.S_IXOTH
            if not st.st_mode & bit:
                return str(directory)
        return ""


def payload_identity(user: str, euid: int | None = None) -> RunAs | None:
    """The user named by ``pilot.payload_user``, or None when it is empty; ConfigError if it cannot be used.

    Only root may start a process as another user: a pilot that is not root
    refuses to start rather than run payloads as itself, which the setting
    says must not happen.
    """
    if not user:
        return None
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        raise ConfigError(
            f"pilot.payload_user = {user!r} needs a pilot started as root (this one runs as uid {euid}); "
            "start the pilot as root, or leave payload_user empty to run payloads as the pilot's own user"
        )
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):
        raise ConfigError(f"pilot.payload_user = {user!r}: no such user on this host") from None
    if entry.pw_uid == 0:
        raise ConfigError(
            f"pilot.payload_user = {user!r} is root: payloads must run as an unprivileged user, "
            "or leave payload_user empty"
        )
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)
