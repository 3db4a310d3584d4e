"""Issue 7 item 10 on 2 ranks: a training resumed on another rank count warns.

Run as ``mpirun -n 2 python -m mpi4py -m pytest --with-mpi -m mpi tests/test_reliability_mpi.py``."""

import pytest

from conftest import checked_on_every_rank, write_ini


@pytest.mark.mpi(min_size=2)
def test_training_resumed_on_another_rank_count_warns(mpi_tmp_path, capsys):
    from mpi4py import MPI

    from hpcflow import run
    from hpcflow import train as train_mod

    comm = MPI.COMM_WORLD
    d = mpi_tmp_path / "tr"

    def stopped_on_one_rank(rank):
        if rank:
            return
        d.mkdir()
        ini = write_ini(d, run={"stages": "train"}, theory={"L": 4},
                        train={"iterations": 8, "checkpoint_every": 4})
        real = train_mod.save_flow

        def save_then_stop(path, payload):
            real(path, payload)
            raise KeyboardInterrupt  # stopped after the first checkpoint, on 1 rank

        train_mod.save_flow = save_then_stop
        try:
            with pytest.raises(KeyboardInterrupt):
                run.main([str(ini)], comm=MPI.COMM_SELF)
        finally:
            train_mod.save_flow = real
    checked_on_every_rank(comm, stopped_on_one_rank)
    capsys.readouterr()
    assert run.main([str(d / "t.ini")]) == 0
    out = capsys.readouterr().out

    def check(rank):
        if rank == 0:
            assert "resuming" in out
            assert "WARNING: resumed on 2 rank(s), but the checkpoint was written on 1" in out
    checked_on_every_rank(comm, check)
