"""Trivializing flows: the paper's coupling-layer family and its frozen evaluator.

- :mod:`hpcflow.flows.layers`: checkerboard masks, bias-free circular convolutions,
  :class:`AffineCoupling` steps applied in the generative direction with tanh nets,
  :class:`GlobalScale`, their composition :class:`Flow` and :class:`IdentityFlow`;
- :mod:`hpcflow.flows.frozen`: :class:`FrozenFlow`, the generator and the analytic pullback
  of forces for flow HMC, with fixed weights; convolutions as sparse site matrices, or
- :mod:`hpcflow.flows.fft`: as products in Fourier space on the checkerboard tori (faster
  for wide hidden nets; ``FrozenFlow(method="auto")`` picks by a measured cost rule).

Conventions: ``forward(phi) -> (z, log|det dz/dphi|)`` is the trivializing map f,
``inverse(z) -> (phi, log|det dphi/dz|)`` the generator g = f^-1 (PHYSICS.md section 5).
"""

from .frozen import FrozenFlow
from .layers import (FAMILY, AffineCoupling, CircularConv2d, Flow, FlowFamilyError, GlobalScale,
                     IdentityFlow, checkerboard, translate)

__all__ = ["FAMILY", "AffineCoupling", "CircularConv2d", "Flow", "FlowFamilyError", "FrozenFlow",
           "GlobalScale", "IdentityFlow", "checkerboard", "translate"]
