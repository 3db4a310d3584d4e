"""Coupling layers and flows: invertibility, exact log-determinants, symmetries, identity start."""

import json

import pytest
import torch

from conftest import randomised
from hpcflow.flow import AffineCoupling, Flow, IdentityFlow, checkerboard, translate


# (id, kernel size, builder L -> randomised module)
FACTORIES = [
    ("coupling-p0-k3", 3, lambda L: randomised(AffineCoupling(L, 0), 1)),
    ("coupling-p1-k3", 3, lambda L: randomised(AffineCoupling(L, 1), 2)),
    ("coupling-p0-k5-h4", 5, lambda L: randomised(AffineCoupling(L, 0, 5, (4,)), 3)),
    ("coupling-p1-k3-h4", 3, lambda L: randomised(AffineCoupling(L, 1, 3, (4,)), 4)),
    ("flow-pair-1", 3, lambda L: randomised(Flow(L), 5)),
    ("flow-pair-2-h4", 3, lambda L: randomised(Flow(L, 3, 2, (4,)), 6)),
    ("flow-single-1", 3, lambda L: randomised(Flow(L, block="single"), 7)),
    ("flow-single-2-k5", 5, lambda L: randomised(Flow(L, 5, 2, block="single"), 8)),
    ("flow-pair-1-k7-h3-2", 7, lambda L: randomised(Flow(L, 7, 1, (3, 2)), 9)),
    ("flow-single-2-k5-h2", 5, lambda L: randomised(Flow(L, 5, 2, (2,), "single"), 10)),
    ("identity", 3, lambda L: IdentityFlow()),
]
IDS = [f[0] for f in FACTORIES]


def fields(L, batch=3, seed=11):
    return 1.5 * torch.randn(batch, L, L, generator=torch.Generator().manual_seed(seed))


def jacobian_lattice(kernel):
    return 4 if kernel <= 4 else 8


@pytest.mark.parametrize("name, kernel, make", FACTORIES, ids=IDS)
def test_inverse_round_trip(name, kernel, make):
    L = 8
    f, phi = make(L), fields(L)
    phi_tilde, _ = f(phi)
    if name != "identity":
        assert (phi_tilde - phi).abs().max() > 0.1
    torch.testing.assert_close(f.inverse(phi_tilde)[0], phi, rtol=0, atol=1e-12)
    torch.testing.assert_close(f(f.inverse(phi)[0])[0], phi, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name, kernel, make", FACTORIES, ids=IDS)
def test_logdet_is_jacobian_determinant(name, kernel, make):
    L = jacobian_lattice(kernel)
    f, phi = make(L), fields(L, batch=2)
    for direction in (f.forward, f.inverse):
        _, logdet = direction(phi)
        for b in range(phi.shape[0]):
            J = torch.autograd.functional.jacobian(
                lambda x: direction(x.view(1, L, L))[0].reshape(-1), phi[b].reshape(-1),
                vectorize=True)
            sign, logabsdet = torch.linalg.slogdet(J)
            assert sign != 0
            torch.testing.assert_close(logdet[b], logabsdet, rtol=1e-10, atol=1e-12)
        if name != "identity":
            assert logdet.abs().min() > 0.1


@pytest.mark.parametrize("name, kernel, make", FACTORIES, ids=IDS)
def test_forward_and_inverse_logdets_cancel(name, kernel, make):
    L = 8
    f, phi = make(L), fields(L)
    phi_tilde, logdet = f(phi)
    _, logdet_inv = f.inverse(phi_tilde)
    torch.testing.assert_close(logdet + logdet_inv, torch.zeros(3), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name, kernel, make", FACTORIES, ids=IDS)
@pytest.mark.parametrize("shift", [(2, 0), (0, 2), (-2, 4)])
def test_even_translations_are_symmetries(name, kernel, make, shift):
    L = 8
    f, phi = make(L), fields(L)
    phi_tilde, logdet = f(phi)
    moved_tilde, moved_logdet = f(translate(phi, *shift))
    torch.testing.assert_close(moved_tilde, translate(phi_tilde, *shift), rtol=0, atol=1e-12)
    torch.testing.assert_close(moved_logdet, logdet, rtol=1e-13, atol=1e-12)
    back, logdet_inv = f.inverse(translate(phi_tilde, *shift))
    torch.testing.assert_close(back, translate(phi, *shift), rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet_inv, -logdet, rtol=1e-13, atol=1e-12)


def test_odd_translation_is_not_a_symmetry():
    """Check that the equivariance test above can fail: a one-site shift swaps the masks."""
    L = 8
    f, phi = randomised(Flow(L), 5), fields(L)
    assert (f(translate(phi, 1, 0))[0] - translate(f(phi)[0], 1, 0)).abs().max() > 1e-3


@pytest.mark.parametrize("parity", [0, 1])
@pytest.mark.parametrize("hidden", [(), (4,)])
def test_coupling_freezes_its_checkerboard(parity, hidden):
    L = 6
    layer, phi = randomised(AffineCoupling(L, parity, 3, hidden), 12), fields(L)
    frozen = checkerboard(L, parity).bool()
    for direction in (layer.forward, layer.inverse):
        out, _ = direction(phi)
        assert torch.equal(out[:, frozen], phi[:, frozen])
        assert (out[:, ~frozen] - phi[:, ~frozen]).abs().min() > 0


def test_checkerboard():
    m0, m1 = checkerboard(4, 0), checkerboard(4, 1)
    assert m0.dtype == torch.float64 and m0.shape == (4, 4)
    assert m0[0, 0] == 1 and m0[0, 1] == 0 and m0[1, 1] == 1
    assert torch.equal(m0 + m1, torch.ones(4, 4))
    assert torch.equal(translate(m0, 1, 0), m1) and torch.equal(translate(m0, 0, 1), m1)


@pytest.mark.parametrize("kwargs", [
    {}, {"layers": 3}, {"block": "single", "layers": 3}, {"kernel_size": 5, "hidden": (8, 4)}])
def test_fresh_flow_is_identity(kwargs):
    L = 6
    f, phi = Flow(L, **kwargs), fields(L)
    for direction in (f.forward, f.inverse):
        out, logdet = direction(phi)
        assert torch.equal(out, phi)
        assert torch.equal(logdet, torch.zeros(3))


def test_fresh_flow_trains():
    """At the identity start every last layer, of s as well as of t, gets a gradient."""
    L = 4
    f, phi = Flow(L, hidden=(2,)), fields(L)
    phi_tilde, logdet = f(phi)
    (0.5 * (phi_tilde ** 2).sum() - logdet.sum()).backward()
    for layer in f.couplings:
        for net in (layer.s, layer.t):
            assert net[-1].weight.grad.abs().sum() > 0


def test_layer_counts_and_parities():
    assert [c.parity for c in Flow(4, layers=2).couplings] == [0, 1, 0, 1]
    assert [c.parity for c in Flow(4, layers=3, block="single").couplings] == [0, 1, 0]
    minimal = Flow(4)
    assert sum(p.numel() for p in minimal.parameters()) == 2 * 2 * (9 + 1)


@pytest.mark.parametrize("kwargs", [
    {"L": 8}, {"L": 8, "kernel_size": 5, "layers": 2, "hidden": (3, 2), "block": "single"}])
def test_spec_rebuilds_flow(kwargs):
    f = randomised(Flow(**kwargs), 13)
    spec = json.loads(json.dumps(f.spec()))
    assert spec == {"L": 8, "kernel_size": 3, "layers": 1, "hidden": [], "block": "pair",
                    **{k: list(v) if k == "hidden" else v for k, v in kwargs.items()}}
    g = Flow.from_spec(spec)
    assert g.spec() == f.spec()
    g.load_state_dict(f.state_dict())
    phi = fields(8)
    for a, b in zip(f(phi), g(phi)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [
    {"L": 4, "kernel_size": 2}, {"L": 4, "kernel_size": 0}, {"L": 4, "kernel_size": -1},
    {"L": 4, "kernel_size": 5}, {"L": 4, "layers": 0}, {"L": 4, "block": "triple"},
    {"L": 0}, {"L": 5}, {"L": 7, "kernel_size": 3}, {"L": 4, "hidden": (0,)},
    {"L": 4, "kernel_size": 3.0}, {"L": 4, "layers": 1.5}])
def test_flow_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        Flow(**kwargs)


@pytest.mark.parametrize("L, parity, kernel", [(5, 0, 3), (4, 2, 3), (4, -1, 3), (4, 0, 4)])
def test_coupling_rejects_bad_arguments(L, parity, kernel):
    with pytest.raises(ValueError):
        AffineCoupling(L, parity, kernel)


def test_flow_refuses_odd_lattice():
    with pytest.raises(ValueError, match="even"):
        Flow(9)


def test_wrong_lattice_size_is_refused():
    with pytest.raises(ValueError):
        Flow(4)(torch.zeros(2, 6, 6))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flow_on_cuda():
    L = 8
    f, phi = randomised(Flow(L, 3, 2, (4,)), 14), fields(L)
    phi_tilde, logdet = f(phi)
    g, x = f.to("cuda"), phi.to("cuda")
    x_tilde, x_logdet = g(x)
    assert x_tilde.device.type == "cuda" and x_tilde.dtype == torch.float64
    torch.testing.assert_close(x_tilde.cpu(), phi_tilde, rtol=0, atol=1e-12)
    torch.testing.assert_close(x_logdet.cpu(), logdet, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g.inverse(x_tilde)[0], x, rtol=0, atol=1e-12)
