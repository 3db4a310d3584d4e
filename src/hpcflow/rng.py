"""Random streams: one per replica, spawned from the run seed (MPI-free).

Every random number hpcflow draws comes from a numpy PCG64 generator seeded by
``SeedSequence(seed, spawn_key=key)``, with ``key`` naming what the numbers are for:

- replica i of a production stage: ``(purpose_key(stage), i)``, so its chain is the same
  whichever rank runs it and however many ranks there are (:class:`ReplicaStreams`);
- training: ``(purpose_key("train"), rank, iteration of the last checkpoint)``;
- flow-acceptance proposals: ``(purpose_key("metropolis"), purpose_key(tag), rank)``.

A stream's exact state is a fixed-size row of :data:`STATE_WIDTH` uint64 numbers, which
checkpoints store (``/checkpoint/slot_rng``) to resume a chain exactly.

A production's chains draw from one of two generators (``[run] rng``, :data:`GENERATORS`):

- ``pcg64`` (the default): numpy PCG64 on the host, normals by numpy's ziggurat, copied to
  the device every trajectory (:class:`ReplicaStreams`);
- ``philox``: the counter-based Philox4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel
  random numbers: as easy as 1, 2, 3", SC11), evaluated as torch integer operations on the
  chains' device, normals by Box-Muller (:class:`PhiloxStreams`).  A replica's stream is
  keyed by the same SeedSequence; its state is one 64-bit block counter.  On a GPU the
  momenta then never cross the bus.  On the development CPU (results/bench-cpu.json,
  ``compiled.philox``) compiled Philox took 9.5-11.1 ns per normal against PCG64's
  10.6-14.6 at B >= 64 chains, but 105 ns at B = 1 (call overhead); eager it is slower.

``replica_block`` is the layout of replicas over ranks (DESIGN.md section 3): rank r of
``size`` owns a contiguous block, the first n % size ranks one replica more.
"""

from __future__ import annotations

import math
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


#: The generators ``[run] rng`` chooses between.
GENERATORS = ("pcg64", "philox")


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

    def momenta(self, shape, device) -> tuple[torch.Tensor, torch.Tensor]:
        """One HMC trajectory's numbers: ``(normal(shape), log_uniform())``."""
        return self.normal(shape, device), self.log_uniform(device)

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


# ---------------------------------------------------------------------------------------
# Philox4x32-10 as torch integer operations

#: Philox4x32 multipliers and Weyl key increments (Salmon et al. 2011, Random123).
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF

#: Column 3 of a Philox state row: tells its rows from PCG64 ones (crc32 of the name).
PHILOX_TAG = zlib.crc32(b"philox4x32-10/box-muller-53")

#: A draw of n numbers per replica uses blocks for a multiple of ``PAD_NUMBERS`` (one
#: Philox block gives four 32-bit words = two 53-bit uniforms = two normals).  The padding
#: keeps every row a whole number of SIMD vectors: a CPU kernel evaluates log, sin and cos
#: in its vector body and a scalar tail, which can round differently, so without it a
#: replica's normals would depend on how many replicas share its rank.
PAD_NUMBERS = 64
#: The Metropolis draw (one number per replica) is padded to 16 numbers only: two AVX-512
#: vectors of float64, the step of ATen's and inductor's vector loops on these machines.
PAD_LOG_UNIFORM = 16


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of m * x for a 32-bit constant m and int64 tensor x of 32-bit
    words, without overflow: x = x_hi 2^16 + x_lo, both partial products below 2^48."""
    p_hi, p_lo = m * (x >> 16), m * (x & 0xFFFF)
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = PHILOX_ROUNDS):
    """The Philox4x32 bijection of the counter (c0, c1, c2, c3) under key (k0, k1).

    All arguments are int64 tensors (or ints) holding 32-bit words; they broadcast.  Round:
    ``(c0, c1, c2, c3) -> (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0))``,
    the key bumped by the Weyl increments before every round but the first.  Checked
    against Random123's known-answer vectors (tests/test_rng.py).
    """
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & _MASK32, (k1 + PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo(PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo(PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_uniforms(counter: torch.Tensor, key: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Uniforms in [0, 1), multiples of 2^-53: [B, 2 n_blocks], two per block.

    Row b uses blocks ``counter[b] + j``, j < n_blocks (a 64-bit block number in counter
    words 0 and 1; words 2 and 3 zero) under ``key[b] = (k0, k1)``; block j's words
    (x0, x1, x2, x3) give u_j = (2^26 (x0 >> 5) + (x1 >> 6)) 2^-53 and u_{n_blocks + j} the
    same of (x2, x3) (halves, not interleaved: inductor vectorises a concatenation, not an
    interleave, which ran twice as slow).
    """
    c = counter[:, None] + torch.arange(n_blocks, device=counter.device)
    zero = torch.zeros_like(c)
    x0, x1, x2, x3 = philox4x32(c & _MASK32, c >> 32, zero, zero, key[:, 0:1], key[:, 1:2])
    u = torch.cat(((x0 >> 5) * 67108864 + (x1 >> 6), (x2 >> 5) * 67108864 + (x3 >> 6)), -1)
    return u.to(torch.float64) * 2.0 ** -53


def philox_normals(counter: torch.Tensor, key: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Standard normals [B, 2 n_blocks] by Box-Muller on :func:`philox_uniforms` u:
    with u1, u2 its two halves, ``r = sqrt(-2 log(1 - u1))`` and the normals
    ``(r cos 2 pi u2, r sin 2 pi u2)``, again as halves (1 - u1 is in (0, 1], exact)."""
    u = philox_uniforms(counter, key, n_blocks)
    r = torch.sqrt(-2.0 * torch.log(1.0 - u[:, :n_blocks]))
    theta = (2.0 * math.pi) * u[:, n_blocks:]
    return torch.cat((r * torch.cos(theta), r * torch.sin(theta)), -1)


def philox_log_uniforms(counter: torch.Tensor, key: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """log(1 - u) of :func:`philox_uniforms`, [B, 2 n_blocks] (u in [0, 1): 1 - u in (0, 1])."""
    return torch.log(1.0 - philox_uniforms(counter, key, n_blocks))


def philox_momenta(counter: torch.Tensor, key: torch.Tensor, n_blocks: int, n_log_blocks: int):
    """:func:`philox_normals` of ``n_blocks`` blocks and :func:`philox_log_uniforms` of the
    next ``n_log_blocks``, in one graph (one compiled call per trajectory)."""
    return (philox_normals(counter, key, n_blocks),
            philox_log_uniforms(counter + n_blocks, key, n_log_blocks))


def philox_key(seed: int, *spawn_key: int) -> tuple[int, int]:
    """The Philox key (k0, k1) of a stream: two 32-bit words of
    ``SeedSequence(seed, spawn_key=spawn_key)``, the entropy the PCG64 stream of the same
    replica is seeded from."""
    k0, k1 = np.random.SeedSequence(seed, spawn_key=spawn_key).generate_state(2, np.uint32)
    return int(k0), int(k1)


def _blocks(n_numbers: int, pad: int = PAD_NUMBERS) -> int:
    """Philox blocks for ``n_numbers`` per replica, padded to a multiple of ``pad``."""
    return -(-max(n_numbers, 1) // pad) * pad // 2


class PhiloxStreams:
    """Counter-based streams for replicas ``indices``: Philox4x32-10 on the device.

    Replica i's key is :func:`philox_key` ``(seed, purpose_key(purpose), i)``; its state is
    the number of blocks it has used.  A draw of n numbers per replica uses the next
    ``ceil(n / 64) * 32`` blocks (:data:`PAD_NUMBERS`), the same whichever rank holds the
    replica and however many replicas share the rank, so a chain does not depend on the
    rank count.  Normals by Box-Muller (:func:`philox_normals`); the Metropolis number is
    log(1 - u) of the first uniform of an 8-block draw (:meth:`log_uniform`,
    :data:`PAD_LOG_UNIFORM`).

    The same interface as :class:`ReplicaStreams`; the numbers are other numbers.

    Parameters
    ----------
    seed, indices, purpose
        As for :class:`ReplicaStreams`.
    device : torch device
        Where the counters live and the numbers are made.
    compiled : bool
        Draw through ``torch.compile`` (one graph per draw shape; see :meth:`compile`).

    Examples
    --------
    >>> streams = PhiloxStreams(1234, range(4), "hmc")
    >>> pi = streams.normal((8, 8), "cpu")      # [4, 8, 8]
    >>> [int(c) for c in streams.get_state()[:, 0]]   # 64 normals: 32 blocks each
    [32, 32, 32, 32]
    """

    STATE_WIDTH = STATE_WIDTH

    def __init__(self, seed: int, indices, purpose: str, device="cpu", compiled: bool = False):
        self.indices = list(indices)
        self.seed, self.purpose = seed, purpose
        key = purpose_key(purpose)
        self.device = torch.device(device)
        self.key = torch.tensor([philox_key(seed, key, i) for i in self.indices],
                                dtype=torch.int64, device=self.device).reshape(len(self.indices), 2)
        self.counter = torch.zeros(len(self.indices), dtype=torch.int64, device=self.device)
        self._normals, self._log_uniforms = philox_normals, philox_log_uniforms
        self._momenta = philox_momenta
        if compiled:
            self.compile()

    def __len__(self):
        return len(self.indices)

    def compile(self) -> None:
        """Draw through ``torch.compile`` (inductor, :func:`hpcflow.fused.compile_graph`:
        once compiled, called without dynamo's per-call overhead); raises what compilation
        raises."""
        from .fused import compile_graph

        self._normals = compile_graph(philox_normals)
        self._log_uniforms = compile_graph(philox_log_uniforms)
        self._momenta = compile_graph(philox_momenta)

    def warm_up(self, shape, draws=("momenta",)) -> None:
        """Compile (when compiled) the ``draws`` (of ``"momenta"``, ``"normal"``,
        ``"log_uniform"``) for ``shape`` now, on this stream's keys, without using any of
        its numbers; a draw not warmed up compiles at its first call.  A production calls
        :meth:`momenta` every trajectory and :meth:`normal` only for a hot start."""
        nb, nl = _blocks(math.prod(shape)), _blocks(1, PAD_LOG_UNIFORM)
        calls = {"momenta": lambda: self._momenta(self.counter, self.key, nb, nl),
                 "normal": lambda: self._normals(self.counter, self.key, nb),
                 "log_uniform": lambda: self._log_uniforms(self.counter, self.key, nl)}
        for draw in draws:
            calls[draw]()

    def _to(self, t: torch.Tensor, device) -> torch.Tensor:
        return t if device is None or torch.device(device) == self.device else t.to(device)

    def _shaped(self, z: torch.Tensor, shape, device) -> torch.Tensor:
        """The first prod(shape) numbers of every row of a padded draw as [B, *shape]."""
        n = math.prod(shape)
        return self._to(z[:, :n].reshape(len(self), *shape).contiguous(), device)

    def normal(self, shape, device=None) -> torch.Tensor:
        """One standard-normal array of ``shape`` per replica: [B, *shape], float64."""
        nb = _blocks(math.prod(shape))
        z = self._normals(self.counter, self.key, nb)
        self.counter = self.counter + nb
        return self._shaped(z, shape, device)

    def log_uniform(self, device=None) -> torch.Tensor:
        """log u with u uniform in (0, 1], one per replica: [B]."""
        nb = _blocks(1, PAD_LOG_UNIFORM)
        out = self._log_uniforms(self.counter, self.key, nb)[:, 0].contiguous()
        self.counter = self.counter + nb
        return self._to(out, device)

    def momenta(self, shape, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One HMC trajectory's numbers, ``(normal(shape), log_uniform())`` - the same
        blocks, in one call (:func:`philox_momenta`)."""
        nb, nl = _blocks(math.prod(shape)), _blocks(1, PAD_LOG_UNIFORM)
        z, log_u = self._momenta(self.counter, self.key, nb, nl)
        self.counter = self.counter + (nb + nl)
        return self._shaped(z, shape, device), self._to(log_u[:, 0].contiguous(), device)

    def get_state(self) -> np.ndarray:
        """uint64 [B, STATE_WIDTH]: block counter, k0, k1, :data:`PHILOX_TAG`, 0, 0."""
        rows = np.zeros((len(self), STATE_WIDTH), dtype=np.uint64)
        rows[:, 0] = self.counter.cpu().numpy()
        rows[:, 1:3] = self.key.cpu().numpy()
        rows[:, 3] = PHILOX_TAG
        return rows

    def set_state(self, rows: np.ndarray):
        """Restore the states :meth:`get_state` returned.

        Raises
        ------
        ValueError
            Rows that are not Philox states of these replicas' streams (another generator,
            seed or purpose).
        """
        rows = np.asarray(rows, dtype=np.uint64).reshape(len(self), STATE_WIDTH)
        if (rows[:, 3] != PHILOX_TAG).any() or (rows[:, 1:3] != self.key.cpu().numpy()).any():
            raise ValueError("the stored random states are not Philox streams of this run's "
                             f"seed {self.seed} and purpose {self.purpose!r} (another [run] rng?)")
        self.counter = torch.from_numpy(rows[:, 0].astype(np.int64)).to(self.device)


def streams(generator: str, seed: int, indices, purpose: str, device="cpu",
            compiled: bool = False):
    """The replicas' streams of ``[run] rng`` = ``generator`` (:data:`GENERATORS`)."""
    if generator == "pcg64":
        return ReplicaStreams(seed, indices, purpose)
    if generator == "philox":
        return PhiloxStreams(seed, indices, purpose, device, compiled)
    raise ValueError(f"rng must be one of {GENERATORS}, got {generator!r}")
