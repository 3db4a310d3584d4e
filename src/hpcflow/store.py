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
    /checkpoint/slot_phi    float64 [replicas, 2, L, L]             chain positions, two slots
    /checkpoint/slot_rng    uint64  [replicas, 2, 6]                random-stream states
    /checkpoint/slot_crc    uint32  [replicas, 2, 2]                crc32 of each replica's
                                                                    slot_phi and slot_rng row
                                                                    (:func:`checkpoint_checksums`)
    /checkpoint/slot_trajectory int64 [2]                           the counter each slot holds
                                                                    (-1: never written)
    /checkpoint/trajectory  int64   [1]                             trajectories done per replica
                                                                    (thermalization included):
                                                                    the commit, naming the slot
                                                                    whose slot_trajectory equals it
    /integrity/rows         uint32  [replicas, measurements, 6]     crc32 of every row of the six
                                                                    datasets above, in the order
                                                                    of attribute ``datasets``
                                                                    (:func:`row_checksums`)
    /integrity/configs      uint32  [replicas, saved]               crc32 of every stored field
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
only ever writes raw data into place.  A checkpoint (:meth:`EnsembleWriter.write_checkpoint`)
writes, in this order: the measurements since the last one and their checksums, the stored
configurations and theirs, then the chain positions, stream states and their checksums
into the slot that the counter does *not* name, flushed; then the slot's own counter,
flushed; then the cost and the counter ``/checkpoint/trajectory`` (the commit), flushed.
Until the commit the counter still names the other slot, untouched, and the rows it
counts, so a run killed at any byte of a checkpoint resumes from the previous one, bit for
bit as if uninterrupted (what lay beyond the counter is written again).  (A kill, not a
power loss: nothing is fsync'ed.)

Checksums (crc32; the initial value mixes in replica and row, so a row in the wrong place
fails too) are verified (:func:`verify`) on every resumption or skip of a production
(:func:`inspect`; a mismatch stops the run, exit 2, naming file, replica and dataset), by
every read of the analysis (:func:`load_ensemble`) and by ``python -m hpcflow.analysis
--check``.  The ``from`` attribute of ``/integrity/rows`` and ``/integrity/configs`` is the
first index they cover: 0, or for a file begun before checksums existed and resumed after,
the first row written after the resumption (``from:<dataset>`` of ``/integrity/rows``: the
same for a row dataset added to a file that had checksums); what lies before is
*unverified*, reported as such, never refused.  Such older files have ``/checkpoint/phi`` [replicas, L, L] and
``/checkpoint/rng`` [replicas, 6] (one checkpoint, no slots): they are read and resumed
(:func:`read_checkpoint`), and a resumption adds the slots and checksums.

A new file is created as ``<name>.new`` beside the result (e.g. ``hmc.h5.new``) and renamed
onto it (``os.replace``) right after its first checkpoint, so a result file always holds a
checkpoint, and ``--force`` leaves an old result in place until the new one has its first
checkpoint.  A ``.new`` file is never resumed: a run finding one starts afresh (or removes
it, when the result it would replace is there to resume or skip).  A result file with no
committed checkpoint (empty, or killed during its creation by a version before ``.new``
files) is started afresh too.

Two ways of writing produce the same file:

- ``mpio``: every rank opens the file through h5py's MPI-IO driver and writes its own
  replicas' rows collectively (parallel HDF5);
- ``gather``: ranks send their rows to rank 0, which alone opens and writes the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .errors import CorruptFileError, StageError  # StageError: first defined here
from .observables import OBSERVABLES
from .rng import STATE_WIDTH

CHECKPOINT_WIDTH = STATE_WIDTH  # uint64 per replica in /checkpoint/slot_rng
SLOTS = 2  # checkpoint slots: the committed one and the one being written
#: The per-trajectory datasets whose rows carry checksums, in the order of the last axis of
#: ``/integrity/rows``.
ROW_DATASETS: tuple[str, ...] = tuple(o.dataset for o in OBSERVABLES)
#: Suffix of a new ensemble file until its first checkpoint (then renamed onto the result).
NEW_SUFFIX = ".new"

#: Exit status of a process stopped by :func:`kill_point` (tests only).
KILLED_STATUS = 99


def kill_point(name: str):
    """Fault injection for the tests: with ``HPCFLOW_TEST_KILL=name`` (or ``name@n``, the
    n-th time this point is reached, default the first) in the environment, the process
    exits at once with :data:`KILLED_STATUS` (``os._exit``: no clean-up, no HDF5 close),
    as a kill at that point of a write would leave it."""
    want = os.environ.get("HPCFLOW_TEST_KILL")
    if not want:
        return
    point, _, nth = want.partition("@")
    if point != name:
        return
    _KILL_COUNTS[name] = _KILL_COUNTS.get(name, 0) + 1
    if _KILL_COUNTS[name] == int(nth or 1):
        os._exit(KILLED_STATUS)


_KILL_COUNTS: dict[str, int] = {}


#: zlib's crc32 byte table (reflected polynomial 0xEDB88320): one step of the register is
#: ``reg -> _CRC_TABLE[(reg ^ byte) & 0xFF] ^ (reg >> 8)``.
_CRC_TABLE = np.array([zlib.crc32(bytes([v])) ^ zlib.crc32(b"\0") for v in range(256)],
                      dtype=np.uint32)
#: Rows of at most this many bytes are checksummed as a batch (:func:`_crc32_rows`); wider
#: ones one zlib call each (the call, not the bytes, is what a narrow row costs).
CRC_BATCH_MAX_BYTES = 128


def _zero_bytes(reg: np.ndarray, n: int) -> np.ndarray:
    """The crc32 registers ``reg`` after n zero bytes (a linear map over GF(2))."""
    for _ in range(n):
        reg = _CRC_TABLE[reg & 0xFF] ^ (reg >> 8)
    return reg


@lru_cache(maxsize=64)
def _crc_tables(width: int) -> tuple[np.ndarray, np.ndarray]:
    """For rows of ``width`` bytes: ``data`` [width, 256], the register (started at 0) after
    byte v at position p and zeros to the end of the row, and ``start`` [4, 256], the
    register after ``width`` zero bytes started at v << 8k.  The register is linear in its
    start and in every byte, so it is the XOR of these."""
    data = np.empty((width, 256), dtype=np.uint32)
    reg = _CRC_TABLE.copy()
    for p in range(width - 1, -1, -1):
        data[p] = reg
        reg = _zero_bytes(reg, 1)
    v = np.arange(256, dtype=np.uint32)
    start = np.stack([_zero_bytes(v << np.uint32(8 * k), width) for k in range(4)])
    return data, start


def _crc32_rows(rows: np.ndarray, start: np.ndarray) -> np.ndarray:
    """``zlib.crc32(rows[i].tobytes(), start[i])`` for every row of uint8 [N, width] at once:
    crc = ~(Z^width(~start) ^ XOR_p D_p(byte_p)), with the tables of :func:`_crc_tables`."""
    width = rows.shape[1]
    data, zero = _crc_tables(width)
    reg = ~start.astype(np.uint32)
    acc = (zero[0][reg & 0xFF] ^ zero[1][(reg >> 8) & 0xFF] ^ zero[2][(reg >> 16) & 0xFF]
           ^ zero[3][reg >> 24])
    for p in range(width):
        acc ^= data[p][rows[:, p]]
    return ~acc


def row_checksums(rows: np.ndarray, r0: int, m0: int) -> np.ndarray:
    """uint32 [B, n]: crc32 of row (r0 + b, m0 + i) of ``rows`` [B, n, ...], its bytes as
    stored (little-endian), with initial value (m 2654435761 + r 40503 + 1) mod 2^32, so
    that a row written to another place fails its checksum too.

    zlib's crc32, bit for bit; rows of up to :data:`CRC_BATCH_MAX_BYTES` bytes (the
    measurements) all at once (:func:`_crc32_rows`), wider ones (configurations) a zlib
    call each."""
    a = np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<"))
    B, n = a.shape[:2]
    if B * n == 0:
        return np.empty((B, n), dtype=np.uint32)
    width = a[0, 0].nbytes
    m = np.arange(m0, m0 + n, dtype=np.uint64)[None, :]
    r = np.arange(r0, r0 + B, dtype=np.uint64)[:, None]
    start = ((m * np.uint64(2654435761) + r * np.uint64(40503) + np.uint64(1))
             & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    if width <= CRC_BATCH_MAX_BYTES:
        return _crc32_rows(a.reshape(B * n, -1).view(np.uint8), start.ravel()).reshape(B, n)
    flat, starts = a.reshape(B * n, -1), start.ravel().tolist()
    return np.fromiter((zlib.crc32(row, s) for row, s in zip(flat, starts)),
                       dtype=np.uint32, count=B * n).reshape(B, n)


def checkpoint_checksums(phi: np.ndarray, rng: np.ndarray, trajectory: int, r0: int) -> np.ndarray:
    """uint32 [B, 2]: the crc32 of replica r0 + b's chain position ``phi[b]`` and of its
    stream state ``rng[b]``, each with the initial value of (r0 + b, trajectory), so that a
    slot's data only matches the counter it was written for."""
    return np.stack([row_checksums(phi[:, None], r0, trajectory)[:, 0],
                     row_checksums(rng[:, None], r0, trajectory)[:, 0]], axis=1)


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
        "checkpoint/slot_phi": ((R, SLOTS, L, L), "f8", nan),
        "checkpoint/slot_rng": ((R, SLOTS, CHECKPOINT_WIDTH), "u8", 0),
        "checkpoint/slot_crc": ((R, SLOTS, 2), "u4", 0),
        "checkpoint/slot_trajectory": ((SLOTS,), "i8", -1),
        "checkpoint/trajectory": ((1,), "i8", 0),
        "integrity/rows": ((R, N, len(ROW_DATASETS)), "u4", 0),
        "integrity/configs": ((R, saved), "u4", 0),
        "cost/seconds": ((1,), "f8", 0.0),
        "cost/rank_seconds": ((1,), "f8", 0.0),
        "cost/ranks": ((1,), "i8", 0),
        "cost/segments": ((1,), "i8", 0),
        "cost/device": ((1,), f"S{COST_DEVICE_BYTES}", None),
        "cost/first_trajectory": ((1,), "i8", 0),
    }


def _mark_integrity(f, name: str, start: int):
    """Attributes of a checksum dataset: ``from`` (first index it covers), and for
    ``/integrity/rows`` ``datasets`` (the datasets of its last axis, comma-separated)."""
    f[name].attrs["from"] = start
    if name == "integrity/rows":
        f[name].attrs["datasets"] = ",".join(ROW_DATASETS)


class EnsembleWriter:
    """Collective writer of one ensemble file for the replicas ``block`` of this rank.

    Every method is collective over ``comm``: all ranks call it, in the same order."""

    def __init__(self, path, comm, block: range, io: str):
        self.path, self.comm, self.block, self.io = Path(path), comm, block, io
        self.file = None
        self.slot = None  # the committed checkpoint slot (None: no checkpoint yet)

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
            for name in ("integrity/rows", "integrity/configs"):
                if name in datasets:
                    _mark_integrity(self.file, name, 0)
            self.file.flush()
        self.comm.Barrier()
        kill_point("created")
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
            # checksums cover what is written from now on: measurements from the counter's
            # (thermalization counted off), configurations from the next one to store
            done, _ = progress(self.file)
            m = max(0, done - int(self.file.attrs["thermalization"]))
            every = int(self.file.attrs["save_every"])
            for name, start in (("integrity/rows", m),
                                ("integrity/configs", m // every if every else 0)):
                if name in missing:
                    _mark_integrity(self.file, name, start)
            if "integrity/rows" not in missing:  # a row dataset added to a checksummed file
                for name in set(missing) & set(ROW_DATASETS):
                    self.file["integrity/rows"].attrs["from:" + name] = m
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

    def write_checkpoint(self, phi: np.ndarray, rng: np.ndarray, trajectories: int,
                         cost: dict | None = None):
        """Write this rank's chain positions ``phi`` [B, L, L] and stream states ``rng``
        [B, 6] as the checkpoint after ``trajectories``, atomically (collective).

        They go into the slot that is not the committed one, with their checksums; after a
        flush rank 0 writes the slot's counter, then (:meth:`set_counter`) the cost and the
        commit ``/checkpoint/trajectory``.  A kill at any byte before that last write
        leaves the committed slot untouched and named by the counter."""
        slot = 0 if self.slot is None else 1 - self.slot
        self.write_rows("checkpoint/slot_phi", phi, (slot,))
        kill_point("slot-phi")
        self.write_rows("checkpoint/slot_rng", rng, (slot,))
        kill_point("slot-rng")
        self.write_rows("checkpoint/slot_crc",
                        checkpoint_checksums(phi, rng, trajectories, self.block.start), (slot,))
        self.flush()
        self.comm.Barrier()
        kill_point("slot-crc")
        if self.comm.Get_rank() == 0:
            self.file["checkpoint/slot_trajectory"][slot] = trajectories
        self.flush()
        kill_point("slot-counter")
        self.set_counter(trajectories, cost)
        self.slot = slot
        kill_point("commit")

    def flush(self):
        if self.file is not None:
            self.file.flush()

    # -- reading back a checkpoint ------------------------------------------------------
    def read_rows(self, name: str, index=()) -> np.ndarray:
        """This rank's replicas' rows of dataset ``name``: dataset[block, *index]."""
        if self.io == "mpio":
            return self.file[name][(slice(self.block.start, self.block.stop), *index)]
        full = self.file[name][(slice(None), *index)] if self.comm.Get_rank() == 0 else None
        blocks = self.comm.gather(self.block, root=0)
        parts = [full[b.start:b.stop] for b in blocks] if full is not None else None
        return self.comm.scatter(parts, root=0)

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
        self.comm.Barrier()


def inspect(path, comm) -> dict | None:
    """Rank 0 reads what an existing file is and verifies it (:func:`verify`); broadcast.

    None when there is no file, or when it holds no checkpoint yet (empty, or an HDF5 file
    without a committed counter: a run killed between creating it and its first
    checkpoint, which produced nothing); {"unreadable": reason} for a file that cannot be
    read; else {"fingerprint", "done", "total", "slot" (the committed checkpoint slot, None
    for a file of the single-checkpoint layout), "report" (of :func:`verify`)}."""
    info = None
    path = Path(path)
    if comm.Get_rank() == 0 and path.exists():
        try:
            info = _inspect(path)
        except (OSError, KeyError, ValueError) as e:
            info = {"unreadable": str(e)}
    return comm.bcast(info, root=0)


def _inspect(path: Path) -> dict | None:
    if path.stat().st_size == 0:
        return None
    with h5py.File(path, "r") as f:
        if "checkpoint/trajectory" not in f or "thermalization" not in f.attrs:
            return None
        done, total = progress(f)
        if done <= 0:
            return None
        report = verify(f, path)
        return {"fingerprint": str(f.attrs.get("fingerprint", "")), "done": done,
                "total": total, "slot": report["slot"], "report": report, "attrs": dict(f.attrs)}


def committed_slot(f: h5py.File) -> int | None:
    """The checkpoint slot that the counter names (the one whose own counter equals it);
    None for a file of the single-checkpoint layout (``/checkpoint/phi``) or none found."""
    if "checkpoint/slot_trajectory" not in f:
        return None
    done = int(f["checkpoint/trajectory"][0])
    hits = [s for s, t in enumerate(f["checkpoint/slot_trajectory"][()]) if t == done]
    return hits[0] if hits else None


def read_checkpoint(f: h5py.File, block: range | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(phi [B, L, L], rng [B, 6]) of the committed checkpoint for the replicas ``block``
    (default all), from its slot, or from ``/checkpoint/phi`` and ``/checkpoint/rng`` in a
    file of the single-checkpoint layout (before checkpoint slots existed)."""
    sel = slice(None) if block is None else slice(block.start, block.stop)
    slot = committed_slot(f)
    if slot is not None:
        return f["checkpoint/slot_phi"][sel, slot], f["checkpoint/slot_rng"][sel, slot]
    if "checkpoint/phi" in f:
        return f["checkpoint/phi"][sel], f["checkpoint/rng"][sel]
    raise KeyError(f"no checkpoint slot holds trajectory {int(f['checkpoint/trajectory'][0])} "
                   f"(/checkpoint/slot_trajectory)")


def verify(f: h5py.File, path=None, rows: bool = True, configs: bool = True) -> dict:
    """Check an open ensemble file against its checksums.

    Checked: the committed checkpoint (``/checkpoint/slot_crc``: crc32 of every replica's
    chain position and stream state for the counter), and with ``rows`` every measured row
    of every dataset of :data:`ROW_DATASETS` (``/integrity/rows``), with ``configs`` every
    stored configuration (``/integrity/configs``), from the ``from`` attribute of each on
    (parts written before checksums existed are unverified).

    Returns
    -------
    dict
        ``file``, ``trajectory`` (the counter), ``slot``, ``status``: ``"ok"`` (all checked
        and matching), ``"unverified"`` (nothing wrong found, some parts without checksums:
        ``unverified`` says which) or ``"corrupt"``; ``problems``: one entry per replica and
        dataset, {"replica", "dataset", "first", "last", "count"} (measurement or
        configuration indices that fail; "first" = "last" = None for a checkpoint), and
        ``text`` (one line per problem, naming file, replica and dataset).
    """
    name = str(path if path is not None else f.filename)
    done = int(f["checkpoint/trajectory"][0])
    slot = committed_slot(f)
    problems, unverified = [], []

    def bad(dataset, replica, idx=None):
        idx = np.asarray(idx if idx is not None else [], dtype=np.int64)
        problems.append({"replica": int(replica), "dataset": dataset,
                         "first": int(idx.min()) if idx.size else None,
                         "last": int(idx.max()) if idx.size else None, "count": int(idx.size)})

    if done > 0:
        if slot is not None:
            phi = f["checkpoint/slot_phi"][:, slot]
            rng = f["checkpoint/slot_rng"][:, slot]
            want = checkpoint_checksums(phi, rng, done, 0)
            have = f["checkpoint/slot_crc"][:, slot]
            for r in np.flatnonzero(want[:, 0] != have[:, 0]):
                bad("/checkpoint/slot_phi", r)
            for r in np.flatnonzero(want[:, 1] != have[:, 1]):
                bad("/checkpoint/slot_rng", r)
        elif "checkpoint/phi" in f:  # the single checkpoint of a file from before the slots
            unverified.append("/checkpoint (written before checkpoint checksums)")
        else:
            problems.append({"replica": None, "dataset": "/checkpoint/slot_trajectory",
                             "first": None, "last": None, "count": 0})
    n = max(0, done - int(f.attrs["thermalization"]))
    if rows and n:
        if "integrity/rows" in f:
            start = int(f["integrity/rows"].attrs.get("from", 0))
            if start > 0:
                unverified.append(f"measurements 0..{min(start, n) - 1} (written before checksums)")
            if start < n:
                crcs = f["integrity/rows"][:, start:n]
                attrs = f["integrity/rows"].attrs
                names = str(attrs.get("datasets", ",".join(ROW_DATASETS))).split(",")
                for k, ds in enumerate(names):
                    if ds not in f:
                        continue
                    first = max(start, int(attrs.get("from:" + ds, 0)))  # added later
                    if first > start:
                        unverified.append(f"/{ds} measurements {start}..{min(first, n) - 1} "
                                          f"(written before the dataset existed)")
                    want = row_checksums(f[ds][:, first:n], 0, first)
                    for r in range(want.shape[0]):
                        idx = np.flatnonzero(want[r] != crcs[r, first - start:, k])
                        if idx.size:
                            bad("/" + ds, r, idx + first)
        else:
            unverified.append("/observables, /mc (written before checksums)")
    saved = f["configs"].shape[1] if "configs" in f else 0
    every = int(f.attrs.get("save_every", 0))
    stored = min(saved, n // every) if every else 0
    if configs and stored:
        if "integrity/configs" in f:
            start = int(f["integrity/configs"].attrs.get("from", 0))
            if start > 0:
                unverified.append(f"configurations 0..{min(start, stored) - 1} (written before checksums)")
            for k in range(start, stored):
                want = row_checksums(f["configs"][:, k][:, None], 0, k)[:, 0]
                for r in np.flatnonzero(want != f["integrity/configs"][:, k]):
                    bad("/configs", r, [k])
        else:
            unverified.append("/configs (written before checksums)")
    problems = _merge(problems)
    text = [f"{name}: replica {p['replica']}: {p['dataset']}: " + (
            "checksum mismatch" if p["first"] is None else
            f"{p['count']} row(s) fail their checksum ({_span(p)})") if p["replica"] is not None
            else f"{name}: {p['dataset']}: no checkpoint slot holds trajectory {done}"
            for p in problems]
    status = "corrupt" if problems else ("unverified" if unverified else "ok")
    return {"file": name, "trajectory": done, "slot": slot, "status": status,
            "problems": problems, "unverified": unverified, "text": text}


def _merge(problems):
    """One entry per (replica, dataset): configurations fail one by one."""
    out = {}
    for p in problems:
        key = (p["replica"], p["dataset"])
        if key in out and p["first"] is not None:
            q = out[key]
            q["first"], q["last"] = min(q["first"], p["first"]), max(q["last"], p["last"])
            q["count"] += p["count"]
        else:
            out[key] = dict(p)
    return list(out.values())


def _span(p):
    kind = "configurations" if p["dataset"] == "/configs" else "measurements"
    return f"{kind} {p['first']}" + (f"..{p['last']}" if p["last"] != p["first"] else "")


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
            for k, v in old.attrs.items():  # e.g. the checksums' "from"
                new.attrs[k] = v
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
    integrity: dict | None = None  # the report of :func:`verify` (None: not from a file)
    digest: str | None = None      # :func:`content_digest` of the measured rows

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


def load_ensemble(path, check: bool = True) -> Ensemble:
    """Read the measured rows of an ensemble file, verified against its checksums.

    Every record of :data:`hpcflow.observables.OBSERVABLES` is read; an optional one the
    file lacks (``/observables/Mz`` of older files) is None, and so is an Mz with
    unmeasured (NaN) rows, as left by a run begun before Mz was stored and resumed after.
    ``cost`` is None for files without ``/cost``.

    Parameters
    ----------
    path : str or path-like
        An ensemble file (``hmc.h5``, ``fhmc.h5``, ``coarse.h5`` ...).
    check : bool
        Raise when a measured row or the checkpoint fails its checksum (else the report is
        only returned, in ``integrity``).  Files written before checksums existed load,
        with ``integrity["status"] == "unverified"``.

    Returns
    -------
    Ensemble
        With ``integrity`` (:func:`verify`'s report) and ``digest`` (sha256 of the counter
        and the measured rows as stored: what the analysis cache is keyed on).

    Raises
    ------
    CorruptFileError
        With ``check``: a checksum mismatch, one line per replica and dataset.
    """
    path = Path(path)
    with h5py.File(path, "r") as f:
        n = measured(f)
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        data, digest = {}, hashlib.sha256(f"{progress(f)}".encode())
        for o in OBSERVABLES:
            if o.dataset not in f and not o.required:
                data[o.name] = None
                continue
            raw = f[o.dataset][:, :n]
            digest.update(o.dataset.encode() + np.ascontiguousarray(raw).tobytes())
            a = o.read(raw)
            data[o.name] = None if not o.required and not np.isfinite(a).all() else a
        report = verify(f, path, configs=False)
        if check and report["status"] == "corrupt":
            raise CorruptFileError("\n".join(report["text"]))
        return Ensemble(path, attrs, data, read_cost(f), integrity=report,
                        digest=digest.hexdigest())


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
        report = verify(f, path, rows=False)
        if report["status"] == "corrupt":
            raise CorruptFileError("\n".join(report["text"]))
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
