"""Fourier backend of :class:`~hpcflow.flows.frozen.FrozenFlow`: coupling steps with frozen
weights whose convolutions are products in Fourier space on the two checkerboard tori.

Sheared checkerboard coordinates
--------------------------------
:func:`to_sublattices` writes a configuration phi [B, L, L] as its two checkerboards

    sub[n, sigma, a, b] = phi[n, a, (a + 2 b + sigma) mod L],   sigma = (x0 + x1) mod 2,

each an L x L/2 torus on which the even translations (those that map a checkerboard to
itself) are ordinary periodic shifts of (a, b).  A circular convolution of the full lattice,
kernel g [o, i, L, L] (:meth:`CircularConv2d.circulant`), restricted to maps from
checkerboard sigma to checkerboard tau is then a circular convolution on that torus with
the kernel of :func:`_half_torus`, i.e. a product of spectra after ``rfft2``.

One step (the formulas of :mod:`hpcflow.flows.frozen`)
------------------------------------------------------
Generative direction, input x, output y, frozen A = checkerboard ``parity``, updated B:

    h_0 = x_A,   h_l = tanh(W_l h_{l-1})  (l = 1..n, s and t nets side by side),
    (s, t) = h_n on B,   y_A = x_A,   y_B = e x_B + t,   e = exp(-|s|),   log|det| = -sum_B |s|.

Pullback of f_y = -dS~/dy to f_x = -dS~/dx:

    f_x,B = e f_y,B,   f_s = -sgn(s) (e x_B f_y,B + 1)  (sgn(0) = +1),   f_t = f_y,B,
    f_x,A = f_y,A + W_1^T D_1 ... W_n^T D_n (f_s, f_t),   D_l = diag(1 - h_l^2).

Every W_l is a product with precomputed kernel spectra G; W_l^T multiplies by conj(G) and
sums over the output channels.  The first convolution reads checkerboard A only (one
channel, shared by s and t), the last writes checkerboard B only; hidden channels live on
both checkerboards, as channel pairs (c, tau).  The minus sign of f_s is folded into the
adjoint spectra of the last convolution.  Costs do not depend on the kernel size k: a
convolution costs FFTs of its input and output channels and a c_in x c_out channel mix per
Fourier mode, against k^2 c_in c_out multiply-adds per site for sparse site matrices.
"""

from __future__ import annotations

import torch

from .layers import AffineCoupling, convolutions


def to_sublattices(phi: torch.Tensor) -> torch.Tensor:
    """phi [..., L, L] -> [N, 2, L, L/2] (N the product of the leading dims), the two
    checkerboards in sheared coordinates:

        sub[n, sigma, a, b] = phi[n, a, (a + 2 b + sigma) mod L],   sigma = (x0 + x1) mod 2.

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


class FFTStep:
    """One coupling step with frozen weights on sheared checkerboard coordinates (see the
    module docstring).  Fields are lists [even, odd] of checkerboards [N, L, L/2]; s and t
    are evaluated together as a net dimension of size 2 (s first)."""

    def __init__(self, layer: AffineCoupling):
        L, p = layer.L, layer.parity
        q = 1 - p
        self.L, self.p, self.q = L, p, q
        nets = [convolutions(layer.s), convolutions(layer.t)]
        self.n = n = len(nets[0])
        self.G, self.Gadj, self.kind = [], [], []
        with torch.no_grad():
            for l in range(n):
                in_sub = (p,) if l == 0 else (0, 1)
                out_sub = (q,) if l == n - 1 else (0, 1)
                K = torch.stack([_half_torus(net[l].circulant(L, L), out_sub, in_sub)
                                 for net in nets])                          # [2, Co, Ci, L, L/2]
                G = torch.fft.rfft2(K)                                      # [2, Co, Ci, L, L/4+1]
                Gadj = torch.conj_physical(G)
                if l == n - 1:  # f_s = -sgn(s) (...): the s net's cotangent enters negated
                    Gadj = Gadj * torch.tensor([-1.0, 1.0], dtype=K.dtype,
                                               device=K.device).view(2, 1, 1, 1, 1)
                if l == 0:                      # input: the single channel x_A, shared by s and t
                    kind = "first"
                    G, Gadj = G[:, :, 0], Gadj[:, :, 0]                     # [2, Co, L, L/4+1]
                elif G.shape[1] == 1:
                    kind = "last"
                    G, Gadj = G[:, 0], Gadj[:, 0]                           # [2, Ci, L, L/4+1]
                else:                           # channel mixing as batched matrix products
                    kind = "mix"
                    G = G.permute(0, 3, 4, 2, 1)                            # [2, L, L/4+1, Ci, Co]
                    Gadj = Gadj.permute(0, 3, 4, 1, 2)                      # [2, L, L/4+1, Co, Ci]
                self.kind.append(kind)
                self.G.append(G.contiguous())
                self.Gadj.append(Gadj.contiguous())

    def _conv(self, l: int, X: torch.Tensor) -> torch.Tensor:
        """Spectrum of convolution l: X [N, 1 or 2, Ci, ...] -> [N, 2, Co, ...]."""
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

    def generate(self, x: list, keep: bool):
        """x = [even, odd] checkerboards [N, L, L/2] -> (y, |s| [N, L, L/2] on B, saved
        values for :meth:`pullback` or None)."""
        L, p, q = self.L, self.p, self.q
        shape = (L, L // 2)
        X = torch.fft.rfft2(x[p])[:, None, None]
        hidden = []
        for l in range(self.n):
            h = torch.tanh_(torch.fft.irfft2(self._conv(l, X), s=shape))
            hidden.append(h)
            if l < self.n - 1:
                X = torch.fft.rfft2(h)
        s, t = h[:, 0, 0], h[:, 1, 0]
        abs_s = s.abs()
        e = torch.exp(-abs_s)
        x_B = x[q]
        y = list(x)
        y[q] = torch.addcmul(t, e, x_B)
        saved = None
        if keep:
            sgn = torch.ones_like(s).masked_fill_(s < 0, -1.0)
            saved = (e, sgn, sgn * e * x_B, hidden)
        return y, abs_s, saved

    def pullback(self, f: list, saved) -> list:
        """f = [even, odd] checkerboards of -dS~/dy -> those of -dS~/dx."""
        L, p, q = self.L, self.p, self.q
        shape = (L, L // 2)
        e, sgn, sgn_ex, hidden = saved
        f_B = f[q]
        g = f_B.new_empty((f_B.shape[0], 2, 1, L, L // 2))
        torch.addcmul(sgn, f_B, sgn_ex, out=g[:, 0, 0])  # -f_s; the sign sits in Gadj[-1]
        g[:, 1, 0] = f_B                                 # f_t
        for l in range(self.n - 1, -1, -1):
            h = hidden[l]
            g = torch.addcmul(g, g * h, h, value=-1.0)   # tanh' = 1 - tanh^2
            D = torch.fft.rfft2(g)
            g = torch.fft.irfft2(self._conv_adjoint(l, D), s=shape)
        out = list(f)
        out[p] = f[p] + g
        out[q] = f_B * e                                 # f_x,B
        return out
