"""Markov-chain production over MPI replicas into an ensemble file.

:func:`produce` is the loop every production stage shares, in three parts:

- :func:`open_production` creates the ensemble file, or resumes an interrupted one from its
  last checkpoint (chain positions and random-stream states), or finds it complete;
- :func:`advance` runs one HMC trajectory of this rank's block of replicas, advanced as one
  batch [B, L, L] over the given action, and measures after thermalization;
- :func:`checkpoint` writes the measurements since the last checkpoint, the configurations
  to store, the chain positions and stream states, then the cost and the trajectory
  counter (:mod:`hpcflow.store`), every ``checkpoint_every`` trajectories and at the end.

An interrupted run resumes from the last checkpoint and continues the very same chains.
A production stage differs only in its action, its stream purpose and ``to_physical``,
the map from the chain's variables to the field that is measured (identity for HMC, the
generator phi = g(z) for FHMC).  What is measured and stored per trajectory is the table
:data:`hpcflow.observables.OBSERVABLES` (the observables of phi, Mz of the chain variable
z, dH and the Metropolis decision).  Every checkpoint also records the production's cost:
wall seconds since the segment began (rank 0's clock) added to those of earlier segments,
rank-seconds, ranks and device (:mod:`hpcflow.store`).

This module uses MPI only through the ``world`` it is given (:mod:`hpcflow.parallel`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch

from . import store
from .errors import CorruptFileError, StageError, Stopped
from .hmc import INTEGRATORS, HMCState, hmc_step, init_state
from .log import logger
from .observables import OBSERVABLES, measure_all
from . import rng
from .signals import StopPoll
from .signals import name as signal_name


@dataclass(frozen=True)
class ChainSpec:
    """What a production runs: a stage name, the action, how to measure."""

    stage: str
    algorithm: str
    action: object
    purpose: str
    to_physical: Callable[[torch.Tensor], torch.Tensor] = lambda phi: phi
    attrs: dict = field(default_factory=dict)  # extra file attributes
    initial_from: str | None = None  # continue the chains of this ensemble file's checkpoint
    # (cfg, file attrs) -> {"[section] key": value} that determines the result; default the
    # stage's declared keys (hpcflow.stages.identity)
    identity: Callable[[object, dict], dict] | None = None

    def identity_of(self, cfg, attrs: dict) -> dict:
        """The result identity of this production for the input ``cfg``."""
        if self.identity is not None:
            return self.identity(cfg, attrs)
        from .stages import identity

        return identity(cfg, self.stage)


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Rank 0's progress lines: trajectories, acceptance, <dH> (of the finite dH),
    <exp(-dH)> (an overflowed trajectory counting 0), the overflowed trajectories when there
    are any, rate, ETA, and a warning when the acceptance is below 0.5."""

    def __init__(self, world, tag, total, start, replicas, every):
        self.world, self.tag, self.total, self.replicas, self.every = world, tag, total, replicas, every
        self.t0 = self.t_last = time.perf_counter()
        self.start = start
        self.sums = np.zeros(5)  # count, accepted, dH, exp(-dH) (finite dH), overflowed

    def add(self, info):
        # on the host, in numpy: two copies a trajectory instead of ten small torch
        # operations and four synchronising conversions
        dH = info.dH.detach().cpu().numpy()
        finite = dH[np.isfinite(dH)]
        self.sums += [dH.size, np.count_nonzero(info.accepted.cpu().numpy()), finite.sum(),
                      np.exp(-finite).sum(), dH.size - finite.size]

    def report(self, done: int, thermalization: int, final=False):
        sums = self.world.comm.allreduce(self.sums)
        now = time.perf_counter()
        if not (final or now - self.t_last >= self.every):
            return
        n = max(sums[0], 1)
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        phase = " (thermalizing)" if done <= thermalization and thermalization else ""
        n_finite = max(sums[0] - sums[4], 1)
        overflow = f" | {int(sums[4])} overflowed (dH not finite)" if sums[4] else ""
        low = (" | WARNING: acceptance below 0.5: raise the MD steps" if sums[1] / n < 0.5 else "")
        logger.info(
            f"[{self.tag}] {done}/{self.total} trajectories{phase} | acc {sums[1] / n:.3f} | "
            f"<dH> {sums[2] / n_finite:+.2e} | <exp(-dH)> {sums[3] / n:.3f}{overflow} | "
            f"{rate:.1f} traj/s x {self.replicas} replicas | "
            f"{'done in ' + _fmt_time(now - self.t0) if final else 'ETA ' + _fmt_time(eta)}{low}")
        self.sums[:] = 0
        self.t_last = now


def device_label(device) -> str:
    """What a rank computes on, for the cost record: "cpu (N threads)" or "cuda (<name>)"."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    n = torch.get_num_threads()
    return f"{device.type} ({n} thread{'s' if n != 1 else ''})"


@dataclass
class Production:
    """An open production on this rank: the file, this rank's chains and streams, where
    they are.  Made by :func:`open_production`; :func:`advance` and :func:`checkpoint`
    move it on; :func:`close_production` closes the file."""

    cfg: object
    world: object
    section: object
    spec: ChainSpec
    path: object
    writer: store.EnsembleWriter
    streams: rng.ReplicaStreams | rng.PhiloxStreams
    state: HMCState
    done: int
    total: int
    status: str
    t_start: float
    cost_before: dict
    progress: "Progress"
    buffers: "_Buffers"
    flush_from: int
    trajectory: object = None  # the fused trajectory (hpcflow.fused), None = eager
    rename_to: object = None  # a new file's final path, until its first checkpoint

    @property
    def thermalization(self) -> int:
        return self.section.thermalization

    def cost_now(self) -> dict:
        """The cost totals to record at a checkpoint now (this segment added)."""
        seconds = time.perf_counter() - self.t_start
        c = self.cost_before
        return {"seconds": c["seconds"] + seconds,
                "rank_seconds": c["rank_seconds"] + seconds * self.world.size,
                "ranks": self.world.size, "segments": c["segments"] + 1,
                "device": device_label(self.world.device)}


def open_production(cfg, world, section, spec: ChainSpec, path, force: bool = False) -> Production | None:
    """Create, resume or skip the production of ``spec`` into ``path`` (collective).

    Returns None when the file is already complete (skipped); else a :class:`Production`
    whose ``status`` is ``"resumed"`` (continuing from the file's last checkpoint) or
    ``"done"`` (a new file, chains from a cold or hot start or ``spec.initial_from``).

    Raises
    ------
    StageError
        Fewer replicas than ranks, or an existing file made by another input (without
        ``force``).
    """
    t_start = time.perf_counter()
    L = cfg.theory.L
    R, N, n_therm = section.replicas, section.trajectories, section.thermalization
    total = n_therm + N
    saved = N // section.save_every if section.save_every else 0
    if R < world.size:
        raise StageError(f"{cfg.path}: [{spec.stage}] replicas: {R} replicas cannot be spread "
                         f"over {world.size} MPI ranks (each rank needs at least one)")
    attrs = store.common_attrs(cfg, spec.stage, spec.algorithm, section) | spec.attrs
    ident = json.loads(json.dumps(spec.identity_of(cfg, attrs)))
    attrs["identity"] = json.dumps(ident, sort_keys=True)
    attrs["fingerprint"] = fp = store.fingerprint(ident)

    io = store.resolve_io(cfg.run.io)
    block = world.block(R)
    writer = store.EnsembleWriter(path, world.comm, block, io)
    t_rng = time.perf_counter()
    streams = _streams(cfg, world, spec, block, hot=section.start == "hot")
    t_start += time.perf_counter() - t_rng  # a Philox compilation: logged, not in /cost

    existing = None if force else store.inspect(path, world.comm)
    if existing is not None and "unreadable" in existing:
        raise StageError(f"{path} exists and {existing['unreadable']}; rerun with --force to replace it")
    new_path = Path(path).with_name(Path(path).name + store.NEW_SUFFIX)
    if existing is not None:
        _check_integrity(existing["report"], spec.stage, path)
        if world.is_root and new_path.exists():  # a start that never reached a checkpoint
            logger.info(f"[{spec.stage}] removing {new_path}: an unfinished new start "
                        f"(no checkpoint), superseded by {path}")
            new_path.unlink()
    layout = store.layout(L, R, N, saved)
    if existing is not None:
        _check_identity(path, cfg, spec, existing, ident)
        if existing["done"] >= total:
            logger.info(f"[{spec.stage}] {path} is complete: skipped (use --force to recompute)")
            return None
        if existing["total"] < total:  # more trajectories asked: the same chains, continued
            if world.is_root:
                store.extend(path, layout, {"trajectories": N})
                logger.info(f"[{spec.stage}] {path}: extended from {existing['total']} to "
                            f"{total} trajectories per replica")
            world.idle_barrier()

    cost_before = {"seconds": 0.0, "rank_seconds": 0.0, "segments": 0}
    rename_to = None
    if existing is not None and existing["done"] > 0:
        writer.reopen()
        done = existing["done"]
        writer.slot = existing["slot"]
        if writer.slot is None:  # the single checkpoint of a file from before the slots
            phi_rng = writer.read_rows("checkpoint/phi"), writer.read_rows("checkpoint/rng")
        missing = writer.ensure(layout)  # a file begun by an older version
        if world.is_root and "cost/first_trajectory" in missing:
            writer.file["cost/first_trajectory"][0] = done  # earlier segments were not timed
        cost_before = writer.read_cost() or cost_before
        if writer.slot is not None:
            phi_rng = (writer.read_rows("checkpoint/slot_phi", (writer.slot,)),
                       writer.read_rows("checkpoint/slot_rng", (writer.slot,)))
        phi = torch.from_numpy(phi_rng[0]).to(world.device)
        try:
            streams.set_state(phi_rng[1])
        except ValueError as err:
            raise StageError(f"{path}: {err}; rerun with --force to replace it") from None
        status = "resumed"
        logger.info(f"[{spec.stage}] resuming {path} at trajectory {done}/{total}")
    else:
        # A new file is written beside the result and renamed onto it at its first
        # checkpoint: an old result (--force) stays until the new one can be resumed.
        writer.path, rename_to = new_path, Path(path)
        writer.create(attrs, layout)
        done = 0
        status = "done"
        if spec.initial_from is not None:
            with h5py.File(spec.initial_from, "r") as f:
                phi = torch.from_numpy(store.read_checkpoint(f, block)[0]).to(world.device)
        elif section.start == "hot":
            phi = streams.normal((L, L), world.device)
        else:
            phi = torch.zeros(len(block), L, L, dtype=torch.float64, device=world.device)
        logger.info(f"[{spec.stage}] {spec.algorithm}: L={L} beta={cfg.theory.beta} "
                    f"lambda={cfg.theory.lam}, {R} replicas on {world.size} rank(s) "
                    f"({len(block)} on rank {world.rank}, device {world.device}), {n_therm} + {N} "
                    f"trajectories, {section.integrator} {section.steps} steps, io={io}")
    t_compile = time.perf_counter()
    trajectory = _trajectory(cfg, world, section, spec, phi)
    t_start += time.perf_counter() - t_compile  # paid once per run, logged, not in /cost
    return Production(cfg, world, section, spec, path, writer, streams,
                      init_state(spec.action, phi), done, total, status, t_start, cost_before,
                      Progress(world, spec.stage, total, done, R, cfg.run.progress_every),
                      _Buffers(), max(done - n_therm, 0),
                      trajectory, rename_to)


def _check_integrity(report, stage, path):
    """Refuse a file that fails its checksums (:func:`hpcflow.store.verify`); say when
    parts of it cannot be verified (written before checksums existed)."""
    if report["status"] == "corrupt":
        raise CorruptFileError("\n".join(report["text"]) + f"\n{path}: fails its checksums; "
                               "rerun with --force to recompute it")
    if report["status"] == "unverified":
        logger.warning(f"[{stage}] {path}: unverified ({'; '.join(report['unverified'])})")


def _check_identity(path, cfg, spec, existing, ident):
    """Refuse an existing file whose result identity differs from ``ident``, naming every
    differing key.  A file without a stored identity (hpcflow <= 0.2.0, whose fingerprint
    hashed the version in) is judged by the identity of the input text stored in it."""
    from . import config as config_mod
    from .stages import identity_diff

    attrs = existing["attrs"]
    if "identity" in attrs:
        old = json.loads(attrs["identity"])
    else:
        try:
            old_cfg = config_mod.parse(str(attrs.get("input", "")), f"{path} (its stored input)")
        except config_mod.ConfigError as err:
            raise StageError(f"{path} exists and its stored input cannot be compared with "
                             f"{cfg.path} ({err}); rerun with --force to replace it") from None
        old = json.loads(json.dumps(spec.identity_of(old_cfg, attrs)))
    diff = identity_diff(old, ident)
    if diff:
        raise StageError(f"{path} exists and was made from a different input: {'; '.join(diff)} "
                         f"({cfg.path}); rerun with --force to replace it")


def _streams(cfg, world, spec, block, hot: bool = False):
    """This rank's replica streams of ``[run] rng``; Philox compiled (its per-trajectory
    draw of this lattice, and for a ``hot`` start its first configuration's, warmed up
    here, outside the timed production) unless ``[run] compile = off``, eager with one
    line when compilation fails under ``auto``."""
    generator = getattr(cfg.run, "rng", "pcg64")
    mode = getattr(cfg.run, "compile", "off")
    streams = rng.streams(generator, cfg.run.seed, block, spec.purpose, world.device)
    if generator == "pcg64":
        if world.device.type == "cuda" and world.is_root:
            logger.info(f"[{spec.stage}] momenta from numpy PCG64 on the host, copied to "
                        f"{world.device} every trajectory: [run] rng = philox draws them there")
        return streams
    if mode != "off":
        t0 = time.perf_counter()
        try:
            streams.compile()
            streams.warm_up((cfg.theory.L, cfg.theory.L),
                            ("momenta", "normal") if hot else ("momenta",))
        except Exception as err:  # what inductor raises without a working compiler varies
            from .fused import _first_line

            if mode == "on":
                raise StageError(f"{cfg.path}: [run] compile = on: the Philox draws: "
                                 f"torch.compile failed: {_first_line(err)}") from None
            if world.is_root:
                logger.info(f"[{spec.stage}] [compile] Philox draws: torch.compile failed: "
                            f"{_first_line(err)}; drawing eager")
            return rng.streams(generator, cfg.run.seed, block, spec.purpose, world.device)
        if world.is_root:
            logger.info(f"[{spec.stage}] Philox draws compiled in {time.perf_counter() - t0:.1f} s")
    return streams


def _trajectory(cfg, world, section, spec, phi):
    """The fused trajectory of ``[run] compile`` (None: eager), compiled here, once per
    production, on a dummy state (the chains' random streams are not touched)."""
    mode = getattr(cfg.run, "compile", "off")
    if mode == "off":
        return None
    from . import fused

    t0 = time.perf_counter()
    example = (torch.zeros_like(phi), torch.ones_like(phi))
    try:
        fn, is_fused = fused.choose_trajectory(
            mode, spec.action, INTEGRATORS[section.integrator], section.length, section.steps,
            example, log=lambda msg: logger.info(f"[{spec.stage}] {msg}") if world.is_root else None)
    except fused.CompileUnavailable as err:
        raise StageError(f"{cfg.path}: [run] compile = on: {err}") from None
    if not is_fused:
        return None
    rows = getattr(fn, "rows", None)
    chunks = f", in chunks of {rows}" if rows else ""
    if getattr(fn, "layout", None):
        chunks += f", {fn.layout}" + (", Metropolis test fused" if hasattr(fn, "step") else "")
    logger.info(f"[{spec.stage}] fused trajectory compiled in {time.perf_counter() - t0:.1f} s "
                f"(torch.compile, {len(phi)} chains on rank {world.rank}{chunks})")
    return fn


def advance(p: Production) -> None:
    """One trajectory of this rank's replicas; measure it (after thermalization) into the
    buffers, with the configuration when it is one to store."""
    section, L, device = p.section, p.cfg.theory.L, p.world.device
    pi, log_u = p.streams.momenta((L, L), device)
    p.state, info = hmc_step(p.spec.action, p.state, pi, log_u, INTEGRATORS[section.integrator],
                             section.length, section.steps, trajectory=p.trajectory)
    p.progress.add(info)
    p.done += 1
    if p.done > p.thermalization:
        m = p.done - p.thermalization - 1
        with torch.no_grad():
            phys = p.spec.to_physical(p.state.phi)
        p.buffers.add(measure_all(phys, p.state.phi, info))
        if section.save_every and (m + 1) % section.save_every == 0:
            p.buffers.configs.append((m // section.save_every, phys.cpu().numpy()))


def due(p: Production) -> bool:
    """Whether a checkpoint is due after the trajectory just done."""
    return p.done % p.cfg.run.checkpoint_every == 0 or p.done == p.total


def checkpoint(p: Production) -> None:
    """Write what was measured since the last checkpoint and the chains' checkpoint, then
    the counter (collective); report progress."""
    _flush(p.writer, p.buffers, p.flush_from, p.state, p.streams, p.done, p.cost_now())
    p.flush_from = max(p.done - p.thermalization, 0)
    if p.rename_to is not None:  # the new file's first checkpoint: it becomes the result
        p.world.comm.Barrier()
        if p.world.is_root:
            os.replace(p.writer.path, p.rename_to)
        p.world.comm.Barrier()
        p.writer.path, p.rename_to = p.rename_to, None
    p.progress.report(p.done, p.thermalization, final=p.done == p.total)


def close_production(p: Production) -> None:
    """Close the file (collective)."""
    p.writer.close()


def produce(cfg, world, section, spec: ChainSpec, path, force: bool = False) -> str:
    """Run (or resume, or skip) one production; returns 'done', 'resumed' or 'skipped'.

    Parameters
    ----------
    cfg : hpcflow.config.Config
        The input (theory, run settings).
    world : hpcflow.parallel.World
        The MPI world; this rank advances its block of the replicas.
    section : hpcflow.config.HMCConfig
        The production's settings ([hmc], [fhmc] or the coarse stage's).
    spec : ChainSpec
        Stage name, action, stream purpose, map to the measured field.
    path : path-like
        The ensemble file.
    force : bool
        Replace an existing file instead of resuming, skipping or refusing.

    Raises
    ------
    hpcflow.errors.Stopped
        A stop signal reached a rank (:mod:`hpcflow.signals`): every rank wrote the
        checkpoint of the same trajectory and closed the file.
    """
    p = open_production(cfg, world, section, spec, path, force)
    if p is None:
        return "skipped"
    poll = StopPoll(world.comm)
    try:
        while p.done < p.total:
            advance(p)
            stop = poll()
            if due(p) or stop:
                checkpoint(p)
            if stop:
                close_production(p)
                raise Stopped(stop, f"[{spec.stage}] stopped by {signal_name(stop)} at trajectory "
                                    f"{p.done}/{p.total}, checkpoint written to {path}")
    except Exception:
        raise  # Stopped closed the file above; for any other error the driver aborts every rank
    except BaseException:
        close_production(p)  # interrupted everywhere at once (e.g. KeyboardInterrupt): close cleanly
        raise
    close_production(p)
    return p.status


class _Buffers:
    """Measurements of this rank's replicas since the last flush, one list per record of
    :data:`hpcflow.observables.OBSERVABLES` (keyed by dataset)."""

    def __init__(self):
        self.clear()

    def clear(self):
        self.rows = {o.dataset: [] for o in OBSERVABLES}
        self.configs = []

    def add(self, meas: dict):
        for o in OBSERVABLES:
            self.rows[o.dataset].append(meas[o.name])


def _consecutive(configs):
    """[(index, field)] -> [(first index, [fields])], one entry per run of consecutive
    indices."""
    runs = []
    for index, phi in configs:
        if runs and runs[-1][0] + len(runs[-1][1]) == index:
            runs[-1][1].append(phi)
        else:
            runs.append((index, [phi]))
    return runs


def _flush(writer, buffers, m0, state, streams, done, cost=None):
    """Write measurements [m0, m0 + n), configurations, checkpoint, then the cost and the
    counter."""
    n = len(next(iter(buffers.rows.values())))
    r0 = writer.block.start
    if n:
        crcs = []
        for name, rows in buffers.rows.items():
            rows = np.stack(rows, axis=1)
            writer.write_rows(name, rows, (slice(m0, m0 + n),))
            crcs.append(store.row_checksums(rows, r0, m0))
        writer.write_rows("integrity/rows", np.stack(crcs, axis=-1), (slice(m0, m0 + n),))
    store.kill_point("rows")
    # Every rank saves the same configuration indices, so the collective calls match; a run
    # of consecutive indices (all of them, between two checkpoints) is one write each
    for first, fields in _consecutive(buffers.configs):
        rows = np.stack(fields, axis=1)                                   # [B, k, L, L]
        where = (slice(first, first + len(fields)),)
        writer.write_rows("configs", rows, where)
        writer.write_rows("integrity/configs", store.row_checksums(rows, r0, first), where)
    store.kill_point("configs")
    writer.write_checkpoint(state.phi.detach().cpu().numpy(), streams.get_state(), done, cost)
    buffers.clear()
