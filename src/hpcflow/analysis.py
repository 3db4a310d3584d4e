"""Error analysis of ensemble files with the Gamma method (pyerrors).

    python -m hpcflow.analysis RUN_DIR_OR_H5 [--json] [--S 2.0]
    python -m hpcflow.analysis --check FILE_OR_DIR [--json]     # verify checksums: exit 0 / 2

Each replica chain is one replica of a pyerrors ensemble named ``<run name>_<stage>``
(replicas ``"<ens>|r000"``, ``"<ens>|r001"``, ...), so the Gamma method (Wolff,
Comput. Phys. Commun. 156 (2004) 143; automatic window with parameter S) combines all
chains into one estimate of every mean, error and integrated autocorrelation time.
tau_int = 1/2 + sum_{t=1}^{W} rho(t) is in units of trajectories (one measurement per
trajectory).

Every Obs is built by :func:`to_obs`, which takes the fluctuations of every replica about
the *overall* mean of all replicas, as Wolff's UWerr does (PHYSICS.md section 7).  A plain
``pyerrors.Obs(samples, names)`` takes them about each replica's own mean, which biases
Gamma(t), tau_int and the error low by O(tau_int / n) for replicas of n measurements.
(pyerrors' JSON reader does the same to the Obs written here: see :func:`recentre`.)

Observables (PHYSICS.md section 2), V = L^2:

- M, |M|, M^2 (primary: tau_int quoted), chi = V <M^2>;
- xi2, the second-moment correlation length sqrt((G(0)/G(p_min) - 1) / (4 sin^2(pi/L)))
  with G(0) = V <M^2>;
- xi = 1/m, m the plateau of the effective mass m_eff(t) = arccosh[(C(t-1) + C(t+1)) /
  (2 C(t))] of the connected correlator C(t) - L <M>^2 (exact for a single cosh on the
  periodic lattice) over t_min <= t < L/2: ``pyerrors.Corr(C).m_eff("arccosh")`` with its
  errors from the Gamma method at the configured S, then ``Corr.plateau(method="fit")``, an
  uncorrelated constant fit, i.e. the mean weighted by 1/dm_eff^2 with the weights held
  fixed in the error propagation (as before analysis schema 4, which weighted with errors at
  S = 2 whatever S was set; a plateau of one point is that point);
- c_M = std(M_z) / std(M) = sqrt((<M_z^2> - <M_z>^2) / (<M^2> - <M>^2)), the slow-mode
  scale of a flow (PHYSICS.md section 5.1), M_z the lattice mean of the chain variable z
  (``/observables/Mz``; M_z = M for HMC, so c_M = 1 exactly); None for files without Mz.

Cost (``"cost"``, from the ensemble's ``/cost`` datasets, :mod:`hpcflow.store`): wall
seconds of the production (all segments), ranks and device of the latest segment,
trajectories per replica (thermalization included), seconds per trajectory per replica =
rank-seconds / (trajectories x replicas) (= wall seconds x ranks / (trajectories x
replicas) when every segment ran on the same number of ranks; only the trajectories the
timing covers count, see ``/cost/first_trajectory``), and force evaluations per
trajectory n_steps x forces_per_step + 1 (:class:`hpcflow.hmc.Integrator`, merged kicks).
None for files without the cost datasets.

Which per-trajectory records are read and which series are made into Obs is the table
:data:`hpcflow.observables.OBSERVABLES`; files are read by :func:`hpcflow.store.load_ensemble`.
Without a file, :func:`analyse` takes numpy arrays (M [replicas, measurements], and C, Gp,
dH, accepted, Mz when there are) and returns the same JSON dict and the Obs.

Output: a table, or with ``--json`` the JSON of DESIGN.md section 4 (one object per
ensemble; a list when a directory holds several), which also carries ``"c_M"``,
``"cost"``, the ensemble's ``"input"`` text and ``"hpcflow_version"``, and
``"measurements_planned"`` (per replica) with ``"complete"`` (false for the partial
ensemble of a running or interrupted production, whose numbers are those of the
measurements done) and ``"integrity"`` (``{"status": "ok" | "unverified", ...}``: every
file is verified against its checksums before it is analysed, :func:`run`; a corrupt one
is refused, exit 2, with a line per replica and dataset).  Alongside each
ensemble the primary Obs are written as a pyerrors JSON file ``<stage>.obs.json.gz`` for users' own scripts
(``pyerrors.input.json.load_json``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
from pathlib import Path

import numpy as np

from . import log as log_mod
from .hmc import INTEGRATORS
from .log import logger
from .observables import OBSERVABLES
from .stages import ENSEMBLE_FILES
from .store import Ensemble, load_ensemble

#: Version of the analysis output.  It is part of the cache key (:func:`cache_path`), so a
#: cached analysis written by code whose results differ is never reused.  History:
#: 1 (unversioned): per-replica means in the Gamma method (biased low);
#: 2: overall mean (:func:`to_obs`), c_M, cost, input text;
#: 3: ``stability``, tau_int(M) from the first half of every replica;
#: 4: m_eff and its plateau from ``pyerrors.Corr`` (errors of m_eff, and so the plateau
#:    weights, at the configured S instead of S = 2).
SCHEMA = 4

#: Former name of :func:`hpcflow.store.load_ensemble`.
load = load_ensemble


def to_obs(data, ens_name: str):
    """One pyerrors Obs of the ensemble ``ens_name`` from per-replica series ``data`` [R, n].

    Parameters
    ----------
    data : array_like
        [replicas, measurements], one row per independent chain.
    ens_name : str
        The pyerrors ensemble name; replica r is ``"<ens_name>|r<r:03d>"``.

    Returns
    -------
    pyerrors.Obs
        Call ``gamma_method()`` on it (or on what is derived from it) for errors and
        ``e_tauint[ens_name]``.

    Notes
    -----
    The fluctuations of every replica are taken about the overall mean
    m = (1/(R n)) sum_{r,i} x_{r,i}, as in Wolff's UWerr
    (U. Wolff, Comput. Phys. Commun. 156 (2004) 143, section 3.3; PHYSICS.md section 7):

        Gamma(t) = sum_r sum_{i=1}^{n-t} (x_{r,i} - m)(x_{r,i+t} - m) / (R (n - t)),

    built as ``pe.Obs([x_r - m for r], names, means=[m] * R)``, so that every replica's
    value is m (derived observables are evaluated at the overall means, never at one short
    replica's).  ``pe.Obs([x_r for r], names)`` would subtract each replica's own mean,
    which biases Gamma(t) by about -2 tau_int Gamma(0) / n at every t, and tau_int and the
    error low with it, when the replicas are short.  Use this for every tau_int.

    Examples
    --------
    >>> o = to_obs(M, "run_hmc")           # M: numpy array [replicas, measurements]
    >>> o.gamma_method()
    >>> o.value, o.dvalue, o.e_tauint["run_hmc"]
    """
    import pyerrors as pe

    data = np.asarray(data, dtype=float)
    if data.ndim != 2 or data.shape[1] < 1:
        raise ValueError(f"to_obs wants data [replicas, measurements], got shape {data.shape}")
    R = data.shape[0]
    m = float(data.mean())
    names = [f"{ens_name}|r{r:03d}" for r in range(R)]
    o = pe.Obs([row - m for row in data], names, means=[m] * R)
    # With ``means`` Obs.__init__ leaves the value unset (0); pyerrors' own constructors
    # that pass means (derived_observable, import_jackknife, the JSON reader) set it so.
    o._value = m
    return o


def recentre(o):
    """``o`` with every replica's fluctuations taken about the overall value again.

    Parameters
    ----------
    o : pyerrors.Obs
        An Obs as loaded from ``<stage>.obs.json.gz`` by ``pyerrors.input.json.load_json``.

    Returns
    -------
    pyerrors.Obs

    Notes
    -----
    pyerrors' JSON reader (``pe.input.json.load_json``) re-centres each replica's deltas on
    that replica's own mean (r_value_r = value + mean_r(deltas)), which turns an Obs of
    :func:`to_obs` into the plain, biased one; this undoes it exactly:
    deltas_r -> deltas_r + (r_value_r - value), r_value_r -> value.  Apply it to the Obs of
    ``<stage>.obs.json.gz`` before a Gamma method.  (Obs with covobs are not handled.)"""
    import pyerrors as pe

    names = [n for n in o.names if n in o.deltas]
    v = o.value
    new = pe.Obs([o.deltas[n] + (o.r_values[n] - v) for n in names], names,
                 idl=[o.idl[n] for n in names], means=[v] * len(names))
    new._value = v
    return new


def primary_obs(e: Ensemble) -> dict:
    """The per-trajectory Obs, the series of :data:`hpcflow.observables.OBSERVABLES`:
    M, absM, M2, Mz, Mz2, C(t) for t = 0..L/2, Gp, exp(-dH); records the ensemble lacks are
    left out, and so are Mz, Mz2 when Mz is M (HMC: the chain variable is the field)."""
    out = {}
    for o in OBSERVABLES:
        x = e.data.get(o.name)
        if o.series is None or x is None:
            continue
        if o.name == "Mz" and np.array_equal(x, e.data.get("M")):
            continue
        for key, series in o.series(x).items():
            out[key] = to_obs(series, e.name)
    return out


def slow_mode_scale(e: Ensemble, p: dict):
    """c_M = sqrt((<Mz^2> - <Mz>^2) / (<M^2> - <M>^2)) (PHYSICS.md section 5.1) as an Obs;
    the float 1.0 when Mz is M (HMC: the chain variable is the field); None without Mz."""
    if e.Mz is None:
        return None
    if "Mz" not in p:
        return 1.0
    return np.sqrt((p["Mz2"] - p["Mz"] ** 2) / (p["M2"] - p["M"] ** 2))


def first_half_tau(e: Ensemble, S: float) -> dict | None:
    """tau_int(M) from the first half of every replica, beside the full one: PHYSICS.md 5.1
    asks that tau_int be stable when the chains are doubled (the Gamma method is biased low
    when a replica is short against tau_int).  None with fewer than 4 measurements."""
    n = e.M.shape[1] // 2
    if n < 2:
        return None
    o = to_obs(e.M[:, :n], e.name)
    o.gamma_method(S=S)
    return {"measurements": n, "M_tau_int": float(o.e_tauint[e.name]),
            "M_tau_int_error": float(o.e_dtauint[e.name])}


def forces_per_trajectory(steps: int, integrator: str) -> int | None:
    """Force evaluations per trajectory, n_steps x forces_per_step + 1 (the last kick of a
    step merged with the first of the next; :mod:`hpcflow.hmc`); None for an unknown scheme."""
    scheme = INTEGRATORS.get(str(integrator))
    return int(steps) * scheme.forces_per_step + 1 if scheme is not None else None


def cost_entry(e: Ensemble) -> dict | None:
    """The production's cost (module docstring), or None for a file without ``/cost``."""
    c, a = e.cost, e.attrs
    if c is None:
        return None
    replicas = int(a["replicas"])
    trajectories = int(c["trajectories"])
    timed = trajectories - int(c["first_trajectory"])  # trajectories the seconds cover
    per = (c["rank_seconds"] / (timed * replicas)) if timed > 0 else None
    return {"wall_seconds": float(c["seconds"]), "rank_seconds": float(c["rank_seconds"]),
            "ranks": int(c["ranks"]), "device": c["device"], "segments": int(c["segments"]),
            "trajectories": trajectories, "timed_trajectories": timed,
            "seconds_per_trajectory_per_replica": per,
            "forces_per_trajectory": forces_per_trajectory(a["steps"], a["integrator"])}


def effective_mass(C: list, tmin: int, S: float = 2.0):
    """The effective mass and its plateau, with pyerrors' correlator class.

    Parameters
    ----------
    C : list of pyerrors.Obs
        The connected correlator C(t), t = 0 .. len(C) - 1 (t <= L/2: symmetrised).
    tmin : int
        First t of the plateau; it ends at len(C) - 2 (= L/2 - 1).
    S : float
        Wolff's S for the errors of m_eff (which weight the plateau).

    Returns
    -------
    (dict, pyerrors.Obs or None)
        m_eff(t) for 1 <= t < len(C) - 1 from ``pyerrors.Corr(C).m_eff("arccosh")``, None
        where the cosh ratio is <= 1 or the error is not positive and finite; and the
        plateau over t >= tmin from ``Corr.plateau(method="fit")`` (a constant fit with
        weights 1/dm^2: the weighted mean) over those points, the point itself when only one
        qualifies, None when none does.
    """
    import pyerrors as pe

    n = len(C)
    meff = {t: None for t in range(1, n - 1)}
    try:
        with np.errstate(invalid="ignore"):  # arccosh of a ratio < 1: NaN, made None by Corr
            corr = pe.Corr(list(C)).m_eff(variant="arccosh")
    except ValueError:  # undefined at every t
        return meff, None
    corr.gamma_method(S=S)
    for t in meff:
        m = corr.content[t][0] if corr.content[t] is not None else None
        if m is not None and m.value > 0 and m.dvalue > 0 and np.isfinite(m.dvalue):
            meff[t] = m
    points = [t for t, m in meff.items() if t >= tmin and m is not None]
    if not points:
        return meff, None
    if len(points) == 1:
        return meff, meff[points[0]]
    kept = pe.Corr([meff.get(t) for t in range(n)])
    with contextlib.redirect_stdout(io.StringIO()):  # the fit prints its summary
        plateau = kept.plateau([tmin, n - 2], method="fit")
    return meff, plateau


def analyse_ensemble(e: Ensemble, S: float = 2.0, plateau_min: int = 0) -> dict:
    """All observables of an ensemble with errors: {'json': the analysis JSON, 'obs':
    {name: pyerrors.Obs}}."""
    L, V = e.L, e.L**2
    if e.M.shape[1] < 2:
        where = e.path if e.path is not None else e.name
        raise ValueError(f"{where}: fewer than 2 measurements per replica, nothing to analyse")
    p = primary_obs(e)
    # to_obs gives every replica the overall mean as its value, so derived observables are
    # evaluated only there; the errstate guards the remaining degenerate cases (a zero
    # error in m_eff, a correlator ratio at 1), which are checked below.
    with np.errstate(invalid="ignore", divide="ignore"):
        return _derive(e, p, L, V, S, plateau_min)


def analyse(arrays, L: int | None = None, *, S: float = 2.0, plateau_min: int = 0,
            name: str = "hpcflow", attrs: dict | None = None) -> tuple[dict, dict]:
    """The Gamma-method analysis of measurements given as numpy arrays, without a file.

    Parameters
    ----------
    arrays : mapping or Ensemble
        ``{"M": [replicas, measurements], ...}``: M is needed; ``C`` [R, N, L/2+1] (for
        m_eff and xi), ``Gp`` (xi2), ``dH`` (exp_mdH), ``accepted`` (acceptance) and ``Mz``
        (c_M) are used when given (the records of :data:`hpcflow.observables.OBSERVABLES`).
        An :class:`hpcflow.store.Ensemble` (:func:`hpcflow.store.load_ensemble`) is taken
        as it is.
    L : int
        The lattice extent (V = L^2 for chi and xi2; the plateau starts at L/4).  Not
        needed for an Ensemble.
    S : float
        Wolff's S of the automatic window (pyerrors' default 2).
    plateau_min : int
        First t of the m_eff plateau; 0 = L/4.
    name : str
        The pyerrors ensemble name of the Obs.
    attrs : dict, optional
        Extra information for the JSON (``beta``, ``lambda``, ``algorithm``, ...).

    Returns
    -------
    (dict, dict)
        The analysis JSON (as ``python -m hpcflow.analysis --json`` prints it; keys the
        arrays cannot give are None) and {name: pyerrors.Obs} (M, absM, M2, chi, xi, m,
        xi2, ...), their ``gamma_method`` already applied with S.

    Examples
    --------
    >>> js, obs = analyse({"M": M}, L=8)      # M: numpy array [replicas, measurements]
    >>> js["observables"]["chi"]["value"], obs["M"].e_tauint["hpcflow"]
    """
    if isinstance(arrays, Ensemble):
        e = arrays
    else:
        if L is None:
            raise ValueError("analyse: L is needed (V = L^2)")
        known = {o.name for o in OBSERVABLES}
        unknown = set(arrays) - known
        if unknown:
            raise ValueError(f"analyse: unknown arrays {sorted(unknown)}; known: {sorted(known)}")
        data = {o.name: (None if arrays.get(o.name) is None else o.read(np.asarray(arrays[o.name])))
                for o in OBSERVABLES}
        if data["M"] is None:
            raise ValueError("analyse: the magnetization M [replicas, measurements] is needed")
        e = Ensemble(None, {**(attrs or {}), "L": int(L)}, data, ens_name=name)
    r = analyse_ensemble(e, S=S, plateau_min=plateau_min)
    return r["json"], r["obs"]


def _derive(e, p, L, V, S, plateau_min):
    chi = V * p["M2"]
    G0 = V * p["M2"]
    xi2 = None
    if "Gp" in p:
        xi2_sq = (G0 / p["Gp"] - 1) / (4 * math.sin(math.pi / L) ** 2)
        xi2 = np.sqrt(xi2_sq) if xi2_sq.value > 0 else None
    tmin = plateau_min or max(1, L // 4)
    meff, m_plateau = {}, None
    if e.data.get("C") is not None:
        C_conn = [p[f"C{t}"] - L * p["M"] ** 2 for t in range(e.C.shape[-1])]
        meff, m_plateau = effective_mass(C_conn, tmin, S)
    xi = 1 / m_plateau if m_plateau is not None else None

    c_M = slow_mode_scale(e, p)
    derived = {"chi": chi, "xi2": xi2, "xi": xi, "m": m_plateau}
    if c_M is not None and not isinstance(c_M, float):
        derived["c_M"] = c_M
    for o in [*p.values(), *derived.values()]:
        if o is not None:
            o.gamma_method(S=S)

    def entry(o, tau=True):
        if o is None:
            return {"value": None, "error": None}
        d = {"value": float(o.value), "error": float(o.dvalue)}
        if tau:
            d["tau_int"] = float(o.e_tauint[e.name])
            d["tau_int_error"] = float(o.e_dtauint[e.name])
        return d

    a = e.attrs
    accepted = e.data.get("accepted")
    planned = int(a["trajectories"]) if a.get("trajectories") is not None else None
    result = {
        "L": L, "beta": _num(a.get("beta")), "lambda": _num(a.get("lambda")),
        "algorithm": _str(a.get("algorithm")), "replicas": int(e.M.shape[0]),
        "measurements": int(e.M.shape[1]),
        "measurements_planned": planned,
        "complete": None if planned is None else int(e.M.shape[1]) >= planned,
        "integrity": (None if e.integrity is None else
                      {"status": e.integrity["status"], "unverified": e.integrity["unverified"]}),
        "acceptance": float(accepted.mean()) if accepted is not None else None,
        "overflows": (int((~np.isfinite(e.data["dH"])).sum()) if e.data.get("dH") is not None
                      else None),
        "observables": {
            "M": entry(p["M"]), "absM": entry(p["absM"]), "M2": entry(p["M2"]),
            "chi": entry(chi), "xi": entry(xi, tau=False),
            "xi2": entry(xi2, tau=False),
            **({"exp_mdH": entry(p["exp_mdH"])} if "exp_mdH" in p else {}),
            **({"Mz": entry(p["Mz"])} if "Mz" in p else {}),
        },
        "meff": {str(t): entry(m, tau=False) for t, m in meff.items()},
        "plateau": [tmin, L // 2 - 1],
        "md": ({"length": float(a["length"]), "steps": int(a["steps"]),
                "integrator": str(a["integrator"])} if "steps" in a else None),
        "stability": first_half_tau(e, S),
        "c_M": ({"value": 1.0, "error": 0.0} if isinstance(c_M, float)
                else entry(c_M, tau=False)),
        "cost": cost_entry(e),
        "stage": _str(a.get("stage")), "file": None if e.path is None else str(e.path),
        "S": S, "schema": SCHEMA,
        "hpcflow_version": str(a.get("hpcflow_version", "")), "input": str(a.get("input", "")),
    }
    if "flow_prior" in a:
        result["flow"] = {"prior": str(a["flow_prior"]), "acceptance": _num(a.get("flow_acceptance")),
                          "spec": json.loads(a["flow_spec"]), "file": str(a["flow_file"])}
    obs = {**{k: p[k] for k in ("M", "absM", "M2", "Gp", "exp_mdH", "Mz", "Mz2") if k in p},
           **{k: v for k, v in derived.items() if v is not None}}
    return {"json": result, "obs": obs}


def _str(v):
    return None if v is None else str(v)


def _num(v):
    return None if v is None or not np.isfinite(v) else float(v)


def write_obs(result: dict, e: Ensemble) -> Path:
    """Write the Obs as ``<stage>.obs.json.gz`` beside the ensemble file; return its path.

    pyerrors' reader re-centres every replica on its own mean: pass the loaded Obs through
    :func:`recentre` before a Gamma method, or tau_int comes out biased low."""
    import pyerrors as pe

    names = list(result["obs"])
    base = e.path.with_name(f"{e.attrs['stage']}.obs")
    pe.input.json.dump_to_json(
        [result["obs"][k] for k in names], str(base),
        description={"observables": names, "source": str(e.path),
                     "note": "replicas about the overall mean: apply hpcflow.analysis.recentre "
                             "to each loaded Obs before gamma_method (load_json re-centres "
                             "each replica on its own mean)"})
    return base.with_name(base.name + ".json.gz")


def _fmt(v, dv):
    if v is None:
        return "n/a"
    if dv is None or not np.isfinite(dv) or dv <= 1e-12 * abs(v):
        return f"{v:.6g}"  # exact, or an error at the level of rounding
    digits = max(0, 1 - int(math.floor(math.log10(dv))))
    return f"{v:.{digits}f} +- {dv:.{digits}f}"


def table(results: list[dict]) -> str:
    """Side-by-side table of several analysed ensembles (one column each)."""
    js = [r["json"] for r in results]
    cols = [f"{j['algorithm']}" for j in js]
    lines = []
    for j in js:
        partial = (f" (PARTIAL: {j['measurements']} of {j['measurements_planned']} planned)"
                   if j.get("complete") is False else "")
        lines.append(f"{j['file']}: {j['algorithm']}, L={j['L']} beta={j['beta']} "
                     f"lambda={j['lambda']}, {j['replicas']} replicas x {j['measurements']} "
                     f"measurements{partial}, acceptance {j['acceptance']:.3f}"
                     + (f", {j['overflows']} overflowed trajectories (dH not finite)"
                        if j.get("overflows") else ""))
        integrity = j.get("integrity") or {}
        if integrity.get("status") == "unverified":
            lines.append(f"  unverified: {'; '.join(integrity['unverified'])}")
    w = 26
    lines.append("")
    lines.append(f"{'':12s}" + "".join(f"{c:>{w}s}" for c in cols))
    for key in ("M", "absM", "M2", "chi", "xi", "xi2", "exp_mdH"):
        row = [_fmt(j["observables"][key]["value"], j["observables"][key]["error"]) for j in js]
        lines.append(f"{key:12s}" + "".join(f"{s:>{w}s}" for s in row))
    for key in ("M", "absM", "M2"):
        row = [_fmt(j["observables"][key]["tau_int"], j["observables"][key]["tau_int_error"])
               for j in js]
        lines.append(f"{'tau_int(' + key + ')':12s}" + "".join(f"{s:>{w}s}" for s in row))
    if any("flow" in j for j in js):
        row = [f"{j['flow']['acceptance']:.3f} ({j['flow']['prior']})"
               if "flow" in j and j["flow"]["acceptance"] is not None else "-" for j in js]
        lines.append(f"{'flow acc':12s}" + "".join(f"{s:>{w}s}" for s in row))
    row = [_fmt(j["c_M"]["value"], j["c_M"]["error"]) if j.get("c_M") else "n/a" for j in js]
    lines.append(f"{'c_M':12s}" + "".join(f"{s:>{w}s}" for s in row))
    costs = [j.get("cost") for j in js]
    if any(costs):
        row = [f"{c['forces_per_trajectory']}" if c else "-" for c in costs]
        lines.append(f"{'forces/traj':12s}" + "".join(f"{s:>{w}s}" for s in row))
        row = [f"{c['wall_seconds']:.3g} s x {c['ranks']} {c['device'].split(' (')[0]}"
               if c else "-" for c in costs]
        lines.append(f"{'wall time':12s}" + "".join(f"{s:>{w}s}" for s in row))
        row = [f"{c['seconds_per_trajectory_per_replica']:.3g} s"
               if c and c["seconds_per_trajectory_per_replica"] is not None else "-" for c in costs]
        lines.append(f"{'s/traj/repl':12s}" + "".join(f"{s:>{w}s}" for s in row))
    return "\n".join(lines)


def find_ensembles(target) -> list[Path]:
    target = Path(target)
    if target.is_dir():
        found = [target / n for n in ENSEMBLE_FILES if (target / n).exists()]
        found += sorted(p for p in target.glob("fhmc-*.h5"))
        return found
    return [target]


def cache_path(path: Path) -> Path:
    """``<stage>.analysis.json`` beside an ensemble: its analysis, reused while the
    ensemble's counter and content (:attr:`hpcflow.store.Ensemble.digest`, sha256 of the
    counter and the measured rows) are those it was made from, with the same S,
    plateau_min and :data:`SCHEMA` (never by modification time: an analysis of a running
    production may be written after the production moved on)."""
    return path.with_name(path.stem + ".analysis.json")


def _cache_key(e: Ensemble, S: float, plateau_min: int) -> dict:
    return {"schema": SCHEMA, "S": S, "plateau_min": plateau_min,
            "trajectory": e.integrity["trajectory"], "digest": e.digest}


def _cached(path: Path, key: dict) -> dict | None:
    c = cache_path(path)
    if not c.exists():
        return None
    try:
        cached = json.loads(c.read_text())
    except (OSError, ValueError):
        return None
    if any(cached.get(k) != v for k, v in key.items()):
        return None
    return {"json": cached["json"]}


def run(target, S: float = 2.0, plateau_min: int = 0, write: bool = True) -> list[dict]:
    """Analyse every ensemble in ``target`` (a file or a run directory).

    An analysis is cached beside its ensemble (:func:`cache_path`) and reused while the
    ensemble's counter and content are those it was made from; ``write`` = False neither
    writes the cache nor the pyerrors Obs file.  Cached results carry the JSON only, not
    the Obs.  Every ensemble is read and verified against its checksums first
    (:func:`hpcflow.store.load_ensemble`): a corrupt one raises
    :class:`hpcflow.errors.CorruptFileError` (a line per replica and dataset); one written
    before checksums existed is analysed with a warning and ``"integrity": {"status":
    "unverified"}``.  A partial ensemble (a running or interrupted production) is analysed
    with ``"complete": false`` and a warning."""
    results = []
    for path in find_ensembles(target):
        e = load_ensemble(path)
        if e.integrity["status"] == "unverified":
            logger.warning(f"[analysis] {path}: unverified ({'; '.join(e.integrity['unverified'])})")
        planned = int(e.attrs["trajectories"])
        if e.M.shape[1] < planned:
            logger.warning(f"[analysis] {path}: partial ensemble, {e.M.shape[1]} of {planned} "
                           f"measurements per replica")
        key = _cache_key(e, S, plateau_min)
        cached = _cached(Path(path), key)
        if cached is not None:
            logger.debug(f"[analysis] {path}: cached analysis {cache_path(Path(path))} reused")
            results.append(cached)
            continue
        logger.debug(f"[analysis] analysing {path}")
        r = analyse_ensemble(e, S=S, plateau_min=plateau_min)
        if write:
            r["json"]["obs_file"] = str(write_obs(r, e))
            cache_path(e.path).write_text(json.dumps({**key, "json": r["json"]}) + "\n")
        results.append(r)
    return results


def check(target) -> tuple[list[dict], list[str]]:
    """Verify every ensemble file of ``target`` (a file, or every ``*.h5`` of a directory)
    against its checksums (:func:`hpcflow.store.verify`).

    Returns
    -------
    (reports, lines)
        One report per file, and the human report: per file its status, and for a corrupt
        one a line per replica (``ok`` or what fails, naming the dataset and rows)."""
    import h5py

    from .store import verify

    target = Path(target)
    files = sorted(target.glob("*.h5")) if target.is_dir() else [target]
    reports, lines = [], []
    for path in files:
        try:
            with h5py.File(path, "r") as f:
                rep = verify(f, path)
                rep["replicas"] = int(f.attrs["replicas"])
                rep["measurements"] = max(0, rep["trajectory"] - int(f.attrs["thermalization"]))
        except (OSError, KeyError, ValueError) as err:
            rep = {"file": str(path), "status": "corrupt", "problems": [], "unverified": [],
                   "text": [f"{path}: unreadable ({err})"], "replicas": 0}
            reports.append(rep)
            lines.append(rep["text"][0])
            continue
        reports.append(rep)
        what = (f"checkpoint at trajectory {rep['trajectory']}, {rep['replicas']} replicas x "
                f"{rep['measurements']} measurements")
        if rep["status"] == "ok":
            lines.append(f"{path}: ok ({what}: every checksum matches)")
        elif rep["status"] == "unverified":
            lines.append(f"{path}: unverified ({what}; no checksums for: "
                         f"{'; '.join(rep['unverified'])})")
        else:
            lines.append(f"{path}: CORRUPT ({what})")
            for r in range(rep["replicas"]):
                mine = [p for p in rep["problems"] if p["replica"] == r]
                if not mine:
                    lines.append(f"  replica {r}: ok")
                for p in mine:
                    span = ("checksum mismatch" if p["first"] is None else
                            f"{p['count']} row(s) fail their checksum "
                            f"({'configurations' if p['dataset'] == '/configs' else 'measurements'} "
                            f"{p['first']}..{p['last']})")
                    lines.append(f"  replica {r}: {p['dataset']}: {span}")
            for p in rep["problems"]:
                if p["replica"] is None:
                    lines.append(f"  {p['dataset']}: no checkpoint slot holds trajectory "
                                 f"{rep['trajectory']}")
    return reports, lines


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0 (got {text!r})")
    return v


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0 (got {text!r})")
    return v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=log_mod.program_name("hpcflow.analysis", "hpcflow-analysis"), description=__doc__.split("\n")[0])
    ap.add_argument("target", help="a run directory or an ensemble .h5 file")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--check", action="store_true",
                    help="only verify the file(s) against their checksums (every *.h5 of a "
                         "directory): exit 0 ok or unverified, 2 corrupt")
    ap.add_argument("--S", type=_positive_float, default=2.0,
                    help="Gamma-method window parameter, a finite number > 0 (default 2)")
    ap.add_argument("--plateau-min", type=_non_negative_int, default=0,
                    help="first t of the m_eff plateau, >= 0 (0 = L/4)")
    log_mod.add_arguments(ap)
    args = ap.parse_args(argv)
    log_mod.configure(0, args.quiet, args.verbose, stream="stderr")
    if not Path(args.target).exists():
        print(f"error: {args.target}: no such file or directory", file=sys.stderr)
        return 2
    if args.check:
        reports, lines = check(args.target)
        print(json.dumps(reports, indent=1) if args.json else "\n".join(lines))
        if not reports:
            print(f"error: {args.target}: no .h5 files", file=sys.stderr)
            return 2
        return 2 if any(r["status"] == "corrupt" for r in reports) else 0
    try:
        results = run(args.target, S=args.S, plateau_min=args.plateau_min)
    except (OSError, KeyError, ValueError) as err:
        print(f"error: {args.target}: {err}", file=sys.stderr)
        return 2
    if not results:
        print(f"error: {args.target}: no ensemble files ({', '.join(ENSEMBLE_FILES)})", file=sys.stderr)
        return 2
    if args.json:
        out = [r["json"] for r in results]
        print(json.dumps(out[0] if len(out) == 1 else out, indent=1))
    else:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
