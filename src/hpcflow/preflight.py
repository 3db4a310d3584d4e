"""Checks of an input against the machine, before MPI starts and before anything is written.

``python -m hpcflow.run`` calls :func:`check` after parsing the input: the output directory
(``[run] output``, and a ``[coarse] file`` or ``[flow] file`` elsewhere) must be a directory
or creatable, and writable; ``device = cuda`` needs a GPU; the ensemble files the run will
create must fit on their disk.  After MPI starts, :func:`check_memory` compares the chains
and training batches of the ranks of each node with the memory available there.  A problem
raises :class:`ConfigError` naming file, section and key (exit 2, nothing written).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .stages import STAGES, coarse_path, flow_path


def free_bytes(path: Path) -> int:
    """Free bytes for this user on the file system of ``path`` (an existing directory)."""
    return shutil.disk_usage(path).free


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    return path


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def check_directory(cfg, path: Path, section: str, key: str):
    """``path`` is a directory, or can be made, and a file can be written in it."""
    if path.exists() and not path.is_dir():
        raise ConfigError(cfg.path, section, key, f"{path} exists and is not a directory")
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise ConfigError(cfg.path, section, key, f"{base} is a file, so {path} cannot be made")
    try:  # root passes every permission test: only a write says whether it works
        fd, probe = tempfile.mkstemp(prefix=".hpcflow-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(cfg.path, section, key,
                          f"cannot write in {base} ({e.strerror or e})") from None


def check_device(cfg):
    if cfg.run.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(cfg.path, "run", "device",
                              "= cuda, but torch sees no CUDA device here (use auto or cpu)")


def _ensemble_bytes(L: int, replicas: int, trajectories: int, saved: int) -> tuple[int, str]:
    """(bytes of an ensemble file, "configs" | "fields" | "rows": what makes it big):
    :func:`hpcflow.store.layout`."""
    from .store import layout

    parts = {"configs": 0, "fields": 0, "rows": 0}
    for name, (shape, dtype, _) in layout(L, replicas, trajectories, saved).items():
        n = math.prod(shape) * np.dtype(dtype).itemsize
        parts["configs" if name == "configs" else "fields" if name.startswith("checkpoint/")
              else "rows"] += n
    return sum(parts.values()), max(parts, key=parts.get)


def planned_files(cfg) -> list[tuple[Path, int, str, str]]:
    """(file, bytes, section, key to name) of every ensemble file the run's stages create;
    the key is the one that makes the file big (trajectories, or save_every when the stored
    configurations dominate)."""
    out = []
    t = cfg.theory
    for stage in ("hmc", "fhmc"):
        s = getattr(cfg, stage)
        if stage in cfg.run.stages and s is not None:
            saved = s.trajectories // s.save_every if s.save_every else 0
            n, big = _ensemble_bytes(t.L, s.replicas, s.trajectories, saved)
            section, key = {"configs": (stage, "save_every"), "fields": ("theory", "L"),
                            "rows": (stage, "trajectories")}[big]
            out.append((STAGES[stage].path(cfg), n, section, key))
    c = cfg.coarse
    if "coarse" in cfg.run.stages and c is not None:
        per_replica = math.ceil((c.samples + c.eval_samples) / c.replicas)
        n, big = _ensemble_bytes(c.L, c.replicas, per_replica * max(c.spacing, 1), per_replica)
        pilot, _ = _ensemble_bytes(c.L, c.replicas, c.pilot, 0)
        out.append((coarse_path(cfg), n + pilot, "coarse", "L" if big == "fields" else "samples"))
    return out


def check_disk(cfg, force: bool = False):
    """The ensemble files to be created fit on their file systems: new files, files
    replaced (``force``) and files extended to more trajectories (made anew as a copy);
    a file that exists at its full size is resumed in place."""
    need: dict[Path, list] = {}
    for path, n, section, key in planned_files(cfg):
        if path.exists() and not force and path.stat().st_size >= n:
            continue
        base = _existing_ancestor(path.parent)
        entry = need.setdefault(base, [0, None])
        entry[0] += n
        if entry[1] is None or n > entry[1][0]:
            entry[1] = (n, section, key, path)
    for base, (n, (_, section, key, path)) in need.items():
        free = free_bytes(base)
        if n > free:
            raise ConfigError(cfg.path, section, key,
                              f"the run's files need {_gb(n)} on {base} ({path.name} the largest), "
                              f"which has {_gb(free)} free: lower [{section}] {key} (or the "
                              f"replicas, trajectories or L), or choose another output")


def check(cfg, force: bool = False):
    """Everything that can be checked before MPI starts (see the module docstring)."""
    check_directory(cfg, Path(cfg.run.output), "run", "output")
    if cfg.coarse is not None and cfg.coarse.file and "coarse" in cfg.run.stages:
        check_directory(cfg, coarse_path(cfg).parent, "coarse", "file")
    if cfg.flow.file and "train" in cfg.run.stages:
        check_directory(cfg, flow_path(cfg).parent, "flow", "file")
    check_device(cfg)
    check_disk(cfg, force)


# Bytes per lattice site and chain that an HMC trajectory keeps alive (field, momenta,
# force, proposal, FFT work space ...), with room to spare.
HMC_SITE_BYTES = 8 * 16


def check_memory(cfg, replicas_here: int, batch_here: int):
    """The chains (``replicas_here`` on this node, the largest production's) and training
    samples (``batch_here``) fit in the memory available on this node."""
    avail = available_memory()
    if avail is None:
        return
    L = cfg.theory.L
    hmc = replicas_here * L * L * HMC_SITE_BYTES
    channels = 2 + 4 * cfg.flow.layers * (2 + sum(cfg.flow.hidden))
    train = batch_here * L * L * 8 * channels if "train" in cfg.run.stages else 0
    if max(hmc, train) > avail:
        section, key = ("train", "batch_size") if train > hmc else ("theory", "L")
        raise ConfigError(cfg.path, section, key,
                          f"the ranks on this node need about {_gb(max(hmc, train))} of memory "
                          f"(L = {L}, {replicas_here} chains, {batch_here} training samples here), "
                          f"{_gb(avail)} available: lower [theory] L, the replicas or "
                          f"[train] batch_size, or use more nodes")
