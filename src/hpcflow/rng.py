"""Random streams: one per replica, spawned from the run seed (MPI-free).

Every random number hpcflow draws comes from a numpy PCG64 generator seeded by
``SeedSequence(seed, spawn_key=key)``, with ``key`` naming what the numbers are for:

- replica i of a production stage: ``(purpose_key(stage), i)``, so its chain is the same
  whichever rank runs it and however many ranks there are (:class:`ReplicaStreams`);
- training: ``(purpose_key("train"), rank, iteration of the last checkpoint)``;
- flow-acceptance proposals: ``(purpose_key("metropolis"), purpose_key(tag), rank)``.

A stream's exact state is a fixed-size row of :data:`STATE_WIDTH` uint64 numbers, which
checkpoints store (``/checkpoint/slot_rng``) to resume a chain exactly.

``replica_block`` is the layout of replicas over ranks (DESIGN.md section 3): rank r of
``size`` owns a contiguous block, the first n % size ranks one replica more.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

#: uint64 numbers per stream state: state (hi, lo), inc (hi, lo), has_uint32, uinteger.
STATE_WIDTH = 6


def purpose_key(purpose: str) -> int:
    """A stable integer for a stream's purpose ('hmc', 'fhmc', ...): crc32 of its name."""
    return zlib.crc32(purpose.encode())


def generator(seed: int, *spawn_key: int) -> np.random.Generator:
    """The numpy generator ``PCG64(SeedSequence(seed, spawn_key=spawn_key))``.

    Parameters
    ----------
    seed : int
        The run seed.
    *spawn_key : int
        What the stream is for (:func:`purpose_key` of a name, replica index, rank ...).
    """
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=spawn_key)))


def replica_block(n_replicas: int, size: int, rank: int) -> range:
    """The contiguous block of replica indices that ``rank`` of ``size`` owns."""
    base, extra = divmod(n_replicas, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


class ReplicaStreams:
    """Independent random streams for replicas ``indices`` of a run, one PCG64 each.

    Replica i draws from ``generator(seed, purpose_key(purpose), i)``.

    Parameters
    ----------
    seed : int
        The run seed.
    indices : iterable of int
        The replicas whose streams this object holds (a rank's block, or all of them).
    purpose : str
        What the streams are for; each stage of a run has its own (``"hmc"``, ``"fhmc"`` ...).

    Examples
    --------
    >>> streams = ReplicaStreams(1234, range(4), "hmc")
    >>> pi = streams.normal((8, 8), "cpu")      # [4, 8, 8] momenta, one row per replica
    >>> log_u = streams.log_uniform("cpu")      # [4] Metropolis numbers
    """

    STATE_WIDTH = STATE_WIDTH

    def __init__(self, seed: int, indices, purpose: str):
        self.indices = list(indices)
        key = purpose_key(purpose)
        self.generators = [generator(seed, key, i) for i in self.indices]

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
        """uint64 [B, STATE_WIDTH]: the exact state of every stream."""
        rows = []
        for g in self.generators:
            s = g.bit_generator.state
            st, inc = s["state"]["state"], s["state"]["inc"]
            rows.append([st >> 64, st & (2**64 - 1), inc >> 64, inc & (2**64 - 1),
                         s["has_uint32"], s["uinteger"]])
        return np.array(rows, dtype=np.uint64).reshape(len(self), STATE_WIDTH)

    def set_state(self, rows: np.ndarray):
        """Restore the states :meth:`get_state` returned."""
        for g, r in zip(self.generators, np.asarray(rows, dtype=np.uint64)):
            r = [int(v) for v in r]
            g.bit_generator.state = {
                "bit_generator": "PCG64",
                "state": {"state": (r[0] << 64) | r[1], "inc": (r[2] << 64) | r[3]},
                "has_uint32": r[4], "uinteger": r[5],
            }
