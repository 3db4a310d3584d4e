"""Tune beta onto the line of constant physics L / xi = target: ``python -m hpcflow.tune``.

    python -m hpcflow.tune --L 24 [--L-over-xi 4] [--lam 0.5] [--xi2] [--json]
                           [--replicas R] [--trajectories N] [--work DIR] [--write results/lcp.json]
    mpirun -n 2 python -m mpi4py -m hpcflow.tune --L 24 ...      # the runs over 2 ranks

Method (PHYSICS.md sections 1-3).  Every point is an ordinary hpcflow run (``[run] stages =
hmc, analysis``: HMC, leapfrog, tau = 1, 10 steps, cold start) in its own directory under
``--work`` (default ``runs/tune/L<N>``), named after beta, lambda and the statistics; a
directory that exists is reused (a finished run is only re-analysed from its cache), and the
sequence of points is a deterministic function of the measured results, so an interrupted
tuning that is started again walks the same points and resumes at the first missing one.
xi is the analysis's ``xi`` = 1/m from the effective-mass plateau (the study's xi), or with
``--xi2`` the second-moment ``xi2``.  The variable tuned is y = L / xi (= L m), which is
close to linear in beta near the target (m ~ (beta_c - beta)^nu with nu = 1 for the 2D
Ising class, nu = 1/2 for the free field, where m^2 rather than m is linear).

1. Start at ``--beta0``; default: at lambda = 0.5 the PHYSICS.md table, as a straight-line fit
   beta = beta_c - b / xi of its points against 1/xi (xi = L / 4 there), evaluated at
   xi = L / target, which extrapolates to larger L; at lambda = 0 the exact free-field beta.
2. With one point, the next beta follows the critical model m ~ (beta_c - beta)^nu:
   beta_c - beta_1 = (beta_c - beta_0) (target / y_0)^(1/nu), moved at least ``--step``
   (a relative change of y of 10 %) away from beta_0 so that the points bracket the target
   and the slope has a lever arm of several errors of y (with 5 % the slope of two points
   2 % apart in error is uncertain by ~40 %, and the error of beta* with it).
3. With two or more, a weighted straight-line fit of y against beta through the (at most
   ``--fit-points``) points closest to the target gives beta* (secant / regression); while
   the target is not yet bracketed, the next point is aimed half a step beyond beta*.
4. It stops when the fitted points bracket the target (some y above, some below) and number
   at least ``--min-points`` (3), or after ``--max-points``.

Result and error.  The final fit is y_i = c0 + c1 beta_i (weights 1 / sigma_i^2,
sigma_i = L sigma(xi_i) / xi_i^2 from the Gamma-method errors of xi; the points are
independent runs), and beta* = (target - c0) / c1.  Its error is the delta method on the fit
parameters (inverse prediction):

    sigma(beta*)^2 = [Var c0 + 2 beta* Cov(c0, c1) + beta*^2 Var c1] / c1^2
                   = sigma(y_fit(beta*))^2 / c1^2,

Cov(c) = s (X^T W X)^-1 with s = max(1, chi^2 / dof) (dof = points - 2 > 0; s = 1 for two
points), so a fit that the straight line does not describe enlarges the error.  The error
of c1 enters through Var c1 and Cov.  xi at beta* is L / target with
sigma(xi) = L sigma(y_fit(beta*)) / target^2.

The line of constant physics is kept in ``results/lcp.json`` (``--write``): a list of
{L, beta, beta_error, xi, xi_error, L_over_xi_target, lambda, xi_kind, runs, points,
hpcflow_version, date, ...}; :func:`beta_lcp` reads it, and :func:`beta_coarse` gives the
coarse coupling of the coarse priors, beta'(L) = beta_LCP(L / 2) (PHYSICS.md section 6).

Odd L is allowed (HMC needs no checkerboard): the 4-interleave prior of an L = 2 L' lattice
with L' odd (L = 10) needs the coarse coupling beta_LCP(5).

Exit status: 0 success, 2 bad input (L < 4, target <= 0, ...), 1 a failed run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LCP_PATH = "results/lcp.json"

#: PHYSICS.md section 1: approximate line L / xi = 4 at lambda = 0.5, (L, beta).
TABLE = ((8, 0.576), (10, 0.601), (12, 0.616), (14, 0.626), (16, 0.634), (20, 0.645))


class TuneError(Exception):
    """Bad input or an impossible request (exit status 2)."""


# ---------------------------------------------------------------------------------------
# The tuned line: results/lcp.json


def _matches(entry: dict, L: int, L_over_xi: float, lam: float, xi_kind: str) -> bool:
    return (int(entry["L"]) == int(L)
            and math.isclose(float(entry.get("L_over_xi_target", 4.0)), float(L_over_xi))
            and math.isclose(float(entry.get("lambda", 0.5)), float(lam))
            and entry.get("xi_kind", "xi") == xi_kind)


def read_lcp(path=LCP_PATH) -> list[dict]:
    """The tuned points in ``path`` (a JSON list), [] if the file does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of tuned points")
    return data


def beta_lcp(L: int, path=LCP_PATH, L_over_xi: float = 4.0, lam: float = 0.5,
             xi_kind: str = "xi", error: bool = False):
    """beta on the line L / xi = ``L_over_xi`` at lattice size ``L`` from ``path``
    (``(beta, beta_error)`` with ``error=True``).  KeyError, naming the file and the
    command that makes the point, if it is missing."""
    for entry in read_lcp(path):
        if _matches(entry, L, L_over_xi, lam, xi_kind):
            b = float(entry["beta"])
            return (b, float(entry["beta_error"])) if error else b
    have = sorted({int(e["L"]) for e in read_lcp(path)
                   if _matches(e, e["L"], L_over_xi, lam, xi_kind)})
    raise KeyError(f"{path}: no tuned point for L = {L} (L/xi = {L_over_xi:g}, lambda = {lam:g}, "
                   f"{xi_kind}); tuned L: {have or 'none'}; make it with "
                   f"`python -m hpcflow.tune --L {L} --L-over-xi {L_over_xi:g} --lam {lam:g}"
                   f"{' --xi2' if xi_kind == 'xi2' else ''} --write {path}`")


def beta_coarse(L: int, path=LCP_PATH, L_over_xi: float = 4.0, lam: float = 0.5,
                xi_kind: str = "xi", error: bool = False):
    """The coarse coupling beta'(L) = beta_LCP(L / 2) (PHYSICS.md section 6: twice the
    lattice spacing, xi' = xi / 2).  ValueError for odd L, KeyError if L/2 is not tuned."""
    if int(L) % 2:
        raise ValueError(f"beta_coarse needs even L (the coarse lattice is L/2), got {L}")
    return beta_lcp(int(L) // 2, path, L_over_xi, lam, xi_kind, error)


def write_lcp(entry: dict, path=LCP_PATH) -> list[dict]:
    """Add ``entry`` to ``path``, replacing the point of the same (L, target, lambda, xi
    kind); the list is kept sorted by L.  Returns the new list."""
    path = Path(path)
    keep = [e for e in read_lcp(path) if not _matches(
        e, entry["L"], entry["L_over_xi_target"], entry["lambda"], entry["xi_kind"])]
    keep.append(entry)
    keep.sort(key=lambda e: (float(e.get("lambda", 0.5)), e.get("xi_kind", "xi"),
                             float(e.get("L_over_xi_target", 4.0)), int(e["L"])))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(keep, indent=1) + "\n")
    tmp.replace(path)
    return keep


# ---------------------------------------------------------------------------------------
# Model and fit


def critical_model(lam: float, beta_c: float | None):
    """(beta_c, nu) of the model m ~ (beta_c - beta)^nu used for the start and the first step."""
    if lam == 0:
        return (0.5 if beta_c is None else beta_c), 0.5
    if beta_c is None:
        if not math.isclose(lam, 0.5):
            raise TuneError(f"lambda = {lam:g}: give --beta0 and --beta-c (the start and the "
                            "critical coupling are only built in for lambda = 0.5 and 0)")
        beta_c = _table_fit()[0]
    return beta_c, 1.0


def _table_fit():
    """Straight line beta = beta_c - b / xi through the PHYSICS.md table (xi = L / 4)."""
    inv_xi = np.array([4.0 / L for L, _ in TABLE])
    beta = np.array([b for _, b in TABLE])
    slope, intercept = np.polyfit(inv_xi, beta, 1)
    return float(intercept), float(-slope)


def default_beta0(L: int, target: float, lam: float) -> float:
    """The starting beta: the PHYSICS.md table line at lambda = 0.5, exact at lambda = 0."""
    xi = L / target
    if lam == 0:
        # cosh(1/xi) = (1 - beta) / beta  ->  beta = 1 / (1 + cosh(1/xi))
        return 1.0 / (1.0 + math.cosh(1.0 / xi))
    if math.isclose(lam, 0.5):
        beta_c, b = _table_fit()
        return beta_c - b / xi
    raise TuneError(f"lambda = {lam:g}: give --beta0 (no built-in start for this lambda)")


@dataclass
class Fit:
    beta: float
    beta_error: float
    c0: float
    c1: float
    cov: list
    chi2: float
    dof: int
    y_error: float          # sigma of the fitted y at beta
    used: list              # betas of the points in the fit
    bracketed: bool


def fit_line(betas, y, dy, target: float) -> Fit:
    """Weighted straight-line fit y = c0 + c1 beta and its inverse prediction at ``target``
    (module docstring: error formula).  Needs two or more points with distinct beta."""
    b = np.asarray(betas, float)
    y = np.asarray(y, float)
    dy = np.asarray(dy, float)
    if len(b) < 2 or np.ptp(b) == 0:
        raise ValueError("a line needs two points with different beta")
    X = np.stack([np.ones_like(b), b], axis=1)
    W = 1.0 / dy**2
    A = X.T @ (W[:, None] * X)
    cov = np.linalg.inv(A)
    c = cov @ (X.T @ (W * y))
    chi2 = float(np.sum(W * (y - X @ c) ** 2))
    dof = len(b) - 2
    if dof > 0:
        cov = cov * max(1.0, chi2 / dof)
    c0, c1 = float(c[0]), float(c[1])
    if c1 == 0:
        raise ValueError("the fitted L/xi does not depend on beta")
    bstar = (target - c0) / c1
    g = np.array([1.0, bstar])
    y_err = float(math.sqrt(max(0.0, g @ cov @ g)))
    return Fit(bstar, y_err / abs(c1), c0, c1, cov.tolist(), chi2, dof, y_err,
               [float(v) for v in b], bool(y.min() < target < y.max()))


# ---------------------------------------------------------------------------------------
# The runs


@dataclass
class Settings:
    L: int
    target: float = 4.0
    lam: float = 0.5
    xi_kind: str = "xi"
    replicas: int = 64
    trajectories: int = 0
    thermalization: int = 0
    length: float = 1.0
    steps: int = 10
    seed: int = 1
    device: str = "cpu"
    work: str = ""
    beta0: float | None = None
    beta_c: float | None = None
    step: float = 0.10
    min_points: int = 3
    max_points: int = 6
    fit_points: int = 3

    def __post_init__(self):
        if self.trajectories <= 0:
            self.trajectories = default_trajectories(self.L)
        if self.thermalization <= 0:
            self.thermalization = default_thermalization(self.L)
        if not self.work:
            self.work = f"runs/tune/L{self.L}"


def default_trajectories(L: int) -> int:
    """Trajectories per replica (with the default 64 replicas): 12 L^2 rounded up to 100,
    at least 2000.  With tau_int of the correlator ~ xi^2 and xi = L / target the relative
    error of xi is then roughly L-independent, about 2 % per point at L / xi = 4
    (2000 at L = 8 and 12, 3100 at L = 16, 7000 at L = 24, 12300 at L = 32)."""
    return max(2000, int(math.ceil(12 * L * L / 100.0) * 100))


def default_thermalization(L: int) -> int:
    """Discarded trajectories per replica from the cold start: 2 L^2, at least 200 (several
    times the exponential autocorrelation time of M on the line, ~ 0.3 L^2 at tau = 1)."""
    return max(200, 2 * L * L)


@dataclass
class Point:
    beta: float
    xi: float | None
    xi_error: float | None
    directory: str
    seconds: float = 0.0       # production wall time of the run (its /cost), 0 if unknown
    ranks: int = 1
    acceptance: float | None = None
    reused: bool = False
    extra: dict = field(default_factory=dict)

    def L_over_xi(self, L):
        return L / self.xi

    def L_over_xi_error(self, L):
        return L * self.xi_error / self.xi**2


def run_name(s: Settings, beta: float) -> str:
    return (f"b{beta:.6f}_lam{s.lam:g}_R{s.replicas}xN{s.trajectories}_th{s.thermalization}"
            f"_tau{s.length:g}x{s.steps}_s{s.seed}")


def run_seed(s: Settings, beta: float) -> int:
    return (s.seed * 1_000_003 + s.L * 7919 + int(round(beta * 1e6))) % (2**31 - 1)


def input_text(s: Settings, beta: float, output: Path) -> str:
    """The INI input of one point (DESIGN.md section 4)."""
    every = max(100, s.trajectories // 10)
    return f"""# hpcflow.tune point: L = {s.L}, L/xi target {s.target:g}, lambda = {s.lam:g}
[run]
name = tune_L{s.L}
output = {output}
seed = {run_seed(s, beta)}
stages = hmc, analysis
device = {s.device}
checkpoint_every = {every}
progress_every = 60

[theory]
L = {s.L}
beta = {beta:.6f}
lambda = {s.lam:g}

[hmc]
replicas = {s.replicas}
trajectories = {s.trajectories}
thermalization = {s.thermalization}
length = {s.length:g}
steps = {s.steps}
integrator = leapfrog
save_every = 0
start = cold
"""


def _comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _log(msg: str):
    if _comm().Get_rank() == 0:
        print(f"[tune] {msg}", file=sys.stderr, flush=True)


def measure(s: Settings, beta: float) -> Point:
    """Run (or reuse) the point at ``beta`` and return its xi (on every rank)."""
    from . import analysis, config, run

    beta = round(float(beta), 6)
    comm = _comm()
    directory = Path(s.work) / run_name(s, beta)
    ini = directory.with_suffix(".ini")
    text = input_text(s, beta, directory)
    config.parse(text, ini)  # raises ConfigError: a bad setting is bad input
    reused = (directory / "analysis.json").exists()
    if comm.Get_rank() == 0:
        ini.parent.mkdir(parents=True, exist_ok=True)
        if not ini.exists() or ini.read_text() != text:
            ini.write_text(text)
    comm.Barrier()
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for --json
        rc = run.main([str(ini)], comm=comm)
    if rc != 0:
        raise RuntimeError(f"{ini}: hpcflow.run exited with status {rc}")
    result = None
    if comm.Get_rank() == 0:
        j = analysis.run(directory)[0]["json"]
        o = j["observables"][s.xi_kind]
        cost = j.get("cost") or {}
        result = Point(beta, o["value"], o["error"], str(directory),
                       seconds=float(cost.get("wall_seconds") or 0.0),
                       ranks=int(cost.get("ranks") or 1), acceptance=j.get("acceptance"),
                       reused=reused,
                       extra={"replicas": j["replicas"], "measurements": j["measurements"]})
    return comm.bcast(result, root=0)


def _usable(p: Point) -> bool:
    return (p.xi is not None and p.xi_error is not None and p.xi > 0 and p.xi_error > 0
            and math.isfinite(p.xi) and math.isfinite(p.xi_error))


def select(points: list[Point], s: Settings) -> list[Point]:
    """The (at most ``fit_points``) usable points whose L/xi is closest to the target, in
    units of their error-free distance |L/xi - target|."""
    good = [p for p in points if _usable(p)]
    good.sort(key=lambda p: abs(p.L_over_xi(s.L) - s.target))
    return good[: s.fit_points]


def fit_points(points: list[Point], s: Settings) -> Fit:
    sel = select(points, s)
    return fit_line([p.beta for p in sel], [p.L_over_xi(s.L) for p in sel],
                    [p.L_over_xi_error(s.L) for p in sel], s.target)


def next_beta(points: list[Point], s: Settings, beta_c: float, nu: float) -> float | None:
    """The next beta to measure, or None when done (module docstring, steps 2-4)."""
    good = [p for p in points if _usable(p)]
    if not good:
        raise RuntimeError(f"no usable xi at beta = {[p.beta for p in points]} (the effective "
                           "mass has no plateau): raise --trajectories, or start nearer the "
                           "line with --beta0")
    near = min(good, key=lambda p: abs(p.L_over_xi(s.L) - s.target))
    y0 = near.L_over_xi(s.L)
    dist = max(beta_c - near.beta, 1e-6)
    dmin = s.step * nu * dist  # beta change that moves y by ~ step (relative)
    fit = None
    if len({p.beta for p in good}) >= 2:
        try:
            fit = fit_points(good, s)
        except ValueError:
            fit = None
    if fit is not None and fit.c1 < 0:
        if fit.bracketed and len(fit.used) >= s.min_points:
            return None
        if fit.bracketed:
            b = fit.beta
        else:  # extrapolate, half a step beyond, at most half way to beta_c
            direction = 1.0 if fit.beta > near.beta else -1.0
            b = fit.beta + direction * 0.5 * dmin
            b = min(b, near.beta + 0.5 * dist)
    else:  # one point (or a fit with the wrong sign): the critical model
        b = beta_c - dist * (s.target / y0) ** (1.0 / nu)
        if abs(b - near.beta) < dmin:
            b = near.beta + (dmin if b >= near.beta else -dmin)
    b = round(b, 6)
    taken = {round(p.beta, 6) for p in points}
    while b in taken:  # never repeat a point: nudge towards the target
        b = round(b + (0.25 * dmin if y0 > s.target else -0.25 * dmin), 6)
    return b


def tune(s: Settings) -> dict:
    """Tune beta (module docstring); returns the result dict (same on every rank)."""
    if s.L < 4:
        raise TuneError(f"--L must be >= 4 (got {s.L})")
    if not s.target > 0:
        raise TuneError(f"--L-over-xi must be > 0 (got {s.target:g})")
    if s.lam < 0:
        raise TuneError(f"--lam must be >= 0 (got {s.lam:g})")
    if s.min_points < 2 or s.fit_points < s.min_points or s.max_points < s.min_points:
        raise TuneError("need 2 <= --min-points <= --fit-points and --min-points <= --max-points")
    if s.replicas < 1 or s.trajectories < 1 or s.steps < 1 or s.length <= 0:
        raise TuneError("--replicas, --trajectories, --steps and --length must be positive")
    beta_c, nu = critical_model(s.lam, s.beta_c)
    beta = s.beta0 if s.beta0 is not None else default_beta0(s.L, s.target, s.lam)
    if not 0 < beta < beta_c:
        raise TuneError(f"the start beta = {beta:g} must lie in (0, beta_c = {beta_c:g})")
    t0 = time.time()
    points: list[Point] = []
    while beta is not None and len(points) < s.max_points:
        p = measure(s, beta)
        points.append(p)
        if _usable(p):
            _log(f"L={s.L} beta={p.beta:.6f}: {s.xi_kind} = {p.xi:.4f} +- {p.xi_error:.4f}, "
                 f"L/xi = {p.L_over_xi(s.L):.4f} +- {p.L_over_xi_error(s.L):.4f} "
                 f"({'reused' if p.reused else f'{p.seconds:.0f} s x {p.ranks} ranks'})")
        else:
            _log(f"L={s.L} beta={p.beta:.6f}: no {s.xi_kind} ({p.directory})")
        beta = next_beta(points, s, beta_c, nu)
    try:
        fit = fit_points(points, s)
    except ValueError as err:
        raise RuntimeError(f"L = {s.L}: cannot fit L/xi(beta): {err}") from None
    converged = beta is None
    if not converged:
        _log(f"warning: stopped after {len(points)} points without the target bracketed by "
             f"{s.min_points} fitted points; raise --max-points")
    xi = s.L / s.target
    from . import __version__

    return {
        "L": s.L, "beta": fit.beta, "beta_error": fit.beta_error, "xi": xi,
        "xi_error": s.L * fit.y_error / s.target**2, "L_over_xi_target": s.target,
        "lambda": s.lam, "xi_kind": s.xi_kind, "converged": converged,
        "fit": {"c0": fit.c0, "c1": fit.c1, "cov": fit.cov, "chi2": fit.chi2, "dof": fit.dof,
                "betas": fit.used, "bracketed": fit.bracketed},
        "points": [{"beta": p.beta, "xi": p.xi, "xi_error": p.xi_error,
                    "L_over_xi": p.L_over_xi(s.L) if _usable(p) else None,
                    "L_over_xi_error": p.L_over_xi_error(s.L) if _usable(p) else None,
                    "acceptance": p.acceptance, "seconds": p.seconds, "ranks": p.ranks,
                    "reused": p.reused, "directory": p.directory} for p in points],
        "runs": {"replicas": s.replicas, "trajectories": s.trajectories,
                 "thermalization": s.thermalization, "length": s.length, "steps": s.steps,
                 "integrator": "leapfrog", "points": len(points), "seed": s.seed},
        "run_seconds": sum(p.seconds for p in points),
        "wall_seconds": time.time() - t0,
        "ranks": max((p.ranks for p in points), default=1),
        "input": input_text(s, round(fit.beta, 6), Path(s.work) / "<point>"),
        "hpcflow_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def lcp_entry(result: dict) -> dict:
    """The record of ``result`` kept in results/lcp.json (no local directories)."""
    keep = ("L", "beta", "beta_error", "xi", "xi_error", "L_over_xi_target", "lambda",
            "xi_kind", "converged", "runs", "fit", "run_seconds", "wall_seconds", "ranks",
            "input", "hpcflow_version", "date")
    entry = {k: result[k] for k in keep}
    entry["points"] = [{k: v for k, v in p.items() if k not in ("directory", "reused")}
                       for p in result["points"]]
    return entry


# ---------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m hpcflow.tune", description=__doc__.split("\n")[0])
    ap.add_argument("--L", type=int, required=True, help="lattice size (>= 4)")
    ap.add_argument("--L-over-xi", type=float, default=4.0, dest="target",
                    help="target L / xi (default 4)")
    ap.add_argument("--lam", type=float, default=0.5, help="quartic coupling lambda (default 0.5)")
    ap.add_argument("--xi2", action="store_true",
                    help="tune the second-moment xi2 instead of the effective-mass xi")
    ap.add_argument("--replicas", type=int, default=64,
                    help="replicas per point (default 64: small lattices are overhead-bound, "
                         "so replicas are nearly free)")
    ap.add_argument("--trajectories", type=int, default=0,
                    help="trajectories per replica per point (default 12 L^2, >= 2000: ~2%% on xi)")
    ap.add_argument("--thermalization", type=int, default=0, help="default 2 L^2, at least 200")
    ap.add_argument("--steps", type=int, default=10, help="leapfrog steps (default 10)")
    ap.add_argument("--length", type=float, default=1.0, help="trajectory length tau (default 1)")
    ap.add_argument("--seed", type=int, default=1, help="base seed (each point derives its own)")
    ap.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--work", default="", help="work directory (default runs/tune/L<N>)")
    ap.add_argument("--beta0", type=float, default=None, help="starting beta (default: table)")
    ap.add_argument("--beta-c", type=float, default=None,
                    help="critical coupling of the step model (default: from the table / 1/2)")
    ap.add_argument("--step", type=float, default=0.10,
                    help="smallest relative change of L/xi between points (default 0.10)")
    ap.add_argument("--min-points", type=int, default=3)
    ap.add_argument("--max-points", type=int, default=6)
    ap.add_argument("--fit-points", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--write", metavar="LCP_JSON", default=None,
                    help="add / replace this L's point in the file (e.g. results/lcp.json)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.L < 4:
            raise TuneError(f"--L must be >= 4 (got {args.L})")
        if not args.target > 0 or not math.isfinite(args.target):
            raise TuneError(f"--L-over-xi must be > 0 (got {args.target:g})")
        s = Settings(L=args.L, target=args.target, lam=args.lam,
                     xi_kind="xi2" if args.xi2 else "xi", replicas=args.replicas,
                     trajectories=args.trajectories, thermalization=args.thermalization,
                     length=args.length, steps=args.steps, seed=args.seed, device=args.device,
                     work=args.work, beta0=args.beta0, beta_c=args.beta_c, step=args.step,
                     min_points=args.min_points, max_points=args.max_points,
                     fit_points=args.fit_points)
        result = tune(s)
    except TuneError as err:
        print(f"error: hpcflow.tune: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # hpcflow.config.ConfigError is a ValueError
        print(f"error: hpcflow.tune: {err}", file=sys.stderr)
        return 2
    if _comm().Get_rank() != 0:
        return 0
    if args.write:
        write_lcp(lcp_entry(result), args.write)
        _log(f"wrote L = {s.L} to {args.write}")
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"L = {result['L']}: beta = {result['beta']:.5f} +- {result['beta_error']:.5f} "
              f"(L/{s.xi_kind} = {s.target:g}, xi = {result['xi']:.4g} +- {result['xi_error']:.2g}, "
              f"lambda = {s.lam:g}; {len(result['points'])} points, "
              f"{result['wall_seconds']:.0f} s{'' if result['converged'] else ', NOT converged'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
