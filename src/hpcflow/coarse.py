"""The coarse stage: a decorrelated ensemble of the coarse theory for the coarse priors.

PHYSICS.md section 6: a flow can be trained from configurations of the theory at a coarser
lattice spacing (beta' < beta), either on the same L (bigger physical volume) or on L/2
(four of them interleaved into one L lattice).  The prior's samples must be independent,
so they are taken at least 2 tau_int(M) trajectories apart, tau_int measured.

Steps, all through the ordinary production loop (so resumable, spread over ranks):

1. pilot: ``[coarse] pilot`` trajectories per replica after ``thermalization``, measuring M
   -> ``<coarse file stem>-pilot.h5``; tau_int(M) from the Gamma method, replicas combined;
2. spacing = ``[coarse] spacing``, or ceil(2 (tau_int + 2 dtau_int)) when that is 0: two
   autocorrelation times, with the pilot's tau_int taken at its upper two-sigma bound (a
   short pilot from a cold start tends to underestimate it).  A configured spacing below
   2 tau_int is used, with a warning;
3. production: the pilot's chains continue, one configuration kept every ``spacing``
   trajectories, until ``samples + eval_samples`` are stored -> the coarse file, whose
   attributes record the spacing and tau_int(M) measured on the production itself.

The coarse file has the ensemble layout of :mod:`hpcflow.store` (algorithm hmc at L', beta').
Its identity is the coarse settings, seed and lambda only (``COARSE_KEYS`` of
:mod:`hpcflow.stages`), not the run name or the target, so inputs that name the same
``[coarse] file`` share it: a later run with the same settings reuses it, one with other
settings is refused unless ``--force``.

Of the stored configurations, ordered by trajectory then replica, the first ``samples``
are the training pool and the next ``eval_samples`` are held out: the flow acceptance is
measured on those alone, each used once (:func:`hpcflow.store.load_samples` reads them; the
paths are those of :mod:`hpcflow.stages`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import h5py

from .action import Phi4Action
from .analysis import to_obs
from .config import HMCConfig, TheoryConfig
from .log import logger
from .production import ChainSpec, produce
from .stages import PILOT_KEYS, coarse_path, identity, pilot_path
from .store import load_ensemble, load_samples  # noqa: F401 (load_samples: was defined here)


def coarse_config(cfg):
    """The input as seen by the coarse productions: theory (L', beta', lambda), coarse seed."""
    c = cfg.coarse
    seed = cfg.run.seed if c.seed < 0 else c.seed
    run = dataclasses.replace(cfg.run, name=f"coarse_L{c.L}_b{c.beta:g}", seed=seed)
    theory = TheoryConfig(L=c.L, beta=c.beta, lam=cfg.theory.lam)
    return dataclasses.replace(cfg, run=run, theory=theory)


def tau_int_M(path, S: float = 2.0) -> tuple[float, float]:
    """tau_int(M) of an ensemble file and its error, in trajectories: Gamma method over all
    replicas about their overall mean (:func:`hpcflow.analysis.to_obs`)."""
    e = load_ensemble(path)
    o = to_obs(e.M, e.name)
    o.gamma_method(S=S)
    return float(o.e_tauint[e.name]), float(o.e_dtauint[e.name])


def _pilot_identity(cfg, attrs):
    return identity(cfg, "coarse", PILOT_KEYS)


def generate(cfg, world, force: bool = False) -> Path:
    """Run the coarse stage (pilot, spacing, production); returns the coarse file."""
    c = cfg.coarse
    ccfg = coarse_config(cfg)
    path, pilot = coarse_path(cfg), pilot_path(cfg)
    action = Phi4Action(c.beta, cfg.theory.lam)
    common = dict(replicas=c.replicas, length=c.length, steps=c.steps, integrator=c.integrator)
    if world.is_root:
        path.parent.mkdir(parents=True, exist_ok=True)
    world.comm.Barrier()

    pilot_run = HMCConfig(trajectories=c.pilot, thermalization=c.thermalization, save_every=0, **common)
    produce(ccfg, world, pilot_run, ChainSpec("coarse-pilot", "hmc", action, "coarse-pilot",
                                              identity=_pilot_identity), pilot, force=force)
    tau = tau_int_M(pilot, cfg.analysis.S) if world.is_root else None
    world.idle_barrier()
    tau = world.comm.bcast(tau)
    spacing = c.spacing or max(1, math.ceil(2 * (tau[0] + 2 * tau[1])))
    if world.is_root:
        logger.info(f"[coarse] pilot tau_int(M) = {tau[0]:.2f} +- {tau[1]:.2f} trajectories; "
                    f"spacing {spacing}" + (" (configured)" if c.spacing else
                                            " = ceil(2 (tau_int + 2 dtau_int))"))
        if c.spacing and c.spacing < 2 * tau[0]:
            logger.warning(f"[coarse] WARNING: [coarse] spacing = {c.spacing} is below 2 tau_int(M) = "
                           f"{2 * tau[0]:.1f}: the coarse samples are correlated")

    per_replica = math.ceil((c.samples + c.eval_samples) / c.replicas)
    main = HMCConfig(trajectories=spacing * per_replica, thermalization=0, save_every=spacing, **common)
    spec = ChainSpec("coarse", "hmc", action, "coarse", initial_from=str(pilot),
                     attrs={"spacing": spacing, "samples": c.samples, "eval_samples": c.eval_samples,
                            "pilot_tau_int": tau[0], "pilot_tau_int_error": tau[1]})
    status = produce(ccfg, world, main, spec, path, force=force)
    if world.is_root and status != "skipped":
        t, dt = tau_int_M(path, cfg.analysis.S)
        with h5py.File(path, "r+") as f:
            f.attrs["tau_int"], f.attrs["tau_int_error"] = t, dt
        logger.info(f"[coarse] {path}: {c.replicas} x {per_replica} configurations, spacing "
                    f"{spacing}, tau_int(M) = {t:.2f} +- {dt:.2f} on the production")
        if spacing < 2 * t:
            logger.warning(f"[coarse] WARNING: spacing {spacing} < 2 tau_int(M) = {2 * t:.1f} "
                           f"measured on the production")
    world.idle_barrier()
    return path
