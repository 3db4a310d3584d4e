"""Logging: the ``hpcflow`` logger, rank-aware, configured by the command-line drivers.

Everything hpcflow reports while it works (stage starts, progress lines, warnings) goes
through ``logging.getLogger("hpcflow")`` with the bare message as its format, so progress
lines read exactly as before::

    [hmc] 16200/16200 trajectories | acc 0.969 | <dH> +3.34e-03 | ... | done in 0m40s

A library user gets the standard library's behaviour: until the application configures
logging, warnings reach standard error and nothing else is shown (``logging.basicConfig(
level=logging.INFO)`` shows the progress lines too).  The drivers (``python -m hpcflow.run``,
``hpcflow.analysis``, ``hpcflow.study``) call :func:`configure`, which writes to standard
output (the run driver, as its progress lines always did) or standard error (analysis and
study, whose standard output is their result: a table or JSON):

- rank 0 at INFO (``--quiet``: warnings only; ``--verbose``: DEBUG too);
- the other MPI ranks silent, unless ``--verbose``: then every rank logs at DEBUG, its
  lines prefixed ``[rank N]``.

Results (the analysis table, JSON) and error messages (standard error) are the programs'
output, not log lines, and are written directly.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("hpcflow")

SILENT = logging.CRITICAL + 1


class _StdHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stdout`` (or ``sys.stderr``) is when a record is
    emitted, so that redirections made after configuration (pytest's capture) are followed."""

    def __init__(self, name: str = "stdout"):
        self.name_of_stream = name
        super().__init__(getattr(sys, name))

    @property
    def stream(self):
        return getattr(sys, self.name_of_stream)

    @stream.setter
    def stream(self, value):  # set by StreamHandler.__init__; the live sys stream is used
        pass


def configure(rank: int = 0, quiet: bool = False, verbose: bool = False,
              stream: str = "stdout") -> logging.Logger:
    """Send the ``hpcflow`` logger to standard output, at the level of the rank and flags.

    Parameters
    ----------
    rank : int
        This process's MPI rank (0 outside MPI).
    quiet : bool
        Rank 0 shows warnings and errors only.
    verbose : bool
        Every rank shows everything down to DEBUG (other ranks prefixed ``[rank N]``);
        wins over ``quiet``.
    stream : str
        ``"stdout"`` or ``"stderr"``.

    Returns
    -------
    logging.Logger
        The ``hpcflow`` logger.  Calling this again replaces the earlier configuration.
    """
    for h in [h for h in logger.handlers if isinstance(h, _StdHandler)]:
        logger.removeHandler(h)
    handler = _StdHandler(stream)
    prefix = f"[rank {rank}] " if rank else ""
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    if verbose:
        logger.setLevel(logging.DEBUG)
    elif rank:
        logger.setLevel(SILENT)
    else:
        logger.setLevel(logging.WARNING if quiet else logging.INFO)
    return logger


def add_arguments(parser) -> None:
    """Add ``--quiet`` and ``--verbose`` to an argparse parser."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    group.add_argument("-v", "--verbose", action="store_true",
                       help="debug messages too, from every MPI rank")


def program_name(module: str, script: str) -> str:
    """How the user called a command, for its usage line: the console script ``script``
    (``hpcflow-run``) or ``python -m module``."""
    import os
    import sys

    return script if os.path.basename(sys.argv[0] or "") == script else f"python -m {module}"
