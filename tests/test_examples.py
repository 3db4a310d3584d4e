"""The scripts of examples/ run, with tiny settings, on the public API and without MPI."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RUNNER = ("import runpy, sys; sys.argv = sys.argv[1:]; "
          "runpy.run_path(sys.argv[0], run_name='__main__'); "
          "assert 'mpi4py' not in sys.modules, 'the example imported mpi4py'")


def run_example(name, *args):
    r = subprocess.run([sys.executable, "-c", RUNNER, str(EXAMPLES / name), *map(str, args)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_examples_are_short_and_use_the_public_api():
    scripts = sorted(EXAMPLES.glob("*.py"))
    assert len(scripts) >= 3
    for script in scripts:
        text = script.read_text()
        assert len(text.splitlines()) <= 40, script
        assert "from hpcflow." not in text and "import hpcflow." not in text, script


@pytest.mark.slow
def test_free_field_hmc():
    out = run_example("free_field_hmc.py", 60)
    assert "chi = " in out and "exact 2.5000" in out


@pytest.mark.slow
def test_train_and_fhmc():
    out = run_example("train_and_fhmc.py", 5, 20)
    assert "flow acceptance on fresh proposals" in out and "FHMC chi = " in out


@pytest.mark.slow
def test_own_analysis(make_input, tmp_path):
    from hpcflow import run

    path = make_input(stages="hmc", L=6, replicas=3, trajectories=100)
    assert run.main([str(path)]) == 0
    out = run_example("own_analysis.py", tmp_path / "out" / "hmc.h5")
    assert "Binder cumulant U = " in out and "C(3) = " in out and "chi = " in out


@pytest.mark.parametrize("name", ["free_field_hmc.py", "train_and_fhmc.py", "own_analysis.py"])
def test_examples_have_a_usage_line(name):
    assert f"python examples/{name}" in (EXAMPLES / name).read_text()
