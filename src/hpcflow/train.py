"""Reverse-KL training of a flow: the :class:`Trainer` loop, flow acceptance, flow files,
and the data-parallel MPI train stage around them.

Loss (PHYSICS.md section 5; prior r, target p = exp(-S)/Z, generator g, model
p_g(phi) = r(z) |det dg/dz|^-1 at phi = g(z)):

    loss = E_{z ~ r} [ S(g(z)) - log|det dg/dz|(z) + log r(z) ] = KL(p_g || p) - log Z,

estimated on a minibatch.  For a prior known only up to a constant (a coarse phi^4
ensemble) the loss is shifted by that constant; the gradient is not.  The optimizer is
Adam with, by default, the authors' settings: lr 0.01 annealed to 0 by a cosine over the
iterations, fresh prior batches of 500 (``[train]``).

:class:`Trainer` is the plain loop (no MPI, no files): one optimizer step per batch of
fresh prior samples, a per-iteration record passed to callbacks.  The train stage
(:func:`train`, run by ``python -m hpcflow.run``) wraps it, data parallel: each rank draws
its own share of the ``batch_size`` samples from its own stream; a gradient hook sums the
gradients of the global mean loss with one MPI allreduce, so every rank takes the same
Adam step and holds identical weights.  This module imports no MPI itself: the stage uses
the communicator of the ``world`` it is given.

Quality measures, per iteration on the training batch and at ``eval_every`` iterations on
``metropolis`` fresh proposals:

- log weights  log w = -S(phi) - log p_g(phi) = -[S(phi) - log|det dg/dz| + log r(z)];
- effective sample size  ESS = (sum w)^2 / (N sum w^2), in (0, 1];
- flow Metropolis acceptance: an independence Metropolis chain over the proposals in
  their order, accepting phi' over phi with min(1, w'/w).

The flow file (``torch.save``) holds everything needed to rebuild and judge the flow:
the architecture spec, the weights, the theory, prior and training settings, the training
history, and while training is unfinished the optimizer state for resumption.  It is
replaced atomically at every checkpoint (written beside it as ``flow.pt.tmp``, then
renamed onto it), and carries a ``checksum`` (:func:`payload_digest`) that every read
verifies; files without one (written before it existed) are read unverified.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .errors import StageError, Stopped
from .flows import FAMILY, Flow, FlowFamilyError
from .log import logger
from .rng import generator, purpose_key, replica_block
from .signals import StopPoll
from .signals import name as signal_name
from .store import fingerprint, kill_point
from .stages import HISTORY_FILE, identity, identity_diff

FORMAT = "hpcflow-flow-2"
OLD_FORMATS = {"hpcflow-flow-1": "hpcflow 0.1 (couplings applied phi -> phi~, convolutions with bias, "
                                    "a Gaussian prior of hand-set width)"}
HISTORY_KEYS = ("iteration", "loss", "acceptance", "ess", "seconds")


# ---------------------------------------------------------------------------------------
# Weights, ESS, acceptance


def log_weights(flow, prior, target, n, rng, device) -> tuple[torch.Tensor, torch.Tensor]:
    """n proposals phi = g(z), z ~ r: returns (loss integrand [n], phi [n, L, L]).

    The integrand is S(phi) - log|det dg/dz| + log r(z) = -log w."""
    z, log_r = prior.sample(n, rng, device)
    phi, logdet = flow.inverse(z)
    return target.action(phi) - logdet + log_r, phi


def ess(log_w: np.ndarray) -> float:
    """Normalized effective sample size (sum w)^2 / (N sum w^2)."""
    lw = log_w - log_w.max()
    w = np.exp(lw)
    return float(w.sum() ** 2 / (len(w) * (w * w).sum()))


def metropolis_acceptance(log_w: np.ndarray, rng: np.random.Generator) -> float:
    """Acceptance of an independence Metropolis chain over proposals with log weights log_w."""
    if len(log_w) < 2:
        return float("nan")
    log_u = np.log(1.0 - rng.random(len(log_w) - 1))
    current, accepted = log_w[0], 0
    for lw, lu in zip(log_w[1:], log_u):
        if lu < lw - current:
            current, accepted = lw, accepted + 1
    return accepted / (len(log_w) - 1)


def fresh_log_weights(flow, prior, target, indices: range, rng, device, batch=1024) -> torch.Tensor:
    """log w of the fresh proposals ``indices`` of the prior (``prior.fresh``: for a coarse
    prior, held-out configurations never trained on), in chunks of ``batch``."""
    chunks = []
    with torch.no_grad():
        for start in range(0, len(indices), batch):
            m = min(batch, len(indices) - start)
            phi_t, log_r = prior.fresh(m, indices.start + start, rng, device)
            phi, logdet_inv = flow.inverse(phi_t)
            chunks.append(-(target.action(phi) - logdet_inv + log_r))
    return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.float64)


def acceptance_summary(log_w: np.ndarray, rng: np.random.Generator) -> dict:
    """{"acceptance", "ess", "proposals"} of proposals with log weights ``log_w``."""
    return {"acceptance": metropolis_acceptance(log_w, rng), "ess": ess(log_w),
            "proposals": len(log_w)}


def _gather_log_w(world, local: torch.Tensor) -> np.ndarray | None:
    parts = world.comm.gather(local.detach().cpu().numpy(), root=0)
    return np.concatenate(parts) if world.is_root else None


def measure_acceptance(world, flow, prior, target, n, seed, tag, batch=1024) -> dict:
    """Flow Metropolis acceptance and ESS from n fresh proposals (spread over ranks).

    Proposals come from ``prior.fresh``: for a coarse prior, held-out configurations never
    trained on, each used once (so n is capped by the prior's ``capacity``)."""
    n = int(min(n, prior.capacity))
    block = replica_block(n, world.size, world.rank)
    rng = generator(seed, purpose_key("metropolis"), purpose_key(tag), world.rank)
    local = fresh_log_weights(flow, prior, target, block, rng, world.device, batch)
    log_w = _gather_log_w(world, local)
    result = None
    if world.is_root:
        result = acceptance_summary(log_w, rng)
    return world.comm.bcast(result, root=0)


# ---------------------------------------------------------------------------------------
# The training loop


def _scheduler(optimizer, schedule: str, iterations: int):
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations, eta_min=0.0)
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    raise ValueError(f"unknown schedule {schedule!r} (cosine or constant)")


def make_scheduler(optimizer, t):
    """The learning-rate schedule of ``[train] schedule``: ``cosine`` anneals lr to 0 over
    ``iterations`` steps (lr_k = lr (1 + cos(pi k / iterations)) / 2, as the authors train),
    ``constant`` keeps it.  ``t`` is anything with ``schedule`` and ``iterations``."""
    return _scheduler(optimizer, t.schedule, t.iterations)


class Trainer:
    """Reverse-KL training of a flow from a prior: a plain loop over batches.

    Each :meth:`step` draws fresh prior samples z ~ r, maps them with the generator
    phi = g(z) (``flow.inverse``) and takes one optimizer step on the loss
    mean[S(phi) - log|det dg/dz| + log r(z)] = KL(p_g || p) - log Z.  No MPI, no files: the
    data-parallel train stage of ``python -m hpcflow.run`` wraps this class with its
    gradient allreduce (``grad_hook``), its checkpoints and its history file.

    Parameters
    ----------
    flow : torch.nn.Module
        The flow to train (changed in place), with ``inverse(z) -> (phi, log|det dg/dz|)``,
        e.g. :class:`hpcflow.Flow`.
    prior : object
        ``sample(n, rng, device) -> (z, log_r)``, e.g. :class:`hpcflow.GaussianPrior`.
    target : object
        The target action, ``action(phi) -> [n]``, e.g. :class:`hpcflow.Phi4Action`.
    optimizer : torch.optim.Optimizer, optional
        Default: Adam over the flow's parameters with learning rate ``lr``.
    scheduler : optional
        A learning-rate scheduler stepped after every optimizer step.  Default: with
        ``iterations`` given, ``schedule`` over that many steps; else none.
    lr : float
        Learning rate of the default optimizer (0.01, the authors').
    iterations : int, optional
        Length of the default schedule.
    schedule : str
        ``"cosine"`` (lr annealed to 0 over ``iterations``, the authors') or ``"constant"``.
    batch_size : int
        Prior samples per step (500, the authors').
    grad_hook : callable, optional
        Called as ``grad_hook(parameters)`` after the backward pass, before the optimizer
        step (the MPI stage sums the gradients over ranks here).
    callbacks : sequence of callables
        Each is called with the record of every iteration (:meth:`record`).

    Examples
    --------
    >>> flow = Flow(8)
    >>> trainer = Trainer(flow, GaussianPrior(8), Phi4Action(0.2, 0.0), iterations=300,
    ...                   batch_size=256)
    >>> history = trainer.train(300, seed=1)
    >>> history["acceptance"][-1]          # flow Metropolis acceptance on the last batch
    """

    def __init__(self, flow, prior, target, optimizer=None, scheduler=None, *, lr: float = 0.01,
                 iterations: int | None = None, schedule: str = "cosine", batch_size: int = 500,
                 grad_hook=None, callbacks=()):
        self.flow, self.prior, self.target = flow, prior, target
        self.params = list(flow.parameters())
        self.optimizer = optimizer if optimizer is not None else torch.optim.Adam(self.params, lr=lr)
        if scheduler is None and iterations is not None:
            scheduler = _scheduler(self.optimizer, schedule, iterations)
        self.scheduler = scheduler
        self.batch_size = batch_size
        self.grad_hook = grad_hook
        self.callbacks = list(callbacks)
        self.iteration = 0
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self._rng = None

    def step(self, rng: np.random.Generator, n: int | None = None,
             normalisation: float | None = None) -> torch.Tensor:
        """One optimizer step on ``n`` fresh prior samples drawn from ``rng``.

        Parameters
        ----------
        rng : numpy.random.Generator
            The stream the prior draws from.
        n : int, optional
            Samples (default ``batch_size``).
        normalisation : float, optional
            The loss is sum(integrand) / normalisation (default n); the MPI stage passes
            the global batch size, so that the summed gradients are those of the global mean.

        Returns
        -------
        torch.Tensor
            [n] the loss integrand -log w of the samples (detached).
        """
        n = self.batch_size if n is None else n
        self.optimizer.zero_grad(set_to_none=False)
        integrand, _ = log_weights(self.flow, self.prior, self.target, n, rng, self.device)
        (integrand.sum() / (n if normalisation is None else normalisation)).backward()
        if self.grad_hook is not None:
            self.grad_hook(self.params)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.iteration += 1
        return integrand.detach()

    def record(self, log_w: np.ndarray, rng: np.random.Generator, t0: float) -> dict:
        """The record of the iteration just done, passed to every callback.

        Parameters
        ----------
        log_w : numpy.ndarray
            Log weights of the iteration's batch (all ranks' for the MPI stage).
        rng : numpy.random.Generator
            Draws the uniforms of the batch's independence Metropolis chain.
        t0 : float
            ``time.perf_counter()`` at the start of training.

        Returns
        -------
        dict
            ``iteration`` (steps done), ``loss`` (mean -log w), ``acceptance`` (flow
            Metropolis acceptance on the batch), ``ess``, ``seconds`` since ``t0``.
        """
        acceptance = metropolis_acceptance(log_w, rng)
        rec = {"iteration": self.iteration, "loss": float(-log_w.mean()), "acceptance": acceptance,
               "ess": ess(log_w), "seconds": time.perf_counter() - t0}
        for callback in self.callbacks:
            callback(rec)
        return rec

    def evaluate(self, n: int, rng: np.random.Generator, batch: int = 1024) -> dict:
        """Flow Metropolis acceptance and ESS on ``n`` fresh proposals (``prior.fresh``;
        at most the prior's ``capacity``): {"acceptance", "ess", "proposals"}."""
        n = int(min(n, getattr(self.prior, "capacity", n)))
        self.flow.eval()
        log_w = fresh_log_weights(self.flow, self.prior, self.target, range(n), rng,
                                  self.device, batch)
        return acceptance_summary(log_w.cpu().numpy(), rng)

    def train(self, iterations: int, seed: int | None = None,
              rng: np.random.Generator | None = None, callbacks=()) -> dict[str, list]:
        """Take ``iterations`` steps; return the history of their records.

        Parameters
        ----------
        iterations : int
            Optimizer steps.
        seed : int, optional
            Starts a new stream, as the train stage's rank 0 at iteration 0 with this run
            seed.  Without ``seed`` (and ``rng``) the trainer's stream continues where the
            last call left it (seed 0 at the first call).
        rng : numpy.random.Generator, optional
            A stream of the caller's to draw the prior samples and Metropolis numbers from.
        callbacks : sequence of callables
            Called with every record, after the trainer's own callbacks.

        Returns
        -------
        dict
            {key: list over iterations} for the keys of :meth:`record`.
        """
        if rng is None:
            if seed is not None or self._rng is None:
                self._rng = generator(0 if seed is None else seed, purpose_key("train"), 0, 0)
            rng = self._rng
        history = {k: [] for k in HISTORY_KEYS}
        t0 = time.perf_counter()
        self.flow.train()
        for _ in range(iterations):
            integrand = self.step(rng)
            rec = self.record(-integrand.cpu().numpy(), rng, t0)
            for callback in callbacks:
                callback(rec)
            for k in HISTORY_KEYS:
                history[k].append(rec[k])
        return history


def allreduce_hook(world):
    """The gradient hook of the data-parallel stage: the sum over ranks of every
    parameter's gradient, by one MPI Allreduce of the flattened gradients."""

    def hook(params):
        grads = _flat_grads(params)
        world.comm.Allreduce(grads.copy(), grads)  # sum over ranks: gradient of the global mean
        _set_grads(params, grads, world.device)

    return hook


def _flat_grads(params) -> np.ndarray:
    return np.concatenate([(p.grad if p.grad is not None else torch.zeros_like(p))
                           .detach().cpu().numpy().ravel() for p in params])


def _set_grads(params, flat: np.ndarray, device):
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = torch.from_numpy(flat[offset:offset + n].reshape(p.shape).copy()).to(device)
        offset += n


def _broadcast_weights(world, flow):
    state = world.comm.bcast({k: v.cpu() for k, v in flow.state_dict().items()} if world.is_root else None)
    flow.load_state_dict(state)


# ---------------------------------------------------------------------------------------
# Flow files


def flow_fingerprint(cfg) -> str:
    return fingerprint({"L": cfg.theory.L, "beta": cfg.theory.beta, "lambda": cfg.theory.lam,
                        "seed": cfg.run.seed, "flow": dataclasses.asdict(cfg.flow) | {"file": ""},
                        "train": dataclasses.asdict(cfg.train),
                        "coarse": (dataclasses.asdict(cfg.coarse)
                                   if cfg.flow.prior.startswith("coarse") else None)})


def payload_digest(payload: dict) -> str:
    """sha256 over a flow file's payload, its ``checksum`` key left out: every tensor by
    dtype, shape and bytes, dicts in key order, other values by type and repr."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().contiguous()
            h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
            h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, np.ndarray):
            h.update(f"A{x.dtype}{x.shape}".encode() + np.ascontiguousarray(x).tobytes())
        elif isinstance(x, dict):
            keys = sorted((k for k in x if x is not payload or k != "checksum"), key=repr)
            h.update(f"D{len(keys)}".encode())
            for k in keys:
                h.update(repr(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                feed(v)
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    feed(payload)
    return h.hexdigest()


def save_flow(path: Path, payload: dict):
    """Atomic write: a reader sees the old file or the new one, never a torn one.  The
    file carries ``checksum`` = :func:`payload_digest` of the payload."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({**payload, "checksum": payload_digest(payload)}, tmp)
    kill_point("flow-tmp")
    os.replace(tmp, path)
    kill_point("flow-saved")


def read_flow_file(path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise StageError(f"{path}: cannot read flow file ({e})") from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise StageError(f"{path}: not an hpcflow flow file")
    if payload["format"] in OLD_FORMATS:
        raise StageError(
            f"{path}: flow family mismatch: the file holds a flow of {OLD_FORMATS[payload['format']]}; "
            f"this version's flows apply the couplings in the generative direction with tanh nets "
            f"without bias and a learned global scale, from a unit prior (PHYSICS.md section 5). "
            f"Retrain it: rerun the train stage with --force")
    if payload["format"] != FORMAT:
        raise StageError(f"{path}: unknown flow file format {payload['format']!r} (this version "
                         f"reads {FORMAT!r})")
    if "checksum" in payload and payload["checksum"] != payload_digest(payload):
        raise StageError(f"{path}: checksum mismatch: the flow file is corrupt (rerun the train "
                         f"stage with --force)")
    return payload


def flow_from_file(path, device="cpu") -> tuple[Flow, dict]:
    """The trained flow in ``path`` (weights frozen by nobody: a plain module) and the file's
    payload, without an input file; refuses unfinished trainings."""
    payload = read_flow_file(path)
    if not payload.get("complete"):
        raise StageError(f"{path}: training is unfinished (run the train stage first)")
    return _rebuild(path, payload, device), payload


def _rebuild(path, payload, device) -> Flow:
    try:
        flow = Flow.from_spec(payload["spec"])
    except FlowFamilyError as err:
        raise StageError(f"{path}: flow family mismatch: {err}; retrain it (train stage, --force)") from None
    flow.load_state_dict(payload["state_dict"])
    return flow.to(device=device, dtype=torch.float64)


def load_flow(path, cfg, device) -> tuple[Flow, dict]:
    """Rebuild a trained flow; refuse one whose lattice or architecture differs from cfg."""
    payload = read_flow_file(path)
    if not payload.get("complete"):
        raise StageError(f"{path}: training is unfinished (run the train stage first)")
    want = expected_spec(cfg)
    have = payload["spec"]
    diff = [k for k in want if want[k] != have.get(k)]
    if diff:
        got = ", ".join(f"{k} = {have.get(k)!r}" for k in diff)
        asked = ", ".join(f"{k} = {want[k]!r}" for k in diff)
        raise StageError(f"{path}: flow was built for {got}, but {cfg.path} asks for {asked} "
                         f"([theory] L, [flow] kernel_size/layers/hidden/block)")
    return _rebuild(path, payload, device), payload


def expected_spec(cfg) -> dict:
    f = cfg.flow
    return {"family": FAMILY, "L": cfg.theory.L, "kernel_size": f.kernel_size, "layers": f.layers,
            "hidden": list(f.hidden), "block": f.block}


def build_flow(cfg, device) -> Flow:
    """The untrained flow of ``cfg``; its initial weights (those of hidden layers are
    random) come from the run seed alone, whatever torch's global generator holds."""
    f = cfg.flow
    seed = int(generator(cfg.run.seed, purpose_key("flow-init")).integers(2**63))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        flow = Flow(cfg.theory.L, kernel_size=f.kernel_size, layers=f.layers,
                    hidden=tuple(f.hidden), block=f.block)
    return flow.to(device=device, dtype=torch.float64)


# ---------------------------------------------------------------------------------------
# The MPI train stage


def _check_identity(path, cfg, payload, ident):
    """Refuse a flow file whose training identity differs from ``ident`` (naming every
    differing key); files without a stored identity are judged by their stored input."""
    from . import config as config_mod

    old = payload.get("identity")
    if old is None:
        try:
            old = identity(config_mod.parse(str(payload.get("input", "")),
                                            f"{path} (its stored input)"), "train")
        except config_mod.ConfigError as err:
            raise StageError(f"{path} exists and its stored input cannot be compared with "
                             f"{cfg.path} ({err}); rerun with --force to replace it") from None
        old = json.loads(json.dumps(old))
    diff = identity_diff(old, ident)
    if diff:
        raise StageError(f"{path} exists and was trained from a different input: "
                         f"{'; '.join(diff)} ({cfg.path}); rerun with --force to replace it")


def _write_history(path: Path, payload: dict):
    """``train.json`` beside the flow file, from a finished training's payload (atomic)."""
    history = path.with_name(HISTORY_FILE)
    tmp = history.with_name(history.name + ".tmp")
    tmp.write_text(json.dumps({"prior": payload["prior"], "spec": payload["spec"],
                               "history": payload["history"],
                               "train_time": payload["train_time"]}, indent=1) + "\n")
    os.replace(tmp, history)


def train(cfg, world, prior, target, path: Path, force: bool = False, log=None) -> dict:
    """The train stage: train (or resume, or skip) the flow of ``cfg``; returns the saved
    payload.

    A :class:`Trainer` with the gradient allreduce (:func:`allreduce_hook`): each rank
    draws its share of ``[train] batch_size`` from its own stream, keyed by (rank, iteration
    of the last checkpoint), so a resumed training repeats the uninterrupted one exactly on
    the same number of ranks.  Rank 0 keeps the history (a callback), measures the flow
    acceptance every ``eval_every`` iterations and writes the flow file at checkpoints.

    Parameters
    ----------
    cfg : hpcflow.config.Config
    world : hpcflow.parallel.World
    prior, target
        As for :class:`Trainer` (``prior`` may be a function returning it, called only
        when there is training to do).
    path : pathlib.Path
        The flow file; ``train.json`` is written beside it.
    force : bool
        Retrain even if the file holds a finished training of this input.
    log : callable, optional
        Where rank 0's messages go (default: the ``hpcflow`` logger at INFO).
    """
    log = logger.info if log is None else log
    t = cfg.train
    ident = json.loads(json.dumps(identity(cfg, "train")))
    payload = None
    if world.is_root and path.exists() and not force:
        try:
            payload = read_flow_file(path)
            _check_identity(path, cfg, payload, ident)
        except StageError as err:
            payload = err
    payload = world.comm.bcast(payload, root=0)
    if isinstance(payload, StageError):  # every rank raises rank 0's finding
        raise payload
    fp = flow_fingerprint(cfg) if payload is None else payload["fingerprint"]
    if payload is not None and payload.get("complete"):
        if world.is_root:
            log(f"[train] {path} is complete: skipped (use --force to retrain)")
            if not path.with_name(HISTORY_FILE).exists():  # killed between the two writes
                _write_history(path, payload)
        return payload

    if callable(prior) and not hasattr(prior, "sample"):
        prior = prior()
    if world.is_root:
        path.parent.mkdir(parents=True, exist_ok=True)
    flow = build_flow(cfg, world.device)
    params = [p for p in flow.parameters()]
    optimizer = torch.optim.Adam(params, lr=t.lr)
    scheduler = make_scheduler(optimizer, t)
    timing = {"seconds": 0.0, "segments": []}
    history = {k: [] for k in HISTORY_KEYS} | {"metropolis": []}
    start = 0
    if payload is not None:  # resume an unfinished training
        flow.load_state_dict(payload["state_dict"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        history = payload["history"]
        timing = payload["train_time"]
        start = payload["iteration"]
        if world.is_root:
            log(f"[train] resuming {path} at iteration {start}/{t.iterations}")
            before = (timing.get("segments") or [{}])[-1].get("ranks")
            if before is not None and before != world.size:
                logger.warning(f"[train] WARNING: resumed on {world.size} rank(s), but the checkpoint "
                               f"was written on {before}: every rank draws its own minibatch, so "
                               f"the result differs from a training on {before} rank(s) throughout")
    else:
        _broadcast_weights(world, flow)

    def keep(rec):
        for k in HISTORY_KEYS:
            history[k].append(rec[k])

    trainer = Trainer(flow, prior, target, optimizer, scheduler, batch_size=t.batch_size,
                      grad_hook=allreduce_hook(world), callbacks=[keep])
    trainer.iteration = start
    eval_every = t.eval_every or max(1, t.iterations // 20)
    n_params = sum(p.numel() for p in params)
    block = replica_block(t.batch_size, world.size, world.rank)
    if world.is_root and start == 0:
        log(f"[train] flow {flow.spec()} ({n_params} parameters), prior {prior.name}, "
            f"{t.iterations} iterations x batch {t.batch_size} over {world.size} rank(s), "
            f"Adam lr {t.lr} ({t.schedule})")

    def payload_now(it, complete):
        return {"format": FORMAT, "hpcflow_version": __version__, "fingerprint": fp, "identity": ident,
                "spec": flow.spec(), "state_dict": {k: v.cpu() for k, v in flow.state_dict().items()},
                "theory": {"L": cfg.theory.L, "beta": cfg.theory.beta, "lambda": cfg.theory.lam},
                "prior": prior.name, "flow": dataclasses.asdict(cfg.flow),
                "train": dataclasses.asdict(t), "history": history, "iteration": it,
                "complete": complete, "input": cfg.text, "train_time": timing_now(it),
                "optimizer": None if complete else optimizer.state_dict(),
                "scheduler": None if complete else scheduler.state_dict()}

    def timing_now(it):
        """Wall time of the training so far: one segment per (re)start, with its rank count."""
        seg = {"ranks": world.size, "device": str(world.device), "from": start, "to": it,
               "seconds": time.perf_counter() - t0}
        done = timing["segments"] + [seg]
        by_ranks = {}
        for d in done:
            by_ranks[str(d["ranks"])] = by_ranks.get(str(d["ranks"]), 0.0) + d["seconds"]
        return {"seconds": sum(d["seconds"] for d in done), "segments": done,
                "seconds_by_ranks": by_ranks,
                "seconds_per_iteration": sum(d["seconds"] for d in done) / max(it, 1)}

    def evaluate(it):
        flow.eval()
        m = measure_acceptance(world, flow, prior, target, t.metropolis, cfg.run.seed, f"train{it}")
        history["metropolis"].append({"iteration": it, **m})
        return m

    t0 = time.perf_counter()
    if start == 0:
        m = evaluate(0)  # the untrained flow, for the acceptance-against-iteration curve
        if world.is_root:
            log(f"[train] 0/{t.iterations} | Metropolis acc {m['acceptance']:.3f} ESS {m['ess']:.3f}")
    t_last, rng = 0.0, None
    poll = StopPoll(world.comm)
    for it in range(start, t.iterations):
        stop = poll()
        if stop:  # the last checkpoint stands: the streams restart only at checkpoints
            last = it - it % t.checkpoint_every
            raise Stopped(stop, f"[train] stopped by {signal_name(stop)} at iteration {it}/"
                                f"{t.iterations}; a rerun resumes {path} from iteration {last}")
        if rng is None or it % t.checkpoint_every == 0:
            # streams restart at checkpoints, so a resumed training draws what it would have
            rng = generator(cfg.run.seed, purpose_key("train"), world.rank, it)
        integrand = trainer.step(rng, len(block), normalisation=t.batch_size)
        log_w = _gather_log_w(world, -integrand)
        if world.is_root:
            trainer.record(log_w, rng, t0)
        done = it + 1
        if done % eval_every == 0 or done == t.iterations:
            m = evaluate(done)
            if world.is_root:
                log(f"[train] {done}/{t.iterations} | loss {history['loss'][-1]:.4f} | "
                    f"batch acc {history['acceptance'][-1]:.3f} | Metropolis acc "
                    f"{m['acceptance']:.3f} ESS {m['ess']:.3f} | {time.perf_counter() - t0:.0f}s")
                t_last = time.perf_counter()
        elif world.is_root and time.perf_counter() - t_last > cfg.run.progress_every:
            log(f"[train] {done}/{t.iterations} | loss {history['loss'][-1]:.4f} | "
                f"batch acc {history['acceptance'][-1]:.3f}")
            t_last = time.perf_counter()
        if done % t.checkpoint_every == 0 and done < t.iterations:
            history = world.comm.bcast(history, root=0)
            if world.is_root:
                save_flow(path, payload_now(done, False))
            world.comm.Barrier()

    history = world.comm.bcast(history, root=0)
    final = payload_now(t.iterations, True)
    if world.is_root:
        final["acceptance"] = history["metropolis"][-1]["acceptance"] if history["metropolis"] else None
        _write_history(path, final)  # first: a finished flow file always has its history
        save_flow(path, final)
    world.comm.Barrier()
    return world.comm.bcast(final if world.is_root else None, root=0)
