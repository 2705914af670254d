"""One run at a time per run directory: a lock file that names its holder.

Two runs writing into one folder would interleave records and checkpoints, and an
`--overwrite` would delete the files of a run still writing them. A run therefore holds
`RUN_DIR/.lock` while it writes: created atomically (O_CREAT | O_EXCL), holding the pid, the
host, the process's start time and when the run started, and removed when the run ends,
whether it finishes, fails or is interrupted. A run killed outright (SIGKILL, power loss)
leaves its lock behind; the next run recognises it as stale when it names this host and a
process that is no longer alive (or a pid since reused by another process), says so and
takes it over, so nobody has to delete it by hand.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from depthcut.errors import DepthcutError

LOCK_NAME = ".lock"


class RunLockError(DepthcutError, FileExistsError):
    """The run directory is in use by another run."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock: the process, its host, and when the run started."""

    pid: int
    host: str
    started: str  # local time, ISO 8601
    process_start: int | None = None  # /proc/PID/stat's start time in clock ticks (Linux)

    @classmethod
    def this_process(cls) -> LockHolder:
        return cls(pid=os.getpid(), host=socket.gethostname(),
                   started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   process_start=process_start_ticks(os.getpid()))

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}"

    def is_alive(self) -> bool | None:
        """Whether the holder still runs: None when it cannot be told (another host)."""
        if self.host != socket.gethostname():
            return None
        if not pid_alive(self.pid):
            return False
        started = process_start_ticks(self.pid)
        # A live pid that started at another time is a new process that reuses the number.
        return self.process_start is None or started is None or started == self.process_start


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this host (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    stat = _proc_stat(pid)
    return stat is None or stat[0] != "Z"


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), where /proc exists."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def process_start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (Linux; None elsewhere)."""
    stat = _proc_stat(pid)
    return int(stat[19]) if stat is not None and len(stat) > 19 else None


class RunLock:
    """The lock of the run directory `folder`; use `with RunLock(folder):` or acquire/release."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.held = False

    def holder(self) -> LockHolder | None:
        """The holder named in the lock file; None when there is no lock file."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            values = json.loads(text)
            return LockHolder(**values)
        except (ValueError, TypeError) as error:
            raise RunLockError(
                f"{self.folder} holds a lock file {self.path} that cannot be read ({error}): "
                "another run may be creating it this moment; if no run uses this folder, "
                f"delete {self.path} and start again"
            ) from None

    def check_free(self) -> None:
        """Refuse when a live run holds the lock (a stale lock is taken over by `acquire`)."""
        holder = self.holder()
        if holder is not None and holder.is_alive() is not False:
            raise self._busy(holder)

    def acquire(self) -> None:
        """Create the lock file, taking over a stale one; RunLockError when a run holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None:  # released between our open and our read
                    continue
                if holder.is_alive() is not False:
                    raise self._busy(holder) from None
                warnings.warn(
                    f"{self.folder} was locked by {holder.describe()}, which is no longer "
                    f"running (killed?): taking the lock over", RuntimeWarning, stacklevel=2)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(asdict(LockHolder.this_process())) + "\n")
            self.held = True
            return
        raise self._busy(self.holder() or LockHolder(-1, "?", "?"))

    def release(self) -> None:
        """Remove the lock file, if this object created it."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _busy(self, holder: LockHolder) -> RunLockError:
        alive = holder.is_alive()
        if alive is None:
            advice = (f"it runs on another host, so depthcut cannot tell whether it is still "
                      f"running: if it is not, delete {self.path}")
        else:
            advice = "wait for it to finish or stop it, or choose another --out"
        return RunLockError(
            f"{self.folder} is in use by another depthcut run ({holder.describe()}): {advice}. "
            "Neither --overwrite nor --resume takes over a run that is still writing."
        )

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
