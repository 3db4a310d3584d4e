"""The exceptions hpcflow raises on purpose, in one place.

- :class:`ConfigError`: a problem with an input file (``python -m hpcflow.run`` exits 2
  before anything is written);
- :class:`StageError`: a stage cannot run as asked, e.g. an existing result made from
  another input, a missing or unfinished prerequisite (exit 2);
- :class:`FlowFamilyError`: a flow description of another flow family than this version's;
- :class:`CorruptFileError`: a file fails its checksums (a :class:`StageError`, exit 2);
- :class:`Stopped`: a run stopped by a signal after a checkpoint (exit 3, resumable).

They are also importable from where they were first defined (``hpcflow.config``,
``hpcflow.store``, ``hpcflow.flows``).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A problem with an input file; the message names file, section and key.

    Parameters
    ----------
    path : str or path-like
        The input file.
    section, key : str or None
        Where in the file (None when the problem is not about one section or key).
    message : str
        What is wrong and what is allowed.
    """

    def __init__(self, path, section: str | None, key: str | None, message: str):
        self.path, self.section, self.key = str(path), section, key
        where = self.path
        if section is not None:
            where += f": [{section}]"
        if key is not None:
            where += f" {key}"
        super().__init__(f"{where}: {message}")


class StageError(RuntimeError):
    """A stage cannot run as asked (e.g. an existing result made from another input)."""


class FlowFamilyError(ValueError):
    """A flow description (spec) from another flow family than this version's."""


class CorruptFileError(StageError, ValueError):
    """A file fails its checksums; the message names the file, and replica and dataset
    (one line each) (exit 2)."""


class Stopped(Exception):
    """A run stopped by a signal (SIGTERM, SIGINT, SIGUSR1) after writing a checkpoint on
    every rank; a rerun resumes it (:mod:`hpcflow.signals`, exit status 3)."""

    def __init__(self, signum: int, message: str):
        self.signum = signum
        super().__init__(message)
