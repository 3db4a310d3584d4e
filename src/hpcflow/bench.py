"""Benchmarks: ``python -m hpcflow.bench [--quick] [--out bench.json]``, one JSON, one run.

What a production costs on one device, measured in one process so that ratios compare
like with like (issue 9).  Rates are in *site-steps per second*: B chains x L^2 sites x
n MD steps per trajectory, divided by the seconds of one batch trajectory.  The paths of
one HMC cell, and those of the FHMC comparison, are timed in the same rounds
(:func:`seconds_together`: a block of each in turn, ``--repeat`` rounds, each one's fastest
block), so the ratios within a cell compare blocks measured seconds apart.

``hmc``
    For every L of ``--Ls`` (16, 64) and B of ``--batches`` (1, 64, 256, 1024): HMC with
    leapfrog, ``--steps`` (10) steps of length 1, on a batch [B, L, L]:

    - ``eager`` and ``compiled`` (the fused trajectory of :mod:`hpcflow.fused` as a
      production runs it: its ``layout``, site-major on a CPU from 16 chains, the
      Metropolis test fused (``metropolis_fused``), compiled once per shape, its
      ``compile_seconds`` reported apart and not in any rate; on a CPU a batch of more than
      ``fused.CPU_CHUNK_ABOVE`` sites (site-major: ``fused.CPU_CHUNK_SITES``) runs in
      chunks of ``chunk_rows`` replicas, and ``unchunked`` is the same trajectory in one
      call, for comparison): the full ``hmc_step`` (momenta from the replicas' streams,
      trajectory, Metropolis), and the trajectory alone (phi, pi) -> (phi', pi', S(phi'));
      ``compiled.fused_metropolis``: the step with the Metropolis test fused and without
      (the production's one and the other, compiled with the same layout), ``speedup`` =
      unfused / fused seconds, ``in_production`` which one productions run;
      ``compiled.other_layout``: the other layout as a production would compile it, its
      rates and ``speedup_of_layout`` = its step seconds / the production's;
      ``compiled.inductor_default``: the production's layout with its MD graph compiled at
      inductor's default settings instead of ``fused.MD_INDUCTOR`` (``md_inductor``), its
      rates and ``trajectory_speedup_of_md_inductor``, ``step_speedup_of_md_inductor`` =
      its seconds / the production's;
    - ``reference``: the same trajectory by a C loop (``ref/leapfrog.c``, one pass over the
      sites per step, compiled now with the system's ``--cc`` at -O3 -march=native and
      called through ctypes on the same [B, L, L] float64 layout).  It is first checked
      against hpcflow's eager trajectory from the same (phi, pi): phi and pi to
      ``REF_TOLERANCE`` (1e-12) absolute, S to 1e-12 relative; only then timed.  Without a C
      compiler (or if it fails) the reference is skipped with a note and the ratios are None.
    - ``ratio_to_reference``: hpcflow's rate / the reference's rate for each path;
    - ``momenta``: the seconds hmc_step spends drawing its random numbers from the replicas'
      streams (B L^2 normals, B uniforms), ns per normal, the fraction of the compiled
      hmc_step, and ``bound_ratio_to_reference`` = reference / momenta seconds, the ceiling
      of ``ratio_to_reference`` that drawing them sets however fast the trajectory is.
    - ``compiled.philox``: the compiled hmc_step with the momenta from compiled Philox
      streams (``[run] rng = philox``) instead, timed in the same rounds: rates,
      ``speedup_over_pcg64`` (compiled step seconds / this one's), its ``momenta`` (ns per
      normal, fraction of the step, bound), and ``ratio_to_reference.compiled_philox_hmc_step``.
``bandwidth``
    The device's copy bandwidth (a 256 MB float64 copy, read + write counted) and the HMC
    bound it sets at 40 bytes per site-step; every HMC cell's ``ratio_to_bandwidth_bound``
    divides its rates by that bound (above 1 where a batch fits in a cache).
``call_overhead``
    Seconds per call of a two-operation graph on 4 numbers through ``torch.compile``
    (dynamo) and as :class:`hpcflow.fused.CompiledGraph` calls every production graph
    (directly), and eager: what each compiled call costs beside its kernel.
``fhmc``
    FHMC over the minimal flow (k = 3, one coupling layer, no hidden channels; generic
    weights) against HMC at L = ``--fhmc-L`` (16), B = ``--fhmc-batch`` (64): seconds per
    trajectory (the full hmc_step) and per force of each path, and the ratios FHMC / HMC
    (eager / eager, and best / best: each algorithm's fastest path).  The compiled FHMC path
    is :mod:`hpcflow.fused`'s (the flowed force and action of :class:`~hpcflow.fused.StencilFlow`
    on its checkerboard halves, the one ``[run] compile`` selects); ``force_seconds``: its
    force and action (one graph, the last of a trajectory); ``kick_drift_seconds``: the
    graph of every other force, kick and drift included; ``inductor_default``: the force
    and action compiled at inductor's defaults instead of ``fused.FLOW_INDUCTOR``, same
    rounds, and ``force_speedup_of_flow_inductor``.
``memory``
    Bytes per replica at the largest B and L, two ways: ``state_bytes_per_replica``, from
    tensor sizes, what a chain keeps between trajectories (phi, pi: 2 L^2 float64, S: one);
    and ``peak_rss_bytes_per_replica`` = (peak RSS at B_max - peak RSS at B_ref) /
    (B_max - B_ref), each peak measured in a fresh process (``--memory-probe``) running a few
    HMC steps after its peak was reset past imports and compilation: the working set of a
    trajectory, temporaries and allocator included (eager and compiled paths).
``weak_scaling``
    A small HMC production (``python -m hpcflow.run``, L = 16, ``--scaling-replicas`` per
    rank, eager) under ``mpirun --oversubscribe -n 1`` and ``-n 2`` with the same replicas
    per rank; efficiency = seconds(1 rank) / seconds(2 ranks), the seconds being the
    production's own ``/cost/seconds`` (start-up and imports excluded).  The pair runs
    ``--scaling-repeat`` times, 1 and 2 ranks alternating (so that a disturbance of the
    machine lasting minutes falls on both); ``efficiency`` is median(1-rank seconds) /
    median(2-rank seconds), with every run's seconds and each pair's efficiency kept
    (``efficiency_by_pair``: its spread is the measurement's).  Without ``mpirun`` it is
    skipped and the command is recorded.
``production``
    Whole single-rank productions (``python -m hpcflow.run``, L = ``--production-L`` (16),
    ``--production-replicas`` (64), ``--production-trajectories`` (1000), configurations
    saved every 10, checkpoints every 100) for every ``[run] compile`` x ``[run] rng`` of
    :data:`PRODUCTION_VARIANTS`, ``--production-repeat`` (3) rounds of the variants in turn:
    median ``/cost/seconds`` (compilation excluded), median process wall time (start-up and
    compilation included), and the speedup over compile = off, rng = pcg64.
``targets``
    The issue's targets as ratios with pass flags (None where not measured):
    HMC at B = 64, L = 16 >= 40% of the reference, at L = 64 >= 50% (the full HMC step,
    best path; ``momenta_bound`` the most the random numbers alone allow, see ``momenta``); FHMC / HMC per trajectory <= 2 (best / best); weak scaling >= 90%;
    replica trajectories per second at B = 1024 >= those at B = 64 (per L, best path).
``machine``
    CPU model, cores, load averages before and after, torch and threads, the C compiler.

Timings: each case is run once (warm-up), then in blocks of at least ``--min-seconds``,
``--repeat`` times, keeping the fastest block (the least disturbed one).  ``--quick`` is a
smoke run (L = 16, B = 1 and 64, short blocks, a short scaling production).

``--frozen-backends`` runs instead the comparison of the two backends of
:class:`hpcflow.flows.FrozenFlow` ("sparse" site matrices, "fft" products in Fourier space):
one flowed-force evaluation (frozen generator with pullback, then the pullback of a force)
on a batch of ``--fhmc-batch`` (64) configurations, best of ``--repeat`` timings, for every
case of ``FROZEN_CASES`` (one coupling layer, lattice sizes and conv architectures).  A
backend whose single evaluation exceeds ``--max-seconds`` (2 s) is recorded as skipped.
``FrozenFlow(method="auto")`` is set from this table (``results/frozen-backends-cpu.json``):

    python -m hpcflow.bench --frozen-backends --repeat 5 --out results/frozen-backends-cpu.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import __version__
from .allocator import tune as tune_allocator
from .action import Phi4Action
from .hmc import INTEGRATORS, hmc_step, init_state
from . import rng
from .rng import ReplicaStreams
from .fused import LAYOUTS

#: the C reference loop, compiled at bench time
REF_SOURCE = Path(__file__).resolve().parent / "ref" / "leapfrog.c"
REF_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")
#: agreement required of the reference before it is timed (phi, pi absolute; S relative)
REF_TOLERANCE = 1e-12


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn, device, min_seconds: float = 0.3, repeat: int = 3) -> float:
    """Seconds per call of ``fn``: :func:`seconds_together` of ``fn`` alone (a warm-up call,
    which may compile, a call that sizes a block of about ``min_seconds``, then the fastest
    of ``repeat`` blocks)."""
    return seconds_together({"fn": fn}, device, min_seconds, repeat)["fn"]


def seconds_together(fns: dict, device, min_seconds: float = 0.3, repeat: int = 3) -> dict:
    """Seconds per call of each of ``fns`` ({name: fn}), timed in turn: every fn gets a
    warm-up call (which may compile) and a second call that sizes its block (about
    ``min_seconds``), then ``repeat`` rounds time one block of each fn, one after the
    other; each fn's fastest block.  A ratio of two of these compares blocks measured
    seconds apart, so a slowdown of a shared machine lasting longer than a round falls on
    both (timed one after the other, they could be minutes apart)."""
    n = {}
    for name, fn in fns.items():
        fn()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        n[name] = max(1, math.ceil(min_seconds / max(time.perf_counter() - t0, 1e-9)))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n[name]):
                fn()
            _sync(device)
            best[name] = min(best[name], (time.perf_counter() - t0) / n[name])
    return best


def bench_streams(generator: str, B: int, L: int, device, purpose: str, seed: int):
    """The replicas' streams a production of ``[run] rng = generator`` draws from (Philox
    compiled and warmed up for [B, L, L] draws: raises when compilation fails)."""
    streams = rng.streams(generator, seed, range(B), purpose, device, compiled=True)
    if generator == "philox":
        streams.warm_up((L, L))
    return streams


def hmc_runner(action, B: int, L: int, steps: int, device, trajectory=None, seed: int = 1,
               generator: str = "pcg64"):
    """A function that runs one HMC trajectory (``hmc_step``, leapfrog, length 1) of B chains,
    each call continuing the chains: momenta and Metropolis numbers from the replicas'
    streams of ``generator`` (``[run] rng``), as in a production."""
    streams = bench_streams(generator, B, L, device, "bench", seed)
    state = init_state(action, 0.5 * streams.normal((L, L), device))
    integ = INTEGRATORS["leapfrog"]

    def one():
        nonlocal state
        state, _ = hmc_step(action, state, *streams.momenta((L, L), device), integ, 1.0, steps,
                            trajectory=trajectory)
    return one


def start_point(B: int, L: int, device, seed: int = 2):
    """(phi, pi): a start configuration 0.5 N(0, 1) and momenta N(0, 1), [B, L, L]."""
    streams = ReplicaStreams(seed, range(B), "bench-start")
    return 0.5 * streams.normal((L, L), device), streams.normal((L, L), device)


# ---------------------------------------------------------------------------------------
# the C reference loop


class Reference:
    """The compiled C leapfrog (``ref/leapfrog.c``) behind ctypes.

    ``trajectory(phi, pi)`` -> (phi', pi', S(phi')) like :func:`hpcflow.fused.eager_trajectory`
    (on CPU copies of the inputs); ``run_inplace(phi, pi, S)`` advances contiguous CPU
    float64 tensors in place (what is timed)."""

    def __init__(self, library: Path, beta: float, lam: float, length: float, n_steps: int):
        self.lib = ctypes.CDLL(str(library))
        self.fn = self.lib.hpcflow_leapfrog
        self.fn.restype = None
        self.fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_double] * 3 \
            + [ctypes.c_long]
        self.beta, self.lam, self.eps, self.n_steps = beta, lam, length / n_steps, n_steps

    def run_inplace(self, phi: torch.Tensor, pi: torch.Tensor, S: torch.Tensor) -> None:
        for t in (phi, pi, S):
            if t.device.type != "cpu" or t.dtype != torch.float64 or not t.is_contiguous():
                raise ValueError("the C reference needs contiguous float64 CPU tensors")
        B, L0, L1 = phi.shape
        if pi.shape != phi.shape or S.shape != (B,):
            raise ValueError(f"shapes phi {tuple(phi.shape)}, pi {tuple(pi.shape)}, "
                             f"S {tuple(S.shape)}")
        self.fn(phi.data_ptr(), pi.data_ptr(), S.data_ptr(), B, L0, L1, self.beta, self.lam,
                self.eps, self.n_steps)

    def trajectory(self, phi: torch.Tensor, pi: torch.Tensor):
        phi = phi.detach().to("cpu", torch.float64, copy=True).contiguous()
        pi = pi.detach().to("cpu", torch.float64, copy=True).contiguous()
        S = torch.empty(phi.shape[0], dtype=torch.float64)
        self.run_inplace(phi, pi, S)
        return phi, pi, S


def compiler_info(cc: str) -> dict:
    """{"cc": path, "version": first line of ``cc --version``} or {"cc": None}."""
    path = shutil.which(cc)
    if path is None:
        return {"cc": None}
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
        version = (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as err:
        version = f"unknown ({type(err).__name__})"
    return {"cc": path, "version": version}


def build_reference(cc: str, workdir: Path) -> tuple[Path | None, dict]:
    """Compile ``ref/leapfrog.c`` into ``workdir`` with ``cc``: (library or None, info).

    No compiler on PATH, or a failing compile, gives None and ``info["skipped"]``: a note
    with the reason (the first line of the compiler's message), not an exception."""
    info = {"source": REF_SOURCE.name, "flags": " ".join(REF_FLAGS), **compiler_info(cc)}
    if info["cc"] is None:
        info["skipped"] = f"no C compiler {cc!r} on PATH: the reference loop is not timed"
        return None, info
    library = workdir / "hpcflow_ref_leapfrog.so"
    t0 = time.perf_counter()
    out = subprocess.run([info["cc"], *REF_FLAGS, "-o", str(library), str(REF_SOURCE)],
                         capture_output=True, text=True)
    info["compile_seconds"] = time.perf_counter() - t0
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines() or ["(no message)"]
        info["skipped"] = f"{cc} failed (status {out.returncode}): {lines[0]}"
        return None, info
    return library, info


def check_reference(ref: Reference, action, L: int, B: int, n_steps: int) -> dict:
    """The reference's trajectory against hpcflow's eager one from the same (phi, pi):
    {"phi_max_abs_diff", "pi_max_abs_diff", "S_max_rel_diff", "agrees"} (on CPU)."""
    from .fused import eager_trajectory

    phi0, pi0 = start_point(B, L, "cpu")
    phi_h, pi_h, S_h = eager_trajectory(action, INTEGRATORS["leapfrog"], 1.0, n_steps)(phi0, pi0)
    phi_r, pi_r, S_r = ref.trajectory(phi0, pi0)
    d = {"L": L, "B": B,
         "phi_max_abs_diff": float((phi_r - phi_h).abs().max()),
         "pi_max_abs_diff": float((pi_r - pi_h).abs().max()),
         "S_max_rel_diff": float(((S_r - S_h).abs() / S_h.abs().clamp_min(1.0)).max())}
    d["agrees"] = (d["phi_max_abs_diff"] <= REF_TOLERANCE and d["pi_max_abs_diff"] <= REF_TOLERANCE
                   and d["S_max_rel_diff"] <= REF_TOLERANCE)
    return d


# ---------------------------------------------------------------------------------------
# HMC: eager, compiled, reference


def _graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _path_rates(sec: float, tsec: float, sites: int, B: int) -> dict:
    """Rates of a path from its seconds per hmc_step and per trajectory alone."""
    return {"hmc_step_seconds": sec, "hmc_site_steps_per_second": sites / sec,
            "replica_trajectories_per_second": B / sec,
            "trajectory_seconds": tsec, "trajectory_site_steps_per_second": sites / tsec}


def compile_for_shape(action, steps: int, example, chunk_sites: int | None = None,
                      reset: bool = True, metropolis: bool | None = None,
                      layout: str | None = None, inductor: dict | None = None
                      ) -> tuple[object, dict]:
    """The fused trajectory compiled for one batch shape: (function or None, info), as a
    production compiles it (chunked in replicas on a CPU, :func:`hpcflow.fused.chunk_rows`;
    ``chunk_sites`` 0: the whole batch in one call).

    dynamo's caches are reset first (inductor's disk cache is kept), so each shape is one
    fresh compilation, timed apart (``compile_seconds``), and the process never reaches
    dynamo's recompilation limit however many shapes the bench visits; ``reset`` False
    keeps the functions compiled before usable (for a second function timed with them)."""
    from . import fused

    if reset:
        torch._dynamo.reset()
    g0 = _graphs()
    t0 = time.perf_counter()
    try:
        fn = fused.compile_trajectory(action, INTEGRATORS["leapfrog"], 1.0, steps, example,
                                      chunk_sites=chunk_sites, metropolis=metropolis,
                                      layout=layout, inductor=inductor)
    except fused.CompileUnavailable as err:
        return None, {"unavailable": str(err)}
    return fn, {"compile_seconds": time.perf_counter() - t0, "graphs_before_timing": _graphs() - g0,
                "layout": getattr(fn, "layout", None),
                "md_inductor": fused.md_inductor(action) if inductor is None else inductor,
                "metropolis_fused": hasattr(fn, "step"),
                "chunk_rows": getattr(fn, "rows", example[0].shape[0]), "_g0": g0}


def momenta_draw(B: int, L: int, device, generator: str = "pcg64"):
    """One trajectory's random numbers drawn the way a production does: B x L^2 momenta and
    B Metropolis numbers from the replicas' own streams (``pcg64``:
    :class:`hpcflow.rng.ReplicaStreams`, numpy's ziggurat normals on the host; ``philox``:
    :class:`hpcflow.rng.PhiloxStreams`, compiled Box-Muller on the device).  Every hmc_step
    pays it, so ``bound_ratio_to_reference`` = reference seconds / its seconds is the most
    any fused trajectory can reach in ``ratio_to_reference`` while the momenta come from
    these streams."""
    streams = bench_streams(generator, B, L, device, "bench-momenta", 3)

    def draw():
        streams.momenta((L, L), device)

    return draw


#: Bytes a fused leapfrog step moves per site from and to memory: phi and pi read and
#: written once each (4 float64, 32 B) plus the neighbours' reuse and the end-point action
#: (issue 9's estimate: about 40 B).
BYTES_PER_SITE_STEP = 40


def bench_bandwidth(device, nbytes: int = 2 ** 28, min_seconds: float = 0.3,
                    repeat: int = 3) -> dict:
    """The device's memory bandwidth as a copy sees it: a float64 tensor of ``nbytes``
    copied into another (read + write counted: 2 nbytes per copy), best of ``repeat``
    blocks; and the HMC bound it sets, ``bandwidth / BYTES_PER_SITE_STEP`` site-steps/s,
    for batches beyond the caches (smaller ones can run above it)."""
    n = nbytes // 8
    src = torch.ones(n, dtype=torch.float64, device=device)
    dst = torch.empty_like(src)
    sec = best_seconds(lambda: dst.copy_(src), device, min_seconds, repeat)
    bandwidth = 2 * nbytes / sec
    return {"bytes_copied": nbytes, "bytes_per_second": bandwidth,
            "bytes_per_site_step": BYTES_PER_SITE_STEP,
            "bound_site_steps_per_second": bandwidth / BYTES_PER_SITE_STEP}


def _two_ops(x, y):
    return x + y, x - y


def bench_call_overhead(device, min_seconds: float = 0.3, repeat: int = 3) -> dict:
    """What a compiled call costs beside its kernel: a graph of two elementwise operations
    on 4 float64 numbers, called through ``torch.compile`` (dynamo evaluates the frame and
    its guards every call) and as :class:`hpcflow.fused.CompiledGraph` calls it (the same
    inductor graph, directly), timed in the same rounds; eager, for scale."""
    from . import fused

    x = torch.ones(4, dtype=torch.float64, device=device)
    y = torch.full_like(x, 0.5)
    through_dynamo = torch.compile(_two_ops, dynamic=False, fullgraph=True)
    direct = fused.compile_graph(_two_ops)

    def dynamo_call():
        with torch.no_grad():
            return through_dynamo(x, y)

    sec = seconds_together({"dynamo": dynamo_call, "direct": lambda: direct(x, y),
                            "eager": lambda: _two_ops(x, y)}, device, min_seconds, repeat)
    return {"graph": "x + y, x - y on 4 float64", "direct_path_taken": direct.direct_calls > 0,
            "dynamo_call_seconds": sec["dynamo"], "direct_call_seconds": sec["direct"],
            "eager_seconds": sec["eager"]}


def bench_hmc_cell(args, device, action, L: int, B: int, ref: Reference | None) -> dict:
    """One (L, B) cell of the HMC table: eager, compiled and reference rates and ratios,
    every path of the cell timed in the same rounds (:func:`seconds_together`)."""
    from . import fused
    from .fused import eager_trajectory

    sites = B * L * L * args.steps
    row = {"L": L, "B": B, "site_steps_per_trajectory": sites}
    phi0, pi0 = start_point(B, L, device)
    eager = eager_trajectory(action, INTEGRATORS["leapfrog"], 1.0, args.steps)
    fns = {"momenta": momenta_draw(B, L, device)}
    if args.eager:
        fns |= {"eager_step": hmc_runner(action, B, L, args.steps, device),
                "eager_trajectory": lambda: eager(phi0, pi0)}
    info = None
    if args.compile:
        fn, info = compile_for_shape(action, args.steps, (phi0, pi0), args.chunk_sites)
        if fn is not None:
            g0 = info.pop("_g0")
            fns["compiled_step"] = hmc_runner(action, B, L, args.steps, device, trajectory=fn)
            try:  # the same compiled trajectory, the momenta from compiled Philox streams
                t0 = time.perf_counter()
                fns["philox_step"] = hmc_runner(action, B, L, args.steps, device, trajectory=fn,
                                                generator="philox")
                fns["philox_momenta"] = momenta_draw(B, L, device, "philox")
                philox_compile = time.perf_counter() - t0
            except Exception as err:  # what inductor raises without a compiler varies
                philox_compile = f"unavailable: {fused._first_line(err)}"
            fns["compiled_trajectory"] = lambda: fn(phi0, pi0)
            # the Metropolis test fused, or not, the other way from the production's
            # (compiled next to fn: no reset); --no-variants skips both comparisons
            fm = fo = None
            if args.variants:
                fm, m = compile_for_shape(action, args.steps, (phi0, pi0), args.chunk_sites,
                                          reset=False, metropolis=not info["metropolis_fused"],
                                          layout=info["layout"])
            if fm is not None:
                fns["fused_metropolis_step"] = hmc_runner(action, B, L, args.steps, device,
                                                          trajectory=fm)
            # the other layout (batch-major on a CPU), as a production would compile it
            if args.variants:
                other = next(x for x in LAYOUTS if x != info["layout"])
                fo, o = compile_for_shape(action, args.steps, (phi0, pi0), args.chunk_sites,
                                          reset=False, layout=other)
            if fo is not None:
                fns["other_layout_step"] = hmc_runner(action, B, L, args.steps, device,
                                                      trajectory=fo)
                fns["other_layout_trajectory"] = lambda: fo(phi0, pi0)
            # the production's layout with the MD graph compiled at inductor's defaults
            fd = None
            if args.variants:
                fd, dflt = compile_for_shape(action, args.steps, (phi0, pi0), args.chunk_sites,
                                             reset=False, layout=info["layout"], inductor={})
            if fd is not None:
                fns["inductor_default_step"] = hmc_runner(action, B, L, args.steps, device,
                                                          trajectory=fd)
                fns["inductor_default_trajectory"] = lambda: fd(phi0, pi0)
    if ref is not None:
        phi_r, pi_r = (t.detach().to("cpu", copy=True).contiguous() for t in (phi0, pi0))
        S_r = torch.empty(B, dtype=torch.float64)
        fns["reference"] = lambda: ref.run_inplace(phi_r, pi_r, S_r)
    sec = seconds_together(fns, device, args.min_seconds, args.repeat)
    row["eager"] = (_path_rates(sec["eager_step"], sec["eager_trajectory"], sites, B)
                    if args.eager else {"skipped": "--no-eager"})
    if info is not None:
        if "compiled_step" in sec:
            info |= _path_rates(sec["compiled_step"], sec["compiled_trajectory"], sites, B)
            # the graphs dynamo compiled for the three paths (the production's, the other
            # Metropolis choice, the other layout), before and during the timed calls
            info["graphs_compiled"] = _graphs() - g0
            if "other_layout_step" in sec:
                o.pop("_g0")
                info["other_layout"] = o | _path_rates(sec["other_layout_step"],
                                                       sec["other_layout_trajectory"], sites, B)
                info["other_layout"]["speedup_of_layout"] = (sec["other_layout_step"]
                                                             / sec["compiled_step"])
            if "inductor_default_step" in sec:
                dflt.pop("_g0")
                info["inductor_default"] = dflt | _path_rates(
                    sec["inductor_default_step"], sec["inductor_default_trajectory"], sites, B)
                info["inductor_default"]["trajectory_speedup_of_md_inductor"] = (
                    sec["inductor_default_trajectory"] / sec["compiled_trajectory"])
                info["inductor_default"]["step_speedup_of_md_inductor"] = (
                    sec["inductor_default_step"] / sec["compiled_step"])
            if "fused_metropolis_step" in sec:  # the step with the test fused and without
                fused_s, unfused_s = sec["fused_metropolis_step"], sec["compiled_step"]
                if info["metropolis_fused"]:
                    fused_s, unfused_s = unfused_s, fused_s
                info["fused_metropolis"] = {
                    "in_production": info["metropolis_fused"],
                    "compile_seconds_of_the_other": m["compile_seconds"],
                    "hmc_step_seconds": fused_s, "unfused_hmc_step_seconds": unfused_s,
                    "speedup": unfused_s / fused_s}
            if "philox_step" in sec:
                info["philox"] = {
                    "compile_seconds": philox_compile,
                    **_path_rates(sec["philox_step"], sec["compiled_trajectory"], sites, B),
                    "speedup_over_pcg64": sec["compiled_step"] / sec["philox_step"],
                    "momenta": {"seconds": sec["philox_momenta"],
                                "ns_per_normal": 1e9 * sec["philox_momenta"] / (B * L * L),
                                "fraction_of_hmc_step": sec["philox_momenta"] / sec["philox_step"]}}
            elif "philox_step" not in fns:  # compilation failed: its one line
                info["philox"] = {"compile_seconds": philox_compile}
            if info["chunk_rows"] < B:  # what the chunks gain: the same batch in one call
                whole, w = compile_for_shape(action, args.steps, (phi0, pi0), chunk_sites=0)
                if whole is not None:
                    info["unchunked"] = {
                        "compile_seconds": w["compile_seconds"],
                        "trajectory_site_steps_per_second":
                            sites / best_seconds(lambda: whole(phi0, pi0), device,
                                                 args.min_seconds, args.repeat)}
        row["compiled"] = info
    row["momenta"] = {"seconds": sec["momenta"],
                      "ns_per_normal": 1e9 * sec["momenta"] / (B * L * L),
                      "fraction_of_compiled_hmc_step": None}
    if ref is not None:
        sec = sec["reference"]
        row["reference"] = {"seconds": sec, "site_steps_per_second": sites / sec}
        ratios = {}
        for path in ("eager", "compiled"):
            r = row.get(path, {})
            if "hmc_step_seconds" in r:
                ratios[f"{path}_hmc_step"] = sec / r["hmc_step_seconds"]
                ratios[f"{path}_trajectory"] = sec / r["trajectory_seconds"]
        if "philox" in row.get("compiled", {}) and "hmc_step_seconds" in row["compiled"]["philox"]:
            p = row["compiled"]["philox"]
            ratios["compiled_philox_hmc_step"] = sec / p["hmc_step_seconds"]
            p["momenta"]["bound_ratio_to_reference"] = sec / p["momenta"]["seconds"]
        row["ratio_to_reference"] = ratios
        # what hmc_step could reach were the trajectory and the Metropolis test free
        row["momenta"]["bound_ratio_to_reference"] = sec / row["momenta"]["seconds"]
    if "hmc_step_seconds" in row.get("compiled", {}):
        row["momenta"]["fraction_of_compiled_hmc_step"] = (row["momenta"]["seconds"]
                                                           / row["compiled"]["hmc_step_seconds"])
    best = max((row[p] for p in ("eager", "compiled") if "hmc_step_seconds" in row.get(p, {})),
               key=lambda r: r["hmc_site_steps_per_second"])
    row["best_path"] = "compiled" if best is row.get("compiled") else "eager"
    row["best_replica_trajectories_per_second"] = best["replica_trajectories_per_second"]
    if ref is not None:
        row["best_ratio_to_reference"] = row["reference"]["seconds"] / best["hmc_step_seconds"]
    return row


def hmc_line(r: dict) -> str:
    def m(x):
        return f"{x / 1e6:9.1f}" if x is not None else f"{'-':>9s}"

    c = r.get("compiled", {})
    ratio = r.get("best_ratio_to_reference")
    return (f"{r['L']:4d} {r['B']:6d} {m(r['eager'].get('hmc_site_steps_per_second'))} "
            f"{m(r['eager'].get('trajectory_site_steps_per_second'))} "
            f"{m(c.get('hmc_site_steps_per_second'))} {m(c.get('trajectory_site_steps_per_second'))} "
            f"{c['compile_seconds'] if 'compile_seconds' in c else float('nan'):8.1f} "
            f"{m(r.get('reference', {}).get('site_steps_per_second'))} "
            f"{ratio if ratio is not None else float('nan'):8.3f} "
            f"{r['best_replica_trajectories_per_second']:10.0f} "
            f"{r['momenta']['ns_per_normal']:7.1f} "
            f"{r['momenta'].get('bound_ratio_to_reference', float('nan')):7.3f}")


HMC_HEADER = (f"{'L':>4s} {'B':>6s} {'eagerHMC':>9s} {'eagerMD':>9s} {'compHMC':>9s} "
              f"{'compMD':>9s} {'compile':>8s} {'C ref':>9s} {'best/ref':>8s} {'repl tr/s':>10s}"
              f" {'RNG ns':>7s} {'RNG cap':>7s}"
              "\n  (M site-steps/s; HMC = full hmc_step, MD = the trajectory alone; compile in s;"
              " best/ref = best HMC step / C reference;\n  RNG ns = ns per momentum drawn from"
              " the replicas' streams; RNG cap = C reference / drawing them, the most best/ref"
              " can reach)")


# ---------------------------------------------------------------------------------------
# FHMC against HMC


def minimal_flow(L: int, device, seed: int = 0):
    """The minimal flow (k = 3, one coupling layer, no hidden channels) with generic weights
    N(0, 0.1^2) (the cost does not depend on their values; the trained start is the
    identity, whose zero weights would be unrepresentative)."""
    from .flows import Flow

    flow = Flow(L, kernel_size=3, layers=1, hidden=())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return flow.to(device)


def bench_fhmc(args, device) -> dict:
    """FHMC with the minimal flow against HMC at L = args.fhmc_L, B = args.fhmc_batch: seconds
    per trajectory (full hmc_step) and per force of each path, and the ratios."""
    from . import fused
    from .action import FlowedAction

    L, B = args.fhmc_L, args.fhmc_batch
    target = Phi4Action(args.beta, args.lam)
    flow = minimal_flow(L, device)
    flowed = FlowedAction(target, flow)
    phi0, pi0 = start_point(B, L, device)
    out = {"L": L, "B": B, "flow": flow.spec(), "frozen_method": flowed.frozen.method}

    # every (algorithm, path): a trajectory (hmc_step) and a force, all timed in the same
    # rounds (seconds_together), so that the ratios compare blocks seconds apart
    fns = {}

    def add(algorithm, path, action, trajectory=None, force=None):
        force = force or action.force
        fns[(algorithm, path, "trajectory_seconds")] = hmc_runner(action, B, L, args.steps,
                                                                 device, trajectory)
        fns[(algorithm, path, "force_seconds")] = lambda: force(phi0)

    out["hmc"], out["fhmc"] = {"eager": {}}, {"eager": {}}
    add("hmc", "eager", target)
    add("fhmc", "eager", flowed)
    if args.compile:
        fn, info = compile_for_shape(target, args.steps, (phi0, pi0))
        if fn is not None:
            info.pop("_g0")
            add("hmc", "compiled", target, fn, _compiled_phi4_force(target))
        out["hmc"]["compiled"] = info
        # FHMC: the compiled flowed force and action (fused.StencilFlow), the force timed
        # as a trajectory calls it (checkerboard halves); compiled next to HMC's (no reset)
        fn, info = compile_for_shape(flowed, args.steps, (phi0, pi0), reset=False)
        if fn is not None:
            info.pop("_g0")
            zs, ps = fn.stencil.halves(phi0), fn.stencil.halves(pi0)
            add("fhmc", "compiled", flowed, fn, lambda _: fn.force_and_action(*zs))
            info["wired"] = ("[run] compile = auto|on: FHMC productions use this path "
                             "(fused.compilable)" if fused.compilable(flowed) else "no")
            # the graph a trajectory calls for every force but the last
            kick_drift = fn.graphs[0]
            # (two tensors: one passed twice would keep the graph with dynamo)
            a, b = (torch.tensor(x, dtype=phi0.dtype, device=phi0.device) for x in (0.1, 0.05))
            fns[("fhmc", "compiled", "kick_drift_seconds")] = lambda: kick_drift(*zs, *ps, a, b)
            # the same force compiled at inductor's defaults, same rounds
            t0 = time.perf_counter()
            dflt = fused.compile_graph(fn.stencil.force_and_action, {})
            dflt(*zs)
            info["inductor_default"] = {"compile_seconds": time.perf_counter() - t0}
            fns[("fhmc", "inductor_default", "force_seconds")] = lambda: dflt(*zs)
            steps = len(fn.stencil.steps)
            floor = fused.compile_graph(lambda z: flow_transcendentals(z, steps))
            zv = torch.cat(zs)
            fns[("fhmc", "transcendentals", "force_seconds")] = lambda: floor(zv)
            out["fhmc"]["transcendentals"] = {"coupling_steps": steps,
                                              "per_updated_site": "3 exp, 2 divisions"}
        out["fhmc"]["compiled"] = info
    for (algorithm, path, what), sec in seconds_together(fns, device, args.min_seconds,
                                                         args.repeat).items():
        if path == "inductor_default":
            d = out["fhmc"]["compiled"]["inductor_default"]
            d["force_seconds"] = sec
        else:
            out[algorithm][path][what] = sec
    if "inductor_default" in out["fhmc"].get("compiled", {}):
        d = out["fhmc"]["compiled"]["inductor_default"]
        d["force_speedup_of_flow_inductor"] = (d["force_seconds"]
                                               / out["fhmc"]["compiled"]["force_seconds"])
    paths = {a: {p: v for p, v in out[a].items() if "trajectory_seconds" in v}
             for a in ("hmc", "fhmc")}
    best = {a: min(paths[a], key=lambda p: paths[a][p]["trajectory_seconds"]) for a in paths}
    e_h, e_f = out["hmc"]["eager"], out["fhmc"]["eager"]
    b_h, b_f = paths["hmc"][best["hmc"]], paths["fhmc"][best["fhmc"]]
    out["ratios"] = {
        "eager_per_trajectory": e_f["trajectory_seconds"] / e_h["trajectory_seconds"],
        "eager_per_force": e_f["force_seconds"] / e_h["force_seconds"],
        "best_paths": best,
        "best_per_trajectory": b_f["trajectory_seconds"] / b_h["trajectory_seconds"],
        "best_per_force": b_f["force_seconds"] / b_h["force_seconds"],
    }
    floor = out["fhmc"].get("transcendentals", {}).get("force_seconds")
    if floor is not None:
        # FHMC's step is HMC's with every force replaced by a flowed one: at least HMC's
        # step less its forces (timed alone, an overestimate of a fused force) plus the
        # flowed forces' transcendentals
        forces = INTEGRATORS["leapfrog"].forces_per_step * args.steps + 1
        rest = max(b_h["trajectory_seconds"] - forces * b_h["force_seconds"], 0.0)
        low = rest + forces * floor
        out["ratios"]["transcendental_floor"] = {
            "forces_per_trajectory": forces, "force_seconds": floor,
            "over_hmc_force": floor / b_h["force_seconds"],
            "fhmc_trajectory_seconds_at_least": low,
            "per_trajectory_at_least": low / b_h["trajectory_seconds"]}
    return out


def _compiled_phi4_force(action):
    """Phi4Action.force compiled as productions compile their graphs (to time a fused HMC
    force alone; :func:`hpcflow.fused.compile_graph`, called without dynamo)."""
    from . import fused

    return fused.compile_graph(action.force)


def flow_transcendentals(z: torch.Tensor, coupling_steps: int) -> torch.Tensor:
    """The transcendental work of one flowed force of a flow without hidden channels, and
    nothing else: per coupling step, on the H = V/2 rows it updates, tanh s and tanh t (an
    exp and a division each, :func:`hpcflow.fused._tanh`) and e = exp(-|s|), i.e. 3 exp and
    2 divisions per updated site, chained so that none can be dropped or shared.  Compiled
    and timed on the site-major [V, B] fields of a trajectory, a floor under the flowed force
    (which also gathers, multiplies and pulls back) on this machine."""
    x = z[: z.shape[0] // 2]
    for _ in range(coupling_steps):
        a, b = torch.exp(-x), torch.exp(x)
        x = (1.0 - a) / (1.0 + a) + (1.0 - b) / (1.0 + b) + torch.exp(0.5 * x)
    return x


# (L, kernel size, hidden channels) of the --frozen-backends comparison, one coupling layer:
# the reference architectures, then more to place the boundary of FrozenFlow's auto rule
# (one hidden layer of 2 to 32 channels, two narrow ones)
FROZEN_ARCHITECTURES = [(3, ()), (5, ()), (7, ()), (3, (8,)), (3, (16, 16)), (5, (8, 8)),
                        (7, (8, 8))]
FROZEN_BOUNDARY = [(3, (16,)), (3, (32,)), (5, (4,)), (5, (8,)), (7, (2,)), (7, (4,)), (7, (8,)),
                   (3, (4, 4)), (3, (8, 8)), (5, (4, 4)), (3, (12, 12))]
FROZEN_CASES = ([(L, k, h) for L in (16, 32) for k, h in FROZEN_ARCHITECTURES]
                + [(64, k, h) for k, h in FROZEN_ARCHITECTURES if not h or (k, h) == (5, (8, 8))]
                + [(L, k, h) for L in (16, 32) for k, h in FROZEN_BOUNDARY])


def _seconds(fn, n, device) -> float:
    """Seconds per call of ``fn`` over ``n`` calls."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / n


def bench_frozen_backends(args, device, cases=None, min_seconds=0.2):
    """Rows {L, kernel_size, hidden, B, max_k2_cin, k2_cin_cout, auto, sparse/fft: {seconds,
    first_seconds, build_seconds} or {skipped, first_seconds | predicted_seconds},
    fft_over_sparse}.

    One evaluation is one flowed force: ``frozen.inverse_with_pullback(z)`` and the pullback
    of a force F, on B = ``args.fhmc_batch`` configurations.  After a first (cold)
    evaluation, both backends are timed alternately ``args.repeat`` times (blocks of about
    ``min_seconds``), keeping the best block of each: drifts of the machine's load hit both.
    A backend is skipped when its first evaluation (the faster of the first two, cold and
    warm, unless the cold one took over twice the limit) takes longer than ``args.max_seconds``,
    or, without building it, when the same architecture on a smaller lattice L0 already took
    longer than ``args.max_seconds`` (L0 / L)^2 (the cost grows at least like the volume;
    ``predicted_seconds`` is that volume-scaled lower bound)."""
    from .flows import Flow
    from .flows.frozen import AUTO_BASE, AUTO_PER_HIDDEN, AUTO_PER_MIX, auto_method, conv_costs

    B = args.fhmc_batch
    rows = []
    for L, k, hidden in (FROZEN_CASES if cases is None else cases):
        flow = Flow(L, kernel_size=k, layers=1, hidden=hidden).to(device)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # generic weights: the cost does not depend on their values
            for p in flow.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        z = (0.5 * torch.randn(B, L, L, generator=g, dtype=torch.float64)).to(device)
        F = torch.randn(B, L, L, generator=g, dtype=torch.float64).to(device)
        k2cc, n_hidden, mix = conv_costs(flow.couplings[0])
        row = {"L": L, "kernel_size": k, "hidden": list(hidden), "B": B,
               "max_k2_cin": k * k * max((1, *hidden)), "k2_cin_cout": k2cc,
               "sparse_budget": AUTO_BASE + AUTO_PER_HIDDEN * n_hidden + AUTO_PER_MIX * mix,
               "auto": auto_method(flow.couplings)}
        timed = {}
        for method in ("sparse", "fft"):
            smaller = [(r["L"], r[method]) for r in rows
                       if (r["kernel_size"], r["hidden"]) == (k, list(hidden)) and r["L"] < L]
            if smaller:
                L0, m0 = max(smaller, key=lambda x: x[0])
                low = (m0.get("seconds") or m0.get("first_seconds")
                       or m0.get("predicted_seconds")) * (L / L0) ** 2
                if low > args.max_seconds:
                    row[method] = {"skipped": True, "predicted_seconds": low}
                    continue
            t0 = time.perf_counter()
            frozen = flow.frozen(method)
            build = time.perf_counter() - t0

            def once(frozen=frozen):
                _, _, pullback = frozen.inverse_with_pullback(z, logdet=False)
                return pullback(F)

            # the first evaluation is cold (allocations, page faults): decide on a second one
            # unless the first is already far beyond the limit
            first = _seconds(once, 1, device)
            row[method] = {"first_seconds": first, "build_seconds": build}
            if first <= 2 * args.max_seconds:
                second = _seconds(once, 1, device)
                row[method]["first_seconds"] = min(first, second)
            if row[method]["first_seconds"] > args.max_seconds:
                row[method]["skipped"] = True
            else:
                timed[method] = (once, max(1, int(min_seconds / row[method]["first_seconds"])))
        best = {m: float("inf") for m in timed}
        for _ in range(args.repeat):
            for method, (once, n) in timed.items():
                best[method] = min(best[method], _seconds(once, n, device))
        for method in timed:
            row[method]["seconds"] = best[method]
        del timed
        if "seconds" in row["sparse"] and "seconds" in row["fft"]:
            row["fft_over_sparse"] = row["fft"]["seconds"] / row["sparse"]["seconds"]
            row["faster"] = "fft" if row["fft_over_sparse"] < 1 else "sparse"
        rows.append(row)
        print(_frozen_line(row), flush=True)
    return rows


def _frozen_line(r) -> str:
    def ms(m):
        if "seconds" in m:
            return f"{m['seconds'] * 1e3:10.2f}"
        low = m.get("predicted_seconds", m.get("first_seconds"))
        return f"{'skip>' + format(low, '.1f') + 's':>10s}"

    ratio = f"{r['fft_over_sparse']:9.2f}" if "fft_over_sparse" in r else f"{'-':>9s}"
    hidden = ",".join(map(str, r["hidden"])) or "-"
    return (f"{r['L']:4d} {r['kernel_size']:3d} {hidden:>8s} {r['max_k2_cin']:8d} "
            f"{r['k2_cin_cout']:8d} {r['sparse_budget']:8d} {ms(r['sparse'])} {ms(r['fft'])} "
            f"{ratio} {r['auto']:>7s}")


def main_frozen_backends(args, device) -> dict:
    print(f"one flowed force (frozen generator + pullback), one coupling layer, "
          f"B={args.fhmc_batch}, device {device}, {args.threads} thread(s), best of {args.repeat}")
    print(f"{'L':>4s} {'k':>3s} {'hidden':>8s} {'k2cin':>8s} {'k2cincout':>8s} {'budget':>8s} "
          f"{'sparse ms':>10s} {'fft ms':>10s} {'fft/spar':>9s} {'auto':>7s}")
    print("  k2cin: max k^2 c_in over the convolutions of a net; k2cincout: sum of k^2 c_in c_out;"
          " auto = sparse iff k2cincout <= budget")
    t0 = time.perf_counter()
    rows = bench_frozen_backends(args, device)
    return {"what": "one flowed-force evaluation: FrozenFlow.inverse_with_pullback(z) and "
                    "the pullback of a force, one coupling layer (two steps) and the global "
                    "scale, per batch of B configurations; best of repeat timings",
            "max_k2_cin": "the largest k^2 c_in over the convolutions of a net (nonzeros per row "
                          "of its sparse matrices)",
            "k2_cin_cout": "sum of k^2 c_in c_out over the convolutions of a net (multiply-adds "
                           "per site of one net, the sparse backend's arithmetic)",
            "sparse_budget": "AUTO_BASE + AUTO_PER_HIDDEN sum c_hidden + AUTO_PER_MIX sum of "
                             "c_in c_out over channel-mixing convolutions (hpcflow.flows.frozen);"
                             " auto = sparse iff k2_cin_cout <= sparse_budget",
            "rows": rows, "total_seconds": time.perf_counter() - t0}




# ---------------------------------------------------------------------------------------
# memory per replica


def _status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes; None where unreadable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_probe(L: int, B: int, mode: str, steps: int, device, chunk_sites=None) -> dict:
    """Run in a fresh process (``--memory-probe L,B,MODE``): the peak RSS of a few HMC steps
    of B chains (and the peak of CUDA allocations on a GPU).

    The compilation (``compiled``) and a first step on a throw-away batch come first; then
    the peak RSS is reset to the current RSS where Linux allows it (``peak_reset``), so the
    peak is that of the chains' data, not of imports or the compiler; else it is the
    process's lifetime peak (ru_maxrss)."""
    action = Phi4Action(0.634, 0.5)
    traj = None
    if mode == "compiled":
        fn, info = compile_for_shape(action, steps, start_point(B, L, device), chunk_sites)
        if fn is None:
            return info
        traj = fn
    hmc_runner(action, 1, L, steps, device)()  # eager kernels' first-call set-up
    reset = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = hmc_runner(action, B, L, steps, device, traj)
    for _ in range(3):
        run()
    peak = _status_bytes("VmHWM") if reset else None
    out = {"L": L, "B": B, "mode": mode, "peak_reset": peak is not None,
           "peak_rss_bytes": peak if peak is not None
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def _child_env() -> dict:
    """The environment of child processes: this hpcflow first on PYTHONPATH."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def bench_allocator_default(args, tmp: Path) -> dict:
    """The compiled HMC step of the per-replica targets' cells (B = 64 and the largest B of
    the table, at every L) with glibc's default malloc settings (``HPCFLOW_MALLOC=default``)
    and with the run's (:func:`hpcflow.allocator.tune`), in child benches run in
    turn, ``--allocator-repeat`` each; the fastest of each cell's runs is kept.  Per cell:
    seconds per replica for both and their ratio; per L: B_max / B = 64 per replica, as the
    targets compute it."""
    B_max = max(args.batches)
    if args.device != "cpu":
        return {"skipped": f"--device {args.device}: the C allocator holds the host's tensors only"}
    if 64 not in args.batches or B_max <= 64:
        return {"skipped": "needs B = 64 and a larger B in --batches"}
    argv = [sys.executable, "-m", "hpcflow.bench", "--Ls", ",".join(map(str, args.Ls)),
            "--batches", f"64,{B_max}", "--no-eager", "--no-reference", "--no-fhmc", "--no-memory",
            "--no-scaling", "--no-production", "--no-variants", "--no-allocator",
            "--min-seconds", str(args.min_seconds), "--repeat", str(args.repeat),
            "--steps", str(args.steps), "--beta", str(args.beta), "--lam", str(args.lam),
            "--threads", str(args.threads), "--device", args.device]
    if args.chunk_sites is not None:
        argv += ["--chunk-sites", str(args.chunk_sites)]
    runs: dict[str, list] = {"default": [], "tuned": []}
    for i in range(args.allocator_repeat):
        for mode in runs:
            env = _child_env()
            env.pop("HPCFLOW_MALLOC", None)
            if mode == "default":
                env["HPCFLOW_MALLOC"] = "default"
            out = tmp / f"allocator-{mode}-{i}.json"
            p = subprocess.run([*argv, "--out", str(out)], env=env, capture_output=True,
                               text=True, timeout=args.scaling_timeout)
            if p.returncode:
                return {"skipped": f"child bench failed: {(p.stderr or p.stdout).strip()[-300:]}"}
            child = json.loads(out.read_text())
            runs[mode].append({(c["L"], c["B"]): c["compiled"]["hmc_step_seconds"] / c["B"]
                               for c in child["hmc"] if "hmc_step_seconds" in c.get("compiled", {})})
            runs[mode][-1]["allocator"] = child["machine"]["allocator"]
    out = {"command": " ".join(argv[1:]) + "  (HPCFLOW_MALLOC=default, and unset)",
           "repeat": args.allocator_repeat,
           "allocator": {m: r[0]["allocator"] for m, r in runs.items()}, "cells": [],
           "per_replica_over_B64": {}}
    best = {m: {k: min(r[k] for r in rs) for k in rs[0] if k != "allocator"}
            for m, rs in runs.items()}
    for key in sorted(best["tuned"]):
        L, B = key
        out["cells"].append({"L": L, "B": B,
                             "default_seconds_per_replica": best["default"][key],
                             "tuned_seconds_per_replica": best["tuned"][key],
                             "speedup": best["default"][key] / best["tuned"][key]})
    for L in args.Ls:
        out["per_replica_over_B64"][str(L)] = {
            m: best[m][(L, 64)] / best[m][(L, B_max)] for m in best}
    return out


def bench_memory(args, device) -> dict:
    """Bytes per replica at the largest B and L (see the module docstring)."""
    L, B_max = max(args.Ls), max(args.batches)
    B_ref = max([b for b in args.batches if b < B_max], default=None)
    out = {"L": L, "B": B_max, "state_bytes_per_replica": 8 * (2 * L * L + 1),
           "state": "phi and pi (2 L^2 float64) and S (one float64) per chain"}
    if B_ref is None:
        out["peak_rss"] = {"skipped": "needs two batch sizes"}
        return out
    out["B_ref"] = B_ref
    for mode in ("eager", "compiled") if args.compile else ("eager",):
        peaks = {}
        for B in (B_ref, B_max):
            cmd = [sys.executable, "-m", "hpcflow.bench", "--memory-probe", f"{L},{B},{mode}",
                   "--steps", str(args.steps), "--device", args.device,
                   "--threads", str(args.threads)]
            if args.chunk_sites is not None:
                cmd += ["--chunk-sites", str(args.chunk_sites)]
            r = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
            if r.returncode != 0:
                tail = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
                peaks = {"failed": f"{' '.join(cmd[1:])}: status {r.returncode}: {tail}"}
                break
            peaks[B] = json.loads(r.stdout.strip().splitlines()[-1])
        if "failed" in peaks or any("peak_rss_bytes" not in p for p in peaks.values()):
            out[mode] = peaks
            continue
        key = "cuda_peak_bytes" if device.type == "cuda" else "peak_rss_bytes"
        out[mode] = {"peak_rss_bytes": {str(B): p["peak_rss_bytes"] for B, p in peaks.items()},
                     "peak_rss_bytes_per_replica":
                         (peaks[B_max]["peak_rss_bytes"] - peaks[B_ref]["peak_rss_bytes"])
                         / (B_max - B_ref),
                     "peak_bytes_per_replica":
                         (peaks[B_max][key] - peaks[B_ref][key]) / (B_max - B_ref),
                     "measured": key,
                     "peak_reset": all(p.get("peak_reset") for p in peaks.values())}
    return out


# ---------------------------------------------------------------------------------------
# weak scaling of a production over MPI ranks


BENCH_INPUT = """\
[run]
name = {name}
output = {output}
seed = 9
stages = hmc
device = {device}
threads = 1
checkpoint_every = {checkpoint_every}
progress_every = 1000
compile = {compile}
rng = {rng}

[theory]
L = {L}
beta = 0.634
lambda = 0.5

[hmc]
replicas = {replicas}
trajectories = {trajectories}
thermalization = 0
steps = {steps}
save_every = {save_every}
"""


def bench_input(**keys) -> str:
    """The input of a bench production (:data:`BENCH_INPUT`); the weak-scaling runs'
    defaults: eager, PCG64, one checkpoint at the end, no configurations saved."""
    keys = {"compile": "off", "rng": "pcg64", "save_every": 0} | keys
    keys.setdefault("checkpoint_every", keys["trajectories"])
    return BENCH_INPUT.format(**keys)


def scaling_command(n: int, ini: str) -> list[str]:
    return ["mpirun", "--oversubscribe", "-n", str(n), sys.executable, "-m", "hpcflow.run", ini]


def run_production(cmd: list[str], h5: Path, env: dict, timeout: float) -> dict | str:
    """Run a production command; from its ensemble file ``h5`` its ``/cost/seconds`` (the
    production's wall time, compilation and start-up excluded) and mean acceptance, with
    the process's wall time; or a line saying why there are none."""
    import h5py

    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"{' '.join(cmd)} took over {timeout} s"
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        tail = ((r.stderr + r.stdout).strip().splitlines() or ["(no message)"])[-1]
        return f"{' '.join(cmd)}: status {r.returncode}: {tail}"
    with h5py.File(h5, "r") as f:
        return {"seconds": float(f["cost/seconds"][0]), "wall_seconds": wall,
                "acceptance": float(f["mc/accepted"][()].mean())}


def bench_weak_scaling(args, workdir: Path) -> dict:
    """The same production per rank on 1 and 2 ranks, ``--scaling-repeat`` pairs in turn:
    efficiency = median seconds(1) / median seconds(2), from each production's
    /cost/seconds, and each pair's own ratio."""
    R, T, L = args.scaling_replicas, args.scaling_trajectories, args.scaling_L
    out = {"L": L, "replicas_per_rank": R, "trajectories": T, "steps": args.steps,
           "path": "eager (compile = off)", "seconds": "/cost/seconds of hmc.h5 "
           "(the production's wall time, rank 0's clock; start-up excluded)",
           "command": " ".join(scaling_command(2, "weak2.ini")) + f"  (and -n 1; inputs: "
                      f"L = {L}, {R} replicas per rank, {T} trajectories; see BENCH_INPUT)"}
    if shutil.which("mpirun") is None:
        out["skipped"] = "no mpirun on PATH"
        return out
    env = _child_env()
    if os.geteuid() == 0:  # Open MPI refuses root unless told (as tools/env.sh does)
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    seconds: dict[int, list[float]] = {1: [], 2: []}
    for i, n in enumerate([1, 2] * max(1, args.scaling_repeat)):
        d = workdir / f"weak{n}-{i // 2}"
        d.mkdir(parents=True, exist_ok=True)
        ini = d / "weak.ini"
        ini.write_text(bench_input(name=f"weak{n}", output=d / "out", device=args.device, L=L,
                                   replicas=n * R, trajectories=T, steps=args.steps))
        done = run_production(scaling_command(n, str(ini)), d / "out" / "hmc.h5", env,
                              args.scaling_timeout)
        if isinstance(done, str):
            out["skipped"] = done
            return out
        seconds[n].append(done["seconds"])
    median = {n: statistics.median(v) for n, v in seconds.items()}
    out["repeat"] = len(seconds[1])
    out["seconds_by_ranks"] = {str(n): median[n] for n in median}
    out["runs_seconds_by_ranks"] = {str(n): v for n, v in seconds.items()}
    out["replica_trajectories_per_second_by_ranks"] = {str(n): n * R * T / s
                                                       for n, s in median.items()}
    out["efficiency_by_pair"] = [a / b for a, b in zip(seconds[1], seconds[2])]
    out["efficiency"] = median[1] / median[2]
    return out


#: The single-rank productions of :func:`bench_production`: ([run] compile, [run] rng).
PRODUCTION_VARIANTS = (("off", "pcg64"), ("on", "pcg64"), ("on", "philox"), ("off", "philox"))

def bench_production(args, workdir: Path) -> dict:
    """Whole single-rank productions (``python -m hpcflow.run``: measurements, configurations
    every 10 trajectories, checkpoints every 100, HDF5 I/O) for every ``[run] compile`` x
    ``[run] rng`` of :data:`PRODUCTION_VARIANTS`, ``--production-repeat`` rounds with the
    variants in turn; per variant the median of /cost/seconds (compilation excluded: it is
    logged apart) and of the process's wall time (start-up and compilation included), and
    ``speedup`` = median seconds of eager PCG64 / median seconds of the variant.  What
    decides the default of ``[run] compile``."""
    L, R, T = args.production_L, args.production_replicas, args.production_trajectories
    out = {"L": L, "replicas": R, "trajectories": T, "steps": args.steps, "ranks": 1,
           "seconds": "/cost/seconds of hmc.h5 (the production; compilation excluded)",
           "wall_seconds": "the whole python -m hpcflow.run process",
           "input": bench_input(name="prod", output="<dir>", device=args.device, compile="<compile>",
                                rng="<rng>", L=L, replicas=R, trajectories=T, steps=args.steps,
                                checkpoint_every=100, save_every=10),
           "variants": {}}
    env = _child_env()
    runs: dict[str, dict[str, list[float]]] = {}
    for i in range(max(1, args.production_repeat)):
        for compile_mode, generator in PRODUCTION_VARIANTS:
            name = f"compile={compile_mode},rng={generator}"
            d = workdir / f"prod-{compile_mode}-{generator}-{i}"
            d.mkdir(parents=True, exist_ok=True)
            ini = d / "prod.ini"
            ini.write_text(bench_input(
                name="prod", output=d / "out", device=args.device, compile=compile_mode,
                rng=generator, L=L, replicas=R, trajectories=T, steps=args.steps,
                checkpoint_every=100, save_every=10))
            done = run_production([sys.executable, "-m", "hpcflow.run", str(ini)],
                                  d / "out" / "hmc.h5", env, args.scaling_timeout)
            if isinstance(done, str):
                out["variants"][name] = {"skipped": done}
                continue
            v = runs.setdefault(name, {"seconds": [], "wall_seconds": [], "acceptance": []})
            for key in v:
                v[key].append(done[key])
            shutil.rmtree(d / "out")
    for name, v in runs.items():
        med = statistics.median(v["seconds"])
        out["variants"][name] = {"seconds": med, "wall_seconds": statistics.median(v["wall_seconds"]),
                                 "runs_seconds": v["seconds"], "runs_wall_seconds": v["wall_seconds"],
                                 "acceptance": v["acceptance"][0],
                                 "replica_trajectories_per_second": R * T / med}
    base = out["variants"].get("compile=off,rng=pcg64", {}).get("seconds")
    for v in out["variants"].values():
        if base and "seconds" in v:
            v["speedup"] = base / v["seconds"]
    return out


# ---------------------------------------------------------------------------------------
# targets, machine, main


def _flag(value, ok) -> dict:
    return {"value": value, "pass": None if value is None else bool(ok(value))}


def targets(result: dict) -> dict:
    """The issue's targets as ratios with pass flags (None: not measured in this run)."""
    cells = {(r["L"], r["B"]): r for r in result.get("hmc", [])}
    t = {}
    for L, need in ((16, 0.40), (64, 0.50)):
        r = cells.get((L, 64), {})
        t[f"hmc_B64_L{L}_over_reference"] = {
            "target": f">= {need}", **_flag(r.get("best_ratio_to_reference"), lambda v: v >= need),
            "momenta_bound": r.get("momenta", {}).get("bound_ratio_to_reference")}
    f = result.get("fhmc", {}).get("ratios", {})
    t["fhmc_over_hmc_per_trajectory"] = {"target": "<= 2",
                                         **_flag(f.get("best_per_trajectory"), lambda v: v <= 2)}
    if "transcendental_floor" in f:
        t["fhmc_over_hmc_per_trajectory"]["transcendental_floor"] = \
            f["transcendental_floor"]["per_trajectory_at_least"]
    w = result.get("weak_scaling", {})
    t["weak_scaling_1_to_2_ranks"] = {"target": ">= 0.9",
                                      **_flag(w.get("efficiency"), lambda v: v >= 0.9)}
    for L in sorted({L for L, _ in cells}):
        a, b = cells.get((L, 64)), cells.get((L, 1024))
        value = (b["best_replica_trajectories_per_second"] / a["best_replica_trajectories_per_second"]
                 if a and b else None)
        t[f"per_replica_B1024_over_B64_L{L}"] = {"target": ">= 1", **_flag(value, lambda v: v >= 1)}
    measured = [v["pass"] for v in t.values() if v["pass"] is not None]
    t["all_measured_pass"] = all(measured) if measured else None
    return t


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(cc: str | None = None) -> dict:
    info = {"hpcflow": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "cpu_model": _cpu_model(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "platform": platform.platform()}
    if hasattr(os, "sched_getaffinity"):
        info["cores_available"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = list(os.getloadavg())
    if cc is not None:
        info["c_compiler"] = compiler_info(cc)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def report(result: dict) -> None:
    """The human summary of a bench run on standard output."""
    s = result["settings"]
    print(f"HMC, leapfrog {s['steps']} steps, device {s['device']}, {s['threads']} thread(s)")
    print(HMC_HEADER)
    for r in result["hmc"]:
        print(hmc_line(r))
    bw = result.get("bandwidth")
    if bw:
        print(f"copy bandwidth {bw['bytes_per_second'] / 1e9:.1f} GB/s: bound "
              f"{bw['bound_site_steps_per_second'] / 1e6:.0f} M site-steps/s at "
              f"{bw['bytes_per_site_step']} B per site-step")
    ref = result["reference"]
    print("C reference:", ref.get("skipped") or
          f"{ref.get('cc')} {ref.get('flags')}; agrees with hpcflow's trajectory: "
          f"{[c['agrees'] for c in ref.get('checks', [])]}")
    f = result.get("fhmc")
    if f:
        r = f["ratios"]
        print(f"FHMC/HMC, L={f['L']}, B={f['B']}, minimal flow: per trajectory "
              f"{r['eager_per_trajectory']:.2f} (eager/eager), {r['best_per_trajectory']:.2f} "
              f"(best/best: {r['best_paths']['fhmc']}/{r['best_paths']['hmc']}); per force "
              f"{r['eager_per_force']:.2f} (eager), {r['best_per_force']:.2f} (best)")
    m = result.get("memory")
    if m:
        per = {k: m[k].get("peak_rss_bytes_per_replica") for k in ("eager", "compiled")
               if isinstance(m.get(k), dict)}
        print(f"memory per replica, L={m['L']}, B={m['B']}: state {m['state_bytes_per_replica']} B, "
              f"peak RSS difference {per}")
    w = result.get("weak_scaling")
    if w:
        print("weak scaling 1 -> 2 ranks:", w.get("skipped") or
              f"{w['efficiency']:.3f} (median seconds {w['seconds_by_ranks']}; pairs "
              f"{', '.join(f'{e:.3f}' for e in w['efficiency_by_pair'])})")
    p = result.get("production")
    if p:
        print(f"productions, L={p['L']}, {p['replicas']} replicas x {p['trajectories']} "
              f"trajectories, 1 rank (median seconds, speedup over compile=off,rng=pcg64):")
        for name, v in p["variants"].items():
            print(f"  {name:28s} " + (v.get("skipped") or f"{v['seconds']:8.2f} s  "
                                      f"{v.get('speedup', float('nan')):6.2f}x  wall "
                                      f"{v['wall_seconds']:6.1f} s"))
    print("targets:")
    for k, v in result["targets"].items():
        if isinstance(v, dict):
            print(f"  {k:36s} {_fmt(v['value']):>8s}  {v['target']:>6s}  pass={v['pass']}")


#: option: (full run, --quick)
RUN_DEFAULTS = {"Ls": ("16,64", "16"), "batches": ("1,64,256,1024", "1,64"),
                "min_seconds": (0.3, 0.05), "repeat": (3, 2), "scaling_trajectories": (1000, 200),
                "production_trajectories": (1000, 100), "production_repeat": (3, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcflow.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench.json", help="JSON output file")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: L 16, B 1 and 64, short timings, a short scaling run")
    ap.add_argument("--Ls", help="lattice sizes of the HMC table (16,64; quick: 16)")
    ap.add_argument("--batches", help="batch sizes of the HMC table (1,64,256,1024; quick: 1,64)")
    ap.add_argument("--beta", type=float, default=0.634)
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--min-seconds", type=float, help="length of a timed block (0.3; quick: 0.05)")
    ap.add_argument("--repeat", type=int, help="timed blocks per case, the best kept (3; quick: 2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cc", default="cc", help="C compiler of the reference loop")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="skip the torch.compile paths")
    ap.add_argument("--chunk-sites", type=int, metavar="N",
                    help="CPU: most sites per call of the compiled HMC trajectory (a larger "
                         "batch runs in chunks of replicas; 0: never; default: "
                         "hpcflow.fused.CPU_CHUNK_SITES above CPU_CHUNK_ABOVE sites, what "
                         "productions use)")
    ap.add_argument("--no-reference", dest="reference", action="store_false")
    ap.add_argument("--no-eager", dest="eager", action="store_false",
                    help="HMC table: the compiled paths only (the allocator section's children)")
    ap.add_argument("--no-fhmc", dest="fhmc", action="store_false")
    ap.add_argument("--no-memory", dest="memory", action="store_false")
    ap.add_argument("--no-scaling", dest="scaling", action="store_false")
    ap.add_argument("--fhmc-L", type=int, default=16)
    ap.add_argument("--fhmc-batch", type=int, default=64)
    ap.add_argument("--scaling-L", type=int, default=16)
    ap.add_argument("--scaling-replicas", type=int, default=64, help="replicas per rank")
    ap.add_argument("--scaling-trajectories", type=int, help="per replica (1000; quick: 200)")
    ap.add_argument("--scaling-repeat", type=int, default=3,
                    help="1- and 2-rank runs, alternating; the medians' ratio (3)")
    ap.add_argument("--scaling-timeout", type=float, default=600)
    ap.add_argument("--no-variants", dest="variants", action="store_false",
                    help="compile only the production's path per cell, not the other layout "
                         "and Metropolis choice beside it (fewer compilations: GPU runs)")
    ap.add_argument("--no-production", dest="production", action="store_false",
                    help="skip the whole-production timings (compile x rng)")
    ap.add_argument("--production-L", type=int, default=16)
    ap.add_argument("--production-replicas", type=int, default=64)
    ap.add_argument("--production-trajectories", type=int,
                    help="per replica (1000; quick: 100)")
    ap.add_argument("--production-repeat", type=int, help="rounds of the variants (3; quick: 1)")
    ap.add_argument("--no-allocator", dest="allocator", action="store_false",
                    help="skip the per-replica cells with glibc's default allocator settings")
    ap.add_argument("--allocator-repeat", type=int, default=2,
                    help="child runs per allocator setting, alternating (2)")
    ap.add_argument("--frozen-backends", action="store_true",
                    help="only compare the sparse and fft FrozenFlow backends (see above)")
    ap.add_argument("--max-seconds", type=float, default=2.0,
                    help="--frozen-backends: skip a backend whose first evaluation is longer")
    ap.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    # defaults: the full run, or the smoke run of --quick; options given explicitly win
    for key, (full, quick) in RUN_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    args.Ls = [int(x) for x in str(args.Ls).split(",")]
    args.batches = [int(b) for b in str(args.batches).split(",")]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    allocator = tune_allocator()
    if args.memory_probe:
        L, B, mode = args.memory_probe.split(",")
        print(json.dumps(memory_probe(int(L), int(B), mode, args.steps, device, args.chunk_sites)))
        return 0

    result = {"machine": machine(args.cc),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "memory_probe")}}
    result["machine"]["allocator"] = allocator  # as a production's make_world does
    if args.frozen_backends:
        result["frozen_backends"] = main_frozen_backends(args, device)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"written {args.out}")
        return 0

    t_start = time.perf_counter()
    action = Phi4Action(args.beta, args.lam)
    with tempfile.TemporaryDirectory(prefix="hpcflow-bench-") as tmp:
        tmp = Path(tmp)
        ref = None
        if args.reference:
            library, info = build_reference(args.cc, tmp)
            if library is not None:
                ref = Reference(library, args.beta, args.lam, 1.0, args.steps)
                info["checks"] = [check_reference(ref, action, L, B, args.steps)
                                  for L in sorted({*args.Ls, 5}) for B in (1, 3)]
                if not all(c["agrees"] for c in info["checks"]):
                    info["skipped"] = (f"the reference disagrees with hpcflow's trajectory "
                                       f"beyond {REF_TOLERANCE}: not timed")
                    ref = None
            info["tolerance"] = REF_TOLERANCE
            if device.type != "cpu":
                info["note"] = "the reference runs on the CPU, hpcflow on " + str(device)
        else:
            info = {"skipped": "--no-reference"}
        result["reference"] = info
        result["bandwidth"] = bw = bench_bandwidth(device, min_seconds=args.min_seconds,
                                                   repeat=args.repeat)
        if args.compile:
            try:
                result["call_overhead"] = bench_call_overhead(device, args.min_seconds,
                                                              args.repeat)
            except Exception as err:  # no compiler: the HMC cells say so too
                result["call_overhead"] = {"skipped": f"torch.compile failed: {err}"}
        result["hmc"] = []
        print(HMC_HEADER, flush=True)
        for L in args.Ls:
            for B in args.batches:
                cell = bench_hmc_cell(args, device, action, L, B, ref)
                bound = bw["bound_site_steps_per_second"]
                cell["ratio_to_bandwidth_bound"] = {
                    f"{path}_{what}": cell[path][f"{what}_site_steps_per_second"] / bound
                    for path in ("eager", "compiled") if path in cell
                    for what in ("hmc", "trajectory")
                    if f"{what}_site_steps_per_second" in cell[path]}
                result["hmc"].append(cell)
                print(hmc_line(result["hmc"][-1]), flush=True)
        if args.fhmc:
            result["fhmc"] = bench_fhmc(args, device)
        if args.memory:
            result["memory"] = bench_memory(args, device)
        if args.scaling:
            result["weak_scaling"] = bench_weak_scaling(args, tmp)
        if args.production:
            result["production"] = bench_production(args, tmp)
        if args.allocator and args.compile:
            result["allocator_default"] = bench_allocator_default(args, tmp)
    result["targets"] = targets(result)
    if hasattr(os, "getloadavg"):
        result["machine"]["load_average_end"] = list(os.getloadavg())
    result["total_seconds"] = time.perf_counter() - t_start
    print()
    report(result)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
