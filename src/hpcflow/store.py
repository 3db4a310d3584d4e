"""Ensemble files (HDF5): layout, parallel writes, checkpoints, resumption.

One file per production stage (``hmc.h5``, later ``fhmc.h5``, ``coarse.h5``):

    attrs                   hpcflow_version, input (the full input text), input_path, stage,
                            algorithm, L, beta, lambda, seed, replicas, trajectories,
                            thermalization, length, steps, integrator, save_every,
                            identity (JSON {"[section] key": value} of the keys that determine
                            the result, :mod:`hpcflow.stages`), fingerprint (its hash)
    /observables/M          float64 [replicas, measurements]        magnetization
    /observables/Mz         float64 [replicas, measurements]        magnetization of the chain
                                                                    variable z (FHMC: z, with
                                                                    phi = g(z) measured; HMC:
                                                                    z = phi, so Mz == M)
    /observables/C          float64 [replicas, measurements, L/2+1] time-slice correlator c(t)
    /observables/Gp         float64 [replicas, measurements]        |phi(p_min)|^2 / V
    /mc/dH                  float64 [replicas, measurements]        energy violation
    /mc/accepted            int8    [replicas, measurements]        Metropolis decision
                            (these six from :data:`hpcflow.observables.OBSERVABLES`)
    /configs                float64 [replicas, saved, L, L]         every save_every-th field
    /checkpoint/phi         float64 [replicas, L, L]                chain positions
    /checkpoint/rng         uint64  [replicas, 6]                   random-stream states
    /checkpoint/trajectory  int64   [1]                             trajectories done per replica
                                                                    (thermalization included)
    /cost/seconds           float64 [1]     wall seconds of the production, all segments
    /cost/rank_seconds      float64 [1]     sum over segments of wall seconds x ranks
    /cost/ranks             int64   [1]     MPI ranks of the latest segment
    /cost/segments          int64   [1]     runs (first + resumptions) that reached a checkpoint
    /cost/device            bytes64 [1]     device of the latest segment (rank 0's),
                                            e.g. "cpu (1 thread)", "cuda (NVIDIA H200)"
    /cost/first_trajectory  int64   [1]     counter when timing began (0; > 0 for a file begun
                                            before the cost datasets existed and resumed after)

A segment's wall time runs from the start of :func:`hpcflow.production.produce` to each
checkpoint, measured on rank 0; the cost datasets are written with the counter, so a
resumed run adds to them (time after the last checkpoint of a killed run is not counted:
its work is lost too).

Measurement m of every replica is trajectory thermalization + m; rows not yet measured
hold NaN.  A reader takes ``measured(f)`` rows (:func:`load_ensemble` does); a file is
complete when its counter reaches thermalization + trajectories (:func:`progress`).  Files written before ``/observables/Mz`` and
``/cost`` existed lack them; readers treat them as absent (:func:`read_cost` returns None),
and a resumed production adds them (:meth:`EnsembleWriter.ensure`), Mz then NaN before the
resumption.

Every dataset is created at full size with its space allocated at creation, so that a run
only ever writes raw data into place: the measurements and the checkpoint first, flushed,
then the trajectory counter, flushed.  A run killed at any moment leaves a file whose
counter names only data that reached the disk, from which the run resumes.

Two ways of writing produce the same file:

- ``mpio``: every rank opens the file through h5py's MPI-IO driver and writes its own
  replicas' rows collectively (parallel HDF5);
- ``gather``: ranks send their rows to rank 0, which alone opens and writes the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .errors import StageError  # also importable from here, where it was first defined
from .observables import OBSERVABLES
from .rng import STATE_WIDTH

CHECKPOINT_WIDTH = STATE_WIDTH  # uint64 per replica in /checkpoint/rng


def h5py_has_mpi() -> bool:
    return bool(h5py.get_config().mpi)


def resolve_io(setting: str) -> str:
    if setting == "auto":
        return "mpio" if h5py_has_mpi() else "gather"
    if setting == "mpio" and not h5py_has_mpi():
        raise RuntimeError("[run] io = mpio, but h5py was built without MPI support "
                           "(rerun tools/setup.sh, or set io = gather)")
    return setting


def fingerprint(values: dict) -> str:
    """A hash of the settings that determine a stage's result."""
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


COST_DEVICE_BYTES = 64


def _early_dcpl(fill):
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC)
    if fill is not None:
        dcpl.set_fill_value(np.array(fill))
    return dcpl


def layout(L: int, replicas: int, measurements: int, saved: int) -> dict[str, tuple]:
    """Dataset name -> (shape, dtype, fill value) of an ensemble file."""
    R, N = replicas, measurements
    nan = np.nan
    return {
        **{o.dataset: ((R, N, *o.shape(L)), o.dtype, o.fill) for o in OBSERVABLES},
        "configs": ((R, saved, L, L), "f8", nan),
        "checkpoint/phi": ((R, L, L), "f8", nan),
        "checkpoint/rng": ((R, CHECKPOINT_WIDTH), "u8", 0),
        "checkpoint/trajectory": ((1,), "i8", 0),
        "cost/seconds": ((1,), "f8", 0.0),
        "cost/rank_seconds": ((1,), "f8", 0.0),
        "cost/ranks": ((1,), "i8", 0),
        "cost/segments": ((1,), "i8", 0),
        "cost/device": ((1,), f"S{COST_DEVICE_BYTES}", None),
        "cost/first_trajectory": ((1,), "i8", 0),
    }


class EnsembleWriter:
    """Collective writer of one ensemble file for the replicas ``block`` of this rank.

    Every method is collective over ``comm``: all ranks call it, in the same order."""

    def __init__(self, path, comm, block: range, io: str):
        self.path, self.comm, self.block, self.io = Path(path), comm, block, io
        self.file = None

    # -- opening -----------------------------------------------------------------------
    def _open(self, mode):
        if self.io == "mpio":
            self.file = h5py.File(self.path, mode, driver="mpio", comm=self.comm)
        elif self.comm.Get_rank() == 0:
            self.file = h5py.File(self.path, mode)

    def create(self, attrs: dict, datasets: dict[str, tuple]):
        """Create the file (replacing any), with ``attrs`` and ``datasets`` from layout()."""
        if self.comm.Get_rank() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.comm.Barrier()
        self._open("w")
        if self.file is not None:
            for k, v in attrs.items():
                self.file.attrs[k] = v
            for name, (shape, dtype, fill) in datasets.items():
                self.file.create_dataset(name, shape=shape, dtype=dtype, dcpl=_early_dcpl(fill))
            self.file.flush()
        self.comm.Barrier()
        return self

    def reopen(self):
        """Open an existing file for appending (after :func:`inspect` said it fits)."""
        self._open("r+")
        return self

    def ensure(self, datasets: dict[str, tuple]) -> list[str]:
        """Create the datasets of ``datasets`` (from layout()) that the open file lacks, as
        :meth:`create` would (a file written by an older version); returns their names
        (on every rank that has the file open; [] elsewhere).  Collective."""
        missing = []
        if self.file is not None:
            missing = [n for n in datasets if n not in self.file]
            for name in missing:
                shape, dtype, fill = datasets[name]
                self.file.create_dataset(name, shape=shape, dtype=dtype, dcpl=_early_dcpl(fill))
            self.file.flush()
        self.comm.Barrier()
        return missing

    def read_cost(self) -> dict | None:
        """:func:`read_cost` of the open file, on rank 0 (None on the other ranks)."""
        if self.comm.Get_rank() == 0:
            return read_cost(self.file)
        return None

    # -- writing -----------------------------------------------------------------------
    def write_rows(self, name: str, rows: np.ndarray, index=()):
        """Write this rank's replicas' ``rows`` [B, ...] into dataset[block, *index]."""
        rows = np.ascontiguousarray(rows)
        if self.io == "mpio":
            dset = self.file[name]
            sel = (slice(self.block.start, self.block.stop), *index)
            with dset.collective:
                dset[sel] = rows
            return
        parts = self.comm.gather(rows, root=0)
        if self.comm.Get_rank() == 0:
            full = np.concatenate([p for p in parts if len(p)], axis=0)
            self.file[name][(slice(0, full.shape[0]), *index)] = full

    def set_counter(self, trajectories: int, cost: dict | None = None):
        """Record that ``trajectories`` are done; call after the data they produced is flushed.

        ``cost`` (rank 0's is used): {"seconds", "rank_seconds", "ranks", "segments",
        "device"}, the totals so far, written just before the counter."""
        self.flush()
        if self.comm.Get_rank() == 0:  # independent writes; mpio allows them for raw data
            if cost is not None:
                f = self.file
                f["cost/seconds"][0] = cost["seconds"]
                f["cost/rank_seconds"][0] = cost["rank_seconds"]
                f["cost/ranks"][0] = cost["ranks"]
                f["cost/segments"][0] = cost["segments"]
                f["cost/device"][0] = cost["device"].encode()[:COST_DEVICE_BYTES]
            self.file["checkpoint/trajectory"][0] = trajectories
        self.flush()

    def flush(self):
        if self.file is not None:
            self.file.flush()

    # -- reading back a checkpoint ------------------------------------------------------
    def read_rows(self, name: str) -> np.ndarray:
        """This rank's replicas' rows of dataset ``name``."""
        if self.io == "mpio":
            return self.file[name][self.block.start:self.block.stop]
        full = self.file[name][()] if self.comm.Get_rank() == 0 else None
        blocks = self.comm.gather(self.block, root=0)
        parts = [full[b.start:b.stop] for b in blocks] if full is not None else None
        return self.comm.scatter(parts, root=0)

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
        self.comm.Barrier()


def inspect(path, comm) -> dict | None:
    """Rank 0 reads what an existing file is (fingerprint, counter, total); broadcast.

    None when there is no file; {"unreadable": reason} for a file that cannot be read."""
    info = None
    if comm.Get_rank() == 0 and Path(path).exists():
        try:
            with h5py.File(path, "r") as f:
                done, total = progress(f)
                info = {"fingerprint": str(f.attrs.get("fingerprint", "")), "done": done,
                        "total": total, "attrs": dict(f.attrs)}
        except (OSError, KeyError) as e:
            info = {"unreadable": str(e)}
    return comm.bcast(info, root=0)


def extend(path, datasets: dict[str, tuple], attrs: dict) -> list[str]:
    """Give an ensemble file room for a longer run: every dataset of ``datasets`` (from
    :func:`layout` for the new length) that the file holds smaller is replaced by one of the
    new shape holding the old values in its leading slice (the rest the fill value), and
    ``attrs`` are set.  Serial (rank 0, no other process has the file open); atomic: the
    work is done on a copy that replaces the file, so a kill leaves the old file or the new
    one.  Returns the names of the grown datasets."""
    import os

    path = Path(path)
    tmp = path.with_name(path.name + ".extend.tmp")
    try:
        grown = _extend_copy(path, tmp, datasets, attrs)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-made copy left behind (a full disk ...)
        raise
    os.replace(tmp, path)
    return grown


def _extend_copy(path, tmp, datasets, attrs):
    import os
    import shutil

    shutil.copyfile(path, tmp)
    grown = []
    with h5py.File(tmp, "r+") as f:
        for name, (shape, dtype, fill) in datasets.items():
            if name not in f or f[name].shape == tuple(shape):
                continue
            old = f[name]
            if len(old.shape) != len(shape) or any(a > b for a, b in zip(old.shape, shape)):
                continue  # never shrink: a longer file keeps its rows
            f.move(name, name + ".old")
            new = f.create_dataset(name, shape=shape, dtype=dtype, dcpl=_early_dcpl(fill))
            old = f[name + ".old"]
            for r in range(old.shape[0]):  # a replica at a time: bounded memory
                new[(r, *(slice(0, n) for n in old.shape[1:]))] = old[r]
            del f[name + ".old"]
            grown.append(name)
        for k, v in attrs.items():
            f.attrs[k] = v
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    return grown


def read_cost(f: h5py.File) -> dict | None:
    """The cost datasets of an open ensemble file and its counter ``trajectories``, or None
    when the file has none (written before they existed)."""
    if "cost/seconds" not in f:
        return None
    device = f["cost/device"][0]
    return {"seconds": float(f["cost/seconds"][0]),
            "rank_seconds": float(f["cost/rank_seconds"][0]),
            "ranks": int(f["cost/ranks"][0]), "segments": int(f["cost/segments"][0]),
            "device": device.decode(errors="replace") if isinstance(device, bytes) else str(device),
            "first_trajectory": int(f["cost/first_trajectory"][0]),
            "trajectories": int(f["checkpoint/trajectory"][0])}


def progress(f: h5py.File) -> tuple[int, int]:
    """(trajectories done, trajectories in all) per replica of an open ensemble file,
    thermalization included; the file is complete when the two are equal."""
    return (int(f["checkpoint/trajectory"][0]),
            int(f.attrs["thermalization"]) + int(f.attrs["trajectories"]))


def measured(f: h5py.File) -> int:
    """Number of measurements that reached the file (per replica)."""
    done, _ = progress(f)
    return max(0, done - int(f.attrs["thermalization"]))


# ---------------------------------------------------------------------------------------
# Reading ensembles


@dataclass
class Ensemble:
    """The measured part of an ensemble file, as numpy arrays [replicas, measurements, ...].

    ``data`` maps every name of :data:`hpcflow.observables.OBSERVABLES` to its array (None
    for an optional record the file lacks); they are also attributes (``e.M``, ``e.C`` ...).
    ``cost`` holds the raw ``/cost`` datasets and the counter (None: absent).
    """

    path: Path | None
    attrs: dict
    data: dict
    cost: dict | None = None
    ens_name: str | None = None

    def __getattr__(self, name):
        data = self.__dict__.get("data")
        if data is not None and name in data:
            return data[name]
        raise AttributeError(name)

    @property
    def name(self) -> str:
        """The pyerrors ensemble name, ``<run name>_<stage>``."""
        if self.ens_name is not None:
            return self.ens_name
        return f"{self.attrs.get('name', 'run')}_{self.attrs['stage']}"

    @property
    def L(self) -> int:
        return int(self.attrs["L"])


def load_ensemble(path) -> Ensemble:
    """Read the measured rows of an ensemble file.

    Every record of :data:`hpcflow.observables.OBSERVABLES` is read; an optional one the
    file lacks (``/observables/Mz`` of older files) is None, and so is an Mz with
    unmeasured (NaN) rows, as left by a run begun before Mz was stored and resumed after.
    ``cost`` is None for files without ``/cost``.

    Parameters
    ----------
    path : str or path-like
        An ensemble file (``hmc.h5``, ``fhmc.h5``, ``coarse.h5`` ...).

    Returns
    -------
    Ensemble
    """
    path = Path(path)
    with h5py.File(path, "r") as f:
        n = measured(f)
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        data = {}
        for o in OBSERVABLES:
            if o.dataset not in f and not o.required:
                data[o.name] = None
                continue
            a = o.read(f[o.dataset][:, :n])
            data[o.name] = None if not o.required and not np.isfinite(a).all() else a
        return Ensemble(path, attrs, data, read_cost(f))


def load_samples(path, expect_L: int, expect_beta: float, expect_lam: float):
    """The configurations of a finished coarse ensemble, split into its pools.

    Of the stored configurations, ordered by trajectory then replica, the first
    ``samples`` (a file attribute) are the training pool and the next ``eval_samples`` are
    held out for the flow acceptance.

    Returns
    -------
    (train_pool [samples, L', L'], held-out pool [eval_samples, L', L'], attrs)

    Raises
    ------
    StageError
        No file, an unfinished production, or another (L, beta, lambda) than expected.
    """
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: no coarse ensemble (run the coarse stage first)")
    with h5py.File(path, "r") as f:
        attrs = dict(f.attrs)
        done, total = progress(f)
        if done < total:
            raise StageError(f"{path}: the coarse production is unfinished ({done}/{total} trajectories)")
        have = (int(attrs["L"]), float(attrs["beta"]), float(attrs["lambda"]))
        if have != (expect_L, expect_beta, expect_lam):
            raise StageError(f"{path}: coarse ensemble has (L, beta, lambda) = {have}, "
                             f"[coarse] asks for {(expect_L, expect_beta, expect_lam)}")
        configs = f["configs"][()]                                   # [R, per_replica, L, L]
    ordered = configs.transpose(1, 0, 2, 3).reshape(-1, *configs.shape[2:])
    n, n_eval = int(attrs["samples"]), int(attrs["eval_samples"])
    return ordered[:n], ordered[n:n + n_eval], attrs


def common_attrs(cfg, stage: str, algorithm: str, section) -> dict:
    """The attributes every ensemble file carries (DESIGN.md section 4)."""
    t = cfg.theory
    return {
        "hpcflow_version": __version__,
        "input": cfg.text,
        "input_path": str(cfg.path),
        "stage": stage,
        "algorithm": algorithm,
        "name": cfg.run.name,
        "L": t.L, "beta": t.beta, "lambda": t.lam, "seed": cfg.run.seed,
        "replicas": section.replicas,
        "trajectories": section.trajectories,
        "thermalization": section.thermalization,
        "length": section.length,
        "steps": section.steps,
        "integrator": section.integrator,
        "save_every": section.save_every,
    }
