"""Copy a job's input into its work directory before the payload starts."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path, PurePosixPath

from p3s.messages import Task

STAGE_IN_TIMEOUT_S = 600.0


class StageInError(OSError):
    """The input could not be copied into the work directory."""


def stage_in(task: Task, workdir: str, values: dict[str, str | list[str]]) -> None:
    """Copy ``values['input']`` into ``workdir`` and point ``{input}`` at the copy.

    ``root://`` URLs go through ``xrdcp``; anything else is a path.  The copy
    lives in the work directory, so it goes when the work directory goes.
    """
    source = str(values.get("input", ""))
    name = PurePosixPath(source.split("?", 1)[0]).name or f"input-{task.job_id}"
    target = Path(workdir) / name
    if source.startswith(("root://", "xroot://")):
        try:
            done = subprocess.run(
                ["xrdcp", "--nopbar", "--force", source, str(target)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=min(STAGE_IN_TIMEOUT_S, max(1.0, task.wall_s)),
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise StageInError(f"xrdcp of {source} failed: {exc}") from exc
        if done.returncode != 0:
            raise StageInError(f"xrdcp of {source} failed: {done.stderr.decode(errors='replace').strip()}")
    else:
        shutil.copyfile(source, target)
    values["input"] = str(target)
