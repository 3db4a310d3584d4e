"""Continuum scans along L/xi = const: a scan file -> one input per job -> runs -> scaling.

    python -m hpcflow.scan make SCAN.ini              # inputs/, manifest.tsv, plan.json; budget
    python -m hpcflow.scan run SCAN.ini               # every job in order, skipping finished ones
    python -m hpcflow.scan refine SCAN.ini            # lengthen productions that missed the target
    mpirun -n 2 python -m mpi4py -m hpcflow.scan run SCAN.ini          # the same over 2 ranks
    sbatch jobs/scan.sbatch SCAN_DIR/manifest.tsv     # the same as SLURM job arrays
    python -m hpcflow.scan analyse SCAN_DIR [--json F] [--csv F] [--png FIG]

(``hpcflow-scan`` is the console script of the same.)

**The scan file** (INI; every key is checked, an unknown one is an error naming the file,
section and key, exit 2)::

    [scan]
    name = continuum
    output = runs/scan/continuum        # the scan directory
    seed = 2026                         # every job derives its seed from this and its name
    L = 8, 10, 12, 16, 20, 24, 32
    lambda = 0.5
    L_over_xi = 4
    lcp = results/lcp.json              # beta(L) = beta_LCP(L); beta'(L) = beta_LCP(L / 2)
    beta =                              # overrides, "L:beta" pairs (e.g. 6:0.52)
    coarse_beta =                       # overrides of beta', "L:beta'" pairs

    [algorithms]
    hmc = yes
    hmc_lengths = 2, 4                  # HMC trajectory-length controls besides [md] length
    fhmc = gaussian:3, coarse-volume:3, coarse-interleave:3, gaussian:5@20, gaussian:7@20
                                        # prior:kernel_size[@L_max]

    [md]
    length = 1.0
    steps = 10
    steps_rule = fixed                  # or sqrt-L: steps(L) = ceil(steps sqrt(L / steps_L))
    steps_L = 16
    integrator = leapfrog

    [statistics]
    target = 0.10                       # relative error of tau_int(M) to aim for
    trajectories = 0                    # > 0: this many per replica instead (no estimate)
    replicas = 32

and optional ``[run]`` (device, compile, checkpoint_every, progress_every, io, threads),
``[flow]``, ``[train]``, ``[coarse]`` sections, copied into every input that has the
section (their keys and defaults are those of an ordinary input, ``python -m
hpcflow.config``; [flow] prior/kernel_size and [coarse] beta/L/file/seed are set per job).

**Jobs.** For every L: ``L<L>-hmc`` (and ``L<L>-hmc-tau<l>`` per control length);
per FHMC entry a training job ``L<L>-<prior>-k<k>-train`` and a production
``L<L>-<prior>-k<k>`` (stages fhmc, analysis) in the same run directory, the production
after its training; for a coarse prior first ``L<L>-coarse-volume`` (L' = L) or
``L<L>-coarse-interleave`` (L' = L / 2), beta' = beta_LCP(L / 2) (PHYSICS.md section 6),
before the trainings that draw from it.  Every job is an ordinary input under
``SCAN_DIR/inputs/``; its results go to ``SCAN_DIR/runs/<job>/`` (coarse ensembles to
``SCAN_DIR/coarse/``).

**Statistics.**  With ``target``, the trajectories per replica follow from an estimate of
tau_int(M) (in trajectories) and the Gamma-method error of tau_int (PHYSICS.md section 7):

    tau_est(HMC, l)  = tau_ref (xi / xi_ref)^z_guess l^(-length_exponent),   xi = L / L_over_xi
    tau_est(FHMC)    = tau_est(HMC, [md] length) / ratio_guess(prior)
    N                = max(error_constant tau_est / (target^2 R),  min_replica_length tau_est)

``error_constant`` = 40 is what the L = 16 study measured (dtau/tau = 4.5 % from
64 x 24000 trajectories at tau_int = 77: 0.045^2 x 1.54e6 / 77 = 40); tau_ref = 77,
xi_ref = 4, z_guess = 2, length_exponent = 1.54 (77 -> 9.1 from tau = 1 to 4) and the
ratio guesses (gaussian 1.3, coarse-volume 1.2, coarse-interleave 2.4) come from the same
study.  The thermalization is max(min_thermalization, thermalization_taus tau_est).  The estimates only
size the runs: ``scan analyse`` reports the error reached, point by point, and ``scan
refine`` lengthens every finished production that missed the target (:func:`refine`).  ``make``
prints the budget, from rank-seconds per site and force measured on the 2-core
development machine (``[statistics] seconds_per_site_force``, ``force_cost_fhmc``,
``seconds_per_site_sample_train``).

**Manifest** (``SCAN_DIR/manifest.tsv``): ``# base: DIR`` (the directory relative paths
are resolved from, where ``make`` ran), then one job per line,
``index<TAB>job<TAB>input<TAB>after`` with ``after`` the indices it waits for (``-``
none).  Lines are in dependency order.  ``jobs/scan.sbatch`` runs line
``SLURM_ARRAY_TASK_ID`` and, started without one, submits the arrays itself
(:func:`submit`): the jobs without dependencies as one array, every other group of jobs
with the same dependencies as an array with ``--dependency=afterok:<job>_<task>...`` on
exactly the tasks it needs and ``--kill-on-invalid-dep=yes``, so a failed task cancels
its dependants and nothing else.

Exit status: 0 success; 2 bad scan file, manifest or missing input (no job started);
1 some jobs failed (``run``: the others still ran; their dependants were not started).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import config as config_mod
from . import log as log_mod
from .config import _key, _parse_section, ints, non_negative, one_of, positive
from .errors import ConfigError
from .log import logger

PRIOR_NAMES = {"gaussian": "gaussian", "coarse-volume": "volume", "coarse-interleave": "interleave"}
MANIFEST = "manifest.tsv"
PLAN = "plan.json"
REFINE = "refine.json"


# ---------------------------------------------------------------------------------------
# The scan file


def _pairs(v) -> str | None:
    try:
        parse_pairs(v)
    except ValueError as err:
        return str(err)
    return None


def parse_pairs(items) -> dict[int, float]:
    """"L:value" items -> {L: value}."""
    out = {}
    for item in items:
        L, sep, value = item.partition(":")
        if not sep:
            raise ValueError(f"expected L:value pairs (e.g. 16:0.634), got {item!r}")
        try:
            out[int(L)] = float(value)
        except ValueError:
            raise ValueError(f"expected L:value pairs (e.g. 16:0.634), got {item!r}") from None
        if not math.isfinite(out[int(L)]) or out[int(L)] <= 0:
            raise ValueError(f"{item!r}: the value must be a positive number")
    return out


@dataclass(frozen=True)
class FlowSpec:
    """One FHMC entry of ``[algorithms] fhmc``: prior, kernel size, largest L (0 = all)."""

    prior: str
    kernel_size: int
    L_max: int = 0

    @property
    def tag(self) -> str:
        return f"{PRIOR_NAMES[self.prior]}-k{self.kernel_size}"


def parse_flow_specs(items) -> list[FlowSpec]:
    specs = []
    for item in items:
        head, _, lmax = item.partition("@")
        prior, sep, k = head.partition(":")
        if prior not in PRIOR_NAMES or not sep:
            raise ValueError(f"{item!r}: expected prior:kernel_size[@L_max] with prior one of "
                             f"{', '.join(PRIOR_NAMES)}")
        try:
            spec = FlowSpec(prior, int(k), int(lmax) if lmax else 0)
        except ValueError:
            raise ValueError(f"{item!r}: kernel_size and L_max must be integers") from None
        if spec.kernel_size < 1 or spec.kernel_size % 2 == 0:
            raise ValueError(f"{item!r}: kernel_size must be odd (3, 5, 7 ...)")
        if spec in specs:
            raise ValueError(f"{item!r} appears twice")
        specs.append(spec)
    return specs


def _specs_check(v):
    try:
        parse_flow_specs(v)
    except ValueError as err:
        return str(err)
    return None


def _L_list(v):
    if not v:
        return "must name at least one L"
    if any(L < 4 for L in v):
        return "every L must be >= 4"
    if len(set(v)) != len(v):
        return "names an L twice"
    return None


@dataclass(frozen=True)
class ScanSection:
    """[scan]: the points of the scan and where it goes."""

    name: str = _key(check=config_mod.name_like, doc="scan name")
    output: str = _key(doc="scan directory: inputs/, runs/, coarse/, manifest.tsv, plan.json")
    seed: int = _key(check=non_negative, doc="base seed; each job's seed is derived from it and its name")
    L: ints = _key(check=_L_list, doc="lattice sizes, comma list")
    lam: float = _key(0.5, check=non_negative, doc="quartic coupling lambda (key 'lambda')")
    L_over_xi: float = _key(4.0, check=positive, doc="the line of constant physics L / xi")
    lcp: str = _key("results/lcp.json", doc="tuned line (python -m hpcflow.tune --write)")
    beta: tuple = _key((), check=_pairs, doc="beta overrides, L:beta pairs")
    coarse_beta: tuple = _key((), check=_pairs, doc="beta' overrides, L:beta' pairs (L of the fine lattice)")


@dataclass(frozen=True)
class AlgorithmsSection:
    """[algorithms]: what runs at every point."""

    hmc: bool = _key(True, doc="HMC at [md] length (the reference)")
    hmc_lengths: tuple = _key((), doc="further HMC trajectory lengths (controls), comma list")
    fhmc: tuple = _key((), check=_specs_check, doc="prior:kernel_size[@L_max] comma list")


@dataclass(frozen=True)
class MDSection:
    """[md]: the MD protocol, the same for HMC and FHMC (PHYSICS.md section 5.1)."""

    length: float = _key(1.0, check=positive, doc="trajectory length tau")
    steps: int = _key(10, check=positive, doc="MD steps at length (and at steps_L with sqrt-L)")
    steps_rule: str = _key("fixed", check=one_of("fixed", "sqrt-L"),
                           doc="fixed, or sqrt-L: steps(L) = ceil(steps sqrt(L / steps_L)) "
                               "(constant acceptance: dH^2 ~ V eps^4)")
    steps_L: int = _key(16, check=positive, doc="reference L of the sqrt-L rule")
    integrator: str = _key("leapfrog", check=one_of(*config_mod.INTEGRATORS), doc="MD integrator")


@dataclass(frozen=True)
class StatisticsSection:
    """[statistics]: how long every production runs, and the budget model."""

    target: float = _key(0.10, check=positive, doc="relative error of tau_int(M) to aim for")
    trajectories: int = _key(0, check=non_negative, doc="> 0: trajectories per replica, no estimate")
    replicas: int = _key(32, check=positive, doc="replicas of every production")
    min_trajectories: int = _key(1000, check=positive, doc="least trajectories per replica")
    min_replica_length: float = _key(50.0, check=non_negative, doc="least replica length in tau_est")
    thermalization_taus: float = _key(20.0, check=non_negative, doc="thermalization in tau_est")
    min_thermalization: int = _key(200, check=non_negative, doc="least thermalization per replica")
    tau_ref: float = _key(77.0, check=positive, doc="tau_int(M) of HMC at length 1 and xi_ref")
    xi_ref: float = _key(4.0, check=positive, doc="xi of tau_ref")
    z_guess: float = _key(2.0, check=non_negative, doc="dynamical exponent of the estimate")
    length_exponent: float = _key(1.54, check=non_negative, doc="tau_int ~ length^-p at fixed xi")
    ratio_guess: tuple = _key(("gaussian:1.3", "coarse-volume:1.2", "coarse-interleave:2.4"),
                              doc="prior:tau_HMC/tau_FHMC guesses")
    error_constant: float = _key(40.0, check=positive, doc="N R = c tau / target^2")
    seconds_per_site_force: float = _key(5.4e-8, check=positive,
                                         doc="rank-seconds of one Phi4 force per site (budget)")
    seconds_per_force_call: float = _key(3e-5, check=non_negative,
                                         doc="overhead of one batched force call per rank (budget)")
    budget_ranks: int = _key(2, check=positive, doc="ranks per job assumed by the budget")
    force_cost_fhmc: float = _key(9.0, check=positive, doc="flowed force in Phi4 forces (budget)")
    seconds_per_site_sample_train: float = _key(4.9e-7, check=positive,
                                                doc="training rank-seconds per site and sample (budget)")


SCAN_SECTIONS = {"scan": ScanSection, "algorithms": AlgorithmsSection, "md": MDSection,
                 "statistics": StatisticsSection}
#: Sections copied into the jobs' inputs, with the keys the scan sets per job.
PASS_THROUGH = {"run": ("name", "output", "seed", "stages"), "flow": ("prior", "kernel_size", "file"),
                "train": (), "coarse": ("beta", "L", "file", "seed")}
PROBE = {"run": {"name": "x", "output": "x", "seed": "0"},
         "coarse": {"beta": "0.5", "L": "4", "replicas": "1", "samples": "1"}}


@dataclass(frozen=True)
class Scan:
    path: str
    scan: ScanSection
    algorithms: AlgorithmsSection
    md: MDSection
    statistics: StatisticsSection
    extra: dict = field(default_factory=dict)      # pass-through sections: {name: {key: raw}}
    flows: tuple = ()
    hmc_lengths: tuple = ()
    ratio_guess: dict = field(default_factory=dict)


def load_scan(path) -> Scan:
    """Read and check a scan file; ConfigError (naming file, section, key) on any problem."""
    path = str(path)
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, None, None, f"cannot read scan file: {getattr(e, 'strerror', None) or e}") from None
    parser = config_mod.read_ini(text, path, list(SCAN_SECTIONS) + list(PASS_THROUGH))
    if "scan" not in parser:
        raise ConfigError(path, "scan", None, "required section is missing")
    parsed = {}
    for name, cls in SCAN_SECTIONS.items():
        parsed[name] = _parse_section(cls, name, dict(parser[name]) if name in parser else {}, path)
    extra = {}
    for name, fixed in PASS_THROUGH.items():
        if name not in parser:
            continue
        items = dict(parser[name])
        for key in items:
            if key in fixed:
                raise ConfigError(path, name, key, f"is set by the scan for every job; remove it "
                                  f"(the scan sets {', '.join(fixed)} of [{name}])")
        probe = {**PROBE.get(name, {}), **items}  # the keys the scan sets, for the checks
        _parse_section(config_mod.SECTIONS[name], name, probe, path)  # type and range checks
        extra[name] = items
    a, st = parsed["algorithms"], parsed["statistics"]
    try:
        lengths = tuple(float(x) for x in a.hmc_lengths)
    except ValueError:
        raise ConfigError(path, "algorithms", "hmc_lengths", f"expected numbers, got {a.hmc_lengths!r}") from None
    if any(not (x > 0 and math.isfinite(x)) for x in lengths):
        raise ConfigError(path, "algorithms", "hmc_lengths", "lengths must be > 0")
    ratio = {}
    for item in st.ratio_guess:
        prior, sep, value = item.partition(":")
        try:
            ratio[prior] = float(value)
        except ValueError:
            ratio[prior] = -1.0
        if prior not in PRIOR_NAMES or not sep or not ratio[prior] > 0:
            raise ConfigError(path, "statistics", "ratio_guess",
                              f"expected prior:ratio pairs with a positive ratio, got {item!r}")
    return Scan(path, parsed["scan"], a, parsed["md"], st, extra,
                tuple(parse_flow_specs(a.fhmc)), lengths, ratio)


# ---------------------------------------------------------------------------------------
# The plan: one job per input


@dataclass
class Job:
    key: str
    kind: str                      # hmc | coarse | train | fhmc
    L: int
    output: str                    # run directory
    input: str = ""                # input file, relative to the base directory
    text: str = ""
    after: list = field(default_factory=list)   # keys of the jobs it waits for
    algorithm: str | None = None
    prior: str | None = None
    kernel_size: int | None = None
    length: float | None = None
    steps: int | None = None
    beta: float | None = None
    replicas: int = 0
    trajectories: int = 0
    thermalization: int = 0
    tau_estimate: float | None = None
    budget_rank_seconds: float = 0.0
    coarse_file: str | None = None

    def record(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("text")
        return d


def job_seed(base: int, key: str) -> int:
    """A job's seed: a hash of the scan seed and the job name (stable across runs)."""
    h = hashlib.sha256(f"{base}:{key}".encode()).digest()
    return int.from_bytes(h[:4], "little") % (2**31 - 1)


def steps_at(md: MDSection, L: int, length: float) -> int:
    """MD steps at lattice L and trajectory length ``length`` (the step size of [md] length
    and steps; with the sqrt-L rule eps ~ L^(-1/2), constant <dH^2> ~ V eps^4)."""
    base = md.steps * length / md.length
    if md.steps_rule == "sqrt-L":
        base *= math.sqrt(L / md.steps_L)
    return max(1, math.ceil(base - 1e-9))


def _round_up(n: float, step: int = 100) -> int:
    return int(math.ceil(n / step) * step)


def tau_estimate(s: Scan, L: int, length: float, prior: str | None) -> float:
    st = s.statistics
    xi = L / s.scan.L_over_xi
    tau = st.tau_ref * (xi / st.xi_ref) ** st.z_guess * length ** (-st.length_exponent)
    if prior is not None:
        tau /= s.ratio_guess.get(prior, 1.0)
    return max(tau, 0.5)


def statistics_for(s: Scan, tau: float) -> tuple[int, int]:
    """(trajectories, thermalization) per replica for an estimated tau_int (module docstring)."""
    st = s.statistics
    therm = _round_up(max(st.min_thermalization, st.thermalization_taus * tau), 10)
    if st.trajectories:
        return st.trajectories, therm
    n = max(st.error_constant * tau / (st.target**2 * st.replicas), st.min_replica_length * tau,
            st.min_trajectories)
    return _round_up(n), therm


def point_betas(s: Scan) -> dict[int, tuple[float, float | None]]:
    """{L: (beta, beta')}; beta' is None where no coarse prior needs it.  ConfigError when a
    coupling is neither tuned (lcp file) nor given."""
    from .tune import beta_lcp

    for L in s.scan.L:  # structural problems before any lookup
        for f in s.flows:
            if f.L_max and L > f.L_max:
                continue
            if L % 2:
                raise ConfigError(s.path, "scan", "L", f"L = {L} is odd: FHMC ({f.prior}:"
                                  f"{f.kernel_size}) needs even L (checkerboard couplings"
                                  f"{'; the interleave combines four L/2 lattices' if f.prior == 'coarse-interleave' else ''})")
            if f.kernel_size > L:
                raise ConfigError(s.path, "algorithms", "fhmc", f"kernel_size {f.kernel_size} "
                                  f"exceeds L = {L}; limit it with {f.prior}:{f.kernel_size}@L_max")
    given = parse_pairs(s.scan.beta)
    given_c = parse_pairs(s.scan.coarse_beta)
    coarse = any(f.prior.startswith("coarse") for f in s.flows)
    out = {}

    def lookup(L, key, what):
        try:
            return round(float(beta_lcp(L, s.scan.lcp, s.scan.L_over_xi, s.scan.lam)), 6)
        except (KeyError, OSError, ValueError) as err:
            raise ConfigError(s.path, "scan", key,
                              f"{what}: no beta for L = {L} in {s.scan.lcp} and none given; tune it (python -m hpcflow.tune --L {L} "
                              f"--L-over-xi {s.scan.L_over_xi:g} --lam {s.scan.lam:g} --write "
                              f"{s.scan.lcp}) or give it as {key} = {L}:BETA") from None

    for L in s.scan.L:
        beta = given[L] if L in given else lookup(L, "beta", f"point L = {L}")
        beta_c = None
        if coarse and any(f.prior.startswith("coarse") and (not f.L_max or L <= f.L_max) for f in s.flows):
            if L in given_c:
                beta_c = given_c[L]
            else:
                beta_c = lookup(L // 2, "coarse_beta", f"coarse coupling of L = {L} (beta_LCP({L // 2}))")
        out[L] = (beta, beta_c)
    return out


def md_cost(st: StatisticsSection, L: int, sec: dict, force_cost: float) -> float:
    """Budget of a production in rank-seconds: every trajectory costs steps + 1 forces of
    ``force_cost`` Phi4 forces on R L^2 sites, plus a per-call overhead on each rank."""
    forces = (sec["trajectories"] + sec["thermalization"]) * (sec["steps"] + 1)
    return forces * force_cost * (sec["replicas"] * L * L * st.seconds_per_site_force
                                  + st.budget_ranks * st.seconds_per_force_call)


def _section(name: str, values: dict) -> str:
    lines = [f"[{name}]"] + [f"{k} = {v}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


def plan(s: Scan, base: Path | None = None) -> list[Job]:
    """Every job of the scan, in dependency order (module docstring); productions that
    ``refine`` lengthened keep their longer runs (``SCAN_DIR/refine.json``)."""
    sc, md, st = s.scan, s.md, s.statistics
    out = Path(sc.output)
    betas = point_betas(s)
    try:
        refined = json.loads((out / REFINE).read_text())
    except (OSError, ValueError):
        refined = {}
    run_extra = s.extra.get("run", {})
    jobs: list[Job] = []
    for L in sc.L:
        beta, beta_c = betas[L]
        theory = {"L": L, "beta": _fmt(beta), "lambda": _fmt(sc.lam)}

        def run_section(key, stages):
            return _section("run", {"name": key, "output": str(out / "runs" / key),
                                    "seed": job_seed(sc.seed, key), "stages": stages, **run_extra})

        def production(L, length, prior, key):
            tau = tau_estimate(s, L, length, prior)
            n, therm = statistics_for(s, tau)
            n = max(n, int(refined.get(key, {}).get("trajectories", 0)))
            return tau, {"replicas": st.replicas, "trajectories": n, "thermalization": therm,
                         "length": _fmt(length), "steps": steps_at(md, L, length),
                         "integrator": md.integrator, "save_every": 0}

        lengths = ([md.length] if s.algorithms.hmc else []) + [x for x in s.hmc_lengths
                                                              if not math.isclose(x, md.length)]
        for length in lengths:
            key = f"L{L}-hmc" + ("" if math.isclose(length, md.length) else f"-tau{length:g}")
            tau, sec = production(L, length, None, key)
            text = (f"# hpcflow scan {sc.name}: HMC at L = {L} (L/xi = {sc.L_over_xi:g}), tau = {length:g}\n"
                    + run_section(key, "hmc, analysis") + "\n" + _section("theory", theory) + "\n"
                    + _section("hmc", sec))
            cost = md_cost(st, L, sec, 1.0)
            jobs.append(Job(key, "hmc", L, str(out / "runs" / key), text=text, algorithm="hmc",
                            length=length, steps=sec["steps"], beta=beta, replicas=st.replicas,
                            trajectories=sec["trajectories"], thermalization=sec["thermalization"],
                            tau_estimate=tau, budget_rank_seconds=cost))
        coarse_jobs: dict[str, Job] = {}
        for f in s.flows:
            if f.L_max and L > f.L_max:
                continue
            coarse_text = ""
            coarse_key = None
            if f.prior.startswith("coarse"):
                Lc = L if f.prior == "coarse-volume" else L // 2
                coarse_key = f"L{L}-coarse-{PRIOR_NAMES[f.prior]}"
                cfile = out / "coarse" / f"coarse-L{Lc}-b{beta_c:.6f}.h5"
                csec = {"beta": _fmt(beta_c), "L": Lc, **s.extra.get("coarse", {}),
                        "file": str(cfile), "seed": job_seed(sc.seed, coarse_key)}
                coarse_text = "\n" + _section("coarse", csec)
                if coarse_key not in coarse_jobs:
                    text = (f"# hpcflow scan {sc.name}: coarse ensemble of the {f.prior} prior at "
                            f"L = {L}: L' = {Lc}, beta' = beta_LCP({L // 2}) = {beta_c:g}\n"
                            + run_section(coarse_key, "coarse") + "\n" + _section("theory", theory)
                            + coarse_text)
                    c = config_mod.SECTIONS["coarse"](beta=beta_c, L=Lc, replicas=1, samples=1)
                    raw = s.extra.get("coarse", {})
                    replicas = int(raw.get("replicas", 64))
                    kept = int(raw.get("samples", 8192)) + int(raw.get("eval_samples", c.eval_samples))
                    pilot = int(raw.get("pilot", c.pilot)) + int(raw.get("thermalization", c.thermalization))
                    spacing = 2 * tau_estimate(s, L // 2, 1.0, None)  # xi' = xi / 2
                    cost = ((pilot * replicas + kept * spacing) * Lc * Lc
                            * (int(raw.get("steps", c.steps)) + 1) * st.seconds_per_site_force)
                    coarse_jobs[coarse_key] = Job(coarse_key, "coarse", L, str(out / "runs" / coarse_key),
                                                  text=text, prior=f.prior, beta=beta_c,
                                                  coarse_file=str(cfile), budget_rank_seconds=cost)
                    jobs.append(coarse_jobs[coarse_key])
            key = f"L{L}-{f.tag}"
            tau, sec = production(L, md.length, f.prior, key)
            flow = {"prior": f.prior, "kernel_size": f.kernel_size, **s.extra.get("flow", {})}
            body = (run_section(key, "@STAGES@") + "\n" + _section("theory", theory) + "\n"
                    + _section("flow", flow) + "\n" + _section("train", s.extra.get("train", {}))
                    + "\n" + _section("fhmc", sec) + coarse_text)
            head = f"# hpcflow scan {sc.name}: FHMC ({f.prior}, k = {f.kernel_size}) at L = {L}"
            tr = config_mod.SECTIONS["train"]()
            raw_t = s.extra.get("train", {})
            train_cost = (int(raw_t.get("iterations", tr.iterations)) * int(raw_t.get("batch_size", tr.batch_size))
                          * L * L * st.seconds_per_site_sample_train * (f.kernel_size / 3) ** 2)
            jobs.append(Job(key + "-train", "train", L, str(out / "runs" / key),
                            text=head + ": training\n" + body.replace("@STAGES@", "train"),
                            after=[coarse_key] if coarse_key else [], algorithm="fhmc",
                            prior=f.prior, kernel_size=f.kernel_size, beta=beta,
                            budget_rank_seconds=train_cost))
            cost = md_cost(st, L, sec, st.force_cost_fhmc)
            jobs.append(Job(key, "fhmc", L, str(out / "runs" / key),
                            text=head + ": production\n" + body.replace("@STAGES@", "fhmc, analysis"),
                            after=[key + "-train"], algorithm="fhmc", prior=f.prior,
                            kernel_size=f.kernel_size, length=md.length, steps=sec["steps"], beta=beta,
                            replicas=st.replicas, trajectories=sec["trajectories"],
                            thermalization=sec["thermalization"], tau_estimate=tau,
                            budget_rank_seconds=cost))
    order = {"coarse": 0, "hmc": 1, "train": 2, "fhmc": 3}
    # point by point (a runner finishes whole points first), dependencies before dependants
    jobs.sort(key=lambda j: (j.L, order[j.kind]))
    for j in jobs:
        j.input = str(out / "inputs" / f"{j.key}.ini")
        try:
            config_mod.parse(j.text, j.input)
        except ConfigError as err:
            raise ConfigError(s.path, err.section, err.key,
                              f"makes an invalid input for job {j.key}: {err}") from None
    return jobs


def make(scan_path, quiet: bool = False) -> tuple[Path, list[Job]]:
    """Write the inputs, the manifest and plan.json of a scan (idempotent: files whose text
    is unchanged are left alone); returns (manifest path, jobs)."""
    s = load_scan(scan_path)
    jobs = plan(s)
    out = Path(s.scan.output)
    (out / "inputs").mkdir(parents=True, exist_ok=True)
    changed = []
    for j in jobs:
        p = Path(j.input)
        if not p.exists() or p.read_text() != j.text:
            if p.exists():
                changed.append(j.key)
            tmp = p.with_name(p.name + ".tmp")
            tmp.write_text(j.text)
            tmp.replace(p)
    index = {j.key: i for i, j in enumerate(jobs)}
    lines = [f"# hpcflow scan manifest: {s.scan.name} (from {scan_path}); one job per line, "
             f"in dependency order",
             f"# base: {Path.cwd()}",
             "# index\tjob\tinput\tafter"]
    lines += [f"{i}\t{j.key}\t{j.input}\t{','.join(str(index[a]) for a in j.after) or '-'}"
              for i, j in enumerate(jobs)]
    manifest = out / MANIFEST
    _write(manifest, "\n".join(lines) + "\n")
    from . import __version__

    _write(out / PLAN, json.dumps({"name": s.scan.name, "scan_file": str(scan_path),
                                   "scan_text": Path(scan_path).read_text(), "base": str(Path.cwd()),
                                   "hpcflow_version": __version__, "L_over_xi": s.scan.L_over_xi,
                                   "lambda": s.scan.lam, "target": s.statistics.target,
                                   "jobs": [j.record() for j in jobs]}, indent=1) + "\n")
    if not quiet:
        print(budget_table(jobs))
        if changed:
            print(f"inputs changed since the last make: {', '.join(changed)} (a finished run of a "
                  f"changed input is refused by hpcflow.run; rerun it with --force)")
        print(f"{manifest}: {len(jobs)} jobs")
    return manifest, jobs


def _write(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def budget_table(jobs: list[Job]) -> str:
    lines = [f"{'job':28s} {'after':28s} {'R x N':>12s} {'therm':>6s} {'steps':>5s} "
             f"{'tau_est':>8s} {'rank-h':>7s}"]
    for j in jobs:
        rn = f"{j.replicas}x{j.trajectories}" if j.replicas else "-"
        lines.append(f"{j.key:28s} {','.join(j.after) or '-':28s} {rn:>12s} "
                     f"{j.thermalization or '-':>6} {j.steps or '-':>5} "
                     f"{'-' if j.tau_estimate is None else format(j.tau_estimate, '.3g'):>8s} "
                     f"{j.budget_rank_seconds / 3600:7.2f}")
    total = sum(j.budget_rank_seconds for j in jobs)
    lines.append(f"budget: {total / 3600:.2f} rank-hours in all (estimate from [statistics]; "
                 f"{total / 3600 / 2:.2f} h on 2 ranks)")
    return "\n".join(lines)


def refine(scan_path, max_factor: float = 8.0, quiet: bool = False, earlier=()) -> dict:
    """Lengthen the finished productions whose tau_int(M) missed the target: with relative
    error e after N trajectories per replica (e ~ N^(-1/2)),

        N' = ceil(1.1 N (e / target)^2),  at most max_factor N,

    recorded in ``SCAN_DIR/refine.json`` and written into the inputs (``make``).  Running
    the scan again continues the same chains (raising ``trajectories`` extends a finished
    ensemble, the first N measurements unchanged).  ``earlier``: analysis JSON files of
    this scan (``scan analyse --json``) that stand in for the jobs with no run here, e.g.
    after the run directories of an earlier allocation are gone: such a job's production
    then restarts at the longer length (the same seeds, so the same chains where its inputs
    are unchanged) and ``scan analyse --earlier`` takes the other jobs from the same file.
    Returns {job: {trajectories, from, error}} of the jobs lengthened now."""
    s = load_scan(scan_path)
    out = Path(s.scan.output)
    target = s.statistics.target
    try:
        refined = json.loads((out / REFINE).read_text())
    except (OSError, ValueError):
        refined = {}
    jobs = plan(s)
    previous: dict[str, dict] = {}
    if earlier:
        planned = {"name": s.scan.name, "jobs": [j.record() for j in jobs]}
        for path in earlier:
            for r in _earlier_rows(planned, path):
                if r.get("status") == "complete" and r["job"] not in previous:
                    previous[r["job"]] = {"measurements": r["measurements"],
                                          "tau_int": r["tau_int"]["value"],
                                          "tau_int_error": r["tau_int"]["error"]}
    now = {}
    for j in jobs:
        if j.kind not in ("hmc", "fhmc"):
            continue
        try:
            js = json.loads((Path(j.output) / "analysis.json").read_text())
        except (OSError, ValueError):
            js = None
        if js is not None:
            entries = js if isinstance(js, list) else [js]
            e = next((x for x in entries if Path(x.get("file", "")).name == f"{j.kind}.h5"), None)
            if e is None or e.get("complete") is False:
                continue  # still running: its error is not final
            n = e["measurements"]
            tau, dtau = e["observables"]["M"]["tau_int"], e["observables"]["M"]["tau_int_error"]
        elif j.key in previous:
            p = previous[j.key]
            n, tau, dtau = p["measurements"], p["tau_int"], p["tau_int_error"]
        else:
            continue
        if not tau or not dtau or dtau / tau <= target:
            continue
        want = min(math.ceil(1.1 * n * (dtau / tau / target) ** 2), int(max_factor * n))
        want = _round_up(want)
        if want > n:
            now[j.key] = {"trajectories": want, "from": n, "error": dtau / tau}
    if now:
        refined.update(now)
        out.mkdir(parents=True, exist_ok=True)
        _write(out / REFINE, json.dumps(refined, indent=1, sort_keys=True) + "\n")
    make(scan_path, quiet=True)
    if not quiet:
        for key, r in now.items():
            print(f"{key}: tau_int(M) to {100 * r['error']:.1f}% > {100 * target:g}%: "
                  f"{r['from']} -> {r['trajectories']} trajectories per replica")
        print(f"{len(now)} production(s) lengthened; run the scan again to continue them")
    return now


# ---------------------------------------------------------------------------------------
# Manifest, completeness, runners


@dataclass
class Entry:
    index: int
    key: str
    input: str
    after: list


def read_manifest(path) -> tuple[Path, list[Entry]]:
    """(base directory, entries); ConfigError-like ValueError naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(path, None, None, f"cannot read manifest: {e.strerror}") from None
    base, entries = None, []
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("# base:"):
            base = Path(line.split(":", 1)[1].strip())
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        try:
            index, key, inp, after = parts
            entry = Entry(int(index), key, inp,
                          [] if after.strip() == "-" else [int(a) for a in after.split(",")])
        except ValueError:
            raise ConfigError(path, None, None, f"line {n}: expected index<TAB>job<TAB>input<TAB>after, "
                              f"got {line!r}") from None
        if entry.index != len(entries) or any(a >= entry.index for a in entry.after):
            raise ConfigError(path, None, None, f"line {n}: indices must count from 0 and a job may "
                              f"only wait for earlier lines")
        entries.append(entry)
    if base is None:
        raise ConfigError(path, None, None, "no '# base:' line (write manifests with hpcflow.scan make)")
    for e in entries:
        if not (base / e.input).is_file():
            raise ConfigError(path, None, None, f"line of job {e.key}: input {base / e.input} does not exist")
    return base, entries


def job_complete(input_path) -> bool:
    """Whether every stage of an input has its complete result made by this very input
    text (so a rerun would only skip).  Conservative: False when unsure."""
    import h5py

    from .stages import STAGES
    from .store import progress

    try:
        cfg = config_mod.load(input_path)
    except ConfigError:
        return False
    for stage in cfg.run.stages:
        if stage == "analysis":
            if not STAGES["analysis"].path(cfg).exists():
                return False
            continue
        if stage == "train":
            from .train import read_flow_file, flow_fingerprint

            p = STAGES["train"].path(cfg)
            try:
                payload = read_flow_file(p) if p.exists() else None
            except Exception:
                return False
            if not payload or not payload.get("complete") or payload.get("fingerprint") != flow_fingerprint(cfg):
                return False
            continue
        p = STAGES[stage].path(cfg)
        try:
            with h5py.File(p, "r") as f:
                done, total = progress(f)
                same = stage == "coarse" or f.attrs.get("input") == cfg.text
        except Exception:
            return False
        if done < total or not same:
            return False
    return True


def select_entries(entries: list[Entry], only) -> list[Entry]:
    """The entries whose job name matches one of the shell patterns ``only`` (``L20-*``),
    with every job they wait for, in manifest order; all entries when ``only`` is empty.
    A pattern that matches no job is a ValueError."""
    if not only:
        return entries
    unmatched = [p for p in only if not any(fnmatch.fnmatchcase(e.key, p) for e in entries)]
    if unmatched:
        raise ValueError(f"--only {', '.join(unmatched)}: no job of the manifest matches")
    keep = {e.index for e in entries if any(fnmatch.fnmatchcase(e.key, p) for p in only)}
    for e in reversed(entries):  # a job waits only for earlier lines
        if e.index in keep:
            keep.update(e.after)
    return [e for e in entries if e.index in keep]


def run_scan(scan_path, comm=None, force: bool = False, quiet: bool = False,
             verbose: bool = False, only=()) -> int:
    """The whole scan in this process (and its MPI ranks), in manifest order: finished jobs
    are skipped, a failed job's dependants are not started, the others still run.  With
    ``only`` (shell patterns of job names), the matching jobs and those they wait for."""
    from . import fused
    from . import run as run_mod

    if comm is None:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    log_mod.configure(rank, quiet, verbose)
    if rank == 0:
        try:
            manifest, _ = make(scan_path, quiet=True)
            base, entries = read_manifest(manifest)
            result = (str(manifest), str(base), select_entries(entries, only), None)
        except (ConfigError, ValueError) as err:
            result = (None, None, None, str(err))
    else:
        result = None
    manifest, base, entries, error = comm.bcast(result)
    if error:
        if rank == 0:
            print(f"error: {error}", file=sys.stderr)
        return 2
    status: dict[int, str] = {}
    t_scan = time.perf_counter()
    for i, e in enumerate(entries, 1):
        tag = f"[scan] {i}/{len(entries)} {e.key}"
        failed = [a for a in e.after if status.get(a) in ("failed", "blocked")]
        if failed:
            status[e.index] = "blocked"
            if rank == 0:
                logger.warning(f"{tag}: not started (waits for failed {entries[failed[0]].key})")
            continue
        inp = str(Path(base) / e.input)
        done = comm.bcast(job_complete(inp) if rank == 0 and not force else False)
        if done:
            status[e.index] = "skipped"
            if rank == 0:
                logger.info(f"{tag}: complete, skipped")
            continue
        if rank == 0:
            logger.info(f"{tag}: running {e.input}")
        t0 = time.perf_counter()
        fused.new_job()
        try:
            rc = run_mod.main([inp] + (["--verbose"] if verbose else ["--quiet"])
                              + (["--force"] if force else []), comm=comm)
        except Exception as err:  # one rank: a job's crash is its own (several: run aborts all)
            logger.exception(f"{tag}: {type(err).__name__}: {err}")
            rc = 1
        log_mod.configure(rank, quiet, verbose)
        status[e.index] = "done" if rc == 0 else "failed"
        if rank == 0:
            if rc == 0:
                logger.info(f"{tag}: done in {time.perf_counter() - t0:.1f} s")
            else:
                logger.error(f"{tag}: FAILED (exit {rc}); its dependants will not start")
    counts = {k: sum(v == k for v in status.values()) for k in ("done", "skipped", "failed", "blocked")}
    if rank == 0:
        logger.info(f"[scan] {manifest}: " + ", ".join(f"{v} {k}" for k, v in counts.items())
                    + f" in {time.perf_counter() - t_scan:.0f} s")
    return 1 if counts["failed"] or counts["blocked"] else 0


def submit(manifest, script, throttle: int = 8, dry_run: bool = False, sbatch=("sbatch",)) -> list[dict]:
    """Submit a manifest as SLURM job arrays (module docstring).  Jobs already complete are
    left out (and nobody waits for them).  Returns [{indices, after, job_id}] per array."""
    base, entries = read_manifest(manifest)
    todo = [e for e in entries if not job_complete(base / e.input)]
    keep = {e.index for e in todo}
    groups: dict[tuple, list[int]] = {}
    for e in todo:
        groups.setdefault(tuple(sorted(a for a in e.after if a in keep)), []).append(e.index)
    array_of: dict[int, str] = {}
    out = []
    for deps, indices in sorted(groups.items(), key=lambda kv: (max(kv[0], default=-1), kv[1][0])):
        argv = list(sbatch) + ["--parsable", f"--array={_ranges(indices)}%{throttle}",
                               f"--job-name=scan-{Path(manifest).parent.name}"[:64]]
        if deps:
            argv += ["--dependency=afterok:" + ":".join(f"{array_of[d]}_{d}" for d in deps),
                     "--kill-on-invalid-dep=yes"]
        argv += [str(script), str(Path(manifest).resolve())]
        if dry_run:
            job_id = f"<array{len(out)}>"
        else:
            p = subprocess.run(argv, capture_output=True, text=True)
            if p.returncode:
                raise RuntimeError(f"{' '.join(argv)} failed: {p.stderr.strip()}")
            job_id = p.stdout.strip().split(";")[0]
        for i in indices:
            array_of[i] = job_id
        out.append({"indices": indices, "after": list(deps), "job_id": job_id, "argv": argv})
    return out


def _ranges(indices: list[int]) -> str:
    """0,1,2,5,7,8 -> "0-2,5,7-8" (SLURM array syntax)."""
    parts, start = [], None
    for i, x in enumerate(indices):
        if start is None:
            start = x
        if i + 1 == len(indices) or indices[i + 1] != x + 1:
            parts.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ",".join(parts)


# ---------------------------------------------------------------------------------------
# Analysis: table, fits, figures


def fit_power(xs, ys, dys, dxs=None) -> dict | None:
    """Weighted least squares of log y = log A + z log x, with the effective variance
    sigma_i^2 = (dy_i / y_i)^2 + (z dx_i / x_i)^2 (iterated twice); the covariance is
    scaled by max(1, chi^2 / dof) when dof > 0.  Returns {z, z_error, A, A_error, chi2,
    dof, n}; None with fewer than 2 usable points."""
    import numpy as np

    pts = [(x, y, dy, (dxs[i] if dxs is not None else 0.0) or 0.0)
           for i, (x, y, dy) in enumerate(zip(xs, ys, dys))
           if x and y and dy and x > 0 and y > 0 and dy > 0]
    if len(pts) < 2:
        return None
    x, y, dy, dx = (np.array(c, dtype=float) for c in zip(*pts))
    X = np.column_stack([np.ones_like(x), np.log(x)])
    z = 0.0
    for _ in range(3):
        var = (dy / y) ** 2 + (z * dx / x) ** 2
        W = np.diag(1 / var)
        cov = np.linalg.inv(X.T @ W @ X)
        c = cov @ X.T @ W @ np.log(y)
        z = c[1]
    r = np.log(y) - X @ c
    chi2 = float(r @ W @ r)
    dof = len(x) - 2
    scale = max(1.0, chi2 / dof) if dof > 0 else 1.0
    cov = cov * scale
    A = math.exp(c[0])
    return {"z": float(c[1]), "z_error": float(math.sqrt(cov[1, 1])), "A": A,
            "A_error": A * float(math.sqrt(cov[0, 0])), "chi2": chi2, "dof": dof, "n": len(x)}


def _series_key(r) -> tuple:
    return (r["algorithm"], r["prior"], r["kernel_size"],
            None if r["algorithm"] == "fhmc" else r["length"])


def _series_label(key) -> str:
    alg, prior, k, length = key
    if alg == "hmc":
        return "HMC" + ("" if length is None or math.isclose(length, 1.0) else f" tau={length:g}")
    return f"FHMC {prior} k={k}"


#: what a job's row must agree on with the plan to be taken from an earlier analysis
REUSED_KEYS = ("L", "algorithm", "prior", "kernel_size", "length", "steps")


def _earlier_rows(planned: dict, path: Path) -> list[dict]:
    """The rows of an earlier analysis JSON of this scan, each checked against the planned
    job of its name (beta to 1e-9 and :data:`REUSED_KEYS`).  ConfigError for another scan,
    an unknown job or a mismatch."""
    path = Path(path)
    try:
        old = json.loads(path.read_text())
        old_rows = old["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(path, None, None, f"not a scan analysis JSON ({e})") from None
    if old.get("scan") != planned["name"]:
        raise ConfigError(path, None, None, f"an analysis of scan {old.get('scan')!r}, "
                          f"not of {planned['name']!r}")
    jobs = {j["key"]: j for j in planned["jobs"]}
    rows = []
    for r in old_rows:
        if r.get("status") == "missing":
            continue
        j = jobs.get(r.get("job"))
        if j is None:
            raise ConfigError(path, None, None, f"row {r.get('job')!r} is not a job of "
                              f"this scan's plan")
        bad = [k for k in REUSED_KEYS if r.get(k) != j.get(k)]
        if abs(float(r["beta"]) - float(j["beta"])) > 1e-9:
            bad.append("beta")
        if bad:
            raise ConfigError(path, None, None, f"row {r['job']}: {', '.join(bad)} differ "
                              f"from the plan ({', '.join(f'{k} {r.get(k)} != {j.get(k)}' for k in bad)})")
        rows.append(r)
    return rows


def reuse_points(planned: dict, out_rows: list[dict], earlier_paths) -> list[dict]:
    """Rows from earlier analyses (``scan analyse --json`` files of the same scan) for the
    jobs that have no production in this directory, e.g. jobs measured in an earlier
    allocation whose run directories are gone, or all but the few jobs rerun or lengthened
    here (``scan refine --earlier``).  A job is taken from the first file that has it and
    carries ``source`` = the file; a job with a run here (complete or partial) is never
    replaced.  The ratios and the rescaling controls of every row at a point with a reused
    row are then recomputed over the merged rows (:func:`hpcflow.study.reference`), so an
    FHMC job rerun here is compared with the earlier HMC reference of its point, and the
    other way round.  ConfigError for another scan, an unknown job or a mismatch
    (:func:`_earlier_rows`)."""
    from . import study

    have = {r["job"] for r in out_rows if r["status"] != "missing"}
    taken: dict[str, dict] = {}
    for path in earlier_paths:
        for r in _earlier_rows(planned, path):
            if r["job"] not in have and r["job"] not in taken:
                taken[r["job"]] = dict(r, source=str(path))
    if not taken:
        return out_rows
    rows = [taken.get(r["job"], r) for r in out_rows]
    rows += [r for k, r in taken.items() if k not in {q["job"] for q in rows}]
    mixed = {r["L"] for r in rows if r.get("source")}
    for r in rows:
        if r["L"] in mixed and r["status"] != "missing":
            ref = study.reference([q for q in rows if q["status"] != "missing"], r)
            if ref is not None:
                r["ratio"] = study.tau_ratio(ref, r)
                r["ratio_reference"] = ref["file"]
            study.add_rescaling_control([q for q in rows if q["status"] != "missing"], r)
    return rows


def collect_scan(directory, bench: bool = False, earlier=()) -> dict:
    """The scan analysis of ``directory`` (a scan's output directory with plan.json):
    rows (study row schema, plus ``job``, ``status`` = complete | partial | missing, the
    error reached against the target, the amortised training cost), fits and missing jobs.
    ``earlier``: analysis JSON files whose points fill those with no run here
    (:func:`reuse_points`)."""
    import h5py

    from . import study
    from .store import progress

    directory = Path(directory)
    try:
        planned = json.loads((directory / PLAN).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(directory / PLAN, None, None, f"not a scan directory ({e})") from None
    base = Path(planned["base"])
    prod_jobs = [j for j in planned["jobs"] if j["kind"] in ("hmc", "fhmc")]
    dirs = sorted({str(_resolve(base, j["output"])) for j in prod_jobs
                   if _resolve(base, j["output"]).is_dir()})
    rows = study.collect(dirs, bench=bench) if dirs else []
    target = _target(planned)
    by_run = {}
    for r in rows:
        by_run.setdefault(str(Path(r["run"]).resolve()), []).append(r)
    out_rows = []
    for j in prod_jobs:
        run = _resolve(base, j["output"])
        stage_file = run / ("hmc.h5" if j["kind"] == "hmc" else "fhmc.h5")
        match = [r for r in by_run.get(str(run.resolve()), [])
                 if Path(r["file"]).name == stage_file.name]
        if not match:
            out_rows.append({"job": j["key"], "status": "missing", "L": j["L"], "beta": j["beta"],
                             "algorithm": j["algorithm"], "prior": j["prior"],
                             "kernel_size": j["kernel_size"], "length": j["length"],
                             "steps": j["steps"], "tau_int": {"value": None, "error": None},
                             "ratio": {"value": None, "error": None}})
            continue
        r = dict(match[0])
        with h5py.File(stage_file, "r") as f:
            done, total = progress(f)
        r["job"] = j["key"]
        r["status"] = "complete" if done >= total else "partial"
        r["progress"] = {"trajectories": done, "planned": total}
        t = r["tau_int"]
        r["tau_int_relative_error"] = t["error"] / t["value"] if t["value"] else None
        r["target_reached"] = (r["tau_int_relative_error"] is not None
                               and r["tau_int_relative_error"] <= target + 1e-12)
        c = r["cost"]
        n_indep = (r["replicas"] * r["measurements"] / (2 * t["value"])) if t["value"] else None
        train = c.get("train_rank_seconds")
        c["train_rank_seconds_per_independent_sample"] = (train / n_indep if train and n_indep else None)
        per = c.get("seconds_per_independent_sample")
        c["seconds_per_independent_sample_with_training"] = (
            per + (c["train_rank_seconds_per_independent_sample"] or 0.0) if per is not None else None)
        out_rows.append(r)
    out_rows = reuse_points(planned, out_rows, earlier)
    missing = [r["job"] for r in out_rows if r["status"] == "missing"]
    order = {"hmc": 0, "fhmc": 1}
    prior_order = {None: 0, "gaussian": 1, "coarse-volume": 2, "coarse-interleave": 3}
    out_rows.sort(key=lambda r: (r["L"], order[r["algorithm"]], r["length"] or 0,
                                 prior_order.get(r["prior"], 9), r["kernel_size"] or 0))
    # xi of a point: its reference HMC (or any row at that L)
    for r in out_rows:
        if r["status"] == "missing":
            ref = next((q for q in out_rows if q["L"] == r["L"] and q.get("xi")), None)
            r["xi"] = dict(ref["xi"]) if ref else {"value": None, "error": None}
    fits = []
    series: dict[tuple, list] = {}
    for r in out_rows:
        if r["status"] != "missing" and r["tau_int"]["value"]:
            series.setdefault(_series_key(r), []).append(r)
    for key, rs in series.items():
        rs = sorted(rs, key=lambda q: q["L"])
        fit = fit_power([q["xi"]["value"] for q in rs], [q["tau_int"]["value"] for q in rs],
                        [q["tau_int"]["error"] for q in rs], [q["xi"]["error"] for q in rs])
        ratio = None
        if key[0] == "fhmc":
            rr = [q for q in rs if q["ratio"]["value"]]
            ratio = fit_power([q["xi"]["value"] for q in rr], [q["ratio"]["value"] for q in rr],
                              [q["ratio"]["error"] for q in rr], [q["xi"]["error"] for q in rr])
        if fit is not None:
            fits.append({"algorithm": key[0], "prior": key[1], "kernel_size": key[2],
                         "length": key[3], "label": _series_label(key), "L": [q["L"] for q in rs],
                         **fit, "ratio_fit": ratio})
    return {"scan": planned["name"], "directory": str(directory), "target": target,
            "hpcflow_version": planned.get("hpcflow_version"), "scan_text": planned.get("scan_text"),
            "rows": out_rows, "fits": fits, "missing": missing,
            "partial": [r["job"] for r in out_rows if r["status"] == "partial"],
            "earlier": sorted({r["source"] for r in out_rows if r.get("source")})}


def _resolve(base: Path, p: str) -> Path:
    return Path(p) if Path(p).is_absolute() else base / p


def _target(planned) -> float:
    """The scan's target relative error: from plan.json, or from the scan text stored in a
    plan.json written before it carried the target."""
    if "target" in planned:
        return planned["target"]
    parser = config_mod.read_ini(planned["scan_text"], planned["scan_file"],
                                 list(SCAN_SECTIONS) + list(PASS_THROUGH))
    items = dict(parser["statistics"]) if "statistics" in parser else {}
    return _parse_section(StatisticsSection, "statistics", items, planned["scan_file"]).target


def scan_table(result: dict) -> str:
    from .study import paren

    lines = [f"scan {result['scan']} ({result['directory']}): tau_int(M) in trajectories; ratio = "
             f"tau_int(HMC, tau = 1) / tau_int; target relative error {100 * result['target']:.0f}%"]
    head = (f"{'L':>3s} {'beta':>8s} {'xi':>10s} {'algorithm':26s} {'status':8s} {'acc':>5s} "
            f"{'steps':>5s} {'R x N':>11s} {'tau_int(M)':>11s} {'err':>5s} {'ratio':>10s} "
            f"{'c_M':>8s} {'s/indep':>8s} {'+train':>8s} {'F cost':>6s}")
    lines.append(head)
    last_L = None
    for r in result["rows"]:
        if r["L"] != last_L and last_L is not None:
            lines.append("")
        last_L = r["L"]
        t = r["tau_int"]
        label = _series_label(_series_key(r)) if r["algorithm"] == "fhmc" else \
            ("HMC" + ("" if math.isclose(r["length"] or 1.0, 1.0) else f" tau={r['length']:g}"))
        if r["status"] == "missing":
            lines.append(f"{r['L']:3d} {r['beta']:8.5f} {'':>10s} {label:26s} {'missing':8s}")
            continue
        c = r["cost"]
        err = r.get("tau_int_relative_error")
        lines.append(
            f"{r['L']:3d} {r['beta']:8.5f} {paren(r['xi']['value'], r['xi']['error']):>10s} "
            f"{label:26s} {r['status']:8s} {r['acceptance']:5.3f} {r['steps']:5d} "
            f"{r['replicas']}x{r['measurements']:<6d} {paren(t['value'], t['error']):>11s} "
            f"{'-' if err is None else format(100 * err, '.0f') + '%':>5s} "
            f"{paren(r['ratio']['value'], r['ratio']['error']):>10s} "
            f"{paren(r['c_M']['value'], r['c_M']['error'], 1) if r['c_M']['value'] else '-':>8s} "
            f"{_g(c.get('seconds_per_independent_sample')):>8s} "
            f"{_g(c.get('seconds_per_independent_sample_with_training')):>8s} "
            f"{_g(c.get('force_cost'), '.2f'):>6s}")
    lines.append("")
    lines.append("fits tau_int(M) = A xi^z (weighted, log-log; error scaled by sqrt(chi2/dof) when > 1):")
    for f in result["fits"]:
        rf = f.get("ratio_fit")
        lines.append(f"  {f['label']:26s} z = {paren(f['z'], f['z_error'])}  (L = "
                     f"{','.join(map(str, f['L']))}, chi2/dof = {f['chi2']:.2f}/{f['dof']})"
                     + (f"; ratio ~ xi^{paren(rf['z'], rf['z_error'])}" if rf else ""))
    for src in result.get("earlier", []):
        Ls = sorted({r["L"] for r in result["rows"] if r.get("source") == src})
        lines.append(f"from the earlier analysis {src}: L = {', '.join(map(str, Ls))}")
    if result["missing"]:
        lines.append("missing (no ensemble yet): " + ", ".join(result["missing"]))
    if result["partial"]:
        lines.append("partial (still running or interrupted): " + ", ".join(result["partial"]))
    lines.append("s/indep = 2 tau_int x rank-seconds per trajectory per replica (production); "
                 "+train = that plus the training rank-seconds amortised over the production's "
                 "independent samples; F cost = flowed force in Phi4 forces (--bench)")
    return "\n".join(lines)


def _g(v, fmt=".3g") -> str:
    return "-" if v is None else format(v, fmt)


def scan_figure(result: dict, png: Path):
    """Four panels, log-log against xi: tau_HMC / tau_FHMC per prior (at the smallest
    kernel size) and per kernel size (Gaussian prior); tau_int(M) per algorithm with the
    fits tau ~ xi^z and the HMC trajectory-length controls; the cost per independent
    sample (rank-seconds, production; open symbols with the training amortised)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in result["rows"] if r["status"] != "missing" and r["tau_int"]["value"]]
    from matplotlib.ticker import ScalarFormatter

    fig, grid = plt.subplots(2, 2, figsize=(12, 9))
    axes = grid.ravel()
    fhmc = [r for r in rows if r["algorithm"] == "fhmc" and r["ratio"]["value"]]
    kmin = min((r["kernel_size"] for r in fhmc), default=3)

    def draw(ax, subset, key, label):
        groups = {}
        for r in subset:
            groups.setdefault(key(r), []).append(r)
        for k, rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
            rs = sorted(rs, key=lambda q: q["L"])
            ax.errorbar([q["xi"]["value"] for q in rs], [q["ratio"]["value"] for q in rs],
                        yerr=[q["ratio"]["error"] for q in rs], xerr=[q["xi"]["error"] for q in rs],
                        marker="o", ms=4, capsize=2, label=label(k))
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_ylabel("tau_int(M) HMC / FHMC")
        if groups:
            ax.legend(fontsize=8)

    draw(axes[0], [r for r in fhmc if r["kernel_size"] == kmin], lambda r: r["prior"],
         lambda k: f"{k}, k={kmin}")
    axes[0].set_title(f"per prior (k = {kmin})", fontsize=10)
    draw(axes[1], [r for r in fhmc if r["prior"] == "gaussian"], lambda r: r["kernel_size"],
         lambda k: f"gaussian, k={k}")
    axes[1].set_title("per kernel size (Gaussian prior)", fontsize=10)
    ax = axes[2]
    fits = {(f["algorithm"], f["prior"], f["kernel_size"], f["length"]): f for f in result["fits"]}
    series = {}
    for r in rows:
        series.setdefault(_series_key(r), []).append(r)
    for key, rs in sorted(series.items(), key=lambda kv: str(kv[0])):
        rs = sorted(rs, key=lambda q: q["L"])
        xi = np.array([q["xi"]["value"] for q in rs])
        f = fits.get(key)
        lab = _series_label(key) + (f", z = {f['z']:.2f}({100 * f['z_error']:.0f})" if f else "")
        line = ax.errorbar(xi, [q["tau_int"]["value"] for q in rs],
                           yerr=[q["tau_int"]["error"] for q in rs], marker="o" if key[0] == "fhmc" else "s",
                           ms=4, capsize=2, ls="none", label=lab)
        if f:
            grid = np.geomspace(xi.min(), xi.max(), 20)
            ax.plot(grid, f["A"] * grid ** f["z"], color=line[0].get_color(), lw=1,
                    ls="--" if key[0] == "hmc" else "-")
    ax.set_ylabel("tau_int(M) [trajectories]")
    ax.set_title("tau_int(M) ~ xi^z (HMC dashed, with its length controls)", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[3]
    for key, rs in sorted(series.items(), key=lambda kv: str(kv[0])):
        rs = [q for q in sorted(rs, key=lambda q: q["L"])
              if q["cost"].get("seconds_per_independent_sample")]
        if not rs:
            continue
        xi = [q["xi"]["value"] for q in rs]
        line, = ax.plot(xi, [q["cost"]["seconds_per_independent_sample"] for q in rs],
                        marker="o" if key[0] == "fhmc" else "s", ms=4,
                        ls="-" if key[0] == "fhmc" else "--", label=_series_label(key))
        if key[0] == "fhmc":
            ax.plot(xi, [q["cost"]["seconds_per_independent_sample_with_training"] for q in rs],
                    marker="o", mfc="none", ls=":", color=line.get_color())
    ax.set_ylabel("rank-seconds per independent sample of M")
    ax.set_title("cost at equal statistics (open: with the training amortised)", fontsize=10)
    ax.legend(fontsize=7)
    for i, ax in enumerate(axes):  # every panel: log-log against xi, plain tick labels
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("xi")
        ax.grid(alpha=0.3, which="both")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ScalarFormatter())
            minor = axis is ax.xaxis or i < 2  # the ratio panels span less than a decade
            axis.set_minor_formatter(ScalarFormatter() if minor else plt.NullFormatter())
    fig.suptitle(f"scan {result['scan']}: L/xi fixed; tau_int in trajectories", fontsize=11)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# Command line


def main(argv=None) -> int:
    prog = log_mod.program_name("hpcflow.scan", "hpcflow-scan")
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make", help="write one input per job, the manifest and plan.json")
    p.add_argument("scan", help="scan file (INI)")
    p = sub.add_parser("run", help="run every job here (mpirun works), skipping finished ones")
    p.add_argument("scan", help="scan file (INI)")
    p.add_argument("--force", action="store_true", help="recompute every job (hpcflow.run --force)")
    p.add_argument("--only", action="append", default=[], metavar="PATTERN",
                   help="run the jobs whose name matches this shell pattern ('L20-*'; "
                        "repeatable), with the jobs they wait for")
    p = sub.add_parser("refine", help="lengthen finished productions that missed the target error")
    p.add_argument("scan", help="scan file (INI)")
    p.add_argument("--max-factor", type=float, default=8.0, help="most a run grows at once (8)")
    p.add_argument("--earlier", action="append", default=[], type=Path, metavar="JSON",
                   help="an earlier analysis JSON of this scan: it stands in for the jobs with "
                        "no run here (repeatable)")
    p = sub.add_parser("submit", help="submit a manifest as SLURM arrays (jobs/scan.sbatch calls it)")
    p.add_argument("manifest")
    p.add_argument("--script", default="jobs/scan.sbatch", help="the array job script")
    p.add_argument("--throttle", type=int, default=8, help="array tasks running at once (%%N)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch commands only")
    p = sub.add_parser("check", help="check a manifest: every input exists and parses")
    p.add_argument("manifest")
    p = sub.add_parser("analyse", aliases=["analyze"], help="table, fits and figures of a scan directory")
    p.add_argument("directory", help="the scan's output directory (with plan.json)")
    p.add_argument("--json", type=Path, help="write the analysis JSON here ('-': standard output)")
    p.add_argument("--csv", type=Path, help="write the rows as flat CSV here")
    p.add_argument("--png", type=Path, help="write the figure here")
    p.add_argument("--bench", action="store_true", help="measure the flowed-force cost of every flow")
    p.add_argument("--earlier", action="append", default=[], type=Path, metavar="JSON",
                   help="an earlier analysis JSON of this scan: its points with no run here are "
                        "taken from it, marked with their source (repeatable)")
    log_mod.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.command == "run":
        from mpi4py import MPI

        return run_scan(args.scan, comm=MPI.COMM_WORLD, force=args.force, quiet=args.quiet,
                        verbose=args.verbose, only=args.only)
    log_mod.configure(0, args.quiet, args.verbose, stream="stderr")
    try:
        if args.command == "make":
            make(args.scan, quiet=args.quiet)
        elif args.command == "refine":
            refine(args.scan, args.max_factor, quiet=args.quiet, earlier=args.earlier)
        elif args.command == "check":
            base, entries = read_manifest(args.manifest)
            for e in entries:
                config_mod.load(base / e.input)
            print(f"{args.manifest}: {len(entries)} jobs, every input present and valid")
        elif args.command == "submit":
            script = Path(args.script).resolve()
            for g in submit(args.manifest, script, args.throttle, args.dry_run):
                print(("would run: " if args.dry_run else f"array {g['job_id']}: ") + " ".join(g["argv"]))
        else:
            result = collect_scan(args.directory, bench=args.bench, earlier=args.earlier)
            if str(args.json) == "-":
                print(json.dumps(result, indent=1))
            else:
                print(scan_table(result))
                if args.json:
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps(result, indent=1) + "\n")
            if args.csv:
                from .study import write_csv

                write_csv(result["rows"], args.csv)
            if args.png:
                scan_figure(result, args.png)
                print(f"{args.png}: ratio per prior, per kernel size, tau_int against xi with fits",
                      file=sys.stderr)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
