"""Coupling layers, the global scale and their composition: the paper's flow family.

Directions and names (PHYSICS.md section 5)
-------------------------------------------
A flow is an invertible map f from a physical configuration phi [B, L, L] (periodic L x L
lattice, float64) to a "trivialized" one z = f(phi).  Its inverse g = f^-1, the
**generator**, takes prior samples to physical configurations, phi = g(z).  Every module
here has

    forward(phi) -> (z = f(phi),   log|det dz/dphi|)      the trivializing direction
    inverse(z)   -> (phi = g(z),   log|det dphi/dz|)      the generative direction

with log-determinants per configuration, shape [B].  Training, flow HMC and the flow
acceptance only use ``inverse``.

The family (Albandea et al., EPJC 83 (2023) 676; authors' public code)
-----------------------------------------------------------------------
One coupling step on the checkerboard mask m of a given parity, frozen sites A = {m = 1},
updated sites B = {m = 0}, applied in the generative direction to an input x:

    y_A = x_A,      y_B = exp(-|s(x_A)|) x_B + t(x_A),      log|det dy/dx| = -sum_{x in B} |s|

(inverse: x_B = (y_B - t(y_A)) exp(|s(y_A)|); the Jacobian is block triangular).
s and t are separate convolutional networks on the masked field m * x (one channel),
read on B only: ``conv_k, tanh`` for the minimal model, ``conv_k, tanh, ..., conv_k, tanh``
with hidden channels.  Every convolution is circular (padding k//2, the lattice stays
periodic, the nets commute with translations) and has **no bias**.  Hence:

- |s| <= 1 and |t| < 1: the generator has no exponential walls and the flowed action is
  as smooth as the target's;
- s and t are odd functions of x_A, so |s| is even and t odd: every layer commutes with
  phi -> -phi, the Z2 symmetry of S.

After the couplings, the generator applies a learnable global scale

    phi = exp(lambda) y,        log|det| += lambda V,

(:class:`GlobalScale`, parameter ``log_scale``), so the prior can be a unit Gaussian and the
flow learns the overall width.  ``Flow(L, kernel_size, layers, hidden, block)``: with
``block = "pair"`` (default) ``layers`` counts coupling layers in the paper's sense, two
steps with complementary masks (parity 0 then parity 1, in the generative order), so that
every site is updated once; ``block = "single"`` counts single steps.  ``Flow(L)`` is the
paper's minimal model: one coupling layer, k = 3, no hidden channels (37 parameters).

The last convolution of s and of t starts at zero and lambda = 0, so a fresh flow is
exactly the identity: FHMC then reproduces HMC.  |s| has a kink at s = 0, where torch's
abs has derivative 0; with the zero start no gradient would reach the s network, so this
module takes d|s|/ds = +1 at s = 0 (a valid subgradient; the value of |s| is unchanged).

Translations by an even number of sites are symmetries of every flow here (``translate``);
odd shifts exchange the two checkerboards.  ``Flow.spec()`` is a JSON-ready description,
tagged with the family name ``FAMILY``; ``Flow.from_spec`` refuses a spec of another family.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import FlowFamilyError

BLOCKS = ("pair", "single")
FAMILY = "generative-tanh-scale"


def checkerboard(L: int, parity: int) -> torch.Tensor:
    """float64 [L, L] mask, 1 where (x0 + x1) % 2 == parity."""
    x = torch.arange(L)
    return (((x[:, None] + x[None, :]) % 2) == parity).to(torch.float64)


def translate(phi: torch.Tensor, shift0: int, shift1: int) -> torch.Tensor:
    """phi shifted periodically by (shift0, shift1) lattice sites over its last two dims."""
    return torch.roll(phi, shifts=(shift0, shift1), dims=(-2, -1))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_lattice(L, kernel_size) -> None:
    if not _is_int(L) or L < 2 or L % 2:
        raise ValueError(f"L must be an even integer >= 2 (checkerboard on a periodic "
                         f"lattice), got {L!r}")
    if not _is_int(kernel_size) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd integer >= 1, got {kernel_size!r}")
    if kernel_size > L:
        raise ValueError(f"kernel_size {kernel_size} does not fit on L = {L}")


def _check_hidden(hidden) -> tuple[int, ...]:
    hidden = tuple(hidden)
    if not all(_is_int(h) and h >= 1 for h in hidden):
        raise ValueError(f"hidden must be positive integer channel counts, got {hidden!r}")
    return hidden


class CircularConv2d(nn.Module):
    """Bias-free 2D cross-correlation with periodic boundaries, as
    nn.Conv2d(bias=False, padding=k//2, padding_mode="circular") computes it, by FFT:

        out[b, o, y] = sum_{i, a} w[o, i, a] x[b, i, y + a - k//2]      (indices mod L)
        out^ = sum_i g^[o, i] x^[b, i],   g[o, i, z] = w[o, i, k//2 - z]  (z mod L)

    CPU float64 convolutions in torch take a slow im2col path; on the lattices here three
    FFT-sized operations are an order of magnitude faster, forward and backward, and exact
    up to rounding.  The weight and its default initialisation are nn.Conv2d's."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int):
        super().__init__()
        ref = nn.Conv2d(c_in, c_out, kernel_size, bias=False, dtype=torch.float64)
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(ref.weight.detach().clone())

    def extra_repr(self) -> str:
        c_out, c_in = self.weight.shape[:2]
        return f"{c_in}, {c_out}, kernel_size={self.kernel_size}, circular, bias=False"

    def circulant(self, L0: int, L1: int) -> torch.Tensor:
        """The kernel g [o, i, L0, L1] on the periodic lattice, g[o, i, z] = w[o, i, k//2 - z],
        so that out = sum_i g[:, i] (*) x_i with (*) the circular convolution."""
        p = self.kernel_size // 2
        g = torch.flip(self.weight, (-2, -1))
        g = nn.functional.pad(g, (0, L1 - self.kernel_size, 0, L0 - self.kernel_size))
        return torch.roll(g, (-p, -p), (-2, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L0, L1 = x.shape[-2:]
        g_hat = torch.fft.rfft2(self.circulant(L0, L1))                     # [o, i, L0, L1/2+1]
        x_hat = torch.fft.rfft2(x)                                          # [b, i, L0, L1/2+1]
        if g_hat.shape[1] == 1:
            out_hat = x_hat * g_hat[:, 0]
        else:
            out_hat = torch.einsum("bixy,oixy->boxy", x_hat, g_hat)
        return torch.fft.irfft2(out_hat, s=(L0, L1))


def conv_net(kernel_size: int, hidden: tuple[int, ...]) -> nn.Sequential:
    """conv_k, tanh [, conv_k, tanh ...] from 1 channel through ``hidden`` to 1, bias-free;
    the last convolution starts at zero (the net outputs 0 until trained)."""
    channels = (1, *hidden, 1)
    modules: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        modules += [CircularConv2d(c_in, c_out, kernel_size), nn.Tanh()]
    nn.init.zeros_(modules[-2].weight)
    return nn.Sequential(*modules)


def convolutions(net: nn.Sequential) -> list[CircularConv2d]:
    """The convolutions of a :func:`conv_net`, in the order they act."""
    return [m for m in net if isinstance(m, CircularConv2d)]


def _abs(s: torch.Tensor) -> torch.Tensor:
    """|s| with derivative +1 at s = 0 (torch.abs has 0 there)."""
    return torch.where(s < 0, -s, s)


class AffineCoupling(nn.Module):
    """One coupling step; the sites of checkerboard ``parity`` are frozen (see module doc)."""

    def __init__(self, L: int, parity: int, kernel_size: int = 3, hidden: tuple[int, ...] = ()):
        super().__init__()
        _check_lattice(L, kernel_size)
        if not _is_int(parity) or parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, got {parity!r}")
        self.L, self.parity, self.kernel_size = L, parity, kernel_size
        self.hidden = _check_hidden(hidden)
        self.register_buffer("mask", checkerboard(L, parity))
        self.s = conv_net(kernel_size, self.hidden)
        self.t = conv_net(kernel_size, self.hidden)

    def extra_repr(self) -> str:
        return f"L={self.L}, parity={self.parity}"

    def _abs_s_t(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """|s(x_A)| and t(x_A), both zero on A; x [B, L, L]."""
        if x.shape[-2:] != (self.L, self.L):
            raise ValueError(f"expected configurations [B, {self.L}, {self.L}], "
                             f"got {tuple(x.shape)}")
        frozen = (self.mask * x).unsqueeze(1)
        updated = 1.0 - self.mask
        s = updated * self.s(frozen).squeeze(1)
        t = updated * self.t(frozen).squeeze(1)
        return _abs(s), t

    def inverse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Generative direction: y_B = exp(-|s(x_A)|) x_B + t(x_A); log det = -sum_B |s|."""
        abs_s, t = self._abs_s_t(x)
        return torch.exp(-abs_s) * x + t, -abs_s.sum(dim=(-2, -1))

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Trivializing direction: x_B = (y_B - t(y_A)) exp(|s(y_A)|); log det = +sum_B |s|."""
        abs_s, t = self._abs_s_t(y)
        return (y - t) * torch.exp(abs_s), abs_s.sum(dim=(-2, -1))

    def frozen(self, method: str = "auto"):
        """This step alone as a :class:`~hpcflow.flows.frozen.FrozenFlow` (current weights);
        ``method``: "auto", "sparse" or "fft", the backend of the convolutions."""
        from .frozen import FrozenFlow

        return FrozenFlow([self], self.L, method=method)


class GlobalScale(nn.Module):
    """phi = exp(lambda) y in the generative direction, log|det| = lambda V; lambda is the
    parameter ``log_scale``, zero at the start."""

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        V = y.shape[-1] * y.shape[-2]
        return torch.exp(self.log_scale) * y, (V * self.log_scale).expand(y.shape[:-2])

    def forward(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        V = phi.shape[-1] * phi.shape[-2]
        return torch.exp(-self.log_scale) * phi, (-V * self.log_scale).expand(phi.shape[:-2])


class Flow(nn.Module):
    """The paper's flow: g = scale o step_n o ... o step_1 (generative order), f = g^-1.

    Each step keeps one checkerboard and updates the other,
    y_B = exp(-|s(x_A)|) x_B + t(x_A), with s and t bias-free circular convolutions each
    followed by tanh; a global scale phi = exp(lambda) y comes last (module docstring,
    PHYSICS.md section 5).  A fresh flow is the identity.

    Parameters
    ----------
    L : int
        Lattice extent (even: checkerboards).
    kernel_size : int
        Odd convolution kernel size k of s and t (3: the minimal model).
    layers : int
        Coupling layers: pairs of complementary steps (``block = "pair"``) or single steps.
    hidden : tuple of int
        Hidden channels of s and t (empty: one convolution each).
    block : str
        ``"pair"`` or ``"single"``, what ``layers`` counts.

    Attributes
    ----------
    couplings : torch.nn.ModuleList
        The steps in the order the generator applies them.
    scale : GlobalScale
        The learned global scale exp(lambda).

    Notes
    -----
    ``inverse(z) -> (phi, log|det dg/dz|)`` is the generator g, ``forward(phi) ->
    (z, log|det df/dphi|)`` the trivializing map f; ``frozen()`` the fixed-weight evaluator
    with the analytic force pullback that :class:`hpcflow.FlowedAction` uses.

    Examples
    --------
    >>> flow = Flow(8)                              # one coupling layer, k = 3: 37 parameters
    >>> phi, logdet = flow.inverse(torch.randn(4, 8, 8, dtype=torch.float64))
    """

    def __init__(self, L: int, kernel_size: int = 3, layers: int = 1,
                 hidden: tuple[int, ...] = (), block: str = "pair"):
        super().__init__()
        _check_lattice(L, kernel_size)
        if not _is_int(layers) or layers < 1:
            raise ValueError(f"layers must be an integer >= 1, got {layers!r}")
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
        self.L, self.kernel_size, self.layers, self.block = L, kernel_size, layers, block
        self.hidden = _check_hidden(hidden)
        n = 2 * layers if block == "pair" else layers
        self.couplings = nn.ModuleList(
            AffineCoupling(L, i % 2, kernel_size, self.hidden) for i in range(n))
        self.scale = GlobalScale()

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """phi = g(z) and log|det dg/dz|."""
        logdet = z.new_zeros(z.shape[:-2])
        for layer in (*self.couplings, self.scale):
            z, dlogdet = layer.inverse(z)
            logdet = logdet + dlogdet
        return z, logdet

    def forward(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z = f(phi) and log|det df/dphi|."""
        logdet = phi.new_zeros(phi.shape[:-2])
        for layer in (self.scale, *reversed(self.couplings)):
            phi, dlogdet = layer.forward(phi)
            logdet = logdet + dlogdet
        return phi, logdet

    def frozen(self, method: str = "auto"):
        """The generator and its analytic force pullback for the current weights (a
        :class:`~hpcflow.flows.frozen.FrozenFlow`; it does not follow later changes);
        ``method``: "auto", "sparse" or "fft", the backend of the convolutions."""
        from .frozen import FrozenFlow

        return FrozenFlow(self.couplings, self.L, float(self.scale.log_scale.detach()),
                          method=method)

    def spec(self) -> dict:
        return {"family": FAMILY, "L": self.L, "kernel_size": self.kernel_size,
                "layers": self.layers, "hidden": list(self.hidden), "block": self.block}

    @classmethod
    def from_spec(cls, spec: dict) -> "Flow":
        spec = dict(spec)
        family = spec.pop("family", None)
        if family != FAMILY:
            raise FlowFamilyError(
                f"flow family {family or 'of hpcflow 0.1 (phi -> phi~ couplings with biases)'!r} "
                f"is not this version's {FAMILY!r}")
        spec["hidden"] = tuple(spec.get("hidden", ()))
        return cls(**spec)


class IdentityFlow(nn.Module):
    """f = g = identity, log|det| = 0."""

    def forward(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return phi, phi.new_zeros(phi.shape[:-2])

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return z, z.new_zeros(z.shape[:-2])

    def frozen(self, method: str = "auto"):
        """The identity as a FrozenFlow (no layers, no backend; the pullback is F -> F);
        ``method`` is only checked."""
        from .frozen import FrozenFlow

        return FrozenFlow(method=method)
