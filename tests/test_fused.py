"""The fused (torch.compile) HMC trajectory against the eager reference, and the fallback."""

import pytest
import torch

from hpcflow import fused
from hpcflow.action import FlowedAction, Phi4Action
from hpcflow.flows import Flow
from hpcflow.hmc import INTEGRATORS, hmc_step, init_state
from hpcflow.parallel import ReplicaStreams

from conftest import randomised

TARGET = Phi4Action(0.576, 0.5)
B, L = 8, 8


@pytest.fixture(scope="module")
def compiled():
    """One compilation for the module (tens of seconds the first time; inductor caches it)."""
    streams = ReplicaStreams(3, range(B), "fused")
    example = (0.5 * streams.normal((L, L), "cpu"), streams.normal((L, L), "cpu"))
    try:
        return fused.compile_trajectory(TARGET, INTEGRATORS["leapfrog"], 1.0, 5, example)
    except fused.CompileUnavailable as err:
        pytest.skip(f"torch.compile unavailable here: {err}")


def chain(trajectory, n=30, action=TARGET):
    """n HMC steps of ``action`` (fields, accept decisions), eager or with ``trajectory``."""
    streams = ReplicaStreams(11, range(B), "same")
    state = init_state(action, 0.5 * streams.normal((L, L), "cpu"))
    phis, accepts = [], []
    for _ in range(n):
        state, info = hmc_step(action, state, streams.normal((L, L), "cpu"),
                               streams.log_uniform("cpu"), INTEGRATORS["leapfrog"], 1.0, 5,
                               trajectory=trajectory)
        phis.append(state.phi)
        accepts.append(info.accepted)
    return torch.stack(phis), torch.stack(accepts)


def assert_same_and_eager(got, want, eager):
    """``got`` == ``want`` bit for bit, tensor by tensor, and both the ``eager`` results to
    1e-12 (accept decisions: equal)."""
    for g, w, e in zip(got, want, eager):
        assert g.shape == w.shape == e.shape and torch.equal(g, w)
        if g.dtype == torch.bool:
            assert torch.equal(g, e)
        else:
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("metropolis,layout", [(None, None), (False, "batch-major"),
                                               (None, "site-major")],
                         ids=["production", "eager_metropolis", "site_major"])
def test_compiled_chain_equals_eager(compiled, metropolis, layout):
    """phi to 1e-12 and identical accept decisions over a short chain (same streams), for
    the production's compiled step at B = 8 (batch-major, the Metropolis test fused), the
    trajectory with the eager test, and the site-major layout."""
    if layout is not None:
        streams = ReplicaStreams(3, range(B), "fused")
        example = (0.5 * streams.normal((L, L), "cpu"), streams.normal((L, L), "cpu"))
        compiled = fused.compile_trajectory(TARGET, INTEGRATORS["leapfrog"], 1.0, 5, example,
                                            metropolis=metropolis, layout=layout)
        assert hasattr(compiled, "step") == (metropolis is None) and compiled.layout == layout
    else:
        assert hasattr(compiled, "step") and compiled.layout == "batch-major"
    phi_eager, acc_eager = chain(None)
    phi_fused, acc_fused = chain(compiled)
    assert 0 < acc_eager.float().mean() < 1
    assert torch.equal(acc_fused, acc_eager)
    torch.testing.assert_close(phi_fused, phi_eager, rtol=0, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("flowed_action", [False, True], ids=["hmc", "fhmc"])
def test_compiled_once_per_shape(flowed_action):
    """The example call compiles the graph; trajectories in a production's grad mode, on
    fresh tensors every time, reuse it (dynamo refuses any recompilation here)."""
    B_, L_ = 2, 4
    action = flowed(L_) if flowed_action else Phi4Action(0.5, 0.5)
    streams = ReplicaStreams(5, range(B_), "once")
    example = (torch.zeros(B_, L_, L_, dtype=torch.float64),
               torch.ones(B_, L_, L_, dtype=torch.float64))
    try:
        fn = fused.compile_trajectory(action, INTEGRATORS["leapfrog"], 1.0, 3, example)
    except fused.CompileUnavailable as err:
        pytest.skip(f"torch.compile unavailable here: {err}")
    state = init_state(action, 0.5 * streams.normal((L_, L_), "cpu"))
    with torch._dynamo.config.patch(error_on_recompile=True), torch.enable_grad():
        for _ in range(3):
            state, _ = hmc_step(action, state, streams.normal((L_, L_), "cpu"),
                                streams.log_uniform("cpu"), INTEGRATORS["leapfrog"], 1.0, 3,
                                trajectory=fn)
    assert torch.isfinite(state.S).all()
    # each graph went through dynamo once (the example) and is called directly since
    called = [g for g in fn.graphs if g.dynamo_calls]
    assert called and all(g.dynamo_calls == 1 for g in fn.graphs if g.dynamo_calls)
    calls = [g.dynamo_calls + g.direct_calls for g in called]
    # 4 trajectories (the example's and 3); FHMC: 4 forces each (leapfrog of 3 steps), a
    # kick-drift graph for 3, a kick-action graph for the last, then the change to halves
    # and the Metropolis test once a trajectory; HMC: each of its graphs once a trajectory
    assert calls == ([12, 4, 4, 4] if flowed_action else [4] * len(called)), \
        [(g.dynamo_calls, g.direct_calls) for g in fn.graphs]
    if flowed_action:  # the force graphs with FLOW_INDUCTOR, the others with the base settings
        flow = {**fused.GRAPH_INDUCTOR, **fused.FLOW_INDUCTOR}
        assert [g.inductor for g in fn.graphs] == [flow, flow] + [fused.GRAPH_INDUCTOR] * 2


def _scaled_sum(x, y):
    return x * y, (x + y).sum()


def test_compiled_graph_calls_the_graph_directly_after_compiling_it():
    """The first call of a signature compiles through dynamo; later calls of it run the
    same graph directly, bit for bit; another shape or dtype compiles again (once); a
    closure tensor (a bound method's attribute) is the same tensor for the direct calls
    (in-place changes are seen); functions whose outputs are not the graph's (an input
    returned as it is) stay with dynamo and are still right."""
    fn = fused.compile_graph(_scaled_sum)
    x, y = torch.arange(6.0).reshape(2, 3), torch.full((2, 3), 0.5)
    try:
        first = fn(x, y)
    except Exception as err:  # no compiler: what compile_trajectory reports
        pytest.skip(f"torch.compile unavailable here: {err}")
    again = fn(x + 0.0, y)
    assert (fn.dynamo_calls, fn.direct_calls) == (1, 1)
    for a, b, c in zip(first, again, _scaled_sum(x, y)):
        assert torch.equal(a, b) and torch.equal(a, c)
    fn(torch.ones(3, 3), torch.ones(3, 3))                     # new shape: compiles once
    fn(torch.ones(3, 3), torch.ones(3, 3))
    fn(x.to(torch.float32), y.to(torch.float32))               # new dtype
    assert (fn.dynamo_calls, fn.direct_calls) == (3, 2)
    assert fn(x.t(), y.t())[1] == _scaled_sum(x.t(), y.t())[1]  # other strides: another graph
    assert fn.dynamo_calls == 4

    class Shift(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("offset", torch.tensor([1.0, 2.0, 3.0]))

        def forward(self, x):
            return (x + self.offset,)

    shift = Shift()
    g = fused.compile_graph(shift.forward)
    assert torch.equal(g(x)[0], x + shift.offset)
    shift.offset.mul_(10.0)
    assert torch.equal(g(x)[0], x + shift.offset) and g.direct_calls == 1

    # a second CompiledGraph of the same function, after a plain torch.compile of it too,
    # compiles its own graph (dynamo caches per code object) and calls it directly
    plain = torch.compile(_scaled_sum, dynamic=False, fullgraph=True)
    with torch.no_grad():
        plain(x, y)
    twin = fused.compile_graph(_scaled_sum)
    for _ in range(2):
        assert torch.equal(twin(x, y)[1], first[1])
    assert (twin.dynamo_calls, twin.direct_calls) == (1, 1)
    assert torch.equal(fn(x, y)[0], first[0]) and fn.dynamo_calls == 4  # still direct

    passthrough = fused.compile_graph(lambda a, b: (a, a * b))
    for _ in range(2):
        out = passthrough(x, y)
        assert out[0] is x and torch.equal(out[1], x * y)
    assert (passthrough.dynamo_calls, passthrough.direct_calls) == (2, 0)


def test_chunk_rows(monkeypatch):
    """ceil(B sites / chunk_sites) chunks of equal size; the whole batch on a GPU, when it
    fits, or without chunking."""
    assert fused.chunk_rows(7, 16, "cpu", 48) == 3           # 112 sites: 3 chunks of 3, 3, 1
    assert fused.chunk_rows(1024, 4096, "cpu", 16384) == 4   # L = 64: 4 replicas a chunk
    assert fused.chunk_rows(64, 256, "cpu", 16384) == 64     # L = 16, B = 64: one call
    assert fused.chunk_rows(3, 100, "cpu", 10) == 1
    assert fused.chunk_rows(7, 16, "cuda", 48) == 7
    assert fused.chunk_rows(7, 16, "cpu", 0) == 7
    assert fused.chunk_rows(1024, 4096, "cpu") == 16         # module values: L = 64, B = 1024
    assert fused.chunk_rows(256, 4096, "cpu") == 256         # 2^20 sites fit: one call
    monkeypatch.setattr(fused, "CPU_CHUNK_SITES", 48)  # None: the module's values
    monkeypatch.setattr(fused, "CPU_CHUNK_ABOVE", 100)
    assert fused.chunk_rows(7, 16, "cpu") == 3               # 112 > 100 sites: chunks of 48
    assert fused.chunk_rows(6, 16, "cpu") == 6               # 96 <= 100: one call
    # site-major: chunks of CPU_CHUNK_SITES above CPU_CHUNK_SITES
    assert fused.chunk_rows(6, 16, "cpu", layout="site-major") == 3   # 96 > 48
    monkeypatch.setattr(fused, "CPU_CHUNK_SITES", 65536)
    assert fused.chunk_rows(64, 4096, "cpu", layout="site-major") == 16
    assert fused.chunk_rows(256, 256, "cpu", layout="site-major") == 256


def test_default_layout():
    """Site-major on a CPU from SITE_MAJOR_MIN_BATCH replicas, batch-major below and on GPUs."""
    n = fused.SITE_MAJOR_MIN_BATCH
    assert fused.default_layout("cpu", n) == "site-major"
    assert fused.default_layout("cpu", n - 1) == "batch-major"
    assert fused.default_layout("cuda", 1024) == "batch-major"


@pytest.mark.slow
@pytest.mark.parametrize("B_,L_,integrator", [(7, 4, "leapfrog"), (16, 6, "omf4"), (3, 8, "omf2")])
def test_layouts_are_bit_identical(B_, L_, integrator):
    """The site-major and batch-major compiled trajectories and fused steps give the same
    numbers bit for bit (the layout, chosen by the replicas per rank, cannot make chains
    depend on the rank count), and the eager ones to 1e-12 with the same decisions."""
    streams = ReplicaStreams(4, range(B_), "layouts")
    phi, pi = 0.5 * streams.normal((L_, L_), "cpu"), streams.normal((L_, L_), "cpu")
    S, log_u = TARGET.action(phi), torch.linspace(-0.3, 0.3, B_, dtype=torch.float64)
    integ = INTEGRATORS[integrator]
    out = {}
    try:
        for layout in fused.LAYOUTS:
            fused.new_job()
            fn = fused.compile_trajectory(TARGET, integ, 1.0, 4, (phi, pi), metropolis=True,
                                          layout=layout, chunk_sites=0)
            assert fn.layout == layout
            out[layout] = (fn(phi, pi), fn.step(phi, S, pi, log_u))
    except fused.CompileUnavailable as err:
        pytest.skip(f"torch.compile unavailable here: {err}")
    eager = (fused.eager_trajectory(TARGET, integ, 1.0, 4)(phi, pi),
             fused.eager_step(TARGET, integ, 1.0, 4)(phi, S, pi, log_u))
    for site, batch, e in zip(*out.values(), eager):
        assert_same_and_eager(site, batch, e)
    assert 0 < int(out["site-major"][1][3].sum()) < B_


@pytest.mark.slow
@pytest.mark.parametrize("layout", fused.LAYOUTS)
def test_md_inductor_settings_reach_the_md_graph_and_change_no_number(layout, monkeypatch):
    """The MD graph is compiled with fused.MD_INDUCTOR (seen by inductor's compile_fx), the
    other graphs with inductor's defaults (every graph over fused.GRAPH_INDUCTOR); the
    trajectory and the fused step equal those compiled at inductor's defaults bit for bit
    (stored or recomputed, a drift is the same operations)."""
    import torch._inductor.compile_fx as cfx

    seen = []
    real = cfx.compile_fx

    def recording(gm, example_inputs, *args, config_patches=None, **kwargs):
        from torch._inductor import config

        seen.append((config_patches, config.realize_reads_threshold))
        return real(gm, example_inputs, *args, config_patches=config_patches, **kwargs)

    monkeypatch.setattr(cfx, "compile_fx", recording)
    B_, L_ = 16, 6
    streams = ReplicaStreams(5, range(B_), "md-inductor")
    phi, pi = 0.5 * streams.normal((L_, L_), "cpu"), streams.normal((L_, L_), "cpu")
    S, log_u = TARGET.action(phi), torch.linspace(-0.3, 0.3, B_, dtype=torch.float64)
    out = []
    try:
        for inductor in (None, {}):
            fused.new_job()
            fn = fused.compile_trajectory(TARGET, INTEGRATORS["omf2"], 1.0, 5, (phi, pi),
                                          layout=layout, chunk_sites=0, inductor=inductor)
            md = fn.graphs[1 if layout == "site-major" else 0]
            assert md.inductor == {**fused.GRAPH_INDUCTOR,
                                   **(fused.MD_INDUCTOR if inductor is None else {})}
            assert all(g.inductor == fused.GRAPH_INDUCTOR for g in fn.graphs if g is not md)
            out.append((fn(phi, pi), fn.step(phi, S, pi, log_u)))
    except fused.CompileUnavailable as err:
        pytest.skip(f"torch.compile unavailable here: {err}")
    # compile_fx applies its patches and calls itself: inductor then sees the setting
    assert [t for _, t in seen].count(1) == 1      # the first trajectory's MD graph only
    assert [p for p, _ in seen].count({**fused.GRAPH_INDUCTOR, **fused.MD_INDUCTOR}) == 1
    assert all(p is not None and p["size_asserts"] is False for p, _ in seen if p)
    for a, b in zip(*out):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.slow
def test_chunked_trajectory_is_the_whole_batch_bit_for_bit():
    """A batch run in chunks of replicas (the last one padded) gives the unchunked compiled
    trajectory bit for bit and the eager one to 1e-12, and is compiled once (dynamo refuses
    any recompilation over chained hmc steps)."""
    B_, L_ = 7, 4
    streams = ReplicaStreams(9, range(B_), "chunks")
    phi, pi = 0.5 * streams.normal((L_, L_), "cpu"), streams.normal((L_, L_), "cpu")
    integ = INTEGRATORS["leapfrog"]
    try:
        fused.new_job()
        whole = fused.compile_trajectory(TARGET, integ, 1.0, 4, (phi, pi), chunk_sites=0,
                                         metropolis=True)
        fused.new_job()
        parts = fused.compile_trajectory(TARGET, integ, 1.0, 4, (phi, pi), chunk_sites=48,
                                         metropolis=True)
    except fused.CompileUnavailable as err:
        pytest.skip(f"torch.compile unavailable here: {err}")
    assert parts.rows == 3 and not hasattr(whole, "rows")
    got, want = parts(phi, pi), whole(phi, pi)
    eager = fused.eager_trajectory(TARGET, integ, 1.0, 4)(phi, pi)
    for g, w, e in zip(got, want, eager):
        assert g.shape == w.shape and torch.equal(g, w)
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    # the fused step (trajectory + Metropolis test, metropolis=True): chunked = whole, bit for bit, and the
    # eager step to 1e-12 with the same decisions; log_u straddles -dH so both outcomes occur
    S, log_u = TARGET.action(phi), torch.linspace(-0.3, 0.3, B_, dtype=torch.float64)
    got = parts.step(phi, S, pi, log_u)
    want = whole.step(phi, S, pi, log_u)
    eager = fused.eager_step(TARGET, integ, 1.0, 4)(phi, S, pi, log_u)
    assert_same_and_eager(got, want, eager)
    assert 0 < int(got[3].sum()) < B_, got[2]
    state = init_state(TARGET, phi)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.enable_grad():
        for _ in range(3):
            state, info = hmc_step(TARGET, state, streams.normal((L_, L_), "cpu"),
                                   streams.log_uniform("cpu"), integ, 1.0, 4, trajectory=parts)
    assert torch.isfinite(state.S).all() and info.accepted.shape == (B_,)


@pytest.mark.slow
@pytest.mark.parametrize("reset", [True, False], ids=["new_job", "without"])
def test_jobs_in_one_process_each_compile(reset):
    """More jobs than dynamo's recompile limit in one process (scan run): with
    fused.new_job() before each, every job compiles its own graph; without it the limit is
    hit (made fatal here, with a limit of 2 instead of 8), which in production silently
    runs the later jobs eager."""
    B_, L_ = 2, 4
    action = Phi4Action(0.5, 0.5)
    example = (torch.zeros(B_, L_, L_, dtype=torch.float64),
               torch.ones(B_, L_, L_, dtype=torch.float64))
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        fused.new_job()
        try:
            for n_steps in (2, 3, 4):  # three jobs' MD settings
                if reset:
                    fused.new_job()
                fused.compile_trajectory(action, INTEGRATORS["leapfrog"], 1.0, n_steps, example)
        except fused.CompileUnavailable as err:
            if "recompile" not in str(err).lower():
                pytest.skip(f"torch.compile unavailable here: {err}")
            assert not reset, f"new_job() before each job, yet: {err}"
            return  # the limit was hit: what new_job prevents
    assert reset, "three MD settings under a limit of 2 should have hit the recompile limit"


def test_eager_trajectory_is_hmc_steps_own():
    phi_a, acc_a = chain(None, n=10)
    eager = fused.eager_trajectory(TARGET, INTEGRATORS["leapfrog"], 1.0, 5)
    phi_b, acc_b = chain(eager, n=10)
    assert torch.equal(acc_a, acc_b) and torch.equal(phi_a, phi_b)


def test_fallback_when_compilation_is_refused(monkeypatch):
    """A failing compiler gives one line and the eager path under auto, an error under on."""
    def refuse(fn, **kw):
        def broken(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\ndetails...")
        return broken

    monkeypatch.setattr(torch, "compile", refuse)
    example = (torch.zeros(B, L, L, dtype=torch.float64), torch.ones(B, L, L, dtype=torch.float64))
    lines = []
    fn, is_fused = fused.choose_trajectory("auto", TARGET, INTEGRATORS["leapfrog"], 1.0, 5,
                                           example, log=lines.append)
    assert not is_fused and len(lines) == 1
    assert "No working C++ compiler found" in lines[0] and "eager" in lines[0]
    assert "details" not in lines[0]
    phi, pi, S = fn(*example)
    assert torch.equal(S, TARGET.action(phi))
    with pytest.raises(fused.CompileUnavailable, match="C\\+\\+ compiler"):
        fused.choose_trajectory("on", TARGET, INTEGRATORS["leapfrog"], 1.0, 5, example)
    fn, is_fused = fused.choose_trajectory("off", TARGET, INTEGRATORS["leapfrog"], 1.0, 5, example)
    assert not is_fused


def test_flowed_action_with_hidden_channels_stays_eager():
    act = FlowedAction(TARGET, Flow(L, hidden=(2,)))
    assert not fused.compilable(act) and fused.compilable(TARGET)
    assert fused.compilable(FlowedAction(TARGET, Flow(L)))  # the minimal flow is fused
    lines = []
    example = (torch.zeros(B, L, L, dtype=torch.float64), torch.ones(B, L, L, dtype=torch.float64))
    fn, is_fused = fused.choose_trajectory("auto", act, INTEGRATORS["leapfrog"], 1.0, 5, example,
                                           log=lines.append)
    assert not is_fused and lines == []
    with pytest.raises(fused.CompileUnavailable, match="hidden channels"):
        fused.choose_trajectory("on", act, INTEGRATORS["leapfrog"], 1.0, 5, example)
    with pytest.raises(ValueError, match="compile mode"):
        fused.choose_trajectory("maybe", act, INTEGRATORS["leapfrog"], 1.0, 5, example)


def flowed(L_, k=3, layers=1, seed=0):
    return FlowedAction(TARGET, randomised(Flow(L_, kernel_size=k, layers=layers), seed))


@pytest.mark.parametrize("L_, k, layers", [(4, 3, 1), (8, 3, 1), (8, 5, 1), (6, 3, 2)])
def test_stencil_flow_is_the_frozen_flow(L_, k, layers):
    """The gather form of the flowed force and action (eager) against FlowedAction's
    (frozen sparse evaluator) and its autograd force, to 1e-12, far from the identity."""
    act = flowed(L_, k, layers, seed=L_ + k)
    st = fused.StencilFlow(TARGET, act.flow, "cpu")
    z = 0.8 * torch.randn(3, L_, L_, generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64)
    zs = st.halves(z)
    assert torch.equal(st.lattice(zs), z)
    *F, S = st.force_and_action(*zs)
    torch.testing.assert_close(st.lattice(F), act.force(z), rtol=0, atol=1e-12)
    torch.testing.assert_close(st.lattice(F), act.force_autograd(z), rtol=0, atol=1e-12)
    torch.testing.assert_close(S, act.action(z), rtol=1e-12, atol=0)
    torch.testing.assert_close(st.lattice(st.force(zs)), act.force(z), rtol=0, atol=1e-12)
    torch.testing.assert_close(st.action(zs), act.action(z), rtol=1e-12, atol=0)
    phi, logdet, _ = st.generate(zs, False)
    phi_ref, logdet_ref = act.flow.inverse(z)
    torch.testing.assert_close(st.lattice(phi), phi_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet, logdet_ref, rtol=0, atol=1e-12)


def test_stencil_trajectory_is_the_eager_one():
    """The site-major trajectory (eager force_and_action) against hmc's eager one, leapfrog
    and omf2: phi, pi to 1e-12 and S~ at the end point (from the last force evaluation)."""
    act = flowed(L)
    st = fused.StencilFlow(TARGET, act.flow, "cpu")
    streams = ReplicaStreams(5, range(B), "stencil")
    z, pi = 0.5 * streams.normal((L, L), "cpu"), streams.normal((L, L), "cpu")
    for name in ("leapfrog", "omf2"):
        ref = fused.eager_trajectory(act, INTEGRATORS[name], 1.0, 5)(z, pi)
        got = fused.stencil_trajectory(st, INTEGRATORS[name], 1.0, 5)(z, pi)
        assert not torch.equal(ref[0], z)
        for a, b in zip(got[:2], ref[:2]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        torch.testing.assert_close(got[2], ref[2], rtol=1e-12, atol=0)


@pytest.fixture(scope="module")
def compiled_flowed():
    """One compilation of the minimal flow's force for the module."""
    act = flowed(L)
    streams = ReplicaStreams(3, range(B), "fused")
    example = (0.5 * streams.normal((L, L), "cpu"), streams.normal((L, L), "cpu"))
    try:
        return act, fused.compile_trajectory(act, INTEGRATORS["leapfrog"], 1.0, 5, example)
    except fused.CompileUnavailable as err:
        pytest.skip(f"torch.compile unavailable here: {err}")


@pytest.mark.slow
def test_compiled_flowed_force_equals_eager(compiled_flowed):
    """The compiled flowed force and action against the eager FlowedAction's, to 1e-12."""
    act, fn = compiled_flowed
    z = 0.8 * torch.randn(B, L, L, generator=torch.Generator().manual_seed(2),
                          dtype=torch.float64)
    *F, S = fn.force_and_action(*fn.stencil.halves(z))
    torch.testing.assert_close(fn.stencil.lattice(F), act.force(z), rtol=0, atol=1e-12)
    torch.testing.assert_close(S, act.action(z), rtol=1e-12, atol=0)


@pytest.mark.slow
def test_compiled_fhmc_chain_equals_eager(compiled_flowed):
    """A short FHMC chain, compiled against eager: z to 1e-12, the same accept decisions."""
    act, fn = compiled_flowed

    z_eager, acc_eager = chain(None, 15, act)
    z_fused, acc_fused = chain(fn, 15, act)
    assert 0 < acc_eager.float().mean() < 1
    assert torch.equal(acc_fused, acc_eager)
    torch.testing.assert_close(z_fused, z_eager, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_compiled_fhmc_replicas_do_not_depend_on_the_batch():
    """A replica's compiled FHMC step (halves, kick-drifts, the Metropolis test) is the same
    bit for bit in batches of 16, 13 and 5 replicas (a batch's size is the replicas per
    rank; 13 and 5 end in a partial SIMD vector): chains do not depend on the rank count."""
    act = flowed(6, seed=4)
    streams = ReplicaStreams(3, range(16), "batch-independent")
    z, pi = 0.5 * streams.normal((6, 6), "cpu"), streams.normal((6, 6), "cpu")
    S = act.action(z)
    # half the replicas 0.3 below their eager -dH (accepted), half 0.3 above (rejected)
    dH = fused.eager_step(act, INTEGRATORS["leapfrog"], 1.0, 3)(z, S, pi, torch.zeros(16))[2]
    log_u = -dH + 0.3 * torch.tensor([1.0, -1.0] * 8, dtype=torch.float64)
    outs = {}
    try:
        for n in (16, 13, 5):
            fused.new_job()
            fn = fused.compile_trajectory(act, INTEGRATORS["leapfrog"], 1.0, 3, (z[:n], pi[:n]))
            outs[n] = fn.step(z[:n], S[:n], pi[:n], log_u[:n])
    except fused.CompileUnavailable as err:
        pytest.skip(f"torch.compile unavailable here: {err}")
    assert outs[16][3].tolist() == [False, True] * 8
    for n in (13, 5):
        assert all(torch.equal(a[:n], b) for a, b in zip(outs[16], outs[n]))


@pytest.mark.slow
def test_compile_key_selects_the_compiled_flowed_force(compiled_flowed):
    """[run] compile = auto/on give FHMC the fused trajectory (the compiled force), off the
    eager one."""
    act, _ = compiled_flowed
    example = (torch.zeros(B, L, L, dtype=torch.float64), torch.ones(B, L, L, dtype=torch.float64))
    for mode in ("auto", "on"):
        fn, is_fused = fused.choose_trajectory(mode, act, INTEGRATORS["leapfrog"], 1.0, 5,
                                               example)
        assert is_fused and isinstance(fn.stencil, fused.StencilFlow)
    fn, is_fused = fused.choose_trajectory("off", act, INTEGRATORS["leapfrog"], 1.0, 5, example)
    assert not is_fused and not hasattr(fn, "stencil")


@pytest.mark.slow
def test_compiled_production_equals_eager(tmp_path, compiled):
    """[run] compile = on gives the eager file's chains: every measurement to 1e-12 and the
    same accept decisions (16 replicas: site-major, the Metropolis test fused)."""
    import h5py
    import numpy as np

    from conftest import write_input
    from hpcflow import run

    files = {}
    for mode in ("off", "on"):
        d = tmp_path / mode
        d.mkdir()
        path = write_input(d, L=8, replicas=16, trajectories=30, thermalization=5, steps=5,
                           checkpoint_every=10)
        path.write_text(path.read_text().replace("[run]\n", f"[run]\ncompile = {mode}\n", 1))
        assert run.main([str(path)]) == 0
        with h5py.File(d / "out" / "hmc.h5") as f:
            files[mode] = {k: f[k][()] for k in ("observables/M", "observables/C", "mc/dH",
                                                 "mc/accepted", "checkpoint/slot_phi")}
    for k, eager in files["off"].items():
        np.testing.assert_allclose(files["on"][k], eager, rtol=0, atol=1e-12, err_msg=k)
    assert (files["on"]["mc/accepted"] == files["off"]["mc/accepted"]).all()


def test_compile_on_without_a_compiler_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from conftest import write_input
    from hpcflow import run

    def refuse(fn, **kw):
        def broken(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return broken

    monkeypatch.setattr(torch, "compile", refuse)
    path = write_input(tmp_path)
    path.write_text(path.read_text().replace("[run]\n", "[run]\ncompile = on\n", 1))
    assert run.main([str(path)]) == 2
    assert "[run] compile = on: torch.compile failed" in capsys.readouterr().err
    path.write_text(path.read_text().replace("compile = on", "compile = auto"))
    assert run.main([str(path), "--force"]) == 0
