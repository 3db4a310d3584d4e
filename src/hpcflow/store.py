"""Ensemble files (HDF5): layout, parallel writes, checkpoints, resumption.

One file per production stage (``hmc.h5``, later ``fhmc.h5``, ``coarse.h5``):

    attrs                   hpcflow_version, input (the full input text), input_path, stage,
                            algorithm, L, beta, lambda, seed, replicas, trajectories,
                            thermalization, length, steps, integrator, save_every, fingerprint
    /observables/M          float64 [replicas, measurements]        magnetization
    /observables/C          float64 [replicas, measurements, L/2+1] time-slice correlator c(t)
    /observables/Gp         float64 [replicas, measurements]        |phi(p_min)|^2 / V
    /mc/dH                  float64 [replicas, measurements]        energy violation
    /mc/accepted            int8    [replicas, measurements]        Metropolis decision
    /configs                float64 [replicas, saved, L, L]         every save_every-th field
    /checkpoint/phi         float64 [replicas, L, L]                chain positions
    /checkpoint/rng         uint64  [replicas, 6]                   random-stream states
    /checkpoint/trajectory  int64   [1]                             trajectories done per replica
                                                                    (thermalization included)

Measurement m of every replica is trajectory thermalization + m; rows not yet measured
hold NaN.  A reader takes ``measured(f)`` rows.

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
from pathlib import Path

import h5py
import numpy as np

from . import __version__

CHECKPOINT_WIDTH = 6


class StageError(RuntimeError):
    """A stage cannot run as asked (e.g. an existing result made from another input)."""


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


def _early_dcpl(fill):
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC)
    if fill is not None:
        dcpl.set_fill_value(np.array(fill))
    return dcpl


def layout(L: int, replicas: int, measurements: int, saved: int) -> dict[str, tuple]:
    """Dataset name -> (shape, dtype, fill value) of an ensemble file."""
    R, N, nt = replicas, measurements, L // 2 + 1
    nan = np.nan
    return {
        "observables/M": ((R, N), "f8", nan),
        "observables/C": ((R, N, nt), "f8", nan),
        "observables/Gp": ((R, N), "f8", nan),
        "mc/dH": ((R, N), "f8", nan),
        "mc/accepted": ((R, N), "i1", -1),
        "configs": ((R, saved, L, L), "f8", nan),
        "checkpoint/phi": ((R, L, L), "f8", nan),
        "checkpoint/rng": ((R, CHECKPOINT_WIDTH), "u8", 0),
        "checkpoint/trajectory": ((1,), "i8", 0),
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

    def set_counter(self, trajectories: int):
        """Record that ``trajectories`` are done; call after the data they produced is flushed."""
        self.flush()
        if self.comm.Get_rank() == 0:  # an independent write; mpio allows it for raw data
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
                info = {
                    "fingerprint": str(f.attrs.get("fingerprint", "")),
                    "done": int(f["checkpoint/trajectory"][0]),
                    "total": int(f.attrs["thermalization"] + f.attrs["trajectories"]),
                }
        except (OSError, KeyError) as e:
            info = {"unreadable": str(e)}
    return comm.bcast(info, root=0)


def measured(f: h5py.File) -> int:
    """Number of measurements that reached the file (per replica)."""
    done = int(f["checkpoint/trajectory"][0])
    return max(0, done - int(f.attrs["thermalization"]))


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
