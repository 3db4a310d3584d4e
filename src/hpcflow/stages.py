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

Result identity: every stage declares the input keys that determine its result
(``Stage.identity``, INI names ``section.key``) and the keys that only extend it
(``Stage.extends``: ``trajectories``).  A rerun finds an existing result of the same
identity complete (skipped) or unfinished (resumed, or extended when ``trajectories`` grew)
and refuses one whose identity differs, naming every differing key with its old and new
value (:func:`identity`, :func:`identity_diff`).  Every other key (``[run] name, device,
threads, io, compile, checkpoint_every, progress_every`` ...) may change between a run and
its resumption.  The hpcflow version is recorded in every result, not compared.
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
    (None for the others); ``outputs(cfg)`` lists every file the stage writes.
    ``identity``: the keys (``section.key``) whose values determine the result;
    ``extends``: keys that only make it longer; ``when``: (section, condition) pairs, the
    section's keys count only where the condition holds for the input (the [coarse] keys of
    a flow trained from a coarse prior)."""

    name: str
    sections: tuple[str, ...]
    does: str
    outputs: Callable[[object], tuple[Path, ...]]
    file: str | None = None
    identity: tuple[str, ...] = ()
    extends: tuple[str, ...] = ()
    when: tuple[tuple[str, Callable[[object], bool]], ...] = ()

    def path(self, cfg) -> Path:
        """The stage's main output (its ensemble, flow file or analysis JSON)."""
        return self.outputs(cfg)[0]


def _in_output(name):
    return lambda cfg: (Path(cfg.run.output) / name,)


_MD = ("replicas", "thermalization", "length", "steps", "integrator", "save_every", "start")
_THEORY = ("theory.L", "theory.beta", "theory.lambda")
_FLOW = ("flow.prior", "flow.kernel_size", "flow.layers", "flow.block", "flow.hidden")
#: The coarse keys that determine the coarse ensemble ([coarse] file only says where it is);
#: those of its pilot run are the first nine.
COARSE_KEYS = ("coarse.beta", "coarse.L", "coarse.replicas", "coarse.pilot",
               "coarse.thermalization", "coarse.length", "coarse.steps", "coarse.integrator",
               "coarse.seed", "coarse.samples", "coarse.eval_samples", "coarse.spacing",
               "theory.lambda")
PILOT_KEYS = COARSE_KEYS[:9] + ("theory.lambda", "run.rng")


def _uses_coarse(cfg) -> bool:
    return cfg.flow.prior.startswith("coarse")


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("coarse", ("coarse",), "decorrelated coarse ensemble (beta', L') for the coarse priors",
          lambda cfg: (coarse_path(cfg), pilot_path(cfg)),
          identity=(*COARSE_KEYS, "analysis.S", "run.rng"),  # S: the Gamma window of the pilot's tau_int
          when=(("analysis", lambda cfg: cfg.coarse is not None and cfg.coarse.spacing == 0),)),
    Stage("hmc", ("hmc",), "HMC production of [hmc] replicas over the ranks",
          _in_output("hmc.h5"), file="hmc.h5",
          identity=("run.seed", "run.rng", *_THEORY, *(f"hmc.{k}" for k in _MD)), extends=("hmc.trajectories",)),
    Stage("train", ("flow", "train"), "reverse-KL training of the [flow] from its prior",
          lambda cfg: (flow_path(cfg), history_path(cfg)),
          identity=("run.seed", *_THEORY, *_FLOW,
                    *(f"train.{k}" for k in ("iterations", "batch_size", "lr", "schedule",
                                             "metropolis", "eval_every", "checkpoint_every")),
                    *COARSE_KEYS[:-1]),
          when=(("coarse", _uses_coarse),)),
    Stage("fhmc", ("flow", "fhmc"), "HMC on the flowed action, measured on phi = g(z)",
          _in_output("fhmc.h5"), file="fhmc.h5",
          identity=("run.seed", "run.rng", *_THEORY, *_FLOW, *(f"fhmc.{k}" for k in _MD)),
          extends=("fhmc.trajectories",)),
    Stage("analysis", (), "Gamma-method analysis of the run's ensembles (rank 0)",
          _in_output("analysis.json")),
)}

#: The ensembles of a run directory that the analysis looks for, in this order (then any
#: ``fhmc-*.h5``).
ENSEMBLE_FILES: tuple[str, ...] = tuple(s.file for s in STAGES.values() if s.file)


def path(cfg, stage: str) -> Path:
    """The main output of ``stage`` for the input ``cfg``."""
    return STAGES[stage].path(cfg)


_ATTRIBUTE = {"lambda": "lam"}  # INI key -> Config attribute, where they differ


def key_value(cfg, key: str):
    """The value of ``section.key`` in the input ``cfg`` as JSON would store it (tuples as
    lists); None for an absent section.  ``coarse.seed`` is the seed the coarse chains use
    (-1 means the [run] seed)."""
    section, name = key.split(".")
    obj = getattr(cfg, section, None)
    if obj is None:
        return None
    value = getattr(obj, _ATTRIBUTE.get(name, name))
    if key == "coarse.seed" and value < 0:
        value = cfg.run.seed
    return list(value) if isinstance(value, tuple) else value


def identity(cfg, stage: str, keys: tuple[str, ...] | None = None) -> dict:
    """{"[section] key": value} of the keys that determine the result of ``stage`` for the
    input ``cfg`` (``keys`` instead of the stage's own: a stage's sub-result, the coarse
    pilot).  Keys of a section whose ``when`` condition fails are left out."""
    s = STAGES[stage]
    skip = {sec for sec, cond in s.when if not cond(cfg)}
    out = {}
    for key in s.identity if keys is None else keys:
        section, name = key.split(".")
        if section not in skip:
            out[f"[{section}] {name}"] = key_value(cfg, key)
    return out


def identity_diff(old: dict, new: dict) -> list[str]:
    """``"[section] key was <old>, now <new>"`` for every key of both identities whose
    values differ (a key only one of them has is not compared: a result made before the
    key existed)."""
    old = LEGACY_IDENTITY | old
    return [f"{k} was {old[k]!r}, now {new[k]!r}" for k in new
            if k in old and old[k] != new[k]]


#: Values of identity keys added after results were made with them fixed: a result without
#: the key was made with this value (every chain before ``[run] rng`` drew from PCG64).
LEGACY_IDENTITY = {"[run] rng": "pcg64"}
