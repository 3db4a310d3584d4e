"""The MPI world: replicas -> ranks, rank -> device.

Layout (DESIGN.md section 3):

- ``replica_block(n, size, rank)`` (:mod:`hpcflow.rng`): rank r owns a contiguous block of
  the n replicas, the first n % size ranks one replica more than the others.
- ``choose_device``: ``auto`` gives ``cuda:(node-local rank % GPUs on the node)`` when CUDA
  is available, else the CPU; the node-local rank comes from an MPI shared-memory split,
  so it is right under mpirun and srun alike.
- replica i draws from its own random stream (:class:`hpcflow.rng.ReplicaStreams`, MPI-free,
  re-exported here), so its chain is the same whichever rank runs it.

This module and the drivers that use it (run, production, the train and coarse stages)
are the only ones that need MPI; the library layer imports without it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from mpi4py import MPI

from .rng import ReplicaStreams, purpose_key, replica_block  # noqa: F401 (re-exported)


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
    """The world of ``comm`` (default COMM_WORLD); threads = 0 takes $OMP_NUM_THREADS or 1.
    Tunes the C allocator (:func:`hpcflow.allocator.tune`)."""
    from .allocator import tune

    tune()
    comm = MPI.COMM_WORLD if comm is None else comm
    if threads == 0:
        env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(env) if env.isdigit() and int(env) > 0 else 1
    torch.set_num_threads(threads)
    return World(comm, choose_device(device, comm))
