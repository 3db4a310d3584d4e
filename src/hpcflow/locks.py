"""One writer per output: an exclusive lock held for the whole run.

``python -m hpcflow.run`` takes the lock ``<output>/.hpcflow.lock`` of its ``[run] output``
directory before any stage starts, and ``<file>.lock`` beside a stage output that lies
outside it (a shared ``[coarse] file``, a ``[flow] file``) while that stage runs.  Under MPI
rank 0 takes it and every rank learns the outcome.  A second run on the same output exits 2
with a message naming the holder (host, pid, start time).

- Where the file system supports ``flock`` (local disks, NFS v4, most Lustre mounts with
  ``-o flock``), the lock is an flock on the lock file: the operating system releases it
  when the process ends in any way (kill -9 included), so a lock left by a dead run is taken
  over without anyone's help.  The file stays, holding the last holder's host, pid and start
  time (empty after a clean release): the flock is the lock, not the file.
- Where ``flock`` is refused (some parallel file systems), a warning says so and the lock
  is the file itself, created exclusively and holding host and pid, removed at release.  A
  file left by a dead process on this host is taken over; one from another host cannot be
  checked and is refused, the message saying to delete it if that run is dead.

MPI-free: the driver broadcasts rank 0's outcome.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path

from .errors import StageError
from .log import logger

LOCK_NAME = ".hpcflow.lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTSUP}


def _holder_text() -> str:
    return (f"host {socket.gethostname()}, pid {os.getpid()}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


class Lock:
    """An exclusive lock on ``path`` (see the module docstring), taken by :meth:`acquire`."""

    def __init__(self, path, what: str):
        self.path, self.what = Path(path), what
        self.fd = None
        self.mode = None  # "flock" or "file"

    def acquire(self) -> "Lock":
        """Take the lock or raise StageError naming its holder."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StageError(f"{self.what} is in use by another run ({_read(self.path) or 'holder unknown'}; "
                             f"lock {self.path}): wait for it to end, or use another output") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _NO_FLOCK:
                raise
            logger.warning(f"[lock] WARNING: {self.path.parent} does not support flock ({e.strerror}); "
                           f"falling back to a lock file holding host and pid")
            return self._acquire_file()
        stale = _read(self.path)
        if stale:
            logger.warning(f"[lock] took over the lock of a run that ended without releasing it "
                           f"({stale})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_text().encode(), 0)
        os.fsync(fd)
        self.fd, self.mode = fd, "flock"
        return self

    def _acquire_file(self) -> "Lock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if not self._stale(holder):
                    raise StageError(
                        f"{self.what} is in use by another run ({holder}; lock file {self.path}, "
                        f"no flock here): wait for it to end; if that run is dead, delete the "
                        f"lock file") from None
                logger.warning(f"[lock] took over the lock file of a dead run ({holder or 'empty'})")
                self.path.unlink(missing_ok=True)
                continue
            os.write(fd, _holder_text().encode())
            os.fsync(fd)
            os.close(fd)
            self.mode = "file"
            return self
        raise StageError(f"{self.what}: cannot take the lock file {self.path}")

    @staticmethod
    def _stale(holder: str) -> bool:
        """Whether the holder written in a lock file is a process of this host that is gone
        (or the file is empty: its writer died before writing)."""
        if not holder:
            return True
        fields = dict(part.strip().split(" ", 1) for part in holder.split(",") if " " in part.strip())
        if fields.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(fields.get("pid", "")), 0)
        except ProcessLookupError:
            return True
        except (ValueError, PermissionError):
            return False
        return False

    def release(self):
        """Give the lock back (the flock file stays, emptied; a fallback lock file goes)."""
        if self.mode == "flock" and self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None
        elif self.mode == "file":
            self.path.unlink(missing_ok=True)
        self.mode = None


def take(path, what: str, comm) -> Lock | None:
    """Rank 0 takes the lock ``path``; every rank raises its StageError or goes on.
    Returns the lock on rank 0 (None elsewhere)."""
    lock, problem = None, None
    if comm.Get_rank() == 0:
        try:
            lock = Lock(path, what).acquire()
        except StageError as err:
            problem = err
    problem = comm.bcast(problem, root=0)
    if problem is not None:
        raise problem
    return lock
