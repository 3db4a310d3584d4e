"""Post-hoc study tables and figures over many run directories.

    python -m hpcflow.study RUN_DIR [RUN_DIR ...] [--png acceptance.png] [--json study.json]

For every ensemble found (``hmc.h5``, ``fhmc.h5`` in each directory; an analysis cached
beside the ensemble by the analysis stage is reused while the ensemble is unchanged), one
row: algorithm, prior and flow architecture (kernel size, layers, hidden), statistics,
flow Metropolis acceptance, tau_int(M) with its error (Gamma method, replicas combined,
in trajectories), and tau_int(M) of HMC over that of the row at the same (L, beta), with
the error of the ratio (independent ensembles, errors added in quadrature).  Rows with
several kernel sizes sit in one table.

``--png`` draws the flow acceptance (independence Metropolis over fresh proposals) against
the training iteration for every flow, from each run's ``train.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from . import analysis


def _analysis_json(directory: Path) -> list[dict]:
    """The analysis JSON of every ensemble in ``directory`` (cached analyses are reused)."""
    return [r["json"] for r in analysis.run(directory, write=False)]


def collect(dirs) -> list[dict]:
    """One row per ensemble in ``dirs``."""
    rows = []
    for d in map(Path, dirs):
        if not d.is_dir():
            continue
        for js in _analysis_json(d):
            o = js["observables"]["M"]
            row = {"run": str(d), "algorithm": js["algorithm"], "L": js["L"], "beta": js["beta"],
                   "replicas": js["replicas"], "measurements": js["measurements"],
                   "acceptance": js["acceptance"], "tau_int": o["tau_int"],
                   "tau_int_error": o["tau_int_error"], "chi": js["observables"]["chi"],
                   "absM": js["observables"]["absM"], "prior": None, "kernel_size": None,
                   "layers": None, "hidden": None, "flow_acceptance": None,
                   "steps": js.get("md", {}).get("steps")}
            if "flow" in js:
                spec = js["flow"]["spec"]
                row.update(prior=js["flow"]["prior"], kernel_size=spec["kernel_size"],
                           layers=spec["layers"], hidden=spec["hidden"],
                           flow_acceptance=js["flow"]["acceptance"])
            rows.append(row)
    for row in rows:
        ref = [r for r in rows if r["algorithm"] == "hmc" and (r["L"], r["beta"]) == (row["L"], row["beta"])]
        if ref and row["tau_int"]:
            a, da = ref[0]["tau_int"], ref[0]["tau_int_error"]
            b, db = row["tau_int"], row["tau_int_error"]
            ratio = a / b
            row["tau_hmc_over_tau"] = ratio
            row["tau_hmc_over_tau_error"] = ratio * math.hypot(da / a, db / b)
    order = {"hmc": 0, "fhmc": 1}
    prior_order = {None: 0, "gaussian": 1, "coarse-volume": 2, "coarse-interleave": 3}
    rows.sort(key=lambda r: (r["L"], r["beta"], order.get(r["algorithm"], 9),
                             prior_order.get(r["prior"], 9), r["kernel_size"] or 0, r["layers"] or 0))
    return rows


def label(r) -> str:
    if r["algorithm"] == "hmc":
        return "HMC"
    hidden = f" h={','.join(map(str, r['hidden']))}" if r["hidden"] else ""
    return f"FHMC {r['prior']} k={r['kernel_size']} n={r['layers']}{hidden}"


def table(rows) -> str:
    lines = [f"{'algorithm':38s} {'L':>3s} {'beta':>6s} {'R x N':>12s} {'steps':>5s} {'acc':>6s} {'flow acc':>9s} "
             f"{'tau_int(M)':>16s} {'rel.err':>8s} {'tau_HMC/tau':>14s}"]
    for r in rows:
        tau = analysis._fmt(r["tau_int"], r["tau_int_error"])
        rel = f"{100 * r['tau_int_error'] / r['tau_int']:.1f}%" if r["tau_int"] else "-"
        fa = f"{r['flow_acceptance']:.3f}" if r["flow_acceptance"] is not None else "-"
        ratio = (analysis._fmt(r["tau_hmc_over_tau"], r["tau_hmc_over_tau_error"])
                 if "tau_hmc_over_tau" in r and r["algorithm"] != "hmc" else "-")
        lines.append(f"{label(r):38s} {r['L']:3d} {r['beta']:6.3f} "
                     f"{str(r['replicas']) + ' x ' + str(r['measurements']):>12s} "
                     f"{str(r['steps'] or '-'):>5s} {r['acceptance']:6.3f} {fa:>9s} {tau:>16s} {rel:>8s} {ratio:>14s}")
    return "\n".join(lines)


def acceptance_figure(dirs, png: Path) -> int:
    """Flow acceptance against training iteration, one curve per flow; returns the count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    n = 0
    for d in map(Path, dirs):
        f = d / "train.json"
        if not f.exists():
            continue
        js = json.loads(f.read_text())
        h = js["history"]
        m = h["metropolis"]
        spec = js["spec"]
        line, = ax.plot([max(p["iteration"], 1) for p in m], [p["acceptance"] for p in m],
                        marker="o", ms=3,
                        label=f"{js['prior']}, k={spec['kernel_size']}, n={spec['layers']} ({d.name})")
        window = min(20, len(h["acceptance"]))
        if window:  # per-iteration estimate on the training batch, running mean
            acc = np.convolve(h["acceptance"], np.ones(window) / window, mode="valid")
            ax.plot(h["iteration"][window - 1:], acc, color=line.get_color(), alpha=0.3, lw=1)
        n += 1
    ax.set_xscale("log")
    ax.set_title("points: fresh proposals; faint: training-batch estimate (running mean of 20)",
                 fontsize=9)
    ax.set_xlabel("training iteration")
    ax.set_ylabel("flow Metropolis acceptance (fresh proposals)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcflow.study", description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", help="run directories")
    ap.add_argument("--png", type=Path, help="write the flow-acceptance figure here")
    ap.add_argument("--json", type=Path, help="write the table as JSON here")
    args = ap.parse_args(argv)
    rows = collect(args.dirs)
    if not rows:
        print("error: no analysed ensembles in " + ", ".join(args.dirs), file=sys.stderr)
        return 2
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if args.png:
        n = acceptance_figure(args.dirs, args.png)
        print(f"{args.png}: flow acceptance against training iteration for {n} flow(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
