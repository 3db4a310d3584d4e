"""Markov-chain production over MPI replicas into an ensemble file.

:func:`produce` is the loop every production stage shares: each rank advances its block
of replicas as one batch [B, L, L] with HMC over the given action, measures after
thermalization, and every ``checkpoint_every`` trajectories writes the measurements, the
chain positions and the random-stream states to the ensemble file (:mod:`hpcflow.store`).
An interrupted run resumes from the last checkpoint and continues the very same chains.
A production stage differs only in its action, its stream purpose and ``to_physical``,
the map from the chain's variables to the field that is measured (identity for HMC, the
inverse flow for FHMC).

Besides the observables of the measured field phi, every trajectory stores Mz, the lattice
mean of the chain variable z itself (z = phi for HMC), from which the analysis gets the
slow-mode scale c_M = std(Mz) / std(M) (PHYSICS.md section 5.1).  Every checkpoint also
records the production's cost: wall seconds since the segment began (rank 0's clock) added
to those of earlier segments, rank-seconds, ranks and device (:mod:`hpcflow.store`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import observables, store
from .hmc import INTEGRATORS, HMCState, hmc_step, init_state
from .parallel import ReplicaStreams, World
from .store import StageError


@dataclass(frozen=True)
class ChainSpec:
    """What a production runs: a stage name, the action, how to measure."""

    stage: str
    algorithm: str
    action: object
    purpose: str
    to_physical: Callable[[torch.Tensor], torch.Tensor] = lambda phi: phi
    attrs: dict = field(default_factory=dict)  # extra file attributes, part of the fingerprint
    initial_from: str | None = None  # continue the chains of this ensemble file's checkpoint


def log(world: World, msg: str):
    if world.is_root:
        print(msg, flush=True)


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Rank 0's progress lines: trajectories, acceptance, <dH>, <exp(-dH)>, rate, ETA."""

    def __init__(self, world, tag, total, start, replicas, every):
        self.world, self.tag, self.total, self.replicas, self.every = world, tag, total, replicas, every
        self.t0 = self.t_last = time.perf_counter()
        self.start = start
        self.sums = np.zeros(4)  # count, accepted, dH, exp(-dH)

    def add(self, info):
        dH = info.dH.detach()
        self.sums += [dH.numel(), float(info.accepted.sum()), float(dH.sum()),
                      float(torch.exp(-dH).sum())]

    def report(self, done: int, thermalization: int, final=False):
        sums = self.world.comm.allreduce(self.sums)
        now = time.perf_counter()
        if not (final or now - self.t_last >= self.every):
            return
        n = max(sums[0], 1)
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        phase = " (thermalizing)" if done <= thermalization and thermalization else ""
        log(self.world,
            f"[{self.tag}] {done}/{self.total} trajectories{phase} | acc {sums[1] / n:.3f} | "
            f"<dH> {sums[2] / n:+.2e} | <exp(-dH)> {sums[3] / n:.3f} | "
            f"{rate:.1f} traj/s x {self.replicas} replicas | "
            f"{'done in ' + _fmt_time(now - self.t0) if final else 'ETA ' + _fmt_time(eta)}")
        self.sums[:] = 0
        self.t_last = now


def device_label(device) -> str:
    """What a rank computes on, for the cost record: "cpu (N threads)" or "cuda (<name>)"."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    n = torch.get_num_threads()
    return f"{device.type} ({n} thread{'s' if n != 1 else ''})"


def produce(cfg, world: World, section, spec: ChainSpec, path, force: bool = False) -> str:
    """Run (or resume, or skip) one production; returns 'done', 'resumed' or 'skipped'."""
    t_start = time.perf_counter()
    L = cfg.theory.L
    R, N, n_therm = section.replicas, section.trajectories, section.thermalization
    total = n_therm + N
    saved = N // section.save_every if section.save_every else 0
    if R < world.size:
        raise StageError(f"{cfg.path}: [{spec.stage}] replicas: {R} replicas cannot be spread "
                         f"over {world.size} MPI ranks (each rank needs at least one)")
    attrs = store.common_attrs(cfg, spec.stage, spec.algorithm, section) | spec.attrs
    fp = store.fingerprint({k: v for k, v in attrs.items() if k not in ("input", "input_path")})
    attrs["fingerprint"] = fp

    io = store.resolve_io(cfg.run.io)
    block = world.block(R)
    writer = store.EnsembleWriter(path, world.comm, block, io)
    streams = ReplicaStreams(cfg.run.seed, block, spec.purpose)

    existing = None if force else store.inspect(path, world.comm)
    if existing is not None and existing.get("fingerprint") != fp:
        why = existing.get("unreadable", "it was made by a different input")
        raise StageError(f"{path} exists and {why}; rerun with --force to replace it")
    if existing is not None and existing["done"] >= existing["total"]:
        log(world, f"[{spec.stage}] {path} is complete: skipped (use --force to recompute)")
        return "skipped"

    layout = store.layout(L, R, N, saved)
    cost_before = {"seconds": 0.0, "rank_seconds": 0.0, "segments": 0}
    if existing is not None and existing["done"] > 0:
        writer.reopen()
        done = existing["done"]
        missing = writer.ensure(layout)  # a file begun by an older version
        if world.is_root and "cost/first_trajectory" in missing:
            writer.file["cost/first_trajectory"][0] = done  # earlier segments were not timed
        cost_before = writer.read_cost() or cost_before
        phi = torch.from_numpy(writer.read_rows("checkpoint/phi")).to(world.device)
        streams.set_state(writer.read_rows("checkpoint/rng"))
        status = "resumed"
        log(world, f"[{spec.stage}] resuming {path} at trajectory {done}/{total}")
    else:
        writer.create(attrs, layout)
        done = 0
        status = "done"
        if spec.initial_from is not None:
            import h5py

            with h5py.File(spec.initial_from, "r") as f:
                phi = torch.from_numpy(f["checkpoint/phi"][block.start:block.stop]).to(world.device)
        elif section.start == "hot":
            phi = streams.normal((L, L), world.device)
        else:
            phi = torch.zeros(len(block), L, L, dtype=torch.float64, device=world.device)
        log(world, f"[{spec.stage}] {spec.algorithm}: L={L} beta={cfg.theory.beta} "
                   f"lambda={cfg.theory.lam}, {R} replicas on {world.size} rank(s) "
                   f"({len(block)} on rank 0, device {world.device}), {n_therm} + {N} "
                   f"trajectories, {section.integrator} {section.steps} steps, io={io}")

    integrator = INTEGRATORS[section.integrator]
    device = device_label(world.device)

    def cost_now():
        seconds = time.perf_counter() - t_start
        return {"seconds": cost_before["seconds"] + seconds,
                "rank_seconds": cost_before["rank_seconds"] + seconds * world.size,
                "ranks": world.size, "segments": cost_before["segments"] + 1, "device": device}

    state: HMCState = init_state(spec.action, phi)
    progress = Progress(world, spec.stage, total, done, R, cfg.run.progress_every)
    buffers = _Buffers()
    flush_from = max(done - n_therm, 0)

    try:
        while done < total:
            pi = streams.normal((L, L), world.device)
            log_u = streams.log_uniform(world.device)
            state, info = hmc_step(spec.action, state, pi, log_u, integrator,
                                   section.length, section.steps)
            progress.add(info)
            done += 1
            if done > n_therm:
                m = done - n_therm - 1
                with torch.no_grad():
                    phys = spec.to_physical(state.phi)
                    meas = observables.measure(phys)
                    meas["Mz"] = observables.magnetization(state.phi)
                buffers.add(meas, info)
                if section.save_every and (m + 1) % section.save_every == 0:
                    buffers.configs.append((m // section.save_every, phys.cpu().numpy()))
            if done % cfg.run.checkpoint_every == 0 or done == total:
                _flush(writer, buffers, flush_from, state, streams, done, cost_now())
                flush_from = max(done - n_therm, 0)
                progress.report(done, n_therm, final=done == total)
    except Exception:
        raise  # no collective clean-up here: the driver aborts every rank
    except BaseException:
        writer.close()  # interrupted everywhere at once (e.g. KeyboardInterrupt): close cleanly
        raise
    writer.close()
    return status


class _Buffers:
    """Measurements of this rank's replicas since the last flush."""

    def __init__(self):
        self.clear()

    def clear(self):
        self.rows = {"observables/M": [], "observables/Mz": [], "observables/C": [],
                     "observables/Gp": [], "mc/dH": [], "mc/accepted": []}
        self.configs = []

    def add(self, meas, info):
        self.rows["observables/M"].append(meas["M"].cpu().numpy())
        self.rows["observables/Mz"].append(meas["Mz"].cpu().numpy())
        self.rows["observables/C"].append(meas["C"].cpu().numpy())
        self.rows["observables/Gp"].append(meas["Gp"].cpu().numpy())
        self.rows["mc/dH"].append(info.dH.detach().cpu().numpy())
        self.rows["mc/accepted"].append(info.accepted.cpu().numpy().astype(np.int8))


def _flush(writer, buffers, m0, state, streams, done, cost=None):
    """Write measurements [m0, m0 + n), configurations, checkpoint, then the cost and the
    counter."""
    n = len(buffers.rows["mc/dH"])
    if n:
        for name, rows in buffers.rows.items():
            writer.write_rows(name, np.stack(rows, axis=1), (slice(m0, m0 + n),))
    # Every rank saves the same configuration indices, so the collective calls match.
    for index, phi in buffers.configs:
        writer.write_rows("configs", phi, (index,))
    writer.write_rows("checkpoint/phi", state.phi.detach().cpu().numpy())
    writer.write_rows("checkpoint/rng", streams.get_state())
    writer.set_counter(done, cost)
    buffers.clear()
