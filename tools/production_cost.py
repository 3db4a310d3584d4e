"""Compare whole productions of this checkout with those of an earlier commit, in the same
rounds (each variant of each version in turn), on this machine.

    python tools/production_cost.py 1a2b3c4 results/production-cost-epyc.json

The earlier commit's ``src`` is unpacked into a temporary folder (``git archive``) and run
with ``python -m hpcflow.run`` on PYTHONPATH, exactly as this checkout's.  The input is the
bench's production (hpcflow.bench.BENCH_INPUT: 64 replicas, 1000 trajectories, every
trajectory measured, a configuration every 10, a checkpoint every 100), at each L of
``--Ls``, with ``[run] compile`` off and on (PCG64).  Per variant: the median of each
version's ``/cost/seconds`` (the production; compilation excluded), the speedup, and the
check that both wrote the same ensemble: the chains (dH, accepted, configurations) and
their checksums (``/integrity``) bit for bit, the measurements to 1e-12 relative."""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import io
from pathlib import Path

import h5py
import numpy as np

from hpcflow.bench import _child_env, bench_input, machine, run_production


def unpack(commit: str, into: Path) -> Path:
    """The ``src`` folder of ``commit``, unpacked under ``into``."""
    tar = subprocess.run(["git", "archive", commit, "src"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(into, filter="data")
    return into / "src"


def agreement(new: Path, old: Path) -> dict:
    """How the two ensembles compare (see the module docstring)."""
    out = {}
    with h5py.File(new, "r") as a, h5py.File(old, "r") as b:
        for name in ("mc/dH", "mc/accepted", "configs", "integrity/configs"):
            out[name + " identical"] = bool(np.array_equal(a[name][()], b[name][()],
                                                          equal_nan=a[name].dtype.kind == "f"))
        # the checksums of the rows that are the same numbers (the measurements round apart)
        names = str(a["integrity/rows"].attrs["datasets"]).split(",")
        for name in ("mc/dH", "mc/accepted"):
            k = names.index(name)
            out[f"integrity/rows of {name} identical"] = bool(np.array_equal(
                a["integrity/rows"][..., k], b["integrity/rows"][..., k]))
        for name in ("observables/M", "observables/Mz", "observables/C", "observables/Gp"):
            x, y = a[name][()], b[name][()]
            out[name + " max_rel_diff"] = float(np.abs(x - y).max() / np.abs(y).max())
    out["agrees"] = (all(v for k, v in out.items() if k.endswith("identical"))
                     and all(v < 1e-12 for k, v in out.items() if k.endswith("diff")))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("commit")
    ap.add_argument("out")
    ap.add_argument("--Ls", default="16,64")
    ap.add_argument("--replicas", type=int, default=64)
    ap.add_argument("--trajectories", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    load = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="hpcflow-cost-"))
    this_src = str(Path(__file__).resolve().parents[1] / "src")
    srcs = {"this": this_src, args.commit: str(unpack(args.commit, tmp / "old"))}
    variants = [(L, c) for L in map(int, args.Ls.split(",")) for c in ("off", "on")]
    seconds = {(L, c, v): [] for L, c in variants for v in srcs}
    files = {}
    for r in range(args.rounds):
        for L, c in variants:
            for version, src in srcs.items():
                d = tmp / f"L{L}-{c}-{'this' if version == 'this' else 'old'}-{r}"
                d.mkdir(parents=True)
                ini = d / "prod.ini"
                ini.write_text(bench_input(name="prod", output=d / "out", device="cpu",
                                           compile=c, L=L, replicas=args.replicas,
                                           trajectories=args.trajectories, steps=10,
                                           checkpoint_every=100, save_every=10))
                env = _child_env()
                env["PYTHONPATH"] = os.pathsep.join([src] + env["PYTHONPATH"].split(os.pathsep)[1:])
                done = run_production([sys.executable, "-m", "hpcflow.run", str(ini)],
                                      d / "out" / "hmc.h5", env, 1800)
                if isinstance(done, str):
                    sys.exit(done)
                seconds[(L, c, version)].append(done["seconds"])
                files[(L, c, version)] = d / "out" / "hmc.h5"
                print(f"round {r}: L = {L}, compile = {c}, {version}: {done['seconds']:.2f} s",
                      flush=True)
    result = {"machine": machine(), "commits": {"this": subprocess.run(
                  ["git", "describe", "--always", "--dirty"], capture_output=True, text=True
              ).stdout.strip(), "old": subprocess.run(
                  ["git", "rev-parse", "--short", args.commit], capture_output=True, text=True
              ).stdout.strip()},
              "load_average_at_start": load,
              "command": " ".join(["python", "tools/production_cost.py", *sys.argv[1:]]),
              "input": bench_input(name="prod", output="<dir>", device="cpu", compile="<compile>",
                                   L="<L>", replicas=args.replicas,
                                   trajectories=args.trajectories, steps=10,
                                   checkpoint_every=100, save_every=10),
              "seconds": "/cost/seconds of hmc.h5 (the production; compilation excluded)",
              "variants": []}
    for L, c in variants:
        new, old = (statistics.median(seconds[(L, c, v)]) for v in srcs)
        result["variants"].append({
            "L": L, "compile": c, "seconds_this": new, "seconds_old": old,
            "runs_this": seconds[(L, c, "this")], "runs_old": seconds[(L, c, args.commit)],
            "speedup": old / new,
            "per_trajectory_ms_this": 1e3 * new / args.trajectories,
            "per_trajectory_ms_old": 1e3 * old / args.trajectories,
            "agreement": agreement(files[(L, c, "this")], files[(L, c, args.commit)])})
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for v in result["variants"]:
        print(f"L = {v['L']:3d} compile = {v['compile']:3s}: {v['seconds_old']:.2f} s -> "
              f"{v['seconds_this']:.2f} s (x{v['speedup']:.2f}), agrees: {v['agreement']['agrees']}")


if __name__ == "__main__":
    main()
