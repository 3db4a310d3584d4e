"""The fused (torch.compile) HMC trajectory against the eager reference, and the fallback."""

import pytest
import torch

from hpcflow import fused
from hpcflow.action import FlowedAction, Phi4Action
from hpcflow.flows import Flow
from hpcflow.hmc import INTEGRATORS, hmc_step, init_state
from hpcflow.parallel import ReplicaStreams

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


def chain(trajectory, n=30):
    streams = ReplicaStreams(11, range(B), "same")
    state = init_state(TARGET, 0.5 * streams.normal((L, L), "cpu"))
    phis, accepts = [], []
    for _ in range(n):
        state, info = hmc_step(TARGET, state, streams.normal((L, L), "cpu"),
                               streams.log_uniform("cpu"), INTEGRATORS["leapfrog"], 1.0, 5,
                               trajectory=trajectory)
        phis.append(state.phi)
        accepts.append(info.accepted)
    return torch.stack(phis), torch.stack(accepts)


@pytest.mark.slow
def test_compiled_chain_equals_eager(compiled):
    """phi to 1e-12 and identical accept decisions over a short chain (same streams)."""
    phi_eager, acc_eager = chain(None)
    phi_fused, acc_fused = chain(compiled)
    assert 0 < acc_eager.float().mean() < 1
    assert torch.equal(acc_fused, acc_eager)
    torch.testing.assert_close(phi_fused, phi_eager, rtol=0, atol=1e-12)


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


def test_flowed_action_stays_eager():
    act = FlowedAction(TARGET, Flow(L))
    assert not fused.compilable(act) and fused.compilable(TARGET)
    lines = []
    example = (torch.zeros(B, L, L, dtype=torch.float64), torch.ones(B, L, L, dtype=torch.float64))
    fn, is_fused = fused.choose_trajectory("auto", act, INTEGRATORS["leapfrog"], 1.0, 5, example,
                                           log=lines.append)
    assert not is_fused and lines == []
    with pytest.raises(fused.CompileUnavailable, match="FlowedAction"):
        fused.choose_trajectory("on", act, INTEGRATORS["leapfrog"], 1.0, 5, example)
    with pytest.raises(ValueError, match="compile mode"):
        fused.choose_trajectory("maybe", act, INTEGRATORS["leapfrog"], 1.0, 5, example)


@pytest.mark.slow
def test_compiled_production_equals_eager(tmp_path, compiled):
    """[run] compile = on gives the eager file's chains: every measurement to 1e-12 and the
    same accept decisions; the compile time is logged once."""
    import h5py
    import numpy as np

    from conftest import write_input
    from hpcflow import run

    files = {}
    for mode in ("off", "on"):
        d = tmp_path / mode
        d.mkdir()
        path = write_input(d, L=8, replicas=B, trajectories=30, thermalization=5, steps=5,
                           checkpoint_every=10)
        path.write_text(path.read_text().replace("[run]\n", f"[run]\ncompile = {mode}\n", 1))
        assert run.main([str(path)]) == 0
        with h5py.File(d / "out" / "hmc.h5") as f:
            files[mode] = {k: f[k][()] for k in ("observables/M", "observables/C", "mc/dH",
                                                 "mc/accepted", "checkpoint/phi")}
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
