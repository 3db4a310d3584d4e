"""The paper's flow family: invertibility, exact log-determinants, symmetries (even
translations and Z2), bounded nets, identity start.  Every factory passes every shared test."""

import json

import pytest
import torch

from conftest import randomised
from hpcflow.flows import (FAMILY, AffineCoupling, Flow, FlowFamilyError, GlobalScale, IdentityFlow,
                           checkerboard, translate)


# (id, kernel size, builder L -> randomised module)
FACTORIES = [
    ("coupling-p0-k3", 3, lambda L: randomised(AffineCoupling(L, 0), 1)),
    ("coupling-p1-k3", 3, lambda L: randomised(AffineCoupling(L, 1), 2)),
    ("coupling-p0-k5-h4", 5, lambda L: randomised(AffineCoupling(L, 0, 5, (4,)), 3)),
    ("coupling-p1-k3-h4", 3, lambda L: randomised(AffineCoupling(L, 1, 3, (4,)), 4)),
    ("scale", 3, lambda L: randomised(GlobalScale(), 5)),
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
    f, z = make(L), fields(L)
    phi, _ = f.inverse(z)
    if name != "identity":
        assert (phi - z).abs().max() > 0.1
    torch.testing.assert_close(f(phi)[0], z, rtol=0, atol=1e-12)
    torch.testing.assert_close(f.inverse(f(z)[0])[0], z, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name, kernel, make", FACTORIES, ids=IDS)
def test_logdet_is_jacobian_determinant(name, kernel, make):
    """Brute force: log|det| of the full V x V autograd Jacobian, both directions."""
    L = jacobian_lattice(kernel)
    f, x = make(L), fields(L, batch=2)
    for direction in (f.forward, f.inverse):
        _, logdet = direction(x)
        for b in range(x.shape[0]):
            J = torch.autograd.functional.jacobian(
                lambda y: direction(y.view(1, L, L))[0].reshape(-1), x[b].reshape(-1),
                vectorize=True)
            sign, logabsdet = torch.linalg.slogdet(J)
            assert sign != 0
            torch.testing.assert_close(logdet[b], logabsdet, rtol=1e-10, atol=1e-12)
        if name != "identity":
            assert logdet.abs().min() > 0.1


@pytest.mark.parametrize("name, kernel, make", FACTORIES, ids=IDS)
def test_forward_and_inverse_logdets_cancel(name, kernel, make):
    L = 8
    f, z = make(L), fields(L)
    phi, logdet_g = f.inverse(z)
    _, logdet_f = f(phi)
    torch.testing.assert_close(logdet_g + logdet_f, torch.zeros(3), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name, kernel, make", FACTORIES, ids=IDS)
@pytest.mark.parametrize("shift", [(2, 0), (0, 2), (-2, 4)])
def test_even_translations_are_symmetries(name, kernel, make, shift):
    L = 8
    f, z = make(L), fields(L)
    phi, logdet = f.inverse(z)
    moved, moved_logdet = f.inverse(translate(z, *shift))
    torch.testing.assert_close(moved, translate(phi, *shift), rtol=0, atol=1e-12)
    torch.testing.assert_close(moved_logdet, logdet, rtol=1e-13, atol=1e-12)
    back, logdet_f = f(translate(phi, *shift))
    torch.testing.assert_close(back, translate(z, *shift), rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet_f, -logdet, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("name, kernel, make", FACTORIES, ids=IDS)
def test_z2_equivariance(name, kernel, make):
    """Bias-free tanh nets: s odd, |s| even, t odd, so g(-z) = -g(z) with the same log det
    (and likewise f), the phi -> -phi symmetry of S."""
    L = 8
    f, z = make(L), fields(L)
    for direction in (f.inverse, f.forward):
        out, logdet = direction(z)
        flipped, flipped_logdet = direction(-z)
        torch.testing.assert_close(flipped, -out, rtol=0, atol=1e-13)
        torch.testing.assert_close(flipped_logdet, logdet, rtol=1e-14, atol=1e-13)


def test_z2_test_can_fail():
    """With a bias in t (the old family had them) g(-z) != -g(z): the test above can fail."""
    L = 8
    layer, z = randomised(AffineCoupling(L, 0), 1), fields(L)
    biased = torch.nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular", dtype=torch.float64)
    with torch.no_grad():
        biased.weight.copy_(layer.t[0].weight)
        biased.bias.fill_(0.2)
    layer.t[0] = biased
    assert (layer.inverse(-z)[0] + layer.inverse(z)[0]).abs().max() > 0.1


def test_odd_translation_is_not_a_symmetry():
    """Check that the equivariance test above can fail: a one-site shift swaps the masks."""
    L = 8
    f, z = randomised(Flow(L), 5), fields(L)
    assert (f.inverse(translate(z, 1, 0))[0] - translate(f.inverse(z)[0], 1, 0)).abs().max() > 1e-3


@pytest.mark.parametrize("hidden", [(), (4,), (3, 2)])
def test_nets_are_bounded_and_shrink(hidden):
    """tanh bounds |s| <= 1, |t| < 1: a step maps x_B to y_B with exp(-1) |x_B| - 1 <=
    |y_B| <= |x_B| + 1, even for huge weights (no exponential walls)."""
    L = 8
    layer = randomised(AffineCoupling(L, 0, 3, hidden), 20, std=30.0)
    x = 10 * fields(L)
    y, logdet = layer.inverse(x)
    B = ~checkerboard(L, 0).bool()
    assert ((y - x)[:, ~B] == 0).all()
    assert (y[:, B].abs() <= x[:, B].abs() + 1 + 1e-12).all()
    assert (y[:, B].abs() >= torch.exp(torch.tensor(-1.0)) * x[:, B].abs() - 1 - 1e-12).all()
    assert (logdet >= -B.sum()).all() and (logdet <= 0).all()


def test_global_scale():
    scale = GlobalScale()
    with torch.no_grad():
        scale.log_scale.fill_(-0.4)
    z = fields(4)
    phi, logdet = scale.inverse(z)
    torch.testing.assert_close(phi, torch.exp(torch.tensor(-0.4)) * z, rtol=1e-15, atol=0)
    torch.testing.assert_close(logdet, torch.full((3,), -0.4 * 16), rtol=1e-15, atol=0)
    flow = Flow(4)
    assert flow.scale.log_scale.requires_grad and flow.scale.log_scale.item() == 0.0


@pytest.mark.parametrize("parity", [0, 1])
@pytest.mark.parametrize("hidden", [(), (4,)])
def test_coupling_freezes_its_checkerboard(parity, hidden):
    L = 6
    layer, x = randomised(AffineCoupling(L, parity, 3, hidden), 12), fields(L)
    frozen = checkerboard(L, parity).bool()
    for direction in (layer.forward, layer.inverse):
        out, _ = direction(x)
        assert torch.equal(out[:, frozen], x[:, frozen])
        assert (out[:, ~frozen] - x[:, ~frozen]).abs().min() > 0


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
    f, x = Flow(L, **kwargs), fields(L)
    for direction in (f.forward, f.inverse):
        out, logdet = direction(x)
        assert torch.equal(out, x)
        assert torch.equal(logdet, torch.zeros(3))


def test_fresh_flow_trains():
    """At the identity start the last convolution of s and of t, and the scale, get a
    gradient of the reverse-KL integrand."""
    L = 4
    f, z = Flow(L, hidden=(2,)), fields(L)
    phi, logdet = f.inverse(z)
    (0.5 * (phi ** 2).sum() + (phi ** 4).sum() - logdet.sum()).backward()
    for layer in f.couplings:
        for net in (layer.s, layer.t):
            assert net[-2].weight.grad.abs().sum() > 0
    assert f.scale.log_scale.grad.abs() > 0


def test_no_biases_and_parameter_count():
    assert [c.parity for c in Flow(4, layers=2).couplings] == [0, 1, 0, 1]
    assert [c.parity for c in Flow(4, layers=3, block="single").couplings] == [0, 1, 0]
    minimal = Flow(4)
    assert sum(p.numel() for p in minimal.parameters()) == 2 * 2 * 9 + 1
    assert not any("bias" in name for name, _ in Flow(8, 3, 2, (4, 2)).named_parameters())


@pytest.mark.parametrize("kwargs", [
    {"L": 8}, {"L": 8, "kernel_size": 5, "layers": 2, "hidden": (3, 2), "block": "single"}])
def test_spec_rebuilds_flow(kwargs):
    f = randomised(Flow(**kwargs), 13)
    spec = json.loads(json.dumps(f.spec()))
    assert spec == {"family": FAMILY, "L": 8, "kernel_size": 3, "layers": 1, "hidden": [],
                    "block": "pair", **{k: list(v) if k == "hidden" else v for k, v in kwargs.items()}}
    g = Flow.from_spec(spec)
    assert g.spec() == f.spec()
    g.load_state_dict(f.state_dict())
    z = fields(8)
    for a, b in zip(f.inverse(z), g.inverse(z)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", [None, "phi-to-z-exp-abs"])
def test_spec_of_another_family_is_refused(family):
    spec = Flow(4).spec()
    spec.pop("family")
    if family:
        spec["family"] = family
    with pytest.raises(FlowFamilyError, match="family"):
        Flow.from_spec(spec)


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
        Flow(4).inverse(torch.zeros(2, 6, 6))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flow_on_cuda():
    L = 8
    f, z = randomised(Flow(L, 3, 2, (4,)), 14), fields(L)
    phi, logdet = f.inverse(z)
    g, x = f.to("cuda"), z.to("cuda")
    x_phi, x_logdet = g.inverse(x)
    assert x_phi.device.type == "cuda" and x_phi.dtype == torch.float64
    torch.testing.assert_close(x_phi.cpu(), phi, rtol=0, atol=1e-12)
    torch.testing.assert_close(x_logdet.cpu(), logdet, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g(x_phi)[0], x, rtol=0, atol=1e-12)
