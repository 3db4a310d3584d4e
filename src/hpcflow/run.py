"""The batch driver: ``python -m hpcflow.run INPUT.ini [--force] [--quiet | --verbose]``.

Runs the stages listed in ``[run] stages`` in order, as one process, under
``mpirun -n N`` or under ``srun`` (what each stage needs and writes: :mod:`hpcflow.stages`):

    coarse    decorrelated coarse ensemble (beta', L') for the coarse priors -> [coarse] file
    hmc       HMC production of [hmc] replicas over the ranks -> <output>/hmc.h5
    train     reverse-KL training of the [flow] from its prior -> <output>/flow.pt, train.json
    fhmc      HMC on the flowed action, measured on phi = g(z)  -> <output>/fhmc.h5
    analysis  Gamma-method analysis of the run's ensembles (rank 0) -> <output>/analysis.json,
              <output>/<stage>.obs.json.gz, and the table on standard output

Progress goes to standard output through the ``hpcflow`` logger (:mod:`hpcflow.log`):
rank 0 at INFO, ``--quiet`` warnings only, ``--verbose`` everything from every rank.

A stage whose output is complete is skipped, an interrupted one resumes from its last
checkpoint, and ``--force`` recomputes.  An existing result made from a different input is
never replaced without ``--force``.

Exit status: 0 success, 2 bad input (nothing written), 1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import config as config_mod
from . import log as log_mod
from .errors import ConfigError, StageError
from .log import logger
from .stages import STAGES as STAGE_TABLE
from .stages import flow_path  # noqa: F401 (also importable from here, as before)


def stage_coarse(cfg, world, force):
    from .coarse import generate

    generate(cfg, world, force)


def stage_hmc(cfg, world, force):
    from .action import Phi4Action
    from .production import ChainSpec, produce

    spec = ChainSpec(stage="hmc", algorithm="hmc", action=Phi4Action(cfg.theory.beta, cfg.theory.lam),
                     purpose="hmc")
    produce(cfg, world, cfg.hmc, spec, STAGE_TABLE["hmc"].path(cfg), force=force)


def stage_train(cfg, world, force):
    from .action import Phi4Action
    from .priors import make_prior
    from .train import train

    def prior():  # made only when there is training to do
        try:
            return make_prior(cfg)
        except ValueError as err:
            raise StageError(f"{cfg.path}: [flow] prior: {err}") from None

    target = Phi4Action(cfg.theory.beta, cfg.theory.lam)
    train(cfg, world, prior, target, STAGE_TABLE["train"].path(cfg), force=force)


def stage_fhmc(cfg, world, force):
    from .action import FlowedAction, Phi4Action
    from .production import ChainSpec, produce
    from .train import load_flow

    path = STAGE_TABLE["train"].path(cfg)
    if not path.exists():
        raise StageError(f"{path}: no trained flow (run the train stage first, or set [flow] file)")
    flow, payload = load_flow(path, cfg, world.device)
    flow.eval()
    action = FlowedAction(Phi4Action(cfg.theory.beta, cfg.theory.lam), flow)
    attrs = {"flow_file": str(path), "flow_prior": payload["prior"],
             "flow_spec": json.dumps(payload["spec"], sort_keys=True),
             "flow_fingerprint": payload["fingerprint"],
             "flow_acceptance": float(payload.get("acceptance") or float("nan"))}
    spec = ChainSpec(stage="fhmc", algorithm="fhmc", action=action, purpose="fhmc",
                     to_physical=action.to_physical, attrs=attrs, identity=_fhmc_identity)
    produce(cfg, world, cfg.fhmc, spec, STAGE_TABLE["fhmc"].path(cfg), force=force)


def _fhmc_identity(cfg, attrs):
    """The fhmc result: its declared keys and the trained flow (its fingerprint)."""
    from .stages import identity

    return identity(cfg, "fhmc") | {"[flow] trained flow (fingerprint)": attrs.get("flow_fingerprint")}


def stage_analysis(cfg, world, force):
    from . import analysis

    if world.is_root:
        results = analysis.run(cfg.output, S=cfg.analysis.S, plateau_min=cfg.analysis.plateau_min)
        others = []
        for other in cfg.analysis.compare:
            if Path(other).exists():
                others += analysis.run(other, S=cfg.analysis.S, plateau_min=cfg.analysis.plateau_min,
                                       write=False)
            else:
                logger.warning(f"[analysis] [analysis] compare: {other} does not exist (yet); not shown")
        if results:
            print(analysis.table(others + results), flush=True)  # the stage's result, not a log line
            out = [r["json"] for r in results]
            STAGE_TABLE["analysis"].path(cfg).write_text(
                json.dumps(out[0] if len(out) == 1 else out, indent=1) + "\n")
        else:
            logger.warning(f"[analysis] no ensembles in {cfg.output}")
    world.idle_barrier()


# What each stage of the table hpcflow.stages.STAGES does.
STAGES = {"coarse": stage_coarse, "hmc": stage_hmc, "train": stage_train, "fhmc": stage_fhmc,
          "analysis": stage_analysis}
assert set(STAGES) == set(STAGE_TABLE), "hpcflow.stages and the driver disagree on the stages"


def main(argv=None, comm=None) -> int:
    ap = argparse.ArgumentParser(prog=log_mod.program_name("hpcflow.run", "hpcflow-run"), description=__doc__.split("\n")[0])
    ap.add_argument("input", help="INI input file")
    ap.add_argument("--force", action="store_true", help="recompute stages whose results exist")
    log_mod.add_arguments(ap)
    args = ap.parse_args(argv)

    # Validate before touching MPI or any file: bad input exits 2 with nothing written.
    try:
        cfg = config_mod.load(args.input)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from mpi4py import MPI

    from .parallel import make_world

    comm = MPI.COMM_WORLD if comm is None else comm
    log_mod.configure(comm.Get_rank(), args.quiet, args.verbose)
    try:
        world = make_world(cfg.run.device, cfg.run.threads, comm)
        if world.is_root:
            Path(cfg.output).mkdir(parents=True, exist_ok=True)
        comm.Barrier()
        for stage in cfg.run.stages:
            STAGES[stage](cfg, world, args.force)
    except StageError as err:
        if comm.Get_rank() == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception:
        if comm.Get_size() > 1:  # one rank failing must not leave the others waiting forever
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
            comm.Abort(1)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
