"""The batch driver: ``python -m hpcflow.run INPUT.ini [--force]``.

Runs the stages listed in ``[run] stages`` in order, as one process, under
``mpirun -n N`` or under ``srun``:

    hmc       HMC production of [hmc] replicas over the ranks -> <output>/hmc.h5
    analysis  Gamma-method analysis of the run's ensembles (rank 0) -> <output>/analysis.json,
              <output>/<stage>.obs.json.gz, and the table on standard output

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
from .config import ConfigError


def stage_hmc(cfg, world, force):
    from .action import Phi4Action
    from .production import ChainSpec, produce

    spec = ChainSpec(stage="hmc", algorithm="hmc", action=Phi4Action(cfg.theory.beta, cfg.theory.lam),
                     purpose="hmc")
    produce(cfg, world, cfg.hmc, spec, cfg.output / "hmc.h5", force=force)


def stage_analysis(cfg, world, force):
    from . import analysis

    if world.is_root:
        results = analysis.run(cfg.output, S=cfg.analysis.S, plateau_min=cfg.analysis.plateau_min)
        if results:
            print(analysis.table(results), flush=True)
            out = [r["json"] for r in results]
            (cfg.output / "analysis.json").write_text(
                json.dumps(out[0] if len(out) == 1 else out, indent=1) + "\n")
        else:
            print(f"[analysis] no ensembles in {cfg.output}", flush=True)
    world.comm.Barrier()


STAGES = {"hmc": stage_hmc, "analysis": stage_analysis}


def main(argv=None, comm=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcflow.run", description=__doc__.split("\n")[0])
    ap.add_argument("input", help="INI input file")
    ap.add_argument("--force", action="store_true", help="recompute stages whose results exist")
    args = ap.parse_args(argv)

    # Validate before touching MPI or any file: bad input exits 2 with nothing written.
    try:
        cfg = config_mod.load(args.input)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from mpi4py import MPI

    from .parallel import make_world
    from .production import StageError

    comm = MPI.COMM_WORLD if comm is None else comm
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
