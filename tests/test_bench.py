"""The bench's code paths on tiny sizes (no timing assertions: the targets live in the bench)."""

import json
import shutil
import statistics

import pytest
import torch

from hpcflow import allocator, bench, fused
from hpcflow.action import Phi4Action
from hpcflow.hmc import INTEGRATORS

TARGET = Phi4Action(0.634, 0.5)
TINY = ["--Ls", "4,6", "--batches", "1,3", "--min-seconds", "0", "--repeat", "1",
        "--fhmc-L", "4", "--fhmc-batch", "2", "--no-production"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler here")
    library, info = bench.build_reference("cc", tmp_path_factory.mktemp("ref"))
    assert library is not None, info
    return library


@pytest.mark.parametrize("L0, L1, steps", [(4, 4, 10), (5, 5, 7), (6, 3, 1), (8, 8, 20)])
def test_reference_reproduces_the_leapfrog(reference, L0, L1, steps):
    """The C loop's end point is hpcflow's leapfrog (Integrator over Phi4Action) from the same
    (phi, pi), phi and pi to 1e-12 and S(phi') to 1e-12 relative, also on rectangles."""
    g = torch.Generator().manual_seed(L0 * L1 + steps)
    phi = 0.5 * torch.randn(3, L0, L1, generator=g, dtype=torch.float64)
    pi = torch.randn(3, L0, L1, generator=g, dtype=torch.float64)
    ref = bench.Reference(reference, TARGET.beta, TARGET.lam, 1.0, steps)
    start = phi.clone(), pi.clone()
    phi_r, pi_r, S_r = ref.trajectory(phi, pi)
    assert torch.equal(phi, start[0]) and torch.equal(pi, start[1])  # copies are advanced
    phi_h, pi_h = INTEGRATORS["leapfrog"](phi, pi, TARGET.force, 1.0 / steps, steps)
    assert not torch.equal(phi_h, phi)  # it moved
    torch.testing.assert_close(phi_r, phi_h, rtol=0, atol=1e-12)
    torch.testing.assert_close(pi_r, pi_h, rtol=0, atol=1e-12)
    torch.testing.assert_close(S_r, TARGET.action(phi_h), rtol=1e-12, atol=0)


def test_reference_check_detects_another_theory(reference):
    good = bench.Reference(reference, TARGET.beta, TARGET.lam, 1.0, 10)
    bad = bench.Reference(reference, TARGET.beta * (1 + 1e-6), TARGET.lam, 1.0, 10)
    assert bench.check_reference(good, TARGET, 4, 2, 10)["agrees"]
    check = bench.check_reference(bad, TARGET, 4, 2, 10)
    assert not check["agrees"] and check["phi_max_abs_diff"] > 1e-12


def test_reference_refuses_other_layouts(reference):
    ref = bench.Reference(reference, TARGET.beta, TARGET.lam, 1.0, 10)
    phi = torch.zeros(2, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="contiguous float64 CPU"):
        ref.run_inplace(phi.float(), phi.clone(), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous float64 CPU"):
        ref.run_inplace(phi.transpose(1, 2), phi.clone(), torch.zeros(2, dtype=torch.float64))


def test_missing_compiler_is_a_note(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench.main([*TINY, "--cc", "no-such-cc-hpcflow", "--no-compile", "--no-fhmc",
                       "--no-memory", "--no-scaling", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert "no C compiler 'no-such-cc-hpcflow'" in r["reference"]["skipped"]
    assert all("reference" not in row and "ratio_to_reference" not in row for row in r["hmc"])
    assert r["targets"]["hmc_B64_L16_over_reference"] == {"target": ">= 0.4", "value": None,
                                                          "pass": None, "momenta_bound": None}
    assert "no C compiler" in capsys.readouterr().out


def test_failing_compiler_is_a_note(tmp_path):
    library, info = bench.build_reference("false", tmp_path)  # exits 1, no output
    assert library is None and "failed (status 1)" in info["skipped"]


def test_json_has_the_keys(tmp_path, monkeypatch, reference):
    """One tiny run: every section of the JSON and every HMC cell, the compiled branches
    taken (torch.compile replaced by the identity, to keep the test fast)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    out = tmp_path / "b.json"
    assert bench.main([*TINY, "--no-memory", "--no-scaling", "--chunk-sites", "48",
                       "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert {"machine", "settings", "reference", "bandwidth", "hmc", "fhmc", "targets",
            "total_seconds"} <= set(r)
    assert {"cpu_model", "cores", "torch", "threads", "c_compiler"} <= set(r["machine"])
    assert [(c["L"], c["B"]) for c in r["hmc"]] == [(4, 1), (4, 3), (6, 1), (6, 3)]
    assert r["allocator_default"] == {"skipped": "needs B = 64 and a larger B in --batches"}
    assert r["machine"]["allocator"] == allocator.tune()
    assert all(c["agrees"] for c in r["reference"]["checks"])
    for cell in r["hmc"]:
        for path in ("eager", "compiled"):
            assert cell[path]["hmc_site_steps_per_second"] > 0
            assert cell[path]["trajectory_site_steps_per_second"] > 0
        assert {"compile_seconds", "graphs_compiled"} <= set(cell["compiled"])
        u = cell["compiled"]["fused_metropolis"]
        assert u["in_production"] and u["hmc_step_seconds"] == cell["compiled"]["hmc_step_seconds"]
        assert u["speedup"] == pytest.approx(u["unfused_hmc_step_seconds"] / u["hmc_step_seconds"])
        # B < 16: batch-major in production, the other layout measured beside it
        assert cell["compiled"]["layout"] == "batch-major"
        o = cell["compiled"]["other_layout"]
        assert o["layout"] == "site-major" and o["hmc_step_seconds"] > 0
        assert o["speedup_of_layout"] == pytest.approx(o["hmc_step_seconds"]
                                                       / cell["compiled"]["hmc_step_seconds"])
        d = cell["compiled"]["inductor_default"]  # the MD graph at inductor's defaults
        assert cell["compiled"]["md_inductor"] == fused.MD_INDUCTOR and d["md_inductor"] == {}
        assert d["layout"] == "batch-major" and d["hmc_step_seconds"] > 0
        assert d["trajectory_speedup_of_md_inductor"] == pytest.approx(
            d["trajectory_seconds"] / cell["compiled"]["trajectory_seconds"])
        assert d["step_speedup_of_md_inductor"] == pytest.approx(
            d["hmc_step_seconds"] / cell["compiled"]["hmc_step_seconds"])
        assert cell["reference"]["site_steps_per_second"] > 0
        assert set(cell["ratio_to_reference"]) == {"eager_hmc_step", "eager_trajectory",
                                                   "compiled_hmc_step", "compiled_trajectory",
                                                   "compiled_philox_hmc_step"}
        p = cell["compiled"]["philox"]  # the compiled step with Philox momenta
        assert p["speedup_over_pcg64"] == pytest.approx(cell["compiled"]["hmc_step_seconds"]
                                                        / p["hmc_step_seconds"])
        assert p["momenta"]["ns_per_normal"] == pytest.approx(
            1e9 * p["momenta"]["seconds"] / (cell["B"] * cell["L"] ** 2))
        assert cell["ratio_to_reference"]["compiled_philox_hmc_step"] == pytest.approx(
            cell["reference"]["seconds"] / p["hmc_step_seconds"])
        assert cell["best_ratio_to_reference"] > 0
        bound = r["bandwidth"]["bound_site_steps_per_second"]
        assert bound == pytest.approx(r["bandwidth"]["bytes_per_second"] / 40)
        assert cell["ratio_to_bandwidth_bound"]["compiled_trajectory"] == pytest.approx(
            cell["compiled"]["trajectory_site_steps_per_second"] / bound)
        assert set(cell["ratio_to_bandwidth_bound"]) == {
            "eager_hmc", "eager_trajectory", "compiled_hmc", "compiled_trajectory"}
        # 48 sites a call: L = 6, B = 3 (108 sites) runs one replica at a time
        assert cell["compiled"]["chunk_rows"] == (1 if (cell["L"], cell["B"]) == (6, 3) else cell["B"])
        assert ("unchunked" in cell["compiled"]) == ((cell["L"], cell["B"]) == (6, 3))
        m = cell["momenta"]
        assert m["ns_per_normal"] == pytest.approx(1e9 * m["seconds"] / (cell["B"] * cell["L"] ** 2))
        assert m["bound_ratio_to_reference"] == pytest.approx(cell["reference"]["seconds"] / m["seconds"])
        assert m["fraction_of_compiled_hmc_step"] == pytest.approx(
            m["seconds"] / cell["compiled"]["hmc_step_seconds"])
    assert r["targets"]["hmc_B64_L16_over_reference"]["momenta_bound"] is None  # no B = 64 cell
    f = r["fhmc"]
    assert f["flow"]["kernel_size"] == 3 and f["flow"]["layers"] == 1 and f["flow"]["hidden"] == []
    assert {"eager_per_trajectory", "eager_per_force", "best_per_trajectory",
            "best_per_force", "best_paths"} <= set(f["ratios"])
    for a in ("hmc", "fhmc"):
        for path in ("eager", "compiled"):
            assert f[a][path]["trajectory_seconds"] > 0 and f[a][path]["force_seconds"] > 0
    assert f["fhmc"]["compiled"]["wired"].startswith("[run] compile = auto|on")
    c = r["call_overhead"]
    assert c["direct_path_taken"] is False  # torch.compile is the identity here: no graph
    assert min(c["dynamo_call_seconds"], c["direct_call_seconds"], c["eager_seconds"]) > 0
    floor = f["ratios"]["transcendental_floor"]
    h = f["hmc"][f["ratios"]["best_paths"]["hmc"]]
    n = floor["forces_per_trajectory"]
    assert floor["force_seconds"] == f["fhmc"]["transcendentals"]["force_seconds"] > 0
    assert floor["fhmc_trajectory_seconds_at_least"] == pytest.approx(
        max(h["trajectory_seconds"] - n * h["force_seconds"], 0.0) + n * floor["force_seconds"])
    assert floor["per_trajectory_at_least"] == pytest.approx(
        floor["fhmc_trajectory_seconds_at_least"] / h["trajectory_seconds"])
    assert r["targets"]["fhmc_over_hmc_per_trajectory"]["transcendental_floor"] == \
        floor["per_trajectory_at_least"]
    assert set(r["targets"]) == {"hmc_B64_L16_over_reference", "hmc_B64_L64_over_reference",
                                 "fhmc_over_hmc_per_trajectory", "weak_scaling_1_to_2_ranks",
                                 "per_replica_B1024_over_B64_L4", "per_replica_B1024_over_B64_L6",
                                 "all_measured_pass"}
    assert r["targets"]["fhmc_over_hmc_per_trajectory"]["pass"] in (True, False)


def test_targets_flags():
    def cell(L, B, ratio, rate):
        return {"L": L, "B": B, "best_ratio_to_reference": ratio,
                "best_replica_trajectories_per_second": rate}

    result = {"hmc": [cell(16, 64, 0.5, 100.0), cell(16, 1024, 0.6, 99.0),
                      cell(64, 64, 0.45, 10.0), cell(64, 1024, 0.5, 12.0)],
              "fhmc": {"ratios": {"best_per_trajectory": 1.9}},
              "weak_scaling": {"skipped": "no mpirun on PATH"}}
    t = bench.targets(result)
    assert t["hmc_B64_L16_over_reference"]["pass"] is True
    assert t["hmc_B64_L64_over_reference"]["pass"] is False
    assert t["fhmc_over_hmc_per_trajectory"]["pass"] is True
    assert t["weak_scaling_1_to_2_ranks"]["pass"] is None
    assert t["per_replica_B1024_over_B64_L16"] == {"target": ">= 1", "value": 0.99, "pass": False}
    assert t["per_replica_B1024_over_B64_L64"]["pass"] is True
    assert t["all_measured_pass"] is False


@pytest.mark.slow
def test_memory_and_weak_scaling(tmp_path):
    """The two sections that start processes: memory probes and mpirun -n 1 and -n 2."""
    out = tmp_path / "b.json"
    assert bench.main([*TINY, "--no-compile", "--no-fhmc", "--no-reference", "--Ls", "8",
                       "--batches", "2,16", "--scaling-L", "4", "--scaling-replicas", "2",
                       "--scaling-trajectories", "20", "--scaling-repeat", "2",
                       "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    m = r["memory"]
    assert (m["L"], m["B"], m["B_ref"]) == (8, 16, 2)
    assert m["state_bytes_per_replica"] == 8 * (2 * 64 + 1)
    assert set(m["eager"]["peak_rss_bytes"]) == {"2", "16"}
    assert "peak_rss_bytes_per_replica" in m["eager"]
    w = r["weak_scaling"]
    if shutil.which("mpirun") is None:
        assert w["skipped"] == "no mpirun on PATH"
    else:
        assert set(w["seconds_by_ranks"]) == {"1", "2"} and w["efficiency"] > 0, w
        runs = w["runs_seconds_by_ranks"]
        assert w["repeat"] == 2 and [len(runs["1"]), len(runs["2"])] == [2, 2]
        assert w["efficiency"] == pytest.approx(statistics.median(runs["1"])
                                                / statistics.median(runs["2"]))
        assert w["efficiency_by_pair"] == pytest.approx([a / b for a, b in zip(runs["1"], runs["2"])])


@pytest.mark.slow
def test_production_section(tmp_path):
    """Every compile x rng variant as a whole production, in rounds; speedups over eager
    PCG64 from the medians of the productions' /cost/seconds."""
    out = tmp_path / "b.json"
    assert bench.main([*TINY[:-1], "--no-compile", "--no-fhmc", "--no-reference", "--no-memory",
                       "--no-scaling", "--Ls", "4", "--batches", "1", "--production-L", "4",
                       "--production-replicas", "2", "--production-trajectories", "20",
                       "--production-repeat", "2", "--out", str(out)]) == 0
    p = json.loads(out.read_text())["production"]
    assert set(p["variants"]) == {f"compile={c},rng={g}" for c, g in bench.PRODUCTION_VARIANTS}
    for v in p["variants"].values():
        assert "skipped" not in v, v
        assert len(v["runs_seconds"]) == 2
        assert v["seconds"] == pytest.approx(statistics.median(v["runs_seconds"]))
        assert v["wall_seconds"] > v["seconds"] > 0 and 0 < v["acceptance"] <= 1
    base = p["variants"]["compile=off,rng=pcg64"]
    assert base["speedup"] == 1.0
    on = p["variants"]["compile=on,rng=philox"]
    assert on["speedup"] == pytest.approx(base["seconds"] / on["seconds"])


def test_flow_transcendentals_are_those_of_a_flowed_force():
    """The floor graph: 3 exp and 2 divisions per updated site and coupling step, on the
    first half of the rows, chained (its value: the formula, step by step)."""
    z = torch.linspace(-1.0, 1.0, 8 * 3, dtype=torch.float64).reshape(8, 3)
    x = z[:4]
    for _ in range(2):
        # tanh(x/2) and tanh(-x/2) as exp and a division each, and exp(x/2)
        x = torch.tanh(x / 2) + torch.tanh(-x / 2) + torch.exp(0.5 * x)
    out = bench.flow_transcendentals(z, 2)
    assert out.shape == (4, 3)
    torch.testing.assert_close(out, x, rtol=1e-13, atol=1e-13)


@pytest.mark.slow
def test_allocator_default_section(tmp_path):
    """Child benches with glibc's default malloc settings and with the run's, in turn: per
    cell seconds per replica of both and their ratio, per L the B_max / B = 64 figure."""
    out = tmp_path / "bench.json"
    assert bench.main(["--Ls", "4", "--batches", "64,80", "--no-reference", "--no-fhmc",
                       "--no-memory", "--no-scaling", "--no-production", "--no-variants",
                       "--min-seconds", "0.01", "--repeat", "1", "--allocator-repeat", "1",
                       "--out", str(out)]) == 0
    a = json.loads(out.read_text())["allocator_default"]
    assert a["allocator"]["default"] == {"skipped": "HPCFLOW_MALLOC=default"}
    assert a["allocator"]["tuned"] == allocator.tune()
    assert [(c["L"], c["B"]) for c in a["cells"]] == [(4, 64), (4, 80)]
    for c in a["cells"]:
        assert c["speedup"] == pytest.approx(c["default_seconds_per_replica"]
                                             / c["tuned_seconds_per_replica"])
    cells = {(c["L"], c["B"]): c for c in a["cells"]}
    assert a["per_replica_over_B64"]["4"]["tuned"] == pytest.approx(
        cells[4, 64]["tuned_seconds_per_replica"] / cells[4, 80]["tuned_seconds_per_replica"])


def test_allocator_default_skips_off_the_host(tmp_path):
    """On a GPU the section is skipped with its reason (no child benches on device time)."""
    import argparse

    args = argparse.Namespace(device="cuda", batches=[64, 1024], Ls=[64])
    assert bench.bench_allocator_default(args, tmp_path) == {
        "skipped": "--device cuda: the C allocator holds the host's tensors only"}
