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

Frozen evaluation (flow HMC)
----------------------------
FHMC needs, many times per trajectory and with fixed weights, the force of the flowed
action S~(phi~) = S(f^-1(phi~)) - log|det J|, J = d f^-1/d phi~:

    F~ = -dS~/dphi~ = J^T F(phi) + d log|det J| / d phi~,    F = -dS/dphi,  phi = f^-1(phi~).

``flow.frozen()`` (:class:`FrozenFlow`; also on ``AffineCoupling`` and ``IdentityFlow``)
precomputes the convolutions once and evaluates f^-1 and this pullback by the chain rule
written out, without autograd.  Per coupling layer in the inverse direction (y = phi~ side,
x = phi side, s, t = nets(y_A) on B, sgn(s) = -1 if s < 0 else +1 as for the module's |s|):

    x_B = (y_B - t) e,  e = exp(|s|);  f_y,B = f_x,B e,  f_s = sgn(s) (f_x,B x_B + 1),
    f_t = -f_x,B e,  f_y,A = f_x,A + J_s^T f_s + J_t^T f_t,

f = -dS~/d(.), the J^T of the nets being the transposed convolutions in reverse order with
tanh' = 1 - tanh^2.  Fields are split into the two checkerboards, so no mask is multiplied.
Two ways to apply a convolution, chosen by ``frozen(method)``: "sparse" (a sparse matrix
over sites, s and t and both checkerboards in one product; few operations, best for the
minimal model and small nets) and "fft" (products in Fourier space on the L x L/2 torus of a
checkerboard in sheared coordinates, :func:`to_sublattices`; best for many hidden channels);
"auto" picks sparse when k^2 c_in <= 64 for every convolution.
"""

from __future__ import annotations

import warnings

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

    def circulant(self, L0: int, L1: int) -> torch.Tensor:
        """The kernel g [o, i, L0, L1] on the periodic lattice, g[o, i, z] = w[o, i, k//2 - z],
        so that out = bias + sum_i g[:, i] (*) x_i with (*) the circular convolution."""
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

    def frozen(self, method: str = "auto") -> "FrozenFlow":
        """This layer as a one-layer :class:`FrozenFlow` with the current weights."""
        return FrozenFlow([self], self.L, method)


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

    def frozen(self, method: str = "auto") -> "FrozenFlow":
        """The inverse flow and its analytic force pullback for the current weights (see
        :class:`FrozenFlow`); rebuild it after changing the weights."""
        return FrozenFlow(self.couplings, self.L, method)

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

    def frozen(self, method: str = "auto") -> "FrozenFlow":
        """The identity as a :class:`FrozenFlow` (no layers; the pullback is F -> F)."""
        return FrozenFlow(method=method)


# ---------------------------------------------------------------------------------------
# Frozen evaluation: the inverse flow and the analytic pullback of forces
# ---------------------------------------------------------------------------------------

def to_sublattices(phi: torch.Tensor) -> torch.Tensor:
    """phi [..., L, L] -> [N, 2, L, L/2] (N the product of the leading dims), the two
    checkerboards in sheared coordinates:

        sub[n, sigma, a, b] = phi[n, a, (a + 2 b + sigma) mod L],   sigma = (x0 + x1) mod 2.

    In these coordinates a checkerboard is an L x L/2 torus on which the even translations
    (those that map each checkerboard to itself) are ordinary periodic shifts of (a, b).
    The result is a strided view of one copy of phi (no index gather)."""
    L = phi.shape[-1]
    x = phi.reshape(-1, L, L)
    doubled = torch.cat((x, x), -1)                       # doubled[n, a, c] = phi[n, a, c mod L]
    return doubled.as_strided((x.shape[0], 2, L, L // 2), (2 * L * L, 1, 2 * L + 1, 2),
                              doubled.storage_offset())


def from_sublattices(even: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_sublattices`: the two checkerboards [N, L, L/2] -> phi [N, L, L]."""
    n, L = even.shape[0], even.shape[1]
    z = torch.stack((even, odd), -1)                      # z[n, a, c] = sub[c mod 2, a, c // 2]
    zz = torch.cat((z, z), 2)                             # zz[n, a, c] = z[n, a, c mod L], c < 2L
    # phi[n, a, x1] = z[n, a, (x1 - a) mod L] = zz[n, a, x1 - a + L]
    return zz.as_strided((n, L, L), (2 * L * L, 2 * L - 1, 1),
                         zz.storage_offset() + L).contiguous()


def _half_torus(g: torch.Tensor, out_sub, in_sub) -> torch.Tensor:
    """Circular-convolution kernel g [o, i, L, L] of the full lattice, restricted to maps from
    the checkerboards ``in_sub`` to the checkerboards ``out_sub`` in sheared coordinates:

        K[(o, tau), (i, sigma), da, db] = g[o, i, da, (da + 2 db + tau - sigma) mod L],

    shape [o * len(out_sub), i * len(in_sub), L, L/2], so that out_tau = sum_sigma K_{tau sigma}
    (*) x_sigma with (*) the circular convolution on the L x L/2 torus."""
    o, i, L = g.shape[0], g.shape[1], g.shape[-1]
    da = torch.arange(L, device=g.device)[:, None]
    db = torch.arange(L // 2, device=g.device)[None, :]
    K = torch.stack([torch.stack([g[:, :, da, (da + 2 * db + tau - sigma) % L]
                                  for sigma in in_sub], 2) for tau in out_sub], 1)
    return K.reshape(o * len(out_sub), i * len(in_sub), L, L // 2)


class _FFTCoupling:
    """One affine coupling layer with frozen weights, on sheared checkerboard coordinates.

    Inverse: with A = checkerboard ``parity`` (frozen) and B the other one, y = phi~ side,
    x = phi side, s, t = nets(y_A) on B,

        x_A = y_A,   x_B = (y_B - t) e,   e = exp(|s|),   log|det df^-1/dy| = sum_B |s|.

    Pullback of a force f_x = -dS~/dx (S~ = S(x) - sum_B |s| + ...) to f_y = -dS~/dy:

        f_y,B = f_x,B e
        f_s   = sgn(s) (f_x,B x_B + 1)        (sgn(0) = +1, the module's |s| convention)
        f_t   = - f_x,B e
        f_y,A = f_x,A + J_s^T f_s + J_t^T f_t,

    J the Jacobian of the nets with respect to y_A.  Every convolution is a product in
    Fourier space on the L x L/2 torus, kernel spectra G precomputed; its adjoint multiplies
    by conj(G) and sums over output channels; tanh' = 1 - tanh^2.  The first convolution
    reads checkerboard A only, the last writes checkerboard B only; hidden channels live on
    both, as channel pairs (c, tau).  s and t are evaluated together as a leading net
    dimension of size 2."""

    def __init__(self, layer: "AffineCoupling"):
        L, p = layer.L, layer.parity
        q = 1 - p
        self.L, self.p, self.q = L, p, q
        nets = [[m for m in net if isinstance(m, CircularConv2d)] for net in (layer.s, layer.t)]
        self.n = n = len(nets[0])
        self.G, self.Gadj, self.bias, self.kind = [], [], [], []
        with torch.no_grad():
            for l in range(n):
                in_sub = (p,) if l == 0 else (0, 1)
                out_sub = (q,) if l == n - 1 else (0, 1)
                K = torch.stack([_half_torus(net[l].circulant(L, L), out_sub, in_sub)
                                 for net in nets])                          # [2, Co, Ci, L, L/2]
                G = torch.fft.rfft2(K)                                      # [2, Co, Ci, L, L/4+1]
                Gadj = torch.conj_physical(G)
                if l == n - 1:  # x_B = (y_B - t) e: the t net's cotangent enters with a minus sign
                    Gadj = Gadj * torch.tensor([1.0, -1.0], dtype=K.dtype,
                                               device=K.device).view(2, 1, 1, 1, 1)
                bias = torch.stack([net[l].bias.repeat_interleave(len(out_sub)) for net in nets])
                # + 0.0 turns a bias of -0.0 into +0.0, so s is never -0.0 and copysign(1, s)
                # equals the module's sign convention (s < 0 ? -1 : +1) exactly.
                self.bias.append((bias + 0.0)[:, :, None, None])            # [2, Co, 1, 1]
                c_out = G.shape[1]
                if l == 0:                      # input: the single channel y_A, shared by s and t
                    kind = "first"
                    G, Gadj = G[:, :, 0], Gadj[:, :, 0]                     # [2, Co, L, L/4+1]
                elif c_out == 1:
                    kind = "last"
                    G, Gadj = G[:, 0], Gadj[:, 0]                           # [2, Ci, L, L/4+1]
                else:                           # channel mixing as batched matrix products
                    kind = "mix"
                    G = G.permute(0, 3, 4, 2, 1)                            # [2, L, L/4+1, Ci, Co]
                    Gadj = Gadj.permute(0, 3, 4, 1, 2)                      # [2, L, L/4+1, Co, Ci]
                self.kind.append(kind)
                self.G.append(G.contiguous())
                self.Gadj.append(Gadj.contiguous())
            self.one = torch.ones((), dtype=K.dtype, device=K.device)

    def _conv(self, l: int, X: torch.Tensor) -> torch.Tensor:
        """Spectrum of convolution l (bias excluded): X [N, 1 or 2, Ci, ...] -> [N, 2, Co, ...]."""
        kind, G = self.kind[l], self.G[l]
        if kind == "first":
            return X * G
        if kind == "last":
            return (X * G).sum(2, keepdim=True)
        return torch.matmul(X.permute(1, 3, 4, 0, 2), G).permute(3, 0, 4, 1, 2)

    def _conv_adjoint(self, l: int, D: torch.Tensor) -> torch.Tensor:
        """Adjoint of :meth:`_conv`: D [N, 2, Co, ...] -> [N, 2, Ci, ...]; for the first
        convolution the s and t parts are summed (shared input) -> [N, ...]."""
        kind, G = self.kind[l], self.Gadj[l]
        if kind == "first":
            return (D * G).sum((1, 2))
        if kind == "last":
            return D * G
        return torch.matmul(D.permute(1, 3, 4, 0, 2), G).permute(3, 0, 4, 1, 2)

    def inverse(self, y: list, keep: bool):
        """y = [even, odd] checkerboards [N, L, L/2] of phi~ -> (x, |s| on B, saved values for
        :meth:`pullback` or None)."""
        L, p, q = self.L, self.p, self.q
        shape = (L, L // 2)
        X = torch.fft.rfft2(y[p])[:, None, None]
        hidden = []
        for l in range(self.n):
            z = torch.fft.irfft2(self._conv(l, X), s=shape) + self.bias[l]
            if l < self.n - 1:
                h = torch.tanh(z)
                hidden.append(h)
                X = torch.fft.rfft2(h)
        s, t = z[:, 0, 0], z[:, 1, 0]
        abs_s = s.abs()
        e = torch.exp(abs_s)
        x_B = (y[q] - t) * e
        x = list(y)
        x[q] = x_B
        saved = None
        if keep:
            sgn = torch.copysign(self.one, s)
            saved = (e, sgn, sgn * x_B, hidden)
        return x, abs_s, saved

    def pullback(self, f: list, saved) -> list:
        """f = [even, odd] checkerboards of -dS~/dx -> those of -dS~/dy."""
        L, p, q = self.L, self.p, self.q
        shape = (L, L // 2)
        e, sgn, sgn_x, hidden = saved
        f_B = f[q]
        out = f_B.new_empty((f_B.shape[0], 2, L, L // 2))
        f_yB = torch.mul(f_B, e, out=out[:, 1])            # f_t up to its sign, folded into Gadj
        torch.addcmul(sgn, f_B, sgn_x, out=out[:, 0])      # f_s = sgn (f_B x_B + 1)
        D = torch.fft.rfft2(out)[:, :, None]
        for l in range(self.n - 1, 0, -1):
            h = hidden[l - 1]
            dh = torch.fft.irfft2(self._conv_adjoint(l, D), s=shape)
            D = torch.fft.rfft2(torch.addcmul(dh, dh * h, h, value=-1.0))  # tanh' = 1 - h^2
        g = list(f)
        g[p] = f[p] + torch.fft.irfft2(self._conv_adjoint(0, D), s=shape)
        g[q] = f_yB
        return g


def _site_order(L: int) -> torch.Tensor:
    """order[r] = site x0 L + x1 stored in row r: checkerboard 0 (row-major), then 1."""
    x = torch.arange(L * L)
    parity = (x // L + x % L) % 2
    return torch.cat((x[parity == 0], x[parity == 1]))


def _conv_entries(conv: CircularConv2d, L: int, out_sites: torch.Tensor, in_index: torch.Tensor,
                  row0: int, col0: int):
    """COO entries (rows, cols, values) of one CircularConv2d as a matrix on lattice sites:
    out[o, y] = bias[o] + sum_{i, a} w[o, i, a] x[i, y + a - k//2], restricted to the output
    sites ``out_sites`` (row row0 + o n_out + r for out_sites[r]) and the input sites with
    ``in_index[site] >= 0`` (column col0 + i n_in + in_index[site])."""
    w = conv.weight.detach().cpu()
    c_out, c_in, k = w.shape[0], w.shape[1], w.shape[-1]
    n_out, n_in = out_sites.numel(), int((in_index >= 0).sum())
    a = torch.arange(k) - k // 2
    x0 = (out_sites[:, None, None] // L + a[None, :, None]) % L
    x1 = (out_sites[:, None, None] % L + a[None, None, :]) % L
    col = in_index[x0 * L + x1]                                   # [n_out, k, k]
    r, a0, a1 = (col >= 0).nonzero(as_tuple=True)
    rows = row0 + torch.arange(c_out)[:, None, None] * n_out + r
    cols = col0 + torch.arange(c_in)[None, :, None] * n_in + col[r, a0, a1]
    rows, cols = torch.broadcast_tensors(rows, cols)
    return rows.reshape(-1), cols.reshape(-1), w[:, :, a0, a1].reshape(-1)


def _csr(rows, cols, values, shape, device):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        m = torch.sparse_coo_tensor(torch.stack((rows, cols)), values, shape).coalesce()
        m = m.to_sparse_csr()
        # int32 indices: the CPU (MKL) kernels would otherwise convert them on every call
        return torch.sparse_csr_tensor(m.crow_indices().int(), m.col_indices().int(),
                                       m.values(), shape).to(device)


class _SparseCoupling:
    """One affine coupling layer with frozen weights, its convolutions as sparse matrices.

    Fields are site-major [sites, batch], sites in checkerboard order (``_site_order``), so
    a checkerboard is a block of rows and the masks cost nothing.  The nets s and t are
    evaluated together: each convolution is one sparse product (s and t block-diagonal,
    the first one reading the rows of checkerboard A, the last one writing checkerboard B
    only).  Inverse, with y = phi~ side, x = phi side, s, t = nets(y_A) on B:

        x_A = y_A,   x_B = (y_B - t) e,   e = exp(|s|),   log|det df^-1/dy| = sum_B |s|.

    Pullback of f_x = -dS~/dx to f_y = -dS~/dy:

        f_y,B = f_x,B e,   f_s = sgn(s) (f_x,B x_B + 1)   (sgn(0) = +1, the module's |s|),
        f_t = -f_x,B e,    f_y,A = f_x,A + J_s^T f_s + J_t^T f_t,

    J the Jacobian of the nets in y_A: the transposed matrices in reverse order, with
    tanh' = 1 - tanh^2 in between.  The sign of f_t is folded into the last transposed
    matrix.  The pullback works on rows [checkerboard 0 | scratch | checkerboard 1], so
    that (f_s, f_y,B) are adjacent rows (f_s in the scratch) and one product does the
    adjoint of the last convolution."""

    def __init__(self, layer: "AffineCoupling", order: torch.Tensor):
        L, p = layer.L, layer.parity
        q = 1 - p
        H = L * L // 2
        self.H, self.p, self.q = H, p, q
        device = layer.s[0].weight.device
        dtype = layer.s[0].weight.dtype
        pos = torch.empty_like(order)
        pos[order] = torch.arange(order.numel())
        local_A = torch.where((pos >= H) == bool(p), pos % H, -1)  # A sites -> row within A
        nets = [[m for m in net if isinstance(m, CircularConv2d)] for net in (layer.s, layer.t)]
        self.n = n = len(nets[0])
        self.M, self.MT, self.bias = [], [], []
        for l in range(n):
            out_sites = order[q * H:(q + 1) * H] if l == n - 1 else order
            in_index = local_A if l == 0 else pos
            c_out, c_in = nets[0][l].weight.shape[:2]
            n_out, n_in = out_sites.numel(), int((in_index >= 0).sum())
            shape = (2 * c_out * n_out, c_in * n_in * (1 if l == 0 else 2))
            rows, cols, vals = [], [], []
            for k, net in enumerate(nets):
                r, c, v = _conv_entries(net[l], L, out_sites, in_index, k * c_out * n_out,
                                        0 if l == 0 else k * c_in * n_in)
                rows.append(r), cols.append(c), vals.append(v)
            rows, cols, vals = torch.cat(rows), torch.cat(cols), torch.cat(vals)
            bias = torch.stack([net[l].bias.detach() for net in nets])   # [2, c_out]
            if n == 1:
                # minimal model: one product gives (s, y_B - t) from all rows of y
                r = torch.arange(H)
                self.M.append(_csr(torch.cat((rows, H + r)), torch.cat((cols + p * H, q * H + r)),
                                   torch.cat((torch.where(rows >= H, -vals, vals),
                                              torch.ones(H, dtype=vals.dtype))),
                                   (2 * H, 2 * H), device))
                bias = bias * torch.tensor([[1.0], [-1.0]], dtype=bias.dtype, device=bias.device)
            else:
                self.M.append(_csr(rows, cols, vals, shape, device))
            # + 0.0 turns -0.0 into +0.0: s is then never -0.0 and copysign(1, s) is the
            # module's convention sgn = (s < 0 ? -1 : +1).
            self.bias.append((bias.repeat_interleave(n_out, 1).reshape(-1, 1) + 0.0).to(device))
            if l == n - 1:
                # x_B = (y_B - t) e: the t cotangent enters with a minus sign; the pullback's
                # operand rows are (f_s, f_y,B) for q = 1 and (f_y,B, f_s) for q = 0.
                vals = torch.where(rows >= H, -vals, vals)
                if q == 0:
                    rows = (rows + H) % (2 * H)
            self.MT.append(_csr(cols, rows, vals, shape[::-1], device))
        self.one = torch.ones((), dtype=dtype, device=device)

    def inverse(self, y: torch.Tensor, keep: bool):
        """y [2H, N] (rows: checkerboard 0, 1) of phi~ -> x, in place; returns (|s| [H, N],
        saved values for :meth:`pullback` or None)."""
        H, p, q = self.H, self.p, self.q
        y_B = y[q * H:(q + 1) * H]
        hidden = []
        if self.n == 1:
            z = torch.addmm(self.bias[0], self.M[0], y)     # rows: s, y_B - t
            s, w = z[:H], z[H:]
        else:
            h = y[p * H:(p + 1) * H]
            for l in range(self.n):
                z = torch.addmm(self.bias[l], self.M[l], h)
                if l < self.n - 1:
                    h = torch.tanh(z)
                    hidden.append(h)
            s, w = z[:H], y_B.sub_(z[H:])
        abs_s = s.abs()
        e = torch.exp(abs_s)
        x_B = torch.mul(w, e, out=y_B)
        saved = None
        if keep:
            sgn = torch.copysign(self.one, s)
            saved = (e, sgn, sgn * x_B, hidden)
        return abs_s, saved

    def pullback(self, f: torch.Tensor, saved) -> None:
        """f [3H, N] (rows: checkerboard 0, scratch, checkerboard 1) of -dS~/dx -> -dS~/dy,
        in place."""
        H, p, q = self.H, self.p, self.q
        e, sgn, sgn_x, hidden = saved
        f_B = f[2 * q * H:(2 * q + 1) * H]
        torch.addcmul(sgn, f_B, sgn_x, out=f[H:2 * H])      # f_s = sgn (f_B x_B + 1)
        f_B.mul_(e)                                         # f_y,B
        g = f[q * H:(q + 2) * H]
        for l in range(self.n - 1, 0, -1):
            h = hidden[l - 1]
            g = torch.mm(self.MT[l], g)
            g = torch.addcmul(g, g * h, h, value=-1.0)      # tanh' = 1 - tanh^2
        f[2 * p * H:(2 * p + 1) * H].addmm_(self.MT[0], g)


def _sparse_row_cost(coupling: "AffineCoupling") -> int:
    """Largest number of nonzeros in a row of the sparse convolution matrices (<= k^2 c_in)."""
    convs = [m for m in coupling.s if isinstance(m, CircularConv2d)]
    return max(c.kernel_size ** 2 * c.weight.shape[1] for c in convs)


class FrozenFlow:
    """A flow's inverse f^-1 and the pullback of forces through it, for fixed weights.

    Built by ``Flow.frozen()`` (also ``AffineCoupling.frozen()``, ``IdentityFlow.frozen()``)
    from the weights at that moment; it does not follow later changes of the module.  No
    autograd and no masks: fields are split into the two checkerboards, the s and t nets of a
    layer are evaluated together, and the convolutions are precomputed linear maps.

    ``inverse(phi~) -> (phi, log|det d f^-1/d phi~|)`` equals the module's ``inverse`` to
    rounding.  ``inverse_with_pullback(phi~) -> (phi, logdet_inv, pullback)`` also returns

        pullback(F) = J^T F + d log|det J| / d phi~,      J = d f^-1 / d phi~,

    so that with F = -dS/dphi at phi, pullback(F) = -dS~/dphi~ is the force of the flowed
    action S~(phi~) = S(f^-1(phi~)) - log|det J|.

    ``method`` chooses how convolutions are applied: ``"sparse"`` (sparse site matrices,
    few large operations; best for small kernels and channel counts, e.g. the minimal
    model), ``"fft"`` (products in Fourier space on the L x L/2 torus of a checkerboard;
    best for many hidden channels) or ``"auto"`` (sparse when every row of the matrices
    has at most ``SPARSE_MAX_ROW`` = 64 nonzeros, i.e. k^2 c_in <= 64)."""

    SPARSE_MAX_ROW = 64

    def __init__(self, couplings=(), L: int | None = None, method: str = "auto"):
        couplings = list(couplings)
        if method not in ("auto", "sparse", "fft"):
            raise ValueError(f"method must be auto, sparse or fft, got {method!r}")
        if method == "auto":
            method = "sparse" if all(_sparse_row_cost(c) <= self.SPARSE_MAX_ROW
                                     for c in couplings) else "fft"
        self.method, self.L = method, L
        if method == "sparse" and couplings:
            order = _site_order(L)
            H = L * L // 2
            pos = torch.empty_like(order)
            pos[order] = torch.arange(L * L)
            device = couplings[0].mask.device
            self._order = order.to(device)
            self._pos = pos.to(device)
            # pullback rows: [checkerboard 0 | scratch | checkerboard 1]
            self._order3 = torch.cat((order[:H], order[:H], order[H:])).to(device)
            self._pos3 = (pos + H * (pos >= H)).to(device)
            self.layers = [_SparseCoupling(c, order) for c in couplings]
        else:
            self.layers = [_FFTCoupling(c) for c in couplings]

    def _check(self, phi_t: torch.Tensor) -> None:
        if self.L is not None and phi_t.shape[-2:] != (self.L, self.L):
            raise ValueError(f"expected configurations [B, {self.L}, {self.L}], "
                             f"got {tuple(phi_t.shape)}")

    def _site_major(self, phi: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        n = phi.shape[-1] * phi.shape[-2]
        return phi.reshape(-1, n).t().contiguous().index_select(0, index)

    def _run(self, phi_t: torch.Tensor, logdet: bool, keep: bool):
        self._check(phi_t)
        if not self.layers:
            zero = phi_t.new_zeros(phi_t.shape[:-2]) if logdet else None
            return phi_t, zero, []
        total, saved = None, []
        if self.method == "sparse":
            y = self._site_major(phi_t, self._order)
            for layer in reversed(self.layers):
                abs_s, keep_l = layer.inverse(y, keep)
                saved.append(keep_l)
                if logdet:
                    total = abs_s.sum(0) if total is None else total + abs_s.sum(0)
            phi = y.index_select(0, self._pos).t().contiguous().reshape(phi_t.shape)
        else:
            sub = to_sublattices(phi_t)
            y = [sub[:, 0], sub[:, 1]]
            for layer in reversed(self.layers):
                y, abs_s, keep_l = layer.inverse(y, keep)
                saved.append(keep_l)
                if logdet:
                    ld = abs_s.sum((-2, -1))
                    total = ld if total is None else total + ld
            phi = from_sublattices(y[0], y[1]).reshape(phi_t.shape)
        if logdet:
            total = total.reshape(phi_t.shape[:-2])
        return phi, total, saved

    def inverse(self, phi_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(phi, log|det d f^-1/d phi~|) for phi~ [B, L, L]."""
        phi, logdet, _ = self._run(phi_t, True, False)
        return phi, logdet

    def inverse_with_pullback(self, phi_t: torch.Tensor, logdet: bool = True):
        """(phi, log|det d f^-1/d phi~| or None if not ``logdet``, pullback); see the class."""
        phi, total, saved = self._run(phi_t, logdet, True)
        return phi, total, lambda F: self._pullback(F, saved)

    def _pullback(self, F: torch.Tensor, saved) -> torch.Tensor:
        if not self.layers:
            return F
        pairs = zip(self.layers, reversed(saved))
        if self.method == "sparse":
            f = self._site_major(F, self._order3)
            for layer, keep_l in pairs:
                layer.pullback(f, keep_l)
            return f.index_select(0, self._pos3).t().contiguous().reshape(F.shape)
        sub = to_sublattices(F)
        f = [sub[:, 0], sub[:, 1]]
        for layer, keep_l in pairs:
            f = layer.pullback(f, keep_l)
        return from_sublattices(f[0], f[1]).reshape(F.shape)
