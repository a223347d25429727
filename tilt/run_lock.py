"""One trainer per run directory: an OS file lock on ``run_dir/.lock`` held for the run's life.

``fcntl.flock`` locks belong to the open file description, so the kernel drops the lock when
the holder exits for any reason (normal exit, exception, SIGKILL, OOM kill): a killed run never
leaves a stale lock behind, and ``tilt train --resume`` can always take it over. While the
holder lives, a second trainer (fresh or resuming) is refused at once with the holder's pid,
which the holder writes into the lock file after taking the lock.
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from tilt.config import ConfigError

LOCK_NAME = ".lock"


class RunDirLocked(ConfigError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``run_dir/.lock``; ``release`` (or process death) frees it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        # O_RDWR without O_TRUNC: a refused process must not wipe the holder's pid
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder_pid()
            os.close(self._fd)
            self._fd = None
            who = f"process {holder}" if holder else "another process"
            raise RunDirLocked(
                f"run directory {str(run_dir)!r} is in use by {who} (lock file {str(self.path)!r}); "
                f"wait for it to finish or stop it{f' (kill {holder})' if holder else ''}, "
                "then `tilt train --resume` it, or choose another --run-dir") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(self._fd)

    def _holder_pid(self) -> int | None:
        """The pid the holder wrote; it writes right after locking, so wait briefly for it."""
        for _ in range(20):
            raw = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
            if raw.isdigit():
                return int(raw)
            time.sleep(0.025)
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
