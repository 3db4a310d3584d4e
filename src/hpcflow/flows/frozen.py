"""Frozen evaluation of a flow for flow HMC: the generator and the pullback of forces.

FHMC integrates z with the flowed action (PHYSICS.md section 5)

    S~(z) = S(g(z)) - log|det dg/dz|,

and needs, many times per trajectory with fixed weights, its force

    F~ = -dS~/dz = J^T F(phi) + d log|det J| / dz,     J = dg/dz,  F = -dS/dphi,  phi = g(z).

:class:`FrozenFlow` evaluates g and this pullback by the chain rule written out, without
autograd, with one of two backends for the convolutions (``method``):

- "sparse" (this module, :class:`_SparseStep`): fields are site-major [sites, batch] with
  the sites in checkerboard order (rows 0..V/2-1: parity 0, then parity 1), so a
  checkerboard is a block of rows and the masks cost nothing.  Every convolution of a step
  is a precomputed sparse matrix over sites, and the s and t nets of a step are evaluated
  together (block-stacked matrices).  Cost: k^2 c_in c_out multiply-adds per site and conv.
- "fft" (:mod:`hpcflow.flows.fft`): the two checkerboards as L x L/2 tori in sheared
  coordinates, every convolution a product of precomputed spectra.  Cost independent of k:
  FFTs of every hidden channel and a c_in x c_out channel mix per Fourier mode.

One step (generative direction, input x, output y, frozen A, updated B), with
h_0 = x_A, h_l = tanh(W_l h_{l-1}), (s, t) = h_n on B:

    y_A = x_A,   y_B = e x_B + t,   e = exp(-|s|),   log|det| = -sum_B |s|.

Pullback of the cotangent f_y = -dS~/dy (S~ contains +sum_B |s| through -log det):

    f_x,B = e f_y,B
    f_s   = -sgn(s) (e x_B f_y,B + 1)        sgn(0) = +1, the module's d|s|/ds at 0
    f_t   = f_y,B
    f_x,A = f_y,A + W_1^T D_1 ... W_n^T D_n (f_s, f_t),     D_l = diag(1 - h_l^2)  (tanh')

and the global scale phi = exp(lambda) y gives f_y = exp(lambda) f_phi (its log det
lambda V does not depend on z).  The minus sign of f_s is folded into W_n^T.

Choice of backend (``method="auto"``), from CPU measurements only (no GPU was timed)
-------------------------------------------------------------------------------------
``python -m hpcflow.bench --frozen-backends --repeat 5 --out results/frozen-backends-cpu.json``
times one flowed force (generator with pullback, then the pullback of a force; one coupling
layer; B = 64; 1 thread; both backends alternately, best of 5) on a shared 2-core x86_64
machine, torch 2.13 CPU.  fft/sparse time ratios (L = 16 / 32 / 64):

    no hidden, k = 3, 5, 7        1.82 / 1.89 / 2.01,  1.57 / 1.33 / 1.53,  1.34 / 1.10 / 1.22
    k = 3, hidden (8,)            1.25 / 1.03       (16,): 1.63 / 1.45   (32,): 1.55 / sparse*
    k = 3, hidden (4, 4)          1.65 / 1.67
    k = 3, hidden (8, 8)          0.97 / 0.87       (12, 12): 0.63 / 0.48   (16, 16): 0.58 / fft*
    k = 5, hidden (4, 4)          0.84 / 0.66       (8, 8):   0.51 / 0.24
    k = 7, hidden (4,)            0.83 / 0.99       (8,): 0.74 / 0.72       (8, 8): 0.25 / 0.24
    near the boundary: k = 5 (4,) 1.41 / 0.83,  (8,) 1.13 / 0.89;  k = 7 (2,) 0.96 / 1.07

(* the other backend took over 2 s per force and was skipped; at L = 64, k = 5 (8, 8) both
did.)  Sparse wins without hidden channels (the minimal model: by 1.8 to 2.0) and with
narrow nets of k = 3; Fourier wins as soon as k^2 multiplies many channels (k = 5, 7 with
hidden channels, channel-mixing layers), by up to 4x.  The largest k^2 c_in of a conv does
not separate the regimes (k = 3 with (16,) and with (16, 16) share 144, but sparse wins the
first by 1.5 and Fourier the second by 1.7).  A cost model does: a least-squares fit of the
ratios of two earlier runs of the same benchmark gave

    fft / sparse ~ (15 H + 2.9 P + 624) / (S + 387),      per net of a step, with
    S = sum k^2 c_in c_out  (sparse multiply-adds per site),   H = sum of hidden channels,
    P = sum of c_in c_out over the convolutions with c_in, c_out > 1 (channel mixing),

(rms error of the log ratio 0.21, the run-to-run scatter on this shared machine), so

    auto = "sparse" if S <= 240 + 15 H + 3 P (summed over the steps), else "fft"

(the break-even, rounded; :func:`auto_method`).  In ``results/frozen-backends-cpu.json``
this picks the faster backend in 34 of the 37 cases timed with both; the three others are
near the boundary (k = 5 (8,) at L = 16, k = 7 (2,) at L = 16, k = 5 (4,) at L = 32), lost
by at most 17%.  Wide nets at L >= 32 cost more than the volume ratio on this machine, for
both backends (fft, k = 3 (32,): 89 ms at L = 16, over 2 s at L = 32 but 0.65 s with glibc's
MALLOC_MMAP_THRESHOLD_ raised: every large temporary is fresh memory that page-faults).
A GPU will have other break-evens: time it there before relying on "auto".
"""

from __future__ import annotations

import warnings

import torch

from .fft import FFTStep, from_sublattices, to_sublattices
from .layers import AffineCoupling, CircularConv2d, convolutions


def site_order(L: int) -> torch.Tensor:
    """order[r] = site x0 L + x1 stored in row r: checkerboard 0 (row-major), then 1."""
    x = torch.arange(L * L)
    parity = (x // L + x % L) % 2
    return torch.cat((x[parity == 0], x[parity == 1]))


def _conv_entries(conv: CircularConv2d, L: int, out_sites: torch.Tensor, in_index: torch.Tensor,
                  row0: int, col0: int):
    """COO entries (rows, cols, values) of one CircularConv2d as a matrix on lattice sites:
    out[o, y] = sum_{i, a} w[o, i, a] x[i, y + a - k//2], restricted to the output sites
    ``out_sites`` (row row0 + o n_out + r for out_sites[r]) and the input sites with
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


class _SparseStep:
    """One coupling step with frozen weights (see the module docstring for the formulas).

    ``M[l]`` maps the (s, t)-stacked channels of layer l - 1 to those of layer l: the first
    reads the H = V/2 rows of checkerboard A (input shared by s and t), the middle ones are
    block diagonal over all 2H sites per channel, the last writes the H rows of
    checkerboard B for s, then for t.  ``MT[l]`` are the transposes, the last with the s
    columns negated."""

    def __init__(self, layer: AffineCoupling, order: torch.Tensor):
        L, p = layer.L, layer.parity
        q = 1 - p
        H = L * L // 2
        self.H, self.A, self.B = H, slice(p * H, (p + 1) * H), slice(q * H, (q + 1) * H)
        device = layer.mask.device
        pos = torch.empty_like(order)
        pos[order] = torch.arange(order.numel())
        local_A = torch.where((pos >= H) == bool(p), pos % H, -1)   # site -> row within A
        nets = [convolutions(layer.s), convolutions(layer.t)]
        self.n = n = len(nets[0])
        self.M, self.MT = [], []
        for l in range(n):
            out_sites = order[q * H:(q + 1) * H] if l == n - 1 else order
            in_index = local_A if l == 0 else pos
            c_out, c_in = nets[0][l].weight.shape[:2]
            n_out, n_in = out_sites.numel(), int((in_index >= 0).sum())
            shape = (2 * c_out * n_out, c_in * n_in * (1 if l == 0 else 2))
            parts = [_conv_entries(net[l], L, out_sites, in_index, k * c_out * n_out,
                                   0 if l == 0 else k * c_in * n_in)
                     for k, net in enumerate(nets)]
            rows, cols, vals = (torch.cat(x) for x in zip(*parts))
            self.M.append(_csr(rows, cols, vals, shape, device))
            if l == n - 1:
                vals = torch.where(rows < H, -vals, vals)            # f_s enters with -sgn
            self.MT.append(_csr(cols, rows, vals, shape[::-1], device))

    def generate(self, x: torch.Tensor, keep: bool):
        """x [2H, N] -> y in place; returns (|s| [H, N], saved values for the pullback)."""
        H = self.H
        h = x[self.A]
        hidden = []
        for l in range(self.n):
            h = torch.tanh_(torch.mm(self.M[l], h))
            hidden.append(h)
        s, t = h[:H], h[H:]
        abs_s = s.abs()
        e = torch.exp(-abs_s)
        x_B = x[self.B]
        saved = None
        if keep:
            sgn = torch.ones_like(s).masked_fill_(s < 0, -1.0)
            saved = (e, sgn, sgn * e * x_B, hidden)
        x_B.mul_(e).add_(t)
        return abs_s, saved

    def pullback(self, f: torch.Tensor, saved) -> None:
        """f [2H, N] = -dS~/dy -> -dS~/dx, in place."""
        H = self.H
        e, sgn, sgn_ex, hidden = saved
        f_B = f[self.B]
        g = torch.empty((2 * H, f.shape[1]), dtype=f.dtype, device=f.device)
        torch.addcmul(sgn, f_B, sgn_ex, out=g[:H])       # -f_s; the sign sits in MT[-1]
        g[H:] = f_B                                      # f_t
        f_B.mul_(e)                                      # f_x,B
        for l in range(self.n - 1, -1, -1):
            h = hidden[l]
            g = torch.addcmul(g, g * h, h, value=-1.0)   # tanh' = 1 - tanh^2
            if l:
                g = torch.mm(self.MT[l], g)
        f[self.A].addmm_(self.MT[0], g)


# auto: sparse when  sum k^2 c_in c_out <= AUTO_BASE + AUTO_PER_HIDDEN * sum c_hidden
#                                       + AUTO_PER_MIX * sum_{c_in, c_out > 1} c_in c_out
# (per step; see the module docstring and results/frozen-backends-cpu.json)
AUTO_BASE, AUTO_PER_HIDDEN, AUTO_PER_MIX = 240, 15, 3


def conv_costs(coupling: AffineCoupling) -> tuple[int, int, int]:
    """(sum k^2 c_in c_out, sum of hidden channels, sum of c_in c_out over the convolutions
    with c_in > 1 and c_out > 1) of one net of a step: the multiply-adds per site of the
    sparse backend, and what drives the Fourier one (its FFTs per hidden channel, its
    channel mixing per Fourier mode; neither depends on k)."""
    shapes = [c.weight.shape for c in convolutions(coupling.s)]
    sparse = sum(w[0] * w[1] * w[2] * w[3] for w in shapes)
    hidden = sum(w[0] for w in shapes[:-1])
    mix = sum(w[0] * w[1] for w in shapes if w[0] > 1 and w[1] > 1)
    return int(sparse), int(hidden), int(mix)


def auto_method(couplings) -> str:
    """The backend ``method="auto"`` picks for these steps: "sparse" when
    sum k^2 c_in c_out <= 240 + 15 sum c_hidden + 3 sum_mix c_in c_out (summed over the
    steps), else "fft" (CPU measurements, see the module docstring)."""
    sparse = budget = 0
    for c in couplings:
        k2cc, hidden, mix = conv_costs(c)
        sparse += k2cc
        budget += AUTO_BASE + AUTO_PER_HIDDEN * hidden + AUTO_PER_MIX * mix
    return "sparse" if sparse <= budget else "fft"


class FrozenFlow:
    """A flow's generator g and the pullback of forces through it, for fixed weights.

    Built by ``Flow.frozen()`` (also ``AffineCoupling.frozen()`` and
    ``IdentityFlow.frozen()``) from the weights at that moment; it does not follow later
    changes of the module.

    ``inverse(z) -> (phi, log|det dg/dz|)`` equals the module's ``inverse`` to rounding.
    ``inverse_with_pullback(z) -> (phi, logdet, pullback)`` also returns

        pullback(F) = J^T F + d log|det J| / dz,      J = dg/dz,

    so that with F = -dS/dphi at phi, pullback(F) = -dS~/dz is the force of
    S~(z) = S(g(z)) - log|det J|.

    ``method``: "sparse", "fft" (the backends of the module docstring) or "auto"
    (:func:`auto_method`); anything else is a ValueError.  The attribute ``method`` is the
    backend in use, None for no coupling steps (identity or scale only: no backend)."""

    METHODS = ("auto", "sparse", "fft")

    def __init__(self, couplings=(), L: int | None = None, log_scale: float = 0.0,
                 method: str = "auto"):
        couplings = list(couplings)
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {self.METHODS}, got {method!r}")
        self.L, self.log_scale = L, float(log_scale)
        self.scale = float(torch.exp(torch.tensor(self.log_scale, dtype=torch.float64)))
        self.layers = []
        self.method = None
        if not couplings:
            return
        if method == "auto":
            method = auto_method(couplings)
        self.method = method
        if method == "sparse":
            order = site_order(L)
            pos = torch.empty_like(order)
            pos[order] = torch.arange(L * L)
            device = couplings[0].mask.device
            self._order, self._pos = order.to(device), pos.to(device)
            self.layers = [_SparseStep(c, order) for c in couplings]
        else:
            self.layers = [FFTStep(c) for c in couplings]

    @property
    def is_identity(self) -> bool:
        return not self.layers and self.log_scale == 0.0

    def _check(self, z: torch.Tensor) -> None:
        if self.L is not None and z.shape[-2:] != (self.L, self.L):
            raise ValueError(f"expected configurations [B, {self.L}, {self.L}], "
                             f"got {tuple(z.shape)}")

    def _site_major(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1] * x.shape[-2]
        return x.reshape(-1, n).t().contiguous().index_select(0, self._order)

    def _lattice(self, y: torch.Tensor, shape) -> torch.Tensor:
        return y.index_select(0, self._pos).t().contiguous().reshape(shape)

    def _run(self, z: torch.Tensor, logdet: bool, keep: bool):
        self._check(z)
        V = z.shape[-1] * z.shape[-2]
        total = (z.new_full(z.shape[:-2], self.log_scale * V) if logdet else None)
        if not self.layers:
            return (z if self.scale == 1.0 else self.scale * z), total, []
        saved = []
        if self.method == "sparse":
            y = self._site_major(z)
            for layer in self.layers:
                abs_s, keep_l = layer.generate(y, keep)
                saved.append(keep_l)
                if logdet:
                    total = total - abs_s.sum(0).reshape(z.shape[:-2])
            if self.scale != 1.0:
                y.mul_(self.scale)
            return self._lattice(y, z.shape), total, saved
        sub = to_sublattices(z)
        y = [sub[:, 0], sub[:, 1]]
        for layer in self.layers:
            y, abs_s, keep_l = layer.generate(y, keep)
            saved.append(keep_l)
            if logdet:
                total = total - abs_s.sum((-2, -1)).reshape(z.shape[:-2])
        phi = from_sublattices(y[0], y[1]).reshape(z.shape)
        if self.scale != 1.0:
            phi.mul_(self.scale)
        return phi, total, saved

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(phi = g(z), log|det dg/dz|) for z [B, L, L]."""
        phi, logdet, _ = self._run(z, True, False)
        return phi, logdet

    def inverse_with_pullback(self, z: torch.Tensor, logdet: bool = True):
        """(phi, log|det dg/dz| or None if not ``logdet``, pullback); see the class."""
        phi, total, saved = self._run(z, logdet, True)
        return phi, total, lambda F: self._pullback(F, saved)

    def _pullback(self, F: torch.Tensor, saved) -> torch.Tensor:
        if not self.layers:
            return F if self.scale == 1.0 else self.scale * F
        if self.method == "sparse":
            f = self._site_major(F)
            if self.scale != 1.0:
                f.mul_(self.scale)
            for layer, keep_l in zip(reversed(self.layers), reversed(saved)):
                layer.pullback(f, keep_l)
            return self._lattice(f, F.shape)
        sub = to_sublattices(F if self.scale == 1.0 else self.scale * F)
        f = [sub[:, 0], sub[:, 1]]
        for layer, keep_l in zip(reversed(self.layers), reversed(saved)):
            f = layer.pullback(f, keep_l)
        return from_sublattices(f[0], f[1]).reshape(F.shape)
