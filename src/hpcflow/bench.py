"""Benchmarks: ``python -m hpcflow.bench [--out bench.json] [--L 16] [--batches 1,16,64,256]``.

Measures, on one rank and one device, what a production costs:

- ``hmc_batch``: HMC trajectories (Phi4Action, leapfrog, ``--steps`` steps, length 1) on a
  batch of B chains, for each B of ``--batches``: trajectories per second of the batch,
  per replica (B times that), and the cost of one batch trajectory relative to B = 1.
  A batched code costs a small multiple of one chain's trajectory, not B times it.
- ``fhmc_vs_hmc``: one FHMC trajectory (FlowedAction over the [flow] architecture given by
  ``--kernel-size``, ``--layers``, ``--hidden``; forces by autograd) against one HMC
  trajectory, both with ``--fhmc-batch`` chains and the same integrator: the cost ratio.

Each case first runs ``--warmup`` trajectories, then times ``--trajectories`` of them, and
repeats that ``--repeat`` times keeping the fastest (the least disturbed) run.  All ratios
are measured in the same process.  The JSON written to ``--out`` holds the machine, the
library versions and every measurement; a table goes to standard output.
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
from .parallel import ReplicaStreams


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_hmc(action, B, L, n_traj, steps, device, warmup=5, repeat=3, seed=1,
             integrator="leapfrog"):
    """Best-of-``repeat`` seconds per batch trajectory for B chains (random numbers included)."""
    streams = ReplicaStreams(seed, range(B), "bench")
    state = init_state(action, 0.5 * streams.normal((L, L), device))
    integ = INTEGRATORS[integrator]

    def trajectories(n):
        nonlocal state
        for _ in range(n):
            state, _ = hmc_step(action, state, streams.normal((L, L), device),
                                streams.log_uniform(device), integ, 1.0, steps)

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
        rows.append({"B": B, "seconds_per_trajectory": sec, "trajectories_per_second": 1 / sec,
                     "replica_trajectories_per_second": B / sec})
    base = rows[0]["seconds_per_trajectory"]
    for r in rows:
        r["cost_relative_to_first"] = r["seconds_per_trajectory"] / base
    return rows


def bench_fhmc(args, device):
    from .action import FlowedAction
    from .flow import Flow

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
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.hidden = tuple(int(h) for h in args.hidden.split(",") if h.strip())
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    result = {"machine": machine(), "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    result["hmc_batch"] = bench_hmc_batch(args, device)
    print(f"HMC, L={args.L}, leapfrog {args.steps} steps, device {device}, "
          f"{args.threads} thread(s)")
    print(f"{'B':>6s} {'traj/s':>10s} {'replica traj/s':>15s} {'cost / cost(B=1)':>17s}")
    for r in result["hmc_batch"]:
        print(f"{r['B']:6d} {r['trajectories_per_second']:10.1f} "
              f"{r['replica_trajectories_per_second']:15.1f} {r['cost_relative_to_first']:17.2f}")
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
