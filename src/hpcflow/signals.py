"""Stopping on a signal: checkpoint everywhere, exit 3, resume later.

``python -m hpcflow.run`` installs handlers (:func:`installed`) for SIGTERM, SIGINT and
SIGUSR1 (SLURM sends SIGTERM at the time limit and on ``scancel``; ``--signal=B:USR1@120``
sends SIGUSR1 to the batch script, which forwards it, 120 s before).  A handler only notes
the signal.  The ranks agree on it through :class:`StopPoll`, called once per trajectory
(and per training iteration): on one rank it reads the note; on several it combines the
notes of all ranks with one small MPI allreduce every ``interval`` calls, the interval
adapted so that the allreduce comes about once per ``seconds`` (1 s) of work; so every rank
sees the stop at the same trajectory, within about a second of the signal.  A production
then writes a checkpoint on every rank, closes its file and raises :class:`Stopped`; the
driver exits with :data:`EXIT_STOPPED` (3): stopped by a signal, resumable by a rerun.

A second signal of the same run raises KeyboardInterrupt at once, as without handlers.
This module imports no MPI: the poll uses the communicator it is given.
"""

from __future__ import annotations

import contextlib
import signal
import time

import numpy as np

from .errors import Stopped  # noqa: F401 (re-exported)

#: Exit status of ``python -m hpcflow.run`` stopped by a signal after a checkpoint.
EXIT_STOPPED = 3
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

_received = 0  # the first stop signal noted (0: none)


def received() -> int:
    """The number of the first stop signal this process received (0: none)."""
    return _received


def _note(signum, frame):
    global _received
    if _received:
        raise KeyboardInterrupt(f"second signal ({signal.Signals(signum).name})")
    _received = signum


@contextlib.contextmanager
def installed():
    """Note SIGTERM, SIGINT and SIGUSR1 while the block runs (main thread only; elsewhere
    nothing is installed); the previous handlers are restored afterwards."""
    global _received
    _received = 0
    try:
        previous = {s: signal.signal(s, _note) for s in SIGNALS}
    except ValueError:  # not the main thread
        previous = {}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _received = 0


def name(signum: int) -> str:
    return signal.Signals(signum).name


class StopPoll:
    """Called by every rank at the same points (once per trajectory); returns the same
    signal number on every rank (0: go on), the first time at the same call everywhere.

    With one rank, every call reads the local note.  With several, every ``interval``-th
    call is one ``Allreduce`` (MAX) of [signal, interval proposed by rank 0]; rank 0 proposes
    the calls that took it ``seconds`` of wall time, between 1 and ``max_interval``."""

    def __init__(self, comm, seconds: float = 1.0, max_interval: int = 1000):
        self.comm, self.seconds, self.max_interval = comm, seconds, max_interval
        self.size = comm.Get_size()
        self.root = comm.Get_rank() == 0
        self.interval = self.countdown = 1
        self.t_last = time.perf_counter()
        self.reductions = 0

    def __call__(self) -> int:
        if self.size == 1:
            return _received
        self.countdown -= 1
        if self.countdown > 0:
            return 0
        proposal = 0
        now = time.perf_counter()
        if self.root:
            per_call = (now - self.t_last) / self.interval
            proposal = int(min(self.max_interval, max(1, self.seconds / max(per_call, 1e-9))))
        buf = np.array([_received, proposal], dtype=np.int64)
        from mpi4py import MPI

        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)
        self.reductions += 1
        self.interval = self.countdown = int(buf[1])
        self.t_last = now
        return int(buf[0])
