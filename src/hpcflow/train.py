"""Reverse-KL training of a flow, data parallel over MPI ranks, and flow acceptance.

Loss (PHYSICS.md section 5; prior r, target p = exp(-S)/Z, generator g, model
p_g(phi) = r(z) |det dg/dz|^-1 at phi = g(z)):

    loss = E_{z ~ r} [ S(g(z)) - log|det dg/dz|(z) + log r(z) ] = KL(p_g || p) - log Z,

estimated on a minibatch.  For a prior known only up to a constant (a coarse phi^4
ensemble) the loss is shifted by that constant; the gradient is not.  The optimizer is
Adam with, by default, the authors' settings: lr 0.01 annealed to 0 by a cosine over the
iterations, fresh prior batches of 500 (``[train]``).

Data parallel: each rank draws its own share of the ``batch_size`` samples from its own
stream; the gradients of the global mean loss are summed with one MPI allreduce, so every
rank takes the same Adam step and holds identical weights.

Quality measures, per iteration on the training batch and at ``eval_every`` iterations on
``metropolis`` fresh proposals:

- log weights  log w = -S(phi) - log p_g(phi) = -[S(phi) - log|det dg/dz| + log r(z)];
- effective sample size  ESS = (sum w)^2 / (N sum w^2), in (0, 1];
- flow Metropolis acceptance: an independence Metropolis chain over the proposals in
  their order, accepting phi' over phi with min(1, w'/w).

The flow file (``torch.save``) holds everything needed to rebuild and judge the flow:
the architecture spec, the weights, the theory, prior and training settings, the training
history, and while training is unfinished the optimizer state for resumption.  It is
replaced atomically at every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .flows import FAMILY, Flow, FlowFamilyError
from .parallel import World, purpose_key, replica_block
from .store import StageError, fingerprint

FORMAT = "hpcflow-flow-2"
OLD_FORMATS = {"hpcflow-flow-1": "hpcflow 0.1 (couplings applied phi -> phi~, convolutions with bias, "
                                    "a Gaussian prior of hand-set width)"}


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


def _gather_log_w(world: World, local: torch.Tensor) -> np.ndarray | None:
    parts = world.comm.gather(local.detach().cpu().numpy(), root=0)
    return np.concatenate(parts) if world.is_root else None


def measure_acceptance(world, flow, prior, target, n, seed, tag, batch=1024) -> dict:
    """Flow Metropolis acceptance and ESS from n fresh proposals (spread over ranks).

    Proposals come from ``prior.fresh``: for a coarse prior, held-out configurations never
    trained on, each used once (so n is capped by the prior's ``capacity``)."""
    n = int(min(n, prior.capacity))
    block = replica_block(n, world.size, world.rank)
    rng = np.random.Generator(np.random.PCG64(
        np.random.SeedSequence(seed, spawn_key=(purpose_key("metropolis"), purpose_key(tag), world.rank))))
    chunks = []
    with torch.no_grad():
        for start in range(0, len(block), batch):
            m = min(batch, len(block) - start)
            phi_t, log_r = prior.fresh(m, block.start + start, rng, world.device)
            phi, logdet_inv = flow.inverse(phi_t)
            chunks.append(-(target.action(phi) - logdet_inv + log_r))
    local = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.float64)
    log_w = _gather_log_w(world, local)
    result = None
    if world.is_root:
        result = {"acceptance": metropolis_acceptance(log_w, rng), "ess": ess(log_w), "proposals": n}
    return world.comm.bcast(result, root=0)


# ---------------------------------------------------------------------------------------
# Flow files


def flow_fingerprint(cfg) -> str:
    return fingerprint({"L": cfg.theory.L, "beta": cfg.theory.beta, "lambda": cfg.theory.lam,
                        "seed": cfg.run.seed, "flow": dataclasses.asdict(cfg.flow) | {"file": ""},
                        "train": dataclasses.asdict(cfg.train),
                        "coarse": (dataclasses.asdict(cfg.coarse)
                                   if cfg.flow.prior.startswith("coarse") else None)})


def save_flow(path: Path, payload: dict):
    """Atomic write: a reader sees the old file or the new one, never a torn one."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_flow_file(path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
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
    f = cfg.flow
    flow = Flow(cfg.theory.L, kernel_size=f.kernel_size, layers=f.layers, hidden=tuple(f.hidden),
                block=f.block)
    return flow.to(device=device, dtype=torch.float64)


# ---------------------------------------------------------------------------------------
# Training


def make_scheduler(optimizer, t):
    """The learning-rate schedule of ``[train] schedule``: ``cosine`` anneals lr to 0 over
    ``iterations`` steps (lr_k = lr (1 + cos(pi k / iterations)) / 2, as the authors train),
    ``constant`` keeps it."""
    if t.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.iterations, eta_min=0.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)


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


def train(cfg, world: World, prior, target, path: Path, force: bool = False, log=print) -> dict:
    """Train (or resume, or skip) the flow of ``cfg``; returns the saved payload."""
    t = cfg.train
    fp = flow_fingerprint(cfg)
    payload = None
    if world.is_root and path.exists() and not force:
        payload = read_flow_file(path)
    payload = world.comm.bcast(payload, root=0)
    if payload is not None and payload.get("fingerprint") != fp:
        raise StageError(f"{path} exists and was trained from a different input; "
                         "rerun with --force to replace it")
    if payload is not None and payload.get("complete"):
        if world.is_root:
            log(f"[train] {path} is complete: skipped (use --force to retrain)")
        return payload

    if world.is_root:
        path.parent.mkdir(parents=True, exist_ok=True)
    flow = build_flow(cfg, world.device)
    params = [p for p in flow.parameters()]
    optimizer = torch.optim.Adam(params, lr=t.lr)
    scheduler = make_scheduler(optimizer, t)
    timing = {"seconds": 0.0, "segments": []}
    history = {"iteration": [], "loss": [], "acceptance": [], "ess": [], "seconds": [],
               "metropolis": []}
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
    else:
        _broadcast_weights(world, flow)
    eval_every = t.eval_every or max(1, t.iterations // 20)
    n_params = sum(p.numel() for p in params)
    block = replica_block(t.batch_size, world.size, world.rank)
    if world.is_root and start == 0:
        log(f"[train] flow {flow.spec()} ({n_params} parameters), prior {prior.name}, "
            f"{t.iterations} iterations x batch {t.batch_size} over {world.size} rank(s), "
            f"Adam lr {t.lr} ({t.schedule})")

    def payload_now(it, complete):
        return {"format": FORMAT, "hpcflow_version": __version__, "fingerprint": fp,
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
    for it in range(start, t.iterations):
        if rng is None or it % t.checkpoint_every == 0:
            # streams restart at checkpoints, so a resumed training draws what it would have
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
                cfg.run.seed, spawn_key=(purpose_key("train"), world.rank, it))))
        optimizer.zero_grad(set_to_none=False)
        integrand, _ = log_weights(flow, prior, target, len(block), rng, world.device)
        (integrand.sum() / t.batch_size).backward()
        grads = _flat_grads(params)
        world.comm.Allreduce(grads.copy(), grads)  # sum over ranks: gradient of the global mean
        _set_grads(params, grads, world.device)
        optimizer.step()
        scheduler.step()

        log_w = _gather_log_w(world, -integrand)
        if world.is_root:
            acc = metropolis_acceptance(log_w, rng)
            history["iteration"].append(it + 1)
            history["loss"].append(float(-log_w.mean()))
            history["acceptance"].append(acc)
            history["ess"].append(ess(log_w))
            history["seconds"].append(time.perf_counter() - t0)
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
        save_flow(path, final)
        path.with_name("train.json").write_text(json.dumps(
            {"prior": prior.name, "spec": flow.spec(), "history": history,
             "train_time": final["train_time"]}, indent=1) + "\n")
    world.comm.Barrier()
    return world.comm.bcast(final if world.is_root else None, root=0)
