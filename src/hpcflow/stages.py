"""The stages of a run and the files they write: one table.

``python -m hpcflow.run`` runs the stages of ``[run] stages`` in order (the driver,
:mod:`hpcflow.run`, holds what each one does); this module says, for every stage, which
input sections it needs and where its results go, for the input parser
(:mod:`hpcflow.config`), the stages themselves, the priors (which read the coarse file) and
the analysis (which looks for the ensembles of a run directory).  MPI-free, and it imports
nothing else of hpcflow.

==========  ===============  ==============================================================
stage       needs sections   writes
==========  ===============  ==============================================================
coarse      [coarse]         ``[coarse] file`` (default ``<output>/coarse.h5``) and its pilot
                             ``<stem>-pilot.h5`` beside it
hmc         [hmc]            ``<output>/hmc.h5``
train       [flow], [train]  ``[flow] file`` (default ``<output>/flow.pt``), ``train.json``
                             beside it
fhmc        [flow], [fhmc]   ``<output>/fhmc.h5``
analysis    -                ``<output>/analysis.json``; beside each ensemble
                             ``<stage>.obs.json.gz`` and ``<stem>.analysis.json`` (cache)
==========  ===============  ==============================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable


def coarse_path(cfg) -> Path:
    """The coarse ensemble: ``[coarse] file``, or ``<output>/coarse.h5``."""
    return Path(cfg.coarse.file) if cfg.coarse.file else Path(cfg.run.output) / "coarse.h5"


def pilot_path(cfg) -> Path:
    """The coarse stage's pilot run, beside the coarse ensemble: ``<stem>-pilot.h5``."""
    path = coarse_path(cfg)
    return path.with_name(path.stem + "-pilot.h5")


def flow_path(cfg) -> Path:
    """The trained flow: ``[flow] file``, or ``<output>/flow.pt``."""
    return Path(cfg.flow.file) if cfg.flow.file else Path(cfg.run.output) / "flow.pt"


#: The training history's file name, beside the flow file.
HISTORY_FILE = "train.json"


def history_path(cfg) -> Path:
    """The training history, ``train.json`` beside the flow file."""
    return flow_path(cfg).with_name(HISTORY_FILE)


@dataclass(frozen=True)
class Stage:
    """One stage: its name, the input sections it needs, what it does, what it writes.

    ``file`` is the name of the ensemble a production stage writes into ``[run] output``
    (None for the others); ``outputs(cfg)`` lists every file the stage writes."""

    name: str
    sections: tuple[str, ...]
    does: str
    outputs: Callable[[object], tuple[Path, ...]]
    file: str | None = None

    def path(self, cfg) -> Path:
        """The stage's main output (its ensemble, flow file or analysis JSON)."""
        return self.outputs(cfg)[0]


def _in_output(name):
    return lambda cfg: (Path(cfg.run.output) / name,)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("coarse", ("coarse",), "decorrelated coarse ensemble (beta', L') for the coarse priors",
          lambda cfg: (coarse_path(cfg), pilot_path(cfg))),
    Stage("hmc", ("hmc",), "HMC production of [hmc] replicas over the ranks",
          _in_output("hmc.h5"), file="hmc.h5"),
    Stage("train", ("flow", "train"), "reverse-KL training of the [flow] from its prior",
          lambda cfg: (flow_path(cfg), history_path(cfg))),
    Stage("fhmc", ("flow", "fhmc"), "HMC on the flowed action, measured on phi = g(z)",
          _in_output("fhmc.h5"), file="fhmc.h5"),
    Stage("analysis", (), "Gamma-method analysis of the run's ensembles (rank 0)",
          _in_output("analysis.json")),
)}

#: The ensembles of a run directory that the analysis looks for, in this order (then any
#: ``fhmc-*.h5``).
ENSEMBLE_FILES: tuple[str, ...] = tuple(s.file for s in STAGES.values() if s.file)


def path(cfg, stage: str) -> Path:
    """The main output of ``stage`` for the input ``cfg``."""
    return STAGES[stage].path(cfg)
