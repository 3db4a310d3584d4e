"""Post-hoc study tables and figures over many run directories (PHYSICS.md section 5.1).

    python -m hpcflow.study RUN_DIR [RUN_DIR ...] [--json study.json] [--csv study.csv]
                            [--png acceptance.png] [--no-bench] [--bench-device cpu]
                            [--quiet | --verbose]

For every ensemble found (``hmc.h5``, ``fhmc.h5``, ``fhmc-*.h5`` in each directory; an
analysis cached beside the ensemble is reused while the ensemble is unchanged and its
schema current, :func:`hpcflow.analysis.run`) one row, in the row schema of DESIGN.md
section 4:

- ``L``, ``beta``, ``lambda``, ``xi`` {value, error} (1/m from the m_eff plateau);
- ``algorithm`` (hmc | fhmc), ``prior``, ``kernel_size`` (also ``layers``, ``hidden``),
  ``length`` (MD trajectory length tau), ``steps``, ``integrator``, ``acceptance``,
  ``flow_acceptance`` (independence Metropolis over fresh proposals), ``replicas``,
  ``measurements``, ``chi``, ``absM``;
- ``tau_int`` {value, error}: of M, in trajectories (Gamma method over all replicas about
  their overall mean, :func:`hpcflow.analysis.to_obs`);
- ``tau_int_first_half`` {value, error}: tau_int(M) from the first half of every replica,
  the check that tau_int is stable when the chains are doubled (PHYSICS.md 5.1);
- ``ratio`` {value, error}: tau_int(M) of the reference HMC over this row's,
  r = tau_ref / tau, dr = r sqrt((dtau_ref / tau_ref)^2 + (dtau / tau)^2) (independent
  ensembles; the reference row itself has 1 +- 0).  The reference is the HMC ensemble at
  the same (L, beta, lambda) with length tau = 1 (the smallest ``steps`` if several);
  HMC at other lengths (the trajectory-length controls tau = 2, 4) are rows with a ratio
  of their own.  ``ratio_reference`` names the reference file;
- ``c_M`` {value, error}: the slow-mode scale std(M_z) / std(M) (1 for HMC);
- ``hmc_equivalent`` {length, tau_int {value, error}} and ``gain_beyond_rescaling``
  {value, error} (FHMC rows): HMC's tau_int(M) at the trajectory length tau / c_M, which is
  what FHMC with a linear flow of scale c_M would give (PHYSICS.md 5.1), interpolated
  between the HMC length controls, and its ratio to the row's tau_int (:func:`add_rescaling_control`);
- ``cost``: the ensemble's recorded cost (:func:`hpcflow.analysis.cost_entry`: wall and
  rank seconds, ranks, device, trajectories, ``seconds_per_trajectory_per_replica``,
  ``forces_per_trajectory`` = n_steps x forces_per_step + 1) and

  - ``force_cost``: the time of one force evaluation of this row's action in units of one
    :class:`hpcflow.action.Phi4Action` force on the same batch, measured in this process
    (1 for HMC; for FHMC ``FlowedAction(Phi4Action(beta, lambda), flow).force`` on B unit
    Gaussian fields, B = replicas per rank of the ensemble; the median over repeats of
    the ratio of the two, timed alternately;
    one measurement per flow file and batch; None with ``--no-bench``).
    ``force_cost_bench`` records how (device, batch, seconds per force of each);
  - ``cost_hmc_forces`` = tau_int x forces_per_trajectory x force_cost: the number of
    Phi4Action force evaluations (per chain) that cost as much as one integrated
    autocorrelation time of M; one statistically independent sample costs twice that;
  - ``seconds_per_independent_sample`` = 2 tau_int x seconds_per_trajectory_per_replica:
    wall-clock rank-seconds per independent measurement of M per chain, from the
    ensemble's recorded production time (on the machine it ran on);
  - ``train_seconds`` (and ``train_rank_seconds``): wall time of training the flow (from
    the flow file's ``train_time``, or the run's ``train.json``), shown apart and never
    added to the production figures; None for HMC or when not recorded;

- ``run``, ``file``, ``flow_file``, ``hpcflow_version`` and ``input`` (the ensemble's input
  text), so that a committed study file carries what made it.

``--json`` writes the list of rows; ``--csv`` the same rows as flat columns (nested keys
joined by ``_``, the input text left out).  The table on standard output groups rows by
(L, beta, lambda); an FHMC (or HMC) row at tau = 1 whose steps or integrator differ from
the reference HMC's is marked ``*``.

``--png`` draws the flow acceptance (independence Metropolis over fresh proposals) against
the training iteration for every flow, from each run's ``train.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from . import analysis
from . import log as log_mod
from .log import logger
from .stages import HISTORY_FILE

BENCH_REPEATS = 5
BENCH_MIN_SECONDS = 0.05  # one timed repeat runs the force at least this long


def _analysis_json(directory: Path) -> list[dict]:
    """The analysis JSON of every ensemble in ``directory`` (cached analyses are reused)."""
    return [r["json"] for r in analysis.run(directory, write=False)]


# ---------------------------------------------------------------------------------------
# Force-cost benchmark


def _sync(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _calibrate(fn, device, min_seconds: float) -> int:
    """Calls of ``fn()`` needed for one timing of at least ``min_seconds`` (after a warm-up)."""
    fn()
    _sync(device)
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(device)
        dt = time.perf_counter() - t0
        if dt >= min_seconds or n >= 1 << 20:
            return n
        n = max(2 * n, int(n * 1.2 * min_seconds / max(dt, 1e-9)))


def _seconds(fn, n, device) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / n


def paired_ratio(fn, ref, device="cpu", repeats: int = BENCH_REPEATS,
                 min_seconds: float = BENCH_MIN_SECONDS) -> tuple[float, float, float]:
    """(median over ``repeats`` of t(fn) / t(ref), best t(fn), best t(ref)), seconds per call.

    The two are timed alternately within each repeat, so a change of the machine's load
    hits both; the median of the paired ratios is robust against a disturbed repeat."""
    n_fn, n_ref = _calibrate(fn, device, min_seconds), _calibrate(ref, device, min_seconds)
    pairs = [(_seconds(fn, n_fn, device), _seconds(ref, n_ref, device)) for _ in range(repeats)]
    return (float(np.median([a / b for a, b in pairs])), min(a for a, _ in pairs),
            min(b for _, b in pairs))


class ForceBench:
    """Measures force costs once per (flow file, batch, theory) within one process."""

    def __init__(self, device="cpu", repeats: int = BENCH_REPEATS, log=None):
        self.device, self.repeats = device, repeats
        self.log = log or logger.warning
        self._flows: dict = {}
        self._costs: dict = {}

    def flow(self, path: str):
        """(flow, payload) of a flow file, or (None, None) with a warning when unreadable."""
        if path not in self._flows:
            from .train import flow_from_file

            try:
                self._flows[path] = flow_from_file(path, device=self.device)
            except Exception as err:  # a moved, unfinished or incompatible flow file
                self.log(f"[study] {path}: cannot load the flow ({err}); force cost and "
                         f"training time not available")
                self._flows[path] = (None, None)
        return self._flows[path]

    def force_cost(self, flow_file: str, L: int, beta: float, lam: float, batch: int):
        """(force_cost, how): seconds of ``FlowedAction(...).force(z)`` over those of
        ``Phi4Action.force`` on the same z [batch, L, L] ~ N(0, 1); (None, None) if the flow
        cannot be loaded."""
        key = (flow_file, L, beta, lam, batch)
        if key not in self._costs:
            import torch

            from .action import FlowedAction, Phi4Action

            flow, _ = self.flow(flow_file)
            if flow is None:
                self._costs[key] = (None, None)
                return self._costs[key]
            flow.eval()
            target = Phi4Action(beta, lam)
            flowed = FlowedAction(target, flow)
            g = torch.Generator().manual_seed(0)
            z = torch.randn(batch, L, L, generator=g, dtype=torch.float64).to(self.device)
            ratio, t_flowed, t_phi4 = paired_ratio(lambda: flowed.force(z),
                                                   lambda: target.force(z), self.device,
                                                   self.repeats)
            from .production import device_label

            how = {"device": device_label(self.device), "batch": batch,
                   "seconds_flowed_force": t_flowed, "seconds_phi4_force": t_phi4,
                   "repeats": self.repeats, "statistic": "median of paired ratios"}
            self._costs[key] = (ratio, how)
        return self._costs[key]


def _train_seconds(payload, flow_file) -> tuple[float | None, float | None]:
    """(wall seconds, rank-seconds) of the training, from the flow payload's ``train_time``
    (a number, or {"seconds", "segments": [{"seconds", "ranks"}, ..]}), else from the
    ``train.json`` beside the flow file; None where not recorded."""
    t = (payload or {}).get("train_time")
    if t is None and flow_file:
        js = Path(flow_file).with_name(HISTORY_FILE)
        try:
            t = json.loads(js.read_text()).get("train_time")
        except (OSError, ValueError):
            t = None
    if isinstance(t, (int, float)):
        return float(t), None
    if not isinstance(t, dict) or t.get("seconds") is None:
        return None, None
    segments = t.get("segments") or []
    rank_seconds = (sum(float(s["seconds"]) * int(s["ranks"]) for s in segments)
                    if segments and all("ranks" in s and "seconds" in s for s in segments)
                    else (float(t["seconds"]) * int(t["ranks"]) if "ranks" in t else None))
    return float(t["seconds"]), rank_seconds


def _flow_file(js) -> str | None:
    """The ensemble's flow file; a relative path that does not resolve from here is looked
    for beside the ensemble (where the train stage writes it by default)."""
    if "flow" not in js:
        return None
    f = Path(js["flow"]["file"])
    if not f.exists() and (Path(js["file"]).parent / f.name).exists():
        f = Path(js["file"]).parent / f.name
    return str(f)


# ---------------------------------------------------------------------------------------
# Rows


def _vd(d) -> dict:
    d = d or {}
    return {"value": d.get("value"), "error": d.get("error")}


def row_from_analysis(js: dict, run_dir: str) -> dict:
    """One study row (without ratio and benchmark) from an ensemble's analysis JSON."""
    o = js["observables"]
    md = js.get("md", {})
    cost = dict(js.get("cost") or {k: None for k in (
        "wall_seconds", "rank_seconds", "ranks", "device", "segments", "trajectories",
        "timed_trajectories", "seconds_per_trajectory_per_replica", "forces_per_trajectory")})
    if cost.get("forces_per_trajectory") is None and md.get("steps") is not None:
        cost["forces_per_trajectory"] = analysis.forces_per_trajectory(md["steps"], md["integrator"])
    row = {"L": js["L"], "beta": js["beta"], "lambda": js.get("lambda"), "xi": _vd(o.get("xi")),
           "algorithm": js["algorithm"], "prior": None, "kernel_size": None, "layers": None,
           "hidden": None, "length": md.get("length"), "steps": md.get("steps"),
           "integrator": md.get("integrator"), "acceptance": js["acceptance"],
           "flow_acceptance": None, "replicas": js["replicas"], "measurements": js["measurements"],
           "tau_int": {"value": o["M"]["tau_int"], "error": o["M"]["tau_int_error"]},
           "ratio": {"value": None, "error": None}, "ratio_reference": None,
           "tau_int_first_half": ({"value": js["stability"]["M_tau_int"],
                                   "error": js["stability"]["M_tau_int_error"]}
                                  if js.get("stability") else {"value": None, "error": None}),
           "c_M": _vd(js.get("c_M")), "chi": o["chi"], "absM": o["absM"], "cost": cost,
           "run": run_dir, "file": js["file"], "flow_file": None,
           "hpcflow_version": js.get("hpcflow_version"), "input": js.get("input")}
    if "flow" in js:
        spec = js["flow"]["spec"]
        row.update(prior=js["flow"]["prior"], kernel_size=spec.get("kernel_size"),
                   layers=spec.get("layers"), hidden=spec.get("hidden"),
                   flow_acceptance=js["flow"]["acceptance"], flow_file=_flow_file(js))
    return row


def _same_point(a, b) -> bool:
    return (a["L"], a["beta"], a["lambda"]) == (b["L"], b["beta"], b["lambda"])


def reference(rows, row) -> dict | None:
    """The reference HMC row of ``row``: same (L, beta, lambda), length 1, fewest steps."""
    refs = [r for r in rows if r["algorithm"] == "hmc" and _same_point(r, row)
            and r["length"] is not None and math.isclose(r["length"], 1.0)]
    return min(refs, key=lambda r: r["steps"] or 0) if refs else None


def tau_ratio(ref, row) -> dict:
    """tau_int(M) of ``ref`` over that of ``row``, r = a / b with dr / r =
    sqrt((da / a)^2 + (db / b)^2) (independent ensembles); 1 exactly for the row itself."""
    if ref is row:
        return {"value": 1.0, "error": 0.0}
    a, da = ref["tau_int"]["value"], ref["tau_int"]["error"]
    b, db = row["tau_int"]["value"], row["tau_int"]["error"]
    if not a or not b:
        return {"value": None, "error": None}
    r = a / b
    return {"value": r, "error": r * math.hypot(da / a, db / b)}


def hmc_at_length(rows, row, length: float) -> dict | None:
    """tau_int(M) of HMC at trajectory length ``length``, interpolated between the HMC rows
    of the same (L, beta, lambda) and integrator that bracket it (the trajectory-length
    controls), linear in (log length, log tau_int):

        log tau = (1 - w) log tau_1 + w log tau_2,   w = log(length / l_1) / log(l_2 / l_1),
        d tau / tau = sqrt(((1 - w) d tau_1 / tau_1)^2 + (w d tau_2 / tau_2)^2)

    (independent ensembles).  None when no pair of HMC lengths brackets ``length``; an HMC
    row at exactly that length is returned as it is."""
    hmc = sorted((r for r in rows if r["algorithm"] == "hmc" and _same_point(r, row)
                  and r["integrator"] == row["integrator"] and r["length"]
                  and r["tau_int"]["value"]), key=lambda r: r["length"])
    for r in hmc:
        if math.isclose(r["length"], length, rel_tol=1e-9):
            return {"length": length, "tau_int": dict(r["tau_int"])}
    for lo, hi in zip(hmc, hmc[1:]):
        if lo["length"] < length < hi["length"]:
            w = math.log(length / lo["length"]) / math.log(hi["length"] / lo["length"])
            (t1, d1), (t2, d2) = ((r["tau_int"]["value"], r["tau_int"]["error"]) for r in (lo, hi))
            tau = math.exp((1 - w) * math.log(t1) + w * math.log(t2))
            rel = math.hypot((1 - w) * d1 / t1, w * d2 / t2)
            return {"length": length, "tau_int": {"value": tau, "error": tau * rel},
                    "between": [lo["length"], hi["length"]]}
    return None


def add_rescaling_control(rows, row):
    """PHYSICS.md 5.1: for a linear generator phi = z / c FHMC at length tau is HMC at
    tau / c.  With c = c_M (the flow's slow-mode scale), ``hmc_equivalent`` is HMC's
    tau_int(M) at length tau / c_M (:func:`hmc_at_length`), and ``gain_beyond_rescaling`` =
    hmc_equivalent / tau_int(M) of this row, the part of the gain that the rescaling of the
    slow mode does not explain (1 within errors: the flow acts like a longer trajectory)."""
    row["hmc_equivalent"], row["gain_beyond_rescaling"] = None, {"value": None, "error": None}
    c = row["c_M"]["value"]
    if row["algorithm"] != "fhmc" or not c or not row["length"]:
        return
    eq = hmc_at_length(rows, row, row["length"] / c)
    row["hmc_equivalent"] = eq
    if eq is not None and row["tau_int"]["value"]:
        row["gain_beyond_rescaling"] = tau_ratio({"tau_int": eq["tau_int"]}, row)


def _mul(*xs):
    return None if any(x is None for x in xs) else math.prod(xs)


def _training_summary(payload) -> dict | None:
    """What training did to the flow: the flow acceptance before and after (fresh
    proposals) and the learned global scale exp(lambda); None without a flow file."""
    if payload is None:
        return None
    evals = payload.get("history", {}).get("metropolis") or []
    log_scale = payload.get("state_dict", {}).get("scale.log_scale")
    return {"acceptance_untrained": evals[0]["acceptance"] if evals else None,
            "acceptance_trained": evals[-1]["acceptance"] if evals else None,
            "iterations": payload.get("iteration"),
            "scale": math.exp(float(log_scale)) if log_scale is not None else None}


def add_costs(row, flows: ForceBench, bench: bool = True):
    """Fill the benchmarked (``bench``) and derived cost columns of ``row`` (module
    docstring); ``flows`` loads the flow files and measures."""
    c = row["cost"]
    c.update(force_cost=None, force_cost_bench=None, train_seconds=None, train_rank_seconds=None)
    if row["algorithm"] == "hmc":
        c["force_cost"] = 1.0
    elif row["flow_file"] is not None:
        _, payload = flows.flow(row["flow_file"])
        c["train_seconds"], c["train_rank_seconds"] = _train_seconds(payload, row["flow_file"])
        row["flow_training"] = _training_summary(payload)
        if bench:
            ranks = c.get("ranks") or 1
            batch = max(1, math.ceil(row["replicas"] / ranks))
            c["force_cost"], c["force_cost_bench"] = flows.force_cost(
                row["flow_file"], row["L"], row["beta"], row["lambda"], batch)
    tau = row["tau_int"]["value"]
    c["cost_hmc_forces"] = _mul(tau, c.get("forces_per_trajectory"), c["force_cost"])
    per = c.get("seconds_per_trajectory_per_replica")
    c["seconds_per_independent_sample"] = _mul(2.0, tau, per)


def collect(dirs, bench: bool = True, bench_device: str = "cpu",
            repeats: int = BENCH_REPEATS) -> list[dict]:
    """One row per ensemble in ``dirs`` (module docstring); ``bench`` = False skips the
    force-cost measurement (force_cost None for FHMC rows)."""
    rows = []
    for d in map(Path, dirs):
        if not d.is_dir():
            continue
        rows += [row_from_analysis(js, str(d)) for js in _analysis_json(d)]
    for row in rows:
        ref = reference(rows, row)
        if ref is not None:
            row["ratio"] = tau_ratio(ref, row)
            row["ratio_reference"] = ref["file"]
    for row in rows:
        add_rescaling_control(rows, row)
    flows = ForceBench(bench_device, repeats)
    for row in rows:
        add_costs(row, flows, bench)
    order = {"hmc": 0, "fhmc": 1}
    prior_order = {None: 0, "gaussian": 1, "coarse-volume": 2, "coarse-interleave": 3}
    rows.sort(key=lambda r: (r["L"], r["beta"], r["lambda"] or 0, order.get(r["algorithm"], 9),
                             r["length"] or 0, prior_order.get(r["prior"], 9),
                             r["kernel_size"] or 0, r["layers"] or 0, r["steps"] or 0))
    return rows


# ---------------------------------------------------------------------------------------
# Output


def _mismatch(rows, r) -> bool:
    """A row at the reference's trajectory length whose steps or integrator differ from it."""
    ref = reference(rows, r)
    return (ref is not None and r is not ref and r["length"] is not None
            and math.isclose(r["length"], ref["length"])
            and (r["steps"], r["integrator"]) != (ref["steps"], ref["integrator"]))


def label(r, rows=()) -> str:
    tau = (f" tau={r['length']:g}" if r["length"] is not None and not math.isclose(r["length"], 1.0)
           else "")
    if r["algorithm"] == "hmc":
        text = "HMC" + tau
    elif r["prior"] is None:  # an FHMC ensemble without flow attributes
        text = "FHMC" + tau
    else:
        hidden = f" h={','.join(map(str, r['hidden']))}" if r["hidden"] else ""
        text = f"FHMC {r['prior']} k={r['kernel_size']} n={r['layers']}{hidden}{tau}"
    return text + ("*" if rows and _mismatch(rows, r) else "")


def paren(v, dv, sig: int = 2) -> str:
    """v(dv) with ``sig`` significant digits of the error, e.g. 61.3(2.9) -> "61.3(29)"."""
    if v is None or not np.isfinite(v):
        return "-"
    if dv is None or not np.isfinite(dv) or dv <= 1e-12 * max(abs(v), 1e-300):
        return f"{v:.4g}"  # exact (or an error at the level of rounding)
    digits = max(0, sig - 1 - int(math.floor(math.log10(dv))))
    err = round(dv * 10**digits)
    return f"{v:.{digits}f}({err})"


def _g(v, fmt=".3g") -> str:
    return "-" if v is None else format(v, fmt)


COLUMNS = [("algorithm", 34), ("R x N", 11), ("steps", 5), ("acc", 5), ("flow acc", 8),
           ("c_M", 10), ("tau_int(M)", 11), ("rel.err", 7), ("tau(N/2)", 9), ("ratio", 10),
           ("HMC@tau/c_M", 11),
           ("gain/resc", 9), ("F/traj", 6), ("F cost", 6), ("tau*F*cost", 10), ("s/indep", 8)]


def table(rows) -> str:
    """The human table: one block per (L, beta, lambda), then the footnotes."""
    head = " ".join(f"{name:<{w}s}" if i == 0 else f"{name:>{w}s}"
                    for i, (name, w) in enumerate(COLUMNS))
    lines, seen, marked = [], [], False
    for r in rows:
        point = (r["L"], r["beta"], r["lambda"])
        if point not in seen:
            seen.append(point)
            ref = reference(rows, r)
            xi = (ref or r)["xi"]
            ref_text = (f"reference HMC tau=1, {ref['steps']} {ref['integrator']} steps"
                        if ref else "no reference HMC at tau=1")
            if lines:
                lines.append("")
            lines += [f"L = {r['L']}, beta = {r['beta']:g}, lambda = {r['lambda']:g}, "
                      f"xi = {paren(xi['value'], xi['error'])}; {ref_text}", head]
        c, t = r["cost"], r["tau_int"]
        marked |= _mismatch(rows, r)
        cells = [label(r, rows), f"{r['replicas']}x{r['measurements']}", _g(r["steps"], "d"),
                 f"{r['acceptance']:.3f}", _g(r["flow_acceptance"], ".3f"),
                 paren(r["c_M"]["value"], r["c_M"]["error"]), paren(t["value"], t["error"]),
                 f"{100 * t['error'] / t['value']:.1f}%" if t["value"] else "-",
                 paren(r["tau_int_first_half"]["value"], r["tau_int_first_half"]["error"]),
                 paren(r["ratio"]["value"], r["ratio"]["error"]),
                 (paren(r["hmc_equivalent"]["tau_int"]["value"], r["hmc_equivalent"]["tau_int"]["error"])
                  if r.get("hmc_equivalent") else "-"),
                 paren(r["gain_beyond_rescaling"]["value"], r["gain_beyond_rescaling"]["error"]),
                 _g(c.get("forces_per_trajectory"), "d"), _g(c.get("force_cost"), ".2f"),
                 _g(c.get("cost_hmc_forces"), ".4g"), _g(c.get("seconds_per_independent_sample"))]
        lines.append(" ".join(f"{s:<{w}s}" if i == 0 else f"{s:>{w}s}"
                              for i, (s, (_, w)) in enumerate(zip(cells, COLUMNS))))
    lines.append("")
    if marked:
        lines.append("* steps or integrator differ from the reference HMC at tau=1 (MD step "
                     "and acceptance not matched)")
    lines += [
        "tau_int(M) in trajectories (Gamma method, replicas about the overall mean); ratio = "
        "tau_int(reference HMC) / tau_int; c_M = std(M_z)/std(M); tau(N/2): tau_int(M) from "
        "the first half of every replica (stable when the chains are doubled?)",
        "HMC@tau/c_M = HMC's tau_int(M) at length tau/c_M, interpolated (log-log) between the "
        "HMC length controls; gain/resc = that / tau_int: the gain the slow-mode rescaling "
        "does not explain",
        "F/traj = force evaluations per trajectory; F cost = one force of the row's action in "
        "Phi4Action forces (measured here); tau*F*cost in Phi4 forces",
        "s/indep = 2 tau_int x rank-seconds per trajectory per replica, as recorded by the "
        "production; training time apart:"]
    trains = {r["flow_file"]: (f"{label(r)} ({Path(r['run']).name})", r["cost"]["train_seconds"],
                               r["cost"]["train_rank_seconds"])
              for r in rows if r["cost"].get("train_seconds") is not None}
    lines += [f"  train {name}: {sec:.3g} s" + (f" ({rs:.3g} rank-s)" if rs is not None else "")
              for name, sec, rs in trains.values()] or ["  (none recorded)"]
    return "\n".join(lines)


def flat(row: dict, prefix: str = "") -> dict:
    """A row as flat columns: nested keys joined by ``_``, lists joined by ``,``, no input."""
    out = {}
    for k, v in row.items():
        if k == "input" and not prefix:
            continue
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "_"))
        elif isinstance(v, (list, tuple)):
            out[key] = ",".join(map(str, v))
        else:
            out[key] = v
    return out


def write_csv(rows, path: Path):
    flats = [flat(r) for r in rows]
    columns = list(dict.fromkeys(k for f in flats for k in f))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for f in flats:
            w.writerow({k: ("" if v is None else v) for k, v in f.items()})


def acceptance_figure(dirs, png: Path) -> int:
    """Flow acceptance against training iteration, one curve per flow; returns the count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    n = 0
    for d in map(Path, dirs):
        f = d / HISTORY_FILE
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
    ap.add_argument("--json", type=Path, help="write the rows as a JSON list here")
    ap.add_argument("--csv", type=Path, help="write the rows as flat CSV columns here")
    ap.add_argument("--no-bench", action="store_true",
                    help="do not measure the flowed-force cost (force_cost None for FHMC)")
    ap.add_argument("--bench-device", default="cpu", help="device of the force benchmark (cpu)")
    ap.add_argument("--bench-repeats", type=int, default=BENCH_REPEATS,
                    help=f"timed repeats per force, the best kept (default {BENCH_REPEATS})")
    log_mod.add_arguments(ap)
    args = ap.parse_args(argv)
    log_mod.configure(0, args.quiet, args.verbose, stream="stderr")
    rows = collect(args.dirs, bench=not args.no_bench, bench_device=args.bench_device,
                   repeats=args.bench_repeats)
    if not rows:
        print("error: no analysed ensembles in " + ", ".join(args.dirs), file=sys.stderr)
        return 2
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if args.csv:
        write_csv(rows, args.csv)
    if args.png:
        n = acceptance_figure(args.dirs, args.png)
        print(f"{args.png}: flow acceptance against training iteration for {n} flow(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
