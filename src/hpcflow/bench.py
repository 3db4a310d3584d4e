"""Benchmarks: ``python -m hpcflow.bench [--out bench.json] [--L 16] [--batches 1,16,64,256]``.

Measures, on one rank and one device, what a production costs:

- ``hmc_batch``: HMC trajectories (Phi4Action, leapfrog, ``--steps`` steps, length 1) on a
  batch of B chains, for each B of ``--batches``: trajectories per second of the batch,
  per replica (B times that), and the cost of one batch trajectory relative to B = 1.
  A batched code costs a small multiple of one chain's trajectory, not B times it.
  With ``--compiled`` the fused trajectory of :mod:`hpcflow.fused` (torch.compile) is timed
  beside the eager one for each B: site-steps per second, speed-up, compilation seconds.
- ``fhmc_vs_hmc``: one FHMC trajectory (FlowedAction over the [flow] architecture given by
  ``--kernel-size``, ``--layers``, ``--hidden``; forces by autograd) against one HMC
  trajectory, both with ``--fhmc-batch`` chains and the same integrator: the cost ratio.

Each case first runs ``--warmup`` trajectories, then times ``--trajectories`` of them, and
repeats that ``--repeat`` times keeping the fastest (the least disturbed) run.  All ratios
are measured in the same process.  The JSON written to ``--out`` holds the machine, the
library versions and every measurement; a table goes to standard output.

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
import json
import platform
import sys
import time

import torch

from . import __version__
from .action import Phi4Action
from .hmc import INTEGRATORS, hmc_step, init_state
from .rng import ReplicaStreams


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_hmc(action, B, L, n_traj, steps, device, warmup=5, repeat=3, seed=1,
             integrator="leapfrog", trajectory=None):
    """Best-of-``repeat`` seconds per batch trajectory for B chains (random numbers included);
    ``trajectory`` is a fused trajectory function for hmc_step (:mod:`hpcflow.fused`)."""
    streams = ReplicaStreams(seed, range(B), "bench")
    state = init_state(action, 0.5 * streams.normal((L, L), device))
    integ = INTEGRATORS[integrator]

    def trajectories(n):
        nonlocal state
        for _ in range(n):
            state, _ = hmc_step(action, state, streams.normal((L, L), device),
                                streams.log_uniform(device), integ, 1.0, steps, trajectory)

    trajectories(warmup)
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        trajectories(n_traj)
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / n_traj)
    return best


def bench_hmc_batch(args, device):
    action = Phi4Action(args.beta, args.lam)
    rows = []
    for B in args.batches:
        sec = time_hmc(action, B, args.L, args.trajectories, args.steps, device,
                       args.warmup, args.repeat)
        row = {"B": B, "seconds_per_trajectory": sec, "trajectories_per_second": 1 / sec,
               "replica_trajectories_per_second": B / sec,
               "site_steps_per_second": B * args.L ** 2 * args.steps / sec}
        if args.compiled:
            from . import fused

            streams = ReplicaStreams(2, range(B), "bench-compile")
            example = (0.5 * streams.normal((args.L, args.L), device),
                       streams.normal((args.L, args.L), device))
            t0 = time.perf_counter()
            try:
                traj = fused.compile_trajectory(action, INTEGRATORS["leapfrog"], 1.0, args.steps,
                                                example)
            except fused.CompileUnavailable as err:
                row["compiled"] = {"unavailable": str(err)}
            else:
                compile_s = time.perf_counter() - t0
                sec_c = time_hmc(action, B, args.L, args.trajectories, args.steps, device,
                                 args.warmup, args.repeat, trajectory=traj)
                row["compiled"] = {"compile_seconds": compile_s, "seconds_per_trajectory": sec_c,
                                   "site_steps_per_second": B * args.L ** 2 * args.steps / sec_c,
                                   "speedup": sec / sec_c}
        rows.append(row)
    base = rows[0]["seconds_per_trajectory"]
    for r in rows:
        r["cost_relative_to_first"] = r["seconds_per_trajectory"] / base
    return rows


def bench_fhmc(args, device):
    from .action import FlowedAction
    from .flows import Flow

    target = Phi4Action(args.beta, args.lam)
    flow = Flow(args.L, kernel_size=args.kernel_size, layers=args.layers, hidden=args.hidden)
    with torch.no_grad():  # generic weights: the cost does not depend on their values
        for p in flow.parameters():
            p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
    flowed = FlowedAction(target, flow.to(device))
    B = args.fhmc_batch
    hmc = time_hmc(target, B, args.L, args.trajectories, args.steps, device, args.warmup, args.repeat)
    fhmc = time_hmc(flowed, B, args.L, max(5, args.trajectories // 5), args.steps, device,
                    args.warmup, args.repeat)
    return {"B": B, "flow": flow.spec(), "hmc_seconds_per_trajectory": hmc,
            "fhmc_seconds_per_trajectory": fhmc, "fhmc_over_hmc": fhmc / hmc}


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


def machine():
    info = {"hpcflow": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcflow.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench.json", help="JSON output file")
    ap.add_argument("--L", type=int, default=16)
    ap.add_argument("--beta", type=float, default=0.634)
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--trajectories", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fhmc-batch", type=int, default=64)
    ap.add_argument("--kernel-size", type=int, default=3)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--hidden", default="", help="comma list of hidden channels")
    ap.add_argument("--skip-fhmc", action="store_true")
    ap.add_argument("--compiled", action="store_true",
                    help="also time the fused torch.compile trajectory (hpcflow.fused) per batch")
    ap.add_argument("--frozen-backends", action="store_true",
                    help="only compare the sparse and fft FrozenFlow backends (see above)")
    ap.add_argument("--max-seconds", type=float, default=2.0,
                    help="--frozen-backends: skip a backend whose first evaluation is longer")
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.hidden = tuple(int(h) for h in args.hidden.split(",") if h.strip())
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    result = {"machine": machine(), "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    if args.frozen_backends:
        result["frozen_backends"] = main_frozen_backends(args, device)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"written {args.out}")
        return 0
    result["hmc_batch"] = bench_hmc_batch(args, device)
    print(f"HMC, L={args.L}, leapfrog {args.steps} steps, device {device}, "
          f"{args.threads} thread(s)")
    print(f"{'B':>6s} {'traj/s':>10s} {'replica traj/s':>15s} {'cost / cost(B=1)':>17s}")
    for r in result["hmc_batch"]:
        c = r.get("compiled", {})
        fused_text = (f"   compiled: {c['site_steps_per_second'] / 1e6:.0f} M site-steps/s "
                      f"(eager {r['site_steps_per_second'] / 1e6:.0f} M, x{c['speedup']:.2f}, "
                      f"compile {c['compile_seconds']:.1f} s)" if "speedup" in c else
                      f"   compiled: {c['unavailable']}" if c else "")
        print(f"{r['B']:6d} {r['trajectories_per_second']:10.1f} "
              f"{r['replica_trajectories_per_second']:15.1f} {r['cost_relative_to_first']:17.2f}"
              + fused_text)
    if not args.skip_fhmc:
        r = result["fhmc_vs_hmc"] = bench_fhmc(args, device)
        print(f"FHMC vs HMC, L={args.L}, B={r['B']}, flow {r['flow']}: "
              f"HMC {r['hmc_seconds_per_trajectory'] * 1e3:.2f} ms, "
              f"FHMC {r['fhmc_seconds_per_trajectory'] * 1e3:.2f} ms per trajectory, "
              f"ratio {r['fhmc_over_hmc']:.1f}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
