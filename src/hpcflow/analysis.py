"""Error analysis of ensemble files with the Gamma method (pyerrors).

    python -m hpcflow.analysis RUN_DIR_OR_H5 [--json] [--S 2.0]

Each replica chain is one replica of a pyerrors ensemble named ``<run name>_<stage>``
(replicas ``"<ens>|r000"``, ``"<ens>|r001"``, ...), so the Gamma method (Wolff,
Comput. Phys. Commun. 156 (2004) 143; automatic window with parameter S) combines all
chains into one estimate of every mean, error and integrated autocorrelation time.
tau_int = 1/2 + sum_{t=1}^{W} rho(t) is in units of trajectories (one measurement per
trajectory).

Observables (PHYSICS.md section 2), V = L^2:

- M, |M|, M^2 (primary: tau_int quoted), chi = V <M^2>;
- xi2, the second-moment correlation length sqrt((G(0)/G(p_min) - 1) / (4 sin^2(pi/L)))
  with G(0) = V <M^2>;
- xi = 1/m, m the weighted mean over the plateau t_min <= t < L/2 of the effective mass
  m_eff(t) = arccosh[(C(t-1) + C(t+1)) / (2 C(t))] of the connected correlator
  C(t) - L <M>^2 (exact for a single cosh on the periodic lattice); the weights 1/dm_eff^2
  are fixed numbers, so the error propagates exactly.

Output: a table, or with ``--json`` the JSON of DESIGN.md section 4 (one object per
ensemble; a list when a directory holds several).  Alongside each ensemble the primary
Obs are written as a pyerrors JSON file ``<stage>.obs.json.gz`` for users' own scripts
(``pyerrors.input.json.load_json``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

ENSEMBLE_FILES = ("hmc.h5", "fhmc.h5")


@dataclass
class Ensemble:
    """The measured part of an ensemble file, as numpy arrays [replicas, measurements, ...]."""

    path: Path
    attrs: dict
    M: np.ndarray
    C: np.ndarray
    Gp: np.ndarray
    dH: np.ndarray
    accepted: np.ndarray

    @property
    def name(self) -> str:
        return f"{self.attrs.get('name', 'run')}_{self.attrs['stage']}"

    @property
    def L(self) -> int:
        return int(self.attrs["L"])


def load(path) -> Ensemble:
    from .store import measured

    path = Path(path)
    with h5py.File(path, "r") as f:
        n = measured(f)
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        return Ensemble(path, attrs, f["observables/M"][:, :n], f["observables/C"][:, :n],
                        f["observables/Gp"][:, :n], f["mc/dH"][:, :n],
                        f["mc/accepted"][:, :n].astype(bool))


def _obs(data: np.ndarray, ens: str):
    """One pyerrors Obs from per-replica series data [R, n]."""
    import pyerrors as pe

    names = [f"{ens}|r{r:03d}" for r in range(data.shape[0])]
    return pe.Obs([np.asarray(row, dtype=float) for row in data], names)


def primary_obs(e: Ensemble) -> dict:
    """The per-trajectory Obs: M, absM, M2, Gp, C(t) for t = 0..L/2, exp(-dH)."""
    ens = e.name
    out = {"M": _obs(e.M, ens), "absM": _obs(np.abs(e.M), ens), "M2": _obs(e.M**2, ens),
           "Gp": _obs(e.Gp, ens), "exp_mdH": _obs(np.exp(-e.dH), ens)}
    for t in range(e.C.shape[-1]):
        out[f"C{t}"] = _obs(e.C[..., t], ens)
    return out


def effective_mass(C: list, tmin: int):
    """m_eff(t) for 1 <= t < len(C) - 1 as Obs (None where the cosh ratio is <= 1), and the
    plateau mean over t >= tmin weighted by 1/dm^2 (None if no point qualifies)."""
    meff = {}
    for t in range(1, len(C) - 1):
        ratio = (C[t - 1] + C[t + 1]) / (2 * C[t])
        if ratio.value > 1:
            m = np.arccosh(ratio)
            m.gamma_method()
            meff[t] = m if m.dvalue > 0 and np.isfinite(m.dvalue) else None
        else:
            meff[t] = None
    points = [(t, m) for t, m in meff.items() if t >= tmin and m is not None]
    if not points:
        return meff, None
    weights = np.array([1 / m.dvalue**2 for _, m in points])
    weights /= weights.sum()
    plateau = sum(w * m for w, (_, m) in zip(weights, points))
    return meff, plateau


def analyse(e: Ensemble, S: float = 2.0, plateau_min: int = 0) -> dict:
    """All observables with errors; returns {'json': ..., 'obs': {name: Obs}, 'meff': ...}."""
    L, V = e.L, e.L**2
    if e.M.shape[1] < 2:
        raise ValueError(f"{e.path}: fewer than 2 measurements per replica, nothing to analyse")
    p = primary_obs(e)
    # pyerrors also evaluates derived observables on each replica's own mean; for short
    # replicas these may leave the domain of sqrt/arccosh.  Only the ensemble value and the
    # linearized errors enter the results, and those are checked below.
    with np.errstate(invalid="ignore", divide="ignore"):
        return _derive(e, p, L, V, S, plateau_min)


def _derive(e, p, L, V, S, plateau_min):
    chi = V * p["M2"]
    G0 = V * p["M2"]
    xi2_sq = (G0 / p["Gp"] - 1) / (4 * math.sin(math.pi / L) ** 2)
    xi2 = np.sqrt(xi2_sq) if xi2_sq.value > 0 else None
    C_conn = [p[f"C{t}"] - L * p["M"] ** 2 for t in range(e.C.shape[-1])]
    tmin = plateau_min or max(1, L // 4)
    meff, m_plateau = effective_mass(C_conn, tmin)
    xi = 1 / m_plateau if m_plateau is not None else None

    derived = {"chi": chi, "xi2": xi2, "xi": xi, "m": m_plateau}
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
    result = {
        "L": L, "beta": float(a["beta"]), "lambda": float(a["lambda"]),
        "algorithm": str(a["algorithm"]), "replicas": int(e.M.shape[0]),
        "measurements": int(e.M.shape[1]), "acceptance": float(e.accepted.mean()),
        "observables": {
            "M": entry(p["M"]), "absM": entry(p["absM"]), "M2": entry(p["M2"]),
            "chi": entry(chi), "xi": entry(xi, tau=False),
            "xi2": entry(xi2, tau=False), "exp_mdH": entry(p["exp_mdH"]),
        },
        "meff": {str(t): entry(m, tau=False) for t, m in meff.items()},
        "plateau": [tmin, L // 2 - 1],
        "md": {"length": float(a["length"]), "steps": int(a["steps"]),
               "integrator": str(a["integrator"])},
        "stage": str(a["stage"]), "file": str(e.path), "S": S,
    }
    if "flow_prior" in a:
        result["flow"] = {"prior": str(a["flow_prior"]), "acceptance": _num(a.get("flow_acceptance")),
                          "spec": json.loads(a["flow_spec"]), "file": str(a["flow_file"])}
    obs = {**{k: p[k] for k in ("M", "absM", "M2", "Gp", "exp_mdH")},
           **{k: v for k, v in derived.items() if v is not None}}
    return {"json": result, "obs": obs}


def _num(v):
    return None if v is None or not np.isfinite(v) else float(v)


def write_obs(result: dict, e: Ensemble) -> Path:
    """Write the Obs as ``<stage>.obs.json.gz`` beside the ensemble file; return its path."""
    import pyerrors as pe

    names = list(result["obs"])
    base = e.path.with_name(f"{e.attrs['stage']}.obs")
    pe.input.json.dump_to_json([result["obs"][k] for k in names], str(base),
                               description={"observables": names, "source": str(e.path)})
    return base.with_name(base.name + ".json.gz")


def _fmt(v, dv):
    if v is None:
        return "n/a"
    if dv is None or not np.isfinite(dv) or dv <= 0:
        return f"{v:.6g}"
    digits = max(0, 1 - int(math.floor(math.log10(dv))))
    return f"{v:.{digits}f} +- {dv:.{digits}f}"


def table(results: list[dict]) -> str:
    """Side-by-side table of several analysed ensembles (one column each)."""
    js = [r["json"] for r in results]
    cols = [f"{j['algorithm']}" for j in js]
    lines = []
    for j in js:
        lines.append(f"{j['file']}: {j['algorithm']}, L={j['L']} beta={j['beta']} "
                     f"lambda={j['lambda']}, {j['replicas']} replicas x {j['measurements']} "
                     f"measurements, acceptance {j['acceptance']:.3f}")
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
    return "\n".join(lines)


def find_ensembles(target) -> list[Path]:
    target = Path(target)
    if target.is_dir():
        found = [target / n for n in ENSEMBLE_FILES if (target / n).exists()]
        found += sorted(p for p in target.glob("fhmc-*.h5"))
        return found
    return [target]


def cache_path(path: Path) -> Path:
    """``<stage>.analysis.json`` beside an ensemble: its analysis, reused while newer."""
    return path.with_name(path.stem + ".analysis.json")


def _cached(path: Path, S: float, plateau_min: int) -> dict | None:
    c = cache_path(path)
    if not c.exists() or c.stat().st_mtime_ns < path.stat().st_mtime_ns:
        return None
    try:
        cached = json.loads(c.read_text())
    except (OSError, ValueError):
        return None
    if cached.get("S") != S or cached.get("plateau_min") != plateau_min:
        return None
    return {"json": cached["json"]}


def run(target, S: float = 2.0, plateau_min: int = 0, write: bool = True) -> list[dict]:
    """Analyse every ensemble in ``target`` (a file or a run directory).

    An analysis is cached beside its ensemble (:func:`cache_path`) and reused while the
    ensemble file has not changed since; ``write`` = False neither writes the cache nor
    the pyerrors Obs file.  Cached results carry the JSON only, not the Obs."""
    results = []
    for path in find_ensembles(target):
        cached = _cached(Path(path), S, plateau_min)
        if cached is not None:
            results.append(cached)
            continue
        e = load(path)
        r = analyse(e, S=S, plateau_min=plateau_min)
        if write:
            r["json"]["obs_file"] = str(write_obs(r, e))
            cache_path(e.path).write_text(json.dumps(
                {"S": S, "plateau_min": plateau_min, "json": r["json"]}) + "\n")
        results.append(r)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcflow.analysis", description=__doc__.split("\n")[0])
    ap.add_argument("target", help="a run directory or an ensemble .h5 file")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--S", type=float, default=2.0, help="Gamma-method window parameter (default 2)")
    ap.add_argument("--plateau-min", type=int, default=0, help="first t of the m_eff plateau (0 = L/4)")
    args = ap.parse_args(argv)
    if not Path(args.target).exists():
        print(f"error: {args.target}: no such file or directory", file=sys.stderr)
        return 2
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
