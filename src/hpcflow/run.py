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

Exit status: 0 success; 2 bad input or a stage that cannot run as asked (nothing written;
the message names file, section and key); 3 stopped by a signal (SIGTERM, SIGINT, SIGUSR1 on
any rank: every rank wrote a checkpoint; rerun to resume, :mod:`hpcflow.signals`); 1 any
other failure (under MPI, one rank's exception aborts every rank with its message).

One run per output: the run holds a lock on ``[run] output`` (:mod:`hpcflow.locks`); a
second run on it exits 2 naming the holder.  An error found after MPI started removes the
output directory when this run created it and it holds nothing.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from . import config as config_mod
from . import locks, preflight, signals
from . import log as log_mod
from .errors import ConfigError, StageError, Stopped
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

    error = None
    if world.is_root:
        try:
            _analysis_on_root(cfg, analysis)
        except StageError as err:  # e.g. a corrupt ensemble: every rank exits 2
            error = str(err)
    world.idle_barrier()
    error = world.comm.bcast(error, root=0)
    if error is not None:
        raise StageError(error)


def _analysis_on_root(cfg, analysis):
    """The analysis stage's work on rank 0: analyse, print the table, write the JSON."""
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


# What each stage of the table hpcflow.stages.STAGES does.
STAGES = {"coarse": stage_coarse, "hmc": stage_hmc, "train": stage_train, "fhmc": stage_fhmc,
          "analysis": stage_analysis}
assert set(STAGES) == set(STAGE_TABLE), "hpcflow.stages and the driver disagree on the stages"


def _print_once(message: str):
    """Print an error before MPI starts, from one process only: rank 0 of a job started
    by mpirun or srun (read from the launcher's environment), or the only process."""
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "0") != "0":
            return
    print(message, file=sys.stderr)


def _out_of_space(err: BaseException) -> bool:
    return getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or \
        "No space left on device" in str(err)


def _stage_locks(cfg, stage, comm) -> list:
    """Locks of the stage's outputs outside ``[run] output`` (a shared coarse or flow file)."""
    out = Path(os.path.abspath(cfg.output))
    main = STAGE_TABLE[stage].path(cfg)
    if stage == "analysis" or out in Path(os.path.abspath(main)).parents:
        return []
    if comm.Get_rank() == 0:
        main.parent.mkdir(parents=True, exist_ok=True)
    return [locks.take(main.with_name(main.name + ".lock"), str(main), comm)]


def _memory(cfg, world):
    """preflight.check_memory with this node's share of the chains and training batch."""
    from mpi4py import MPI

    from .rng import replica_block

    node = world.comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        ranks = node.allgather(world.rank)
    finally:
        node.Free()
    sizes = [s.replicas for s in (cfg.hmc, cfg.fhmc) if s is not None]
    if cfg.coarse is not None:
        sizes.append(cfg.coarse.replicas)
    chains = sum(len(replica_block(max(sizes, default=0), world.size, r)) for r in ranks)
    batch = (sum(len(replica_block(cfg.train.batch_size, world.size, r)) for r in ranks)
             if cfg.train is not None else 0)
    problem = None
    try:
        preflight.check_memory(cfg, chains, batch)
    except ConfigError as err:
        problem = str(err)
    problems = [p for p in world.comm.allgather(problem) if p is not None]
    if problems:
        raise StageError(problems[0])


def main(argv=None, comm=None) -> int:
    ap = argparse.ArgumentParser(prog=log_mod.program_name("hpcflow.run", "hpcflow-run"), description=__doc__.split("\n")[0])
    ap.add_argument("input", help="INI input file")
    ap.add_argument("--force", action="store_true", help="recompute stages whose results exist")
    log_mod.add_arguments(ap)
    args = ap.parse_args(argv)

    # Validate before touching MPI or any file: bad input exits 2 with nothing written.
    try:
        cfg = config_mod.load(args.input)
        preflight.check(cfg, args.force)
    except ConfigError as err:
        _print_once(f"error: {err}")
        return 2

    from mpi4py import MPI

    from .parallel import make_world

    comm = MPI.COMM_WORLD if comm is None else comm
    log_mod.configure(comm.Get_rank(), args.quiet, args.verbose)
    output = Path(cfg.output)
    created = comm.bcast(not output.exists() if comm.Get_rank() == 0 else None, root=0)
    held = []
    stage, before = None, set()
    try:
        with signals.installed():
            world = make_world(cfg.run.device, cfg.run.threads, comm)
            if world.is_root:
                output.mkdir(parents=True, exist_ok=True)
            held.append(locks.take(output / locks.LOCK_NAME, f"[run] output {output}", comm))
            _memory(cfg, world)
            for i, stage in enumerate(cfg.run.stages):
                sig = comm.allreduce(signals.received(), op=MPI.MAX) if i else 0
                if sig:
                    raise Stopped(sig, f"stopped by {signals.name(sig)} before the {stage} stage")
                before = {p for p in STAGE_TABLE[stage].outputs(cfg) if p.exists()}
                stage_held = _stage_locks(cfg, stage, comm)
                try:
                    STAGES[stage](cfg, world, args.force)
                finally:
                    for lock in stage_held:
                        if lock is not None:
                            lock.release()
    except Stopped as err:
        if comm.Get_rank() == 0:
            print(f"stopped: {err}; rerun the same command to resume (exit {signals.EXIT_STOPPED})",
                  file=sys.stderr, flush=True)
        return signals.EXIT_STOPPED
    except StageError as err:
        if comm.Get_rank() == 0:
            print(f"error: {err}", file=sys.stderr)
            _release(held)
            _remove_if_empty(output, created)
        return 2
    except Exception as err:
        if _out_of_space(err) and stage is not None:
            if comm.Get_rank() == 0:  # the stage's new files without a result: no stubs
                from .store import NEW_SUFFIX

                for p in set(STAGE_TABLE[stage].outputs(cfg)) - before:
                    p.unlink(missing_ok=True)
                    p.with_name(p.name + NEW_SUFFIX).unlink(missing_ok=True)  # a new file's draft
                print(f"error: {cfg.path}: [run] output: no space left on the device while the "
                      f"{stage} stage wrote its output ({err}); free space or choose another output",
                      file=sys.stderr, flush=True)
                _release(held)
                _remove_if_empty(output, created)
            if comm.Get_size() > 1:
                comm.Abort(2)
            return 2
        if comm.Get_size() > 1:  # one rank failing must not leave the others waiting forever
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
            comm.Abort(1)
        raise
    finally:
        _release(held)
    return 0


def _release(held):
    while held:
        lock = held.pop()
        if lock is not None:
            lock.release()


def _remove_if_empty(output: Path, created: bool):
    """Remove the output directory this run created when nothing but its lock is in it."""
    if not created or not output.is_dir():
        return
    if {p.name for p in output.iterdir()} <= {locks.LOCK_NAME}:
        (output / locks.LOCK_NAME).unlink(missing_ok=True)
        output.rmdir()


if __name__ == "__main__":
    sys.exit(main())
