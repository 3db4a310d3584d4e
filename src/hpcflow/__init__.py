"""hpcflow: HMC and flow HMC for trivializing flows in 2D phi^4 lattice theory.

The library layer imports without MPI: each name loads its module on first use, and
``mpi4py`` is imported only by the drivers (``python -m hpcflow.run`` and its stages).

Actions (``action(phi) -> [B]``, ``force(phi) -> [B, L, L]`` on a batch of B chains)
    :class:`Phi4Action`, :class:`FlowedAction` (S~(z) = S(g(z)) - log|det dg/dz| over its
    own frozen snapshot of a flow).
Flows
    :class:`Flow` (the paper's family: tanh coupling layers applied z -> phi, a learned
    global scale; ``Flow(L)`` is the minimal model), :class:`IdentityFlow`.
HMC (an ``init``/``step`` kernel with explicit randomness)
    :func:`init_state`, :func:`hmc_step`, :class:`HMCState`, :class:`HMCInfo`,
    :data:`INTEGRATORS`, :class:`ReplicaStreams` (one random stream per replica; PCG64 on
    the host), :class:`PhiloxStreams` (the same, counter-based, on the chains' device).
Training
    :class:`Trainer` (reverse KL, a plain loop with callbacks), the priors
    :class:`GaussianPrior`, :class:`CoarseVolumePrior`, :class:`CoarseInterleavePrior`.
Measurements and errors
    :mod:`hpcflow.observables` (``OBSERVABLES``), :func:`load_ensemble` (an ensemble file
    as numpy arrays), :func:`to_obs` (array [replicas, measurements] -> pyerrors Obs about
    the overall mean), :func:`recentre`, :func:`analyse` (arrays -> the analysis JSON and
    the Obs).
Errors
    :class:`ConfigError`, :class:`StageError`.

Examples
--------
>>> import hpcflow as hf
>>> action = hf.Phi4Action(beta=0.4, lam=0.0)
>>> streams = hf.ReplicaStreams(seed=1, indices=range(16), purpose="hmc")
>>> state = hf.init_state(action, streams.normal((8, 8), "cpu"))
>>> state, info = hf.hmc_step(action, state, streams.normal((8, 8), "cpu"),
...                           streams.log_uniform("cpu"), "leapfrog", 1.0, 10)

More in ``examples/``.
"""

from typing import TYPE_CHECKING

__version__ = "0.2.0"

# name -> module; imported on first use (PEP 562), so that ``python -m hpcflow.config`` and
# friends do not pay for torch and pyerrors until they need them.
_EXPORTS = {
    "Phi4Action": "action", "FlowedAction": "action",
    "analyse": "analysis", "recentre": "analysis", "to_obs": "analysis",
    "ConfigError": "errors", "StageError": "errors",
    "Flow": "flows", "IdentityFlow": "flows",
    "INTEGRATORS": "hmc", "HMCInfo": "hmc", "HMCState": "hmc", "hmc_step": "hmc",
    "init_state": "hmc",
    "OBSERVABLES": "observables",
    "CoarseInterleavePrior": "priors", "CoarseVolumePrior": "priors", "GaussianPrior": "priors",
    "PhiloxStreams": "rng", "ReplicaStreams": "rng",
    "Ensemble": "store", "load_ensemble": "store",
    "Trainer": "train",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for static analysis and IDEs only
    from .action import FlowedAction, Phi4Action  # noqa: F401
    from .analysis import analyse, recentre, to_obs  # noqa: F401
    from .errors import ConfigError, StageError  # noqa: F401
    from .flows import Flow, IdentityFlow  # noqa: F401
    from .hmc import INTEGRATORS, HMCInfo, HMCState, hmc_step, init_state  # noqa: F401
    from .observables import OBSERVABLES  # noqa: F401
    from .priors import CoarseInterleavePrior, CoarseVolumePrior, GaussianPrior  # noqa: F401
    from .rng import PhiloxStreams, ReplicaStreams  # noqa: F401
    from .store import Ensemble, load_ensemble  # noqa: F401
    from .train import Trainer  # noqa: F401
