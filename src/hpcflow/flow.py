"""Trivializing normalizing flows built from affine coupling layers.

A flow is an invertible map f from a physical configuration phi [B, L, L] (periodic L x L
lattice, float64) to a "trivialized" configuration phi~ = f(phi).  Flow HMC samples phi~
with the pulled-back action

    S~(phi~) = S(f^-1(phi~)) - log |det d f^-1 / d phi~|

and maps each sample back with phi = f^-1(phi~); with f = identity it is plain HMC.

Checkerboard mask
-----------------
``checkerboard(L, parity)`` is m_x = 1 where (x0 + x1) % 2 == parity, else 0.  The frozen
sites are A = {m = 1}, the updated sites B = {m = 0}.  L must be even: on an odd periodic
lattice the checkerboard is not bipartite (sites across the boundary share a colour).

Affine coupling layer
---------------------
``AffineCoupling(L, parity, kernel_size, hidden)``:

    f(phi)_A = phi_A
    f(phi)_B = exp(-|s(phi_A)|_B) * phi_B + t(phi_A)_B

    log |det df/dphi|             = - sum_{x in B} |s(phi_A)_x|
    inverse: phi_B                = (phi~_B - t(phi~_A)_B) * exp(|s(phi~_A)|_B)
             log |det df^-1/dphi~| = + sum_{x in B} |s(phi~_A)_x|

The Jacobian is block triangular (phi_A passes through, phi_B depends on itself only
through the diagonal factor), hence the determinant above.  ``forward`` returns
(f(phi), log|det df/dphi|) and ``inverse`` returns (f^-1(phi~), log|det df^-1/dphi~|), the
log-determinants per configuration, shape [B].

s and t are separate convolutional networks acting on the masked field m * phi (one
channel [B, 1, L, L]); their output is multiplied by (1 - m), so it lives on B only.  Every
convolution has an odd ``kernel_size`` k <= L, ``padding_mode="circular"`` and padding k//2:
the lattice stays periodic and the networks commute with lattice translations.  With
``hidden = ()`` (the minimal model) s and t are each one 1 -> 1 channel convolution with
bias; with ``hidden = (h1, h2, ...)`` each is

    conv 1->h1, tanh, conv h1->h2, tanh, ..., conv h_n->1.

The last convolution of s and of t starts with zero weights and zero bias, so s = t = 0 and
a freshly built flow is exactly the identity (FHMC then reproduces HMC bit for bit).

|s| has a kink at s = 0, where torch's abs has derivative sign(0) = 0; with the zero start
no gradient would ever reach the s network.  This module therefore takes d|s|/ds = +1 at
s = 0 (any subgradient in [-1, 1] is valid; the value |s| is unchanged), so training starts.

Composition
-----------
``Flow(L, kernel_size, layers, hidden, block)`` is f = layer_n o ... o layer_1;
log|det df/dphi| is the sum over the layers, and ``inverse`` applies the layer inverses in
reverse order; the coupling layers are ``flow.couplings`` (a ModuleList, in the order
they act).  Meaning of ``layers``:

- ``block="pair"`` (default): ``layers`` counts coupling blocks; a block is two affine
  coupling layers with complementary masks (parity 0, then parity 1), so one block
  updates every site once.  ``Flow(L)`` = 1 block, kernel 3, no hidden layers is the
  minimal model of Albandea et al., "Learning trivializing flows", EPJC 83 (2023) 676.
- ``block="single"``: ``layers`` counts individual coupling layers, with alternating
  parities 0, 1, 0, ...

``Flow.spec()`` is a JSON-ready dict of all constructor arguments and ``Flow.from_spec``
rebuilds the same architecture (the weights travel separately, as a state_dict).
Translations by an even number of sites in either direction are symmetries of every flow
here (``translate`` shifts a configuration); odd shifts exchange the two checkerboards.

``IdentityFlow`` is f = identity with log-determinant 0, for tests and as the trivial flow.
"""

from __future__ import annotations

import torch
from torch import nn

BLOCKS = ("pair", "single")


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
    """2D cross-correlation with periodic boundaries, as nn.Conv2d(padding=k//2,
    padding_mode="circular") computes it, but evaluated by FFT:

        out[b, o, y] = bias[o] + sum_{i, a} w[o, i, a] x[b, i, y + a - k//2]   (indices mod L)
        out^ = sum_i g^[o, i] x^[b, i],   g[o, i, z] = w[o, i, k//2 - z]  (z mod L)

    CPU float64 convolutions in torch take a slow im2col path; on the small lattices here
    three FFT-sized operations are an order of magnitude faster, forward and backward, and
    exact up to rounding.  Parameters and their default initialisation are nn.Conv2d's."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int):
        super().__init__()
        ref = nn.Conv2d(c_in, c_out, kernel_size, dtype=torch.float64)
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone())

    def extra_repr(self) -> str:
        c_out, c_in = self.weight.shape[:2]
        return f"{c_in}, {c_out}, kernel_size={self.kernel_size}, circular"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L0, L1 = x.shape[-2:]
        p = self.kernel_size // 2
        g = torch.flip(self.weight, (-2, -1))
        g = nn.functional.pad(g, (0, L1 - self.kernel_size, 0, L0 - self.kernel_size))
        g_hat = torch.fft.rfft2(torch.roll(g, (-p, -p), (-2, -1)))          # [o, i, L0, L1/2+1]
        x_hat = torch.fft.rfft2(x)                                          # [b, i, L0, L1/2+1]
        if g_hat.shape[1] == 1:
            out_hat = x_hat * g_hat[:, 0]
        else:
            out_hat = torch.einsum("bixy,oixy->boxy", x_hat, g_hat)
        return torch.fft.irfft2(out_hat, s=(L0, L1)) + self.bias[:, None, None]


def _conv_net(kernel_size: int, hidden: tuple[int, ...]) -> nn.Sequential:
    channels = (1, *hidden, 1)
    modules: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        modules.append(CircularConv2d(c_in, c_out, kernel_size))
        modules.append(nn.Tanh())
    modules.pop()
    last = modules[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*modules)


def _abs(s: torch.Tensor) -> torch.Tensor:
    """|s| with derivative +1 at s = 0 (torch.abs has 0 there)."""
    return torch.where(s < 0, -s, s)


class AffineCoupling(nn.Module):
    """One affine coupling layer; sites of the given checkerboard parity are frozen."""

    def __init__(self, L: int, parity: int, kernel_size: int = 3, hidden: tuple[int, ...] = ()):
        super().__init__()
        _check_lattice(L, kernel_size)
        if parity not in (0, 1) or not _is_int(parity):
            raise ValueError(f"parity must be 0 or 1, got {parity!r}")
        self.L, self.parity, self.kernel_size = L, parity, kernel_size
        self.hidden = _check_hidden(hidden)
        self.register_buffer("mask", checkerboard(L, parity))
        self.s = _conv_net(kernel_size, self.hidden)
        self.t = _conv_net(kernel_size, self.hidden)

    def extra_repr(self) -> str:
        return f"L={self.L}, parity={self.parity}"

    def _abs_s_t(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """|s(phi_A)| and t(phi_A), both zero on A; phi [B, L, L]."""
        if phi.shape[-2:] != (self.L, self.L):
            raise ValueError(f"expected configurations [B, {self.L}, {self.L}], "
                             f"got {tuple(phi.shape)}")
        frozen = (self.mask * phi).unsqueeze(1)
        updated = 1.0 - self.mask
        s = updated * self.s(frozen).squeeze(1)
        t = updated * self.t(frozen).squeeze(1)
        return _abs(s), t

    def forward(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abs_s, t = self._abs_s_t(phi)
        return torch.exp(-abs_s) * phi + t, -abs_s.sum(dim=(-2, -1))

    def inverse(self, phi_tilde: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abs_s, t = self._abs_s_t(phi_tilde)
        return (phi_tilde - t) * torch.exp(abs_s), abs_s.sum(dim=(-2, -1))


class Flow(nn.Module):
    """f = layer_n o ... o layer_1 of affine coupling layers (see the module docstring)."""

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

    def forward(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = phi.new_zeros(phi.shape[:-2])
        for layer in self.couplings:
            phi, dlogdet = layer(phi)
            logdet = logdet + dlogdet
        return phi, logdet

    def inverse(self, phi_tilde: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = phi_tilde.new_zeros(phi_tilde.shape[:-2])
        for layer in reversed(self.couplings):
            phi_tilde, dlogdet = layer.inverse(phi_tilde)
            logdet = logdet + dlogdet
        return phi_tilde, logdet

    def spec(self) -> dict:
        return {"L": self.L, "kernel_size": self.kernel_size, "layers": self.layers,
                "hidden": list(self.hidden), "block": self.block}

    @classmethod
    def from_spec(cls, spec: dict) -> "Flow":
        spec = dict(spec)
        spec["hidden"] = tuple(spec.get("hidden", ()))
        return cls(**spec)


class IdentityFlow(nn.Module):
    """f = identity, log|det| = 0."""

    def forward(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return phi, phi.new_zeros(phi.shape[:-2])

    def inverse(self, phi_tilde: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return phi_tilde, phi_tilde.new_zeros(phi_tilde.shape[:-2])
