"""The driver end to end in one process: files, resumption, skipping, --force."""

import json

import h5py
import numpy as np
import pytest

from hpcflow import analysis, run
from hpcflow.store import measured


def read_all(path, cost=False):
    """Every dataset and the attributes; without ``cost``, the /cost group (wall time, ranks,
    segments: not part of the chains, which the comparisons are about) is left out."""
    with h5py.File(path, "r") as f:
        data = {}
        f.visititems(lambda name, obj: data.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) and (cost or not name.startswith("cost/"))
                     else None)
        return data, dict(f.attrs)


def test_layout_and_attributes(make_input, tmp_path):
    path = make_input(L=4, replicas=3, trajectories=20, thermalization=5, save_every=5)
    assert run.main([str(path)]) == 0
    data, attrs = read_all(tmp_path / "out" / "hmc.h5")
    assert data["observables/M"].shape == (3, 20)
    assert data["observables/C"].shape == (3, 20, 3)
    assert data["mc/dH"].shape == (3, 20) and data["mc/accepted"].shape == (3, 20)
    assert data["configs"].shape == (3, 4, 4, 4)
    assert np.isfinite(data["observables/M"]).all()
    assert set(np.unique(data["mc/accepted"])) <= {0, 1}
    assert data["checkpoint/trajectory"][0] == 25
    assert attrs["input"] == path.read_text()
    # HMC's chain variable is the field itself: Mz is M, bit for bit
    np.testing.assert_array_equal(data["observables/Mz"], data["observables/M"])
    cost, _ = read_all(tmp_path / "out" / "hmc.h5", cost=True)
    assert cost["cost/seconds"][0] > 0 and cost["cost/rank_seconds"][0] == cost["cost/seconds"][0]
    assert (cost["cost/ranks"][0], cost["cost/segments"][0],
            cost["cost/first_trajectory"][0]) == (1, 1, 0)
    assert cost["cost/device"][0].decode().startswith("cpu")
    for k, v in {"stage": "hmc", "algorithm": "hmc", "L": 4, "beta": 0.5, "lambda": 0.5,
                 "seed": 7, "replicas": 3}.items():
        assert attrs[k] == v
    assert "hpcflow_version" in attrs
    # stored configurations are the measured ones: M of config k = M at measurement 5k+4
    import torch

    from hpcflow.observables import magnetization

    M_cfg = magnetization(torch.from_numpy(data["configs"].reshape(12, 4, 4))).numpy().reshape(3, 4)
    np.testing.assert_array_equal(M_cfg, data["observables/M"][:, 4::5])


def test_interrupted_run_resumes_to_the_same_chain(make_input, tmp_path, monkeypatch):
    """Kill a run after its first checkpoint; the rerun finishes the very same chains."""
    path = make_input(trajectories=30, thermalization=5, checkpoint_every=10)
    assert run.main([str(path)]) == 0
    reference, _ = read_all(tmp_path / "out" / "hmc.h5")

    from hpcflow import production

    calls = {"n": 0}
    real_flush = production._flush

    def flush_then_die(*args):
        real_flush(*args)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if killed right after the 2nd checkpoint

    monkeypatch.setattr(production, "_flush", flush_then_die)
    with pytest.raises(KeyboardInterrupt):
        run.main([str(path), "--force"])
    with h5py.File(tmp_path / "out" / "hmc.h5", "r") as f:
        assert f["checkpoint/trajectory"][0] == 20 and measured(f) == 15
        assert np.isnan(f["observables/M"][:, 15:]).all()
    with h5py.File(tmp_path / "out" / "hmc.h5", "r") as f:
        seconds_cut = f["cost/seconds"][0]
        assert seconds_cut > 0 and f["cost/segments"][0] == 1
    monkeypatch.setattr(production, "_flush", real_flush)
    assert run.main([str(path)]) == 0
    resumed, _ = read_all(tmp_path / "out" / "hmc.h5")
    for name, arr in reference.items():
        np.testing.assert_array_equal(resumed[name], arr, err_msg=name)
    with h5py.File(tmp_path / "out" / "hmc.h5", "r") as f:  # the resumed run adds its time
        assert f["cost/segments"][0] == 2 and f["cost/seconds"][0] > seconds_cut


def test_complete_stage_is_skipped_and_other_input_refused(make_input, tmp_path, capsys):
    path = make_input()
    assert run.main([str(path)]) == 0
    h5 = tmp_path / "out" / "hmc.h5"
    mtime = h5.stat().st_mtime_ns
    assert run.main([str(path)]) == 0
    assert "skipped" in capsys.readouterr().out
    assert h5.stat().st_mtime_ns == mtime

    path.write_text(path.read_text().replace("steps = 5", "steps = 6"))
    assert run.main([str(path)]) == 2
    assert "different input" in capsys.readouterr().err
    assert h5.stat().st_mtime_ns == mtime
    assert run.main([str(path), "--force"]) == 0
    with h5py.File(h5, "r") as f:
        assert f.attrs["steps"] == 6


def test_io_paths_give_the_same_file(make_input, tmp_path):
    """h5py's mpio driver and the gather-to-rank-0 path write identical files."""
    from hpcflow.store import h5py_has_mpi

    if not h5py_has_mpi():
        pytest.skip("h5py without MPI: only the gather path exists")
    files = []
    for io in ("mpio", "gather"):
        d = tmp_path / io
        d.mkdir()
        from conftest import write_input

        path = write_input(d, io=io)
        assert run.main([str(path)]) == 0
        files.append(read_all(d / "out" / "hmc.h5"))
    (a, attrs_a), (b, attrs_b) = files
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert {k for k in attrs_a if k not in ("input", "input_path")} == set(attrs_b) - {"input", "input_path"}


def test_replica_blocks_partition_the_replicas():
    from hpcflow.rng import replica_block

    blocks = [replica_block(10, 4, r) for r in range(4)]
    assert [len(b) for b in blocks] == [3, 3, 2, 2]
    assert [b.start for b in blocks] == [0, 3, 6, 8]
    assert sum(len(b) for b in blocks) == 10


class _Comm:
    """A stand-in communicator of ``size`` ranks, for the checks made before any message."""

    def __init__(self, size):
        self.size = size

    def Get_size(self):
        return self.size

    def Get_rank(self):
        return 0


def test_replicas_fewer_than_ranks_is_refused(make_input, tmp_path):
    """3 replicas over 4 ranks: refused before any file is touched (the 2-rank run in
    test_mpi.py checks the driver's exit status on real ranks)."""
    from hpcflow import config
    from hpcflow.action import Phi4Action
    from hpcflow.errors import StageError
    from hpcflow.parallel import World
    from hpcflow.production import ChainSpec, produce

    cfg = config.load(make_input(replicas=3))
    spec = ChainSpec("hmc", "hmc", Phi4Action(0.5, 0.5), "hmc")
    with pytest.raises(StageError, match=r"\[hmc\] replicas: 3 replicas cannot be spread over 4 MPI ranks"):
        produce(cfg, World(_Comm(4), "cpu"), cfg.hmc, spec, tmp_path / "out" / "hmc.h5")
    assert not (tmp_path / "out").exists()


def test_analysis_cli_json_and_pyerrors_file(make_input, tmp_path, capsys):
    path = make_input(stages="hmc, analysis", trajectories=200, thermalization=20, L=4, replicas=3)
    assert run.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "tau_int(M)" in out
    assert analysis.main([str(tmp_path / "out"), "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert set(js) >= {"L", "beta", "lambda", "algorithm", "replicas", "measurements",
                       "acceptance", "observables"}
    assert (js["L"], js["algorithm"], js["replicas"], js["measurements"]) == (4, "hmc", 3, 200)
    for key in ("M", "absM", "M2", "chi"):
        assert set(js["observables"][key]) == {"value", "error", "tau_int", "tau_int_error"}
        assert js["observables"][key]["error"] > 0
    assert set(js["observables"]["xi"]) >= {"value", "error"}
    assert js["observables"]["chi"]["value"] == pytest.approx(16 * js["observables"]["M2"]["value"])
    saved = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert saved["observables"]["M"] == js["observables"]["M"]

    import pyerrors as pe

    obs = pe.input.json.load_json(str(tmp_path / "out" / "hmc.obs.json.gz"), verbose=False)
    assert obs[0].names == [f"t_hmc|r{r:03d}" for r in range(3)]
    obs[0].gamma_method()
    assert obs[0].value == pytest.approx(js["observables"]["M"]["value"])


def test_analysis_cli_errors(tmp_path, capsys):
    assert analysis.main([str(tmp_path / "nothing")]) == 2
    assert analysis.main([str(tmp_path)]) == 2


def test_analysis_compare_shows_other_runs(tmp_path, capsys):
    from conftest import write_input

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    path_a = write_input(a, name="a", stages="hmc", trajectories=50)
    assert run.main([str(path_a)]) == 0
    path_b = write_input(b, name="b", stages="hmc, analysis", trajectories=50, steps=4,
                         extra=f"\n[analysis]\ncompare = {a / 'out' / 'hmc.h5'}, {tmp_path / 'nope'}\n")
    capsys.readouterr()
    assert run.main([str(path_b)]) == 0
    out = capsys.readouterr().out
    assert f"{a / 'out' / 'hmc.h5'}: hmc" in out and f"{b / 'out' / 'hmc.h5'}: hmc" in out
    assert "does not exist (yet)" in out
    saved = json.loads((b / "out" / "analysis.json").read_text())
    assert saved["file"] == str(b / "out" / "hmc.h5")  # the JSON holds this run's ensembles only


def test_analysis_is_cached_until_the_ensemble_changes(make_input, tmp_path, capsys):
    import os

    path = make_input(stages="hmc", trajectories=60)
    assert run.main([str(path)]) == 0
    capsys.readouterr()
    h5 = tmp_path / "out" / "hmc.h5"
    assert analysis.main([str(h5), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    cache = analysis.cache_path(h5)
    stored = json.loads(cache.read_text())
    assert stored["json"] == first and stored["S"] == 2.0 and stored["schema"] == analysis.SCHEMA
    old_schema = dict(stored, schema=analysis.SCHEMA - 1, json=dict(first, acceptance=-1.0))
    cache.write_text(json.dumps(old_schema))  # written by an older analysis: never reused
    assert analysis.main([str(h5), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["acceptance"] == first["acceptance"]
    del old_schema["schema"]  # ... nor one from before the schema existed
    cache.write_text(json.dumps(old_schema))
    assert analysis.main([str(h5), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["acceptance"] == first["acceptance"]
    stored["json"]["acceptance"] = -1.0  # a sentinel: only the cache can produce it
    cache.write_text(json.dumps(stored))
    assert analysis.main([str(h5), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["acceptance"] == -1.0
    assert analysis.main([str(h5), "--json", "--S", "1.5"]) == 0  # other settings: recomputed
    assert json.loads(capsys.readouterr().out)["acceptance"] == first["acceptance"]
    later = cache.stat().st_mtime_ns + 10**9
    os.utime(h5, ns=(later, later))  # touched, not changed: the cache is keyed on content
    cache.write_text(json.dumps(stored))
    os.utime(cache, ns=(later - 10**8, later - 10**8))
    assert analysis.main([str(h5), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["acceptance"] == -1.0
    cache.write_text(json.dumps(dict(stored, digest="0" * 64)))  # other content: recomputed
    assert analysis.main([str(h5), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["acceptance"] == first["acceptance"]
