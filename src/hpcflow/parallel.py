"""The MPI world: replicas -> ranks, rank -> device, one random stream per replica.

Layout (DESIGN.md section 3):

- ``replica_block(n, size, rank)``: rank r owns a contiguous block of the n replicas, the
  first n % size ranks one replica more than the others.
- ``choose_device``: ``auto`` gives ``cuda:(node-local rank % GPUs on the node)`` when CUDA
  is available, else the CPU; the node-local rank comes from an MPI shared-memory split,
  so it is right under mpirun and srun alike.
- :class:`ReplicaStreams`: replica i draws from its own PCG64 stream, seeded by
  ``SeedSequence(seed, spawn_key=(purpose, i))``, so its chain is the same whichever rank
  runs it and however many ranks there are.  The stream state is a fixed-size uint64 row
  per replica, which checkpoints store to resume a chain exactly.
"""

from __future__ import annotations

import os
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI


def replica_block(n_replicas: int, size: int, rank: int) -> range:
    """The contiguous block of replica indices that ``rank`` of ``size`` owns."""
    base, extra = divmod(n_replicas, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


@dataclass
class World:
    """The communicator and where this rank computes."""

    comm: MPI.Comm
    device: torch.device

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def size(self) -> int:
        return self.comm.Get_size()

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def block(self, n_replicas: int) -> range:
        return replica_block(n_replicas, self.size, self.rank)

    def blocks(self, n_replicas: int) -> list[range]:
        return [replica_block(n_replicas, self.size, r) for r in range(self.size)]

    def idle_barrier(self, poll: float = 0.05):
        """A barrier that sleeps while it waits: ranks waiting for rank 0's serial work
        (analysis, pilot tau_int) leave their cores to it instead of busy-polling MPI."""
        request = self.comm.Ibarrier()
        while not request.Test():
            time.sleep(poll)


def local_rank(comm: MPI.Comm) -> int:
    """Rank within the node (processes sharing memory)."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_rank()
    finally:
        node.Free()


def choose_device(setting: str, comm: MPI.Comm) -> torch.device:
    """auto | cpu | cuda -> the torch device of this rank."""
    if setting == "cpu":
        return torch.device("cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("[run] device = cuda, but torch sees no CUDA device on this node")
    if setting in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank(comm) % torch.cuda.device_count()}")
    return torch.device("cpu")


def make_world(device: str = "auto", threads: int = 0, comm: MPI.Comm | None = None) -> World:
    """The world of ``comm`` (default COMM_WORLD); threads = 0 takes $OMP_NUM_THREADS or 1."""
    comm = MPI.COMM_WORLD if comm is None else comm
    if threads == 0:
        env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(env) if env.isdigit() and int(env) > 0 else 1
    torch.set_num_threads(threads)
    return World(comm, choose_device(device, comm))


def purpose_key(purpose: str) -> int:
    """A stable integer for a stream's purpose ('hmc', 'fhmc', ...)."""
    return zlib.crc32(purpose.encode())


class ReplicaStreams:
    """Independent random streams for replicas ``indices`` of a run, one PCG64 each."""

    STATE_WIDTH = 6  # state (hi, lo), inc (hi, lo), has_uint32, uinteger

    def __init__(self, seed: int, indices, purpose: str):
        self.indices = list(indices)
        key = purpose_key(purpose)
        self.generators = [
            np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(key, i))))
            for i in self.indices
        ]

    def __len__(self):
        return len(self.generators)

    def normal(self, shape, device) -> torch.Tensor:
        """One standard-normal array of ``shape`` per replica: [B, *shape], float64."""
        out = np.empty((len(self), *shape))
        for g, row in zip(self.generators, out):
            g.standard_normal(out=row)
        return torch.from_numpy(out).to(device)

    def log_uniform(self, device) -> torch.Tensor:
        """log u with u uniform in (0, 1], one per replica: [B]."""
        u = np.array([1.0 - g.random() for g in self.generators])
        return torch.from_numpy(np.log(u)).to(device)

    def get_state(self) -> np.ndarray:
        """uint64 [B, 6]: the exact state of every stream."""
        rows = []
        for g in self.generators:
            s = g.bit_generator.state
            st, inc = s["state"]["state"], s["state"]["inc"]
            rows.append([st >> 64, st & (2**64 - 1), inc >> 64, inc & (2**64 - 1),
                         s["has_uint32"], s["uinteger"]])
        return np.array(rows, dtype=np.uint64).reshape(len(self), self.STATE_WIDTH)

    def set_state(self, rows: np.ndarray):
        for g, r in zip(self.generators, np.asarray(rows, dtype=np.uint64)):
            r = [int(v) for v in r]
            g.bit_generator.state = {
                "bit_generator": "PCG64",
                "state": {"state": (r[0] << 64) | r[1], "inc": (r[2] << 64) | r[3]},
                "has_uint32": r[4], "uinteger": r[5],
            }
