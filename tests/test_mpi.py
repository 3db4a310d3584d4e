"""Two MPI ranks: the same chains as one rank, bit for bit; mpio and gather, the same file.

Run as ``mpirun -n 2 python -m mpi4py -m pytest --with-mpi tests/test_mpi.py``."""

import numpy as np
import pytest

from conftest import checked_on_every_rank, write_input
from test_run import read_all


def mpi_dirs(root, *names):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    dirs = [root / n for n in names]
    if comm.Get_rank() == 0:
        for d in dirs:
            d.mkdir()
    comm.Barrier()
    return comm, dirs


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("compile_mode,generator", [("off", "pcg64"), ("on", "pcg64"),
                                                    ("off", "philox"), ("on", "philox")])
def test_one_rank_and_many_ranks_give_identical_chains(mpi_tmp_path, compile_mode, generator):
    """Eager, and fused by torch.compile (one compilation per rank and batch shape): 20
    replicas run site-major on one rank and batch-major as 10 per rank on two
    (fused.SITE_MAJOR_MIN_BATCH = 16), with the same chains bit for bit; with either
    generator ([run] rng; Philox compiled with compile = on, 20 or 10 rows a draw)."""
    from mpi4py import MPI

    from hpcflow import run

    comm, (many, one) = mpi_dirs(mpi_tmp_path, f"many-{compile_mode}-{generator}",
                                 f"one-{compile_mode}-{generator}")
    kw = dict(L=6, replicas=20, trajectories=30, thermalization=3, save_every=10,
              checkpoint_every=7, stages="hmc, analysis")
    if comm.Get_rank() == 0:
        for d in (many, one):
            path = write_input(d, **kw)
            path.write_text(path.read_text().replace("[run]\n", f"[run]\ncompile = {compile_mode}\nrng = {generator}\n", 1))
    comm.Barrier()
    assert run.main([str(many / "t.ini")]) == 0

    def check(rank):
        if rank == 0:
            assert run.main([str(one / "t.ini")], comm=MPI.COMM_SELF) == 0
            a, attrs = read_all(many / "out" / "hmc.h5")
            b, _ = read_all(one / "out" / "hmc.h5")
            assert a["observables/M"].shape == (20, 30)
            for name in a:
                np.testing.assert_array_equal(a[name], b[name], err_msg=name)
            assert (many / "out" / "analysis.json").exists()
    checked_on_every_rank(comm, check)


@pytest.mark.mpi(min_size=2)
def test_mpio_and_gather_write_the_same_file(mpi_tmp_path):
    from hpcflow import run
    from hpcflow.store import h5py_has_mpi

    if not h5py_has_mpi():
        pytest.skip("h5py without MPI support")
    comm, (d_mpio, d_gather) = mpi_dirs(mpi_tmp_path, "mpio", "gather")
    if comm.Get_rank() == 0:
        write_input(d_mpio, io="mpio", replicas=3, save_every=4)
        write_input(d_gather, io="gather", replicas=3, save_every=4)
    comm.Barrier()
    assert run.main([str(d_mpio / "t.ini")]) == 0
    assert run.main([str(d_gather / "t.ini")]) == 0

    def check(rank):
        if rank:
            return
        a, _ = read_all(d_mpio / "out" / "hmc.h5")
        b, _ = read_all(d_gather / "out" / "hmc.h5")
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        for d in (d_mpio, d_gather):  # the cost record: rank 0's clock, both ranks counted
            c, _ = read_all(d / "out" / "hmc.h5", cost=True)
            assert (c["cost/ranks"][0], c["cost/segments"][0]) == (2, 1)
            assert c["cost/rank_seconds"][0] == 2 * c["cost/seconds"][0] > 0
            assert c["cost/device"][0].startswith(b"cpu")
    checked_on_every_rank(comm, check)


def run_full_and_interrupted(mpi_tmp_path):
    """Two identical 2-rank inputs: "full" run to the end, "cut" stopped on every rank
    right after its second checkpoint (a KeyboardInterrupt, as at a signal)."""
    from hpcflow import production, run

    comm, (full, cut) = mpi_dirs(mpi_tmp_path, "full", "cut")
    kw = dict(replicas=4, trajectories=24, thermalization=2, checkpoint_every=6)
    if comm.Get_rank() == 0:
        write_input(full, **kw)
        write_input(cut, **kw)
    comm.Barrier()
    assert run.main([str(full / "t.ini")]) == 0
    real = production._flush
    calls = {"n": 0}

    def flush_then_stop(*args):
        real(*args)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    production._flush = flush_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            run.main([str(cut / "t.ini")])
    finally:
        production._flush = real
    comm.Barrier()
    return comm, full, cut


@pytest.mark.mpi(min_size=2)
def test_resume_under_mpi(mpi_tmp_path):
    """A 2-rank run interrupted after a checkpoint resumes to the uninterrupted result."""
    from hpcflow import run

    comm, full, cut = run_full_and_interrupted(mpi_tmp_path)
    assert run.main([str(cut / "t.ini")]) == 0

    def check(rank):
        if rank == 0:
            a, _ = read_all(full / "out" / "hmc.h5")
            b, _ = read_all(cut / "out" / "hmc.h5")
            for name in a:
                np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    checked_on_every_rank(comm, check)


@pytest.mark.mpi(min_size=2)
def test_data_parallel_training_keeps_identical_weights(mpi_tmp_path):
    """Each rank trains on its own minibatch; after the gradient allreduce every rank
    holds the same weights, bit for bit, and they differ from the initial ones."""
    import torch
    from mpi4py import MPI

    from hpcflow import config
    from hpcflow.action import Phi4Action
    from hpcflow.parallel import make_world
    from hpcflow.priors import make_prior
    from hpcflow.train import train

    from test_train import train_input

    comm, (d,) = mpi_dirs(mpi_tmp_path, "train")
    if comm.Get_rank() == 0:
        train_input(d, L=4, iterations=25, ckpt=10, batch=64)
    comm.Barrier()
    cfg = config.load(d / "tr.ini")
    world = make_world("cpu", 1, comm)
    payload = train(cfg, world, make_prior(cfg), Phi4Action(cfg.theory.beta, cfg.theory.lam),
                    d / "tr" / "flow.pt", log=lambda m: None)
    mine = torch.cat([v.flatten() for v in payload["state_dict"].values()])
    everyone = comm.allgather(mine)
    assert all(torch.equal(everyone[0], w) for w in everyone)
    assert mine.abs().sum() > 0  # trained away from the zero-initialised identity
    assert len(payload["history"]["loss"]) == 25
    del MPI


@pytest.mark.mpi(min_size=2)
def test_resume_of_a_file_without_cost_under_mpi(mpi_tmp_path):
    """A file from before /cost and /observables/Mz existed, resumed by 2 ranks (mpio where
    h5py has it): the datasets are created collectively and the chains are unchanged."""
    import h5py

    from hpcflow import run

    comm, full, cut = run_full_and_interrupted(mpi_tmp_path)
    if comm.Get_rank() == 0:
        with h5py.File(cut / "out" / "hmc.h5", "r+") as f:
            del f["cost"], f["observables/Mz"]
    comm.Barrier()
    assert run.main([str(cut / "t.ini")]) == 0

    def check(rank):
        if rank:
            return
        a, _ = read_all(full / "out" / "hmc.h5")
        b, _ = read_all(cut / "out" / "hmc.h5", cost=True)
        for name in a:
            if name != "observables/Mz":
                np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        np.testing.assert_array_equal(b["observables/Mz"][:, 10:], a["observables/Mz"][:, 10:])
        assert np.isnan(b["observables/Mz"][:, :10]).all()
        assert (b["cost/first_trajectory"][0], b["cost/ranks"][0], b["cost/segments"][0]) == (12, 2, 1)
    checked_on_every_rank(comm, check)


@pytest.mark.mpi(min_size=2)
def test_fewer_replicas_than_ranks_exits_2_and_writes_no_ensemble(mpi_tmp_path, capsys):
    from hpcflow import run

    comm, (d,) = mpi_dirs(mpi_tmp_path, "few")
    if comm.Get_rank() == 0:
        write_input(d, replicas=1)
    comm.Barrier()
    assert run.main([str(d / "t.ini")]) == 2  # on every rank
    err = capsys.readouterr().err

    def check(rank):
        if rank == 0:
            assert "1 replicas cannot be spread over 2 MPI ranks" in err
            assert not (d / "out" / "hmc.h5").exists()
        else:
            assert err == ""  # only rank 0 reports
    checked_on_every_rank(comm, check)
