"""Fused molecular dynamics: one compiled kernel per HMC trajectory (torch.compile).

Eager torch pays one pass over memory and one dispatch per elementwise operation; a
phi^4 force plus a momentum kick is about 15 of them.  :func:`compile_trajectory` hands the
whole trajectory of an integrator (:mod:`hpcflow.hmc`) over an action, followed by the
action at its end point, to ``torch.compile`` (the inductor backend, which runs on CPU
with the system's C++ compiler and on CUDA with Triton, from the same source).  The
integrator and the action are the ordinary ones, traced, so there is one source of truth
for the MD; the step size and the number of steps are constants of the compiled graph.

The compiled function gives the same numbers as the eager path up to rounding (the same
operations in the same order; in practice bit-identical on CPU, tested to 1e-12), so chains
stay independent of the rank count and resume exactly.  Shapes are static: a process
compiles once per batch shape (a production rank has one), and the first call pays the
compilation (tens of seconds on CPU; inductor caches it on disk, ``TORCHINDUCTOR_CACHE_DIR``).

Only actions whose force is traceable elementwise torch code are compiled:
:class:`~hpcflow.action.Phi4Action`.  The frozen flow of FHMC uses sparse matrices, which
inductor does not fuse; it stays eager.
"""

from __future__ import annotations

from typing import Callable

import torch

from .action import Phi4Action

MODES = ("auto", "on", "off")


class CompileUnavailable(RuntimeError):
    """torch.compile cannot be used here (no C++ compiler, unsupported platform, ...)."""


def compilable(action) -> bool:
    """Whether :func:`compile_trajectory` fuses this action (exactly a Phi4Action)."""
    return type(action) is Phi4Action


def eager_trajectory(action, integrator, length: float, n_steps: int) -> Callable:
    """(phi, pi) -> (phi', pi', S(phi')): the trajectory as hmc_step computes it eagerly."""
    eps = length / n_steps

    def trajectory(phi, pi):
        phi_new, pi_new = integrator(phi, pi, action.force, eps, n_steps)
        return phi_new, pi_new, action.action(phi_new)

    return trajectory


def compile_trajectory(action, integrator, length: float, n_steps: int,
                       example: tuple[torch.Tensor, torch.Tensor] | None = None) -> Callable:
    """The fused trajectory (phi, pi) -> (phi', pi', S(phi')) of ``integrator`` over
    ``action`` with step length / n_steps.

    With ``example`` = (phi, pi) the compilation happens here, and a failure raises
    :class:`CompileUnavailable` with the reason in one line (callers fall back to
    :func:`eager_trajectory`); without it, at the first call."""
    if not compilable(action):
        raise CompileUnavailable(f"{type(action).__name__} is not fused (only Phi4Action)")
    fn = torch.compile(eager_trajectory(action, integrator, length, n_steps), dynamic=False,
                       fullgraph=True)
    if example is not None:
        try:
            with torch.no_grad():
                fn(*example)
        except Exception as err:  # inductor raises many types; all mean "not here"
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CompileUnavailable(f"torch.compile failed: {type(err).__name__}: {first}") from None
    return fn


def choose_trajectory(mode: str, action, integrator, length: float, n_steps: int,
                      example: tuple[torch.Tensor, torch.Tensor], log=print):
    """The trajectory function for ``[run] compile`` = ``mode``, and whether it is fused.

    ``off``: eager.  ``on``: compiled, or CompileUnavailable.  ``auto``: compiled when the
    action is fusable and compilation works, else eager with one line saying why."""
    if mode not in MODES:
        raise ValueError(f"compile mode must be one of {MODES}, got {mode!r}")
    if mode == "off" or (mode == "auto" and not compilable(action)):
        return eager_trajectory(action, integrator, length, n_steps), False
    try:
        return compile_trajectory(action, integrator, length, n_steps, example), True
    except CompileUnavailable as err:
        if mode == "on":
            raise
        log(f"[compile] {err}; using the eager path")
        return eager_trajectory(action, integrator, length, n_steps), False
