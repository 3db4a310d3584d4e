"""Compare the compiled FHMC step of this checkout with that of an earlier commit, in the
same rounds (a block of each in turn, the fastest block each), on this machine.

    python tools/fhmc_formulation.py 3c2c039 results/fhmc-formulation-epyc.json

The earlier commit's hpcflow/fused.py is loaded as a module of this package (its other
modules are this checkout's); both compile the minimal flow (hpcflow.bench.minimal_flow)
at L = 16, B = 64, leapfrog of 10 steps, and their chains must agree (z, pi bit for bit
or to 1e-12)."""

import importlib.util
import json
import platform
import subprocess
import sys
import time

import torch

import os
from hpcflow import fused
from hpcflow.action import FlowedAction, Phi4Action
from hpcflow.bench import _cpu_model, minimal_flow, start_point
from hpcflow.hmc import INTEGRATORS, hmc_step, init_state


def load_old(commit: str):
    source = subprocess.run(["git", "show", f"{commit}:src/hpcflow/fused.py"], check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("hpcflow._fused_at_commit", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "hpcflow"
    sys.modules[spec.name] = module  # dynamo looks the module up by name
    exec(compile(source, f"{commit}:fused.py", "exec"), module.__dict__)
    return module


def main(commit: str, out: str, L: int = 16, B: int = 64, rounds: int = 15, n: int = 30):
    torch.set_num_threads(1)
    start_load = os.getloadavg()
    old = load_old(commit)
    target = Phi4Action(0.634, 0.5)
    flowed = FlowedAction(target, minimal_flow(L, "cpu"))
    phi0, pi0 = start_point(B, L, "cpu")
    paths = {"this": fused, commit: old}
    fns, compile_seconds = {}, {}
    for name, module in paths.items():
        t0 = time.perf_counter()
        fns[name] = module.compile_trajectory(flowed, INTEGRATORS["leapfrog"], 1.0, 10,
                                              (phi0, pi0))
        compile_seconds[name] = time.perf_counter() - t0
    a, b = fns["this"](phi0, pi0), fns[commit](phi0, pi0)
    diff = [float((x - y).abs().max()) for x, y in zip(a, b)]
    assert max(diff[:2]) < 1e-12, diff
    state, log_u = init_state(flowed, phi0), torch.zeros(B, dtype=torch.float64)

    def step(fn):
        return lambda: hmc_step(flowed, state, pi0, log_u, "leapfrog", 1.0, 10, trajectory=fn)

    calls = {name: step(fn) for name, fn in fns.items()}
    best = {name: float("inf") for name in calls}
    for call in calls.values():
        call()
    for _ in range(rounds):
        for name, call in calls.items():
            t0 = time.perf_counter()
            for _ in range(n):
                call()
            best[name] = min(best[name], (time.perf_counter() - t0) / n)
    result = {
        "what": "compiled FHMC hmc_step, minimal flow, leapfrog 10 steps, tau = 1",
        "L": L, "B": B, "rounds": rounds, "calls_per_block": n,
        "commit_compared": commit, "machine": {
            "cpu_model": _cpu_model(), "platform": platform.platform(),
            "torch": torch.__version__, "threads": 1, "load_average_start": start_load},
        "step_seconds": best, "compile_seconds": compile_seconds,
        "max_abs_difference_z_pi_S": diff,
        "speedup_over_commit": best[commit] / best["this"],
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
