"""Input files: INI text -> typed, validated, immutable settings.

An input file has one section per concern; each section maps onto a frozen dataclass below,
whose fields are the allowed keys.  Every field carries its type, its default (``REQUIRED``
when the key must be given), a check of its allowed values, and a one-line description,
which together are the reference of the input format (``python -m hpcflow.config`` prints it).

Example (``inputs/demo.ini``)::

    [run]
    name = demo
    output = runs/demo
    seed = 1234
    stages = hmc, analysis

    [theory]
    L = 8
    beta = 0.576
    lambda = 0.5

    [hmc]
    replicas = 4
    trajectories = 2000
    ...

Anything wrong -- unknown section or key, a value of the wrong type, out of range or
inconsistent with another key, a missing required key, an unreadable file -- raises
:class:`ConfigError`, whose message names the file, section and key and says what is
allowed.  ``python -m hpcflow.run`` turns it into exit status 2 before anything is written.
"""

from __future__ import annotations

import ast
import configparser
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError
from .stages import STAGES as _STAGE_TABLE

REQUIRED = object()


class ints(tuple):
    """Annotation of keys holding a comma list of integers."""

STAGES = tuple(_STAGE_TABLE)  # coarse, hmc, train, fhmc, analysis (hpcflow.stages)
PRIORS = ("gaussian", "coarse-volume", "coarse-interleave")
INTEGRATORS = ("leapfrog", "omf2", "omf4")
DEVICES = ("auto", "cpu", "cuda")
IO_MODES = ("auto", "mpio", "gather")


# ---------------------------------------------------------------------------------------
# Field declarations


def _key(default=REQUIRED, check: Callable[[Any], str | None] | None = None, doc: str = ""):
    """A key of a section: default (or REQUIRED), a check returning an error text or None."""
    return field(default=None if default is REQUIRED else default,
                 metadata={"required": default is REQUIRED, "check": check, "doc": doc})


def positive(v):
    return None if v > 0 else "must be > 0"


def non_negative(v):
    return None if v >= 0 else "must be >= 0"


def one_of(*allowed):
    def check(v):
        return None if v in allowed else f"must be one of {', '.join(allowed)}"
    return check


def name_like(v):
    ok = v and all(c.isalnum() or c in "-_." for c in v)
    return None if ok else "must be a non-empty name of letters, digits, '-', '_', '.'"


def stage_list(v):
    bad = [s for s in v if s not in STAGES]
    if bad:
        return f"unknown stage {bad[0]!r}; allowed stages: {', '.join(STAGES)}"
    if not v:
        return "must name at least one stage"
    if len(set(v)) != len(v):
        return "names a stage twice"
    return None


# ---------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class RunConfig:
    """[run]: what to run and where to put it."""

    name: str = _key(check=name_like, doc="run name; also the pyerrors ensemble name")
    output: str = _key(check=lambda v: None if v.strip() else "must name a directory (it is empty)",
                       doc="output directory (relative paths are relative to the working directory)")
    seed: int = _key(check=non_negative, doc="run seed; replica i's stream is spawned from (seed, i)")
    stages: tuple = _key(("hmc", "analysis"), check=stage_list,
                         doc="comma list of stages, run in order: " + ", ".join(STAGES))
    device: str = _key("auto", check=one_of(*DEVICES),
                       doc="auto = cuda:(node-local rank %% GPUs) when CUDA exists, else cpu")
    threads: int = _key(0, check=non_negative,
                        doc="torch CPU threads per rank; 0 = $OMP_NUM_THREADS if set, else 1")
    io: str = _key("auto", check=one_of(*IO_MODES),
                   doc="HDF5 writes: mpio (parallel HDF5), gather (to rank 0), auto = mpio if h5py has MPI")
    checkpoint_every: int = _key(100, check=positive,
                                 doc="trajectories between writes of measurements and checkpoints")
    progress_every: float = _key(10.0, check=positive, doc="seconds between progress lines (rank 0)")
    compile: str = _key("off", check=one_of("auto", "on", "off"),
                        doc="fused HMC trajectories (torch.compile, hpcflow.fused): auto = where "
                            "the action allows and a compiler works, on = required, off = eager")
    rng: str = _key("pcg64", check=one_of("pcg64", "philox"),
                    doc="the chains' random streams (hpcflow.rng): pcg64 = numpy on the host, "
                        "philox = Philox4x32-10 on the chains' device (compiled unless "
                        "compile = off); use philox on GPUs")


@dataclass(frozen=True)
class TheoryConfig:
    """[theory]: S = sum_x [-beta sum_mu phi_x phi_{x+mu} + phi_x^2 + lambda (phi_x^2 - 1)^2]."""

    L: int = _key(check=lambda v: None if v >= 2 else "must be >= 2", doc="lattice extent (L x L, periodic)")
    beta: float = _key(check=positive, doc="hopping coupling")
    lam: float = _key(0.5, check=non_negative, doc="quartic coupling lambda (key 'lambda')")


@dataclass(frozen=True)
class HMCConfig:
    """[hmc]: hybrid Monte Carlo production."""

    replicas: int = _key(check=positive, doc="independent chains, over all ranks")
    trajectories: int = _key(check=positive, doc="measured trajectories per replica, after thermalization")
    thermalization: int = _key(0, check=non_negative, doc="trajectories discarded first, per replica")
    length: float = _key(1.0, check=positive, doc="MD trajectory length tau")
    steps: int = _key(10, check=positive, doc="MD steps per trajectory (eps = length / steps)")
    integrator: str = _key("leapfrog", check=one_of(*INTEGRATORS), doc="MD integrator")
    save_every: int = _key(0, check=non_negative,
                           doc="store a configuration every N measured trajectories; 0 = never")
    start: str = _key("cold", check=one_of("cold", "hot"),
                      doc="initial field: cold = all zero, hot = unit Gaussian")


@dataclass(frozen=True)
class FHMCConfig(HMCConfig):
    """[fhmc]: flow HMC production, HMC in the flowed variables phi~ = f(phi); keys as [hmc]."""


def kernel_size_check(v):
    return None if v >= 1 and v % 2 == 1 else "must be an odd integer >= 1 (3, 5, 7 ...)"


def channels_check(v):
    return None if all(c > 0 for c in v) else "must be positive channel counts"


@dataclass(frozen=True)
class FlowConfig:
    """[flow]: the normalizing flow, generator phi = g(z) (tanh coupling layers, global scale)."""

    prior: str = _key("gaussian", check=one_of(*PRIORS),
                      doc="distribution r of z the flow is trained from (gaussian = unit normal)")
    kernel_size: int = _key(3, check=kernel_size_check, doc="convolution kernel size k of s and t")
    layers: int = _key(1, check=positive,
                       doc="coupling blocks (block = pair) or single coupling layers (block = single)")
    block: str = _key("pair", check=one_of("pair", "single"),
                      doc="pair: a block is two layers with complementary masks, updating every site")
    hidden: ints = _key((), check=channels_check,
                        doc="hidden channels of the s and t networks, comma list; empty = none")
    file: str = _key("", doc="flow file; empty = <output>/flow.pt (written by the train stage)")


@dataclass(frozen=True)
class TrainConfig:
    """[train]: reverse-KL training of the flow, data parallel over ranks."""

    iterations: int = _key(2000, check=positive, doc="Adam steps")
    batch_size: int = _key(500, check=positive, doc="samples per step, over all ranks")
    lr: float = _key(0.01, check=positive, doc="Adam learning rate (initial, with schedule = cosine)")
    schedule: str = _key("cosine", check=one_of("cosine", "constant"),
                         doc="cosine: lr annealed to 0 over the iterations; constant: lr throughout")
    metropolis: int = _key(4096, check=positive,
                           doc="proposals of the independence-Metropolis chain measuring flow acceptance")
    eval_every: int = _key(0, check=non_negative,
                           doc="iterations between Metropolis-acceptance measurements; 0 = iterations/20")
    checkpoint_every: int = _key(100, check=positive, doc="iterations between training checkpoints")


@dataclass(frozen=True)
class CoarseConfig:
    """[coarse]: the coarse ensemble that coarse priors draw from (HMC at beta' on L')."""

    beta: float = _key(check=positive, doc="coarse hopping coupling beta' (lambda as in [theory])")
    L: int = _key(check=lambda v: None if v >= 2 else "must be >= 2",
                  doc="coarse lattice: L of [theory] (coarse-volume) or L/2 (coarse-interleave)")
    replicas: int = _key(check=positive, doc="coarse chains, over all ranks")
    samples: int = _key(check=positive, doc="decorrelated configurations kept for training, in all")
    eval_samples: int = _key(4096, check=positive,
                             doc="further configurations, never trained on, for the flow acceptance")
    spacing: int = _key(0, check=non_negative,
                        doc="trajectories between kept configurations; 0 = ceil(2 tau_int(M)) measured")
    pilot: int = _key(2000, check=positive,
                      doc="trajectories per replica of the pilot run that measures tau_int(M)")
    thermalization: int = _key(500, check=non_negative, doc="trajectories discarded first, per replica")
    length: float = _key(1.0, check=positive, doc="MD trajectory length")
    steps: int = _key(10, check=positive, doc="MD steps per trajectory")
    integrator: str = _key("leapfrog", check=one_of(*INTEGRATORS), doc="MD integrator")
    seed: int = _key(-1, doc="seed of the coarse chains; -1 = [run] seed")
    file: str = _key("", doc="coarse ensemble file, shareable between inputs; empty = <output>/coarse.h5")


@dataclass(frozen=True)
class AnalysisConfig:
    """[analysis]: Gamma-method settings."""

    S: float = _key(2.0, check=positive, doc="Wolff's S parameter of the automatic window")
    plateau_min: int = _key(0, check=non_negative,
                            doc="first t of the effective-mass plateau; 0 = L/4")
    compare: tuple = _key((), doc="other runs' directories or .h5 files shown beside this run's table")


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "theory": TheoryConfig,
    "hmc": HMCConfig,
    "flow": FlowConfig,
    "train": TrainConfig,
    "fhmc": FHMCConfig,
    "coarse": CoarseConfig,
    "analysis": AnalysisConfig,
}
# Sections a stage needs; any other section is optional (None when absent, defaults for
# [analysis] and [flow]).
STAGE_SECTIONS = {name: stage.sections for name, stage in _STAGE_TABLE.items()}
ALWAYS = ("run", "theory")
DEFAULTED = ("analysis", "flow")
KEY_ALIASES = {("theory", "lambda"): "lam", ("scan", "lambda"): "lam"}  # [scan]: hpcflow.scan
# Keys of earlier versions, with why they went; named in the error instead of "unknown key".
REMOVED_KEYS = {
    ("flow", "prior_width"): "was removed: the Gaussian prior has unit width and the flow learns "
                             "the overall scale (a global exp(lambda)), PHYSICS.md section 5; "
                             "delete the key",
}


@dataclass(frozen=True)
class Config:
    """A whole input file: one attribute per section, plus where it came from."""

    run: RunConfig
    theory: TheoryConfig
    hmc: HMCConfig | None
    flow: FlowConfig
    train: TrainConfig | None
    fhmc: FHMCConfig | None
    coarse: CoarseConfig | None
    analysis: AnalysisConfig
    path: str = ""
    text: str = ""

    @property
    def output(self) -> Path:
        return Path(self.run.output)


# ---------------------------------------------------------------------------------------
# Parsing


def _convert(raw: str, typ, path, section, key):
    raw = raw.strip()
    try:
        if typ is int:
            return int(raw)
        if typ is float:
            v = float(raw)
            if not math.isfinite(v):
                raise ValueError
            return v
        if typ is tuple:
            return tuple(s.strip() for s in raw.split(",") if s.strip())
        if typ is ints:
            return tuple(int(s) for s in raw.split(",") if s.strip())
        if typ is bool:
            low = raw.lower()
            if low in ("1", "yes", "true", "on"):
                return True
            if low in ("0", "no", "false", "off"):
                return False
            raise ValueError
        return raw
    except ValueError:
        kind = {int: "an integer", float: "a finite number", bool: "a boolean (yes/no)",
                ints: "a comma list of integers"}[typ]
        raise ConfigError(path, section, key, f"expected {kind}, got {raw!r}") from None


def _field_types(cls) -> dict[str, type]:
    hints = {"int": int, "float": float, "str": str, "tuple": tuple, "bool": bool, "ints": ints}
    return {f.name: hints[f.type] for f in dataclasses.fields(cls)}


def _ini_key(section: str, name: str) -> str:
    for (sec, key), alias in KEY_ALIASES.items():
        if sec == section and alias == name:
            return key
    return name


def _parse_section(cls, section: str, items: dict[str, str], path):
    types = _field_types(cls)
    values = {}
    for key, raw in items.items():
        name = KEY_ALIASES.get((section, key), key)
        if (section, key) in REMOVED_KEYS:
            raise ConfigError(path, section, key, REMOVED_KEYS[(section, key)])
        if name not in types:
            allowed = ", ".join(_ini_key(section, n) for n in types)
            raise ConfigError(path, section, key, f"unknown key; allowed keys: {allowed}")
        values[name] = _convert(raw, types[name], path, section, key)
    for f in dataclasses.fields(cls):
        key = _ini_key(section, f.name)
        if f.name not in values:
            if f.metadata["required"]:
                raise ConfigError(path, section, key, "required key is missing")
            values[f.name] = f.default
        check = f.metadata["check"]
        if check is not None:
            problem = check(values[f.name])
            if problem:
                raise ConfigError(path, section, key, f"{problem} (got {values[f.name]!r})")
    return cls(**values)


def _cross_checks(cfg: Config):
    p = cfg.path
    t = cfg.theory
    if t.lam == 0 and t.beta >= 0.5:
        raise ConfigError(p, "theory", "beta",
                          f"the free field (lambda = 0) needs beta < 1/2 to be stable (got {t.beta})")
    flows = {"train", "fhmc"} & set(cfg.run.stages)
    if flows and cfg.flow.prior == "coarse-interleave" and t.L % 2:
        raise ConfigError(p, "theory", "L", "the coarse-interleave prior needs even L "
                          f"(four L/2 lattices interleaved; got {t.L})")
    if flows and t.L % 2:
        raise ConfigError(p, "theory", "L", f"the {'/'.join(sorted(flows))} stage needs even L "
                          f"(checkerboard coupling layers; got {t.L})")
    if "train" in cfg.run.stages and cfg.flow.prior.startswith("coarse"):
        c = cfg.coarse
        if c is None:
            raise ConfigError(p, "coarse", None, f"required section is missing (prior = {cfg.flow.prior})")
        want = t.L if cfg.flow.prior == "coarse-volume" else t.L // 2
        if c.L != want:
            raise ConfigError(p, "coarse", "L", f"must be {want} for prior = {cfg.flow.prior} "
                              f"with [theory] L = {t.L} (got {c.L})")
    if cfg.coarse is not None and t.lam == 0 and cfg.coarse.beta >= 0.5:
        raise ConfigError(p, "coarse", "beta", "the free field (lambda = 0) needs beta < 1/2")
    if flows and cfg.flow.kernel_size > t.L:
        raise ConfigError(p, "flow", "kernel_size",
                          f"must not exceed L = {t.L} (got {cfg.flow.kernel_size})")


def read_ini(text: str, path, allowed) -> configparser.ConfigParser:
    """The sections of an INI text (keys case sensitive, ``#``/``;`` comments, a UTF-8 BOM
    accepted); ConfigError with the line number for a syntax error, and for a section not
    in ``allowed``.  Shared by input files and scan files (:mod:`hpcflow.scan`)."""
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"),
                                       delimiters=("=",), strict=True)
    parser.optionxform = str  # keys are case sensitive: L is not l
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark, as some editors write
    try:
        parser.read_string(text, source=str(path))
    except configparser.DuplicateSectionError as e:
        raise ConfigError(path, e.section, None, f"section appears twice (again on line {e.lineno})") from None
    except configparser.DuplicateOptionError as e:
        raise ConfigError(path, e.section, e.option, f"key appears twice (again on line {e.lineno})") from None
    except configparser.MissingSectionHeaderError as e:
        raise ConfigError(path, None, None, f"line {e.lineno}: not a valid INI file: a key before "
                          f"the first [section]: {e.line.strip()!r}") from None
    except configparser.ParsingError as e:
        lineno, line = e.errors[0]
        try:  # configparser keeps the repr of the line
            line = ast.literal_eval(line)
        except (ValueError, SyntaxError):
            pass
        raise ConfigError(path, None, None, f"line {lineno}: not a valid INI line: "
                          f"{line.strip()!r} (expected [section] or key = value)") from None
    except configparser.Error as e:
        where = f"line {e.lineno}: " if getattr(e, "lineno", None) else ""
        raise ConfigError(path, None, None, f"{where}not a valid INI file: {e.message.splitlines()[0]}") from None
    for section in parser.sections():
        if section not in allowed:
            raise ConfigError(path, section, None,
                              f"unknown section; allowed sections: {', '.join(allowed)}")
    return parser


def parse(text: str, path: str | Path = "<string>") -> Config:
    """Parse the text of an input file; raise ConfigError on any problem."""
    parser = read_ini(text, path, SECTIONS)
    sections = {}
    for name in ALWAYS:
        if name not in parser:
            raise ConfigError(path, name, None, "required section is missing")
        sections[name] = _parse_section(SECTIONS[name], name, dict(parser[name]), path)
    needed = {sec for stage in sections["run"].stages for sec in STAGE_SECTIONS[stage]}
    for name, cls in SECTIONS.items():
        if name in ALWAYS:
            continue
        if name in parser:
            sections[name] = _parse_section(cls, name, dict(parser[name]), path)
        elif name in needed and name not in DEFAULTED:
            stages = [s for s in sections["run"].stages if name in STAGE_SECTIONS[s]]
            raise ConfigError(path, name, None,
                              f"required section is missing (the {', '.join(stages)} stage needs it)")
        else:
            sections[name] = _parse_section(cls, name, {}, path) if name in DEFAULTED else None
    cfg = Config(**sections, path=str(path), text=text)
    _cross_checks(cfg)
    return cfg


def load(path: str | Path) -> Config:
    """Read and parse an input file; raise ConfigError (naming the file) on any problem."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(path, None, None, f"cannot read input file: {reason}") from None
    return parse(text, path)


def reference() -> str:
    """The input-file reference: every section and key with its default and meaning."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]  {cls.__doc__.split(':', 1)[1].strip()}")
        for f in dataclasses.fields(cls):
            default = "(required)" if f.metadata["required"] else f"= {_show(f.default)}".rstrip()
            lines.append(f"  {_ini_key(section, f.name):16s} {default:18s} {f.metadata['doc']}")
        lines.append("")
    return "\n".join(lines).replace("%%", "%")


def _show(v):
    return ", ".join(str(x) for x in v) if isinstance(v, tuple) else str(v)


if __name__ == "__main__":
    sys.stdout.write(reference())
