"""Result identity (issue 7, item 3): which keys of an input determine a stage's result.

For every key of every section a stage reads, a rerun with that key changed either refuses
the existing result, naming the key with its old and new value (exit 2, nothing changed),
or accepts it (skips, resumes, or extends it).  The expected sets are written out here,
independently of the declarations in :mod:`hpcflow.stages`."""

import shutil

import h5py
import numpy as np
import pytest

from conftest import ini_text
from hpcflow import run

HMC_KEYS = {"replicas", "thermalization", "length", "steps", "integrator", "save_every", "start"}
THEORY = {"theory.L", "theory.beta", "theory.lambda"}
FLOW = {"flow.prior", "flow.kernel_size", "flow.layers", "flow.block", "flow.hidden"}
TRAIN = {f"train.{k}" for k in ("iterations", "batch_size", "lr", "schedule", "metropolis",
                                "eval_every", "checkpoint_every")}

BASES = {  # stage -> (sections of its input, keys whose change must be refused)
    "hmc": (dict(run={"stages": "hmc"}, hmc={"save_every": 5}, analysis={}),
            {"run.seed", "run.rng", *THEORY, *(f"hmc.{k}" for k in HMC_KEYS)}),
    "coarse": (dict(run={"stages": "coarse"}, coarse={}, analysis={}),
               {"run.seed", "run.rng", "theory.lambda", "analysis.S",
                *(f"coarse.{k}" for k in ("beta", "L", "replicas", "samples", "eval_samples",
                                         "spacing", "pilot", "thermalization", "length",
                                         "steps", "integrator", "seed"))}),
    # a Gaussian prior: the [coarse] keys are not the training's
    "train": (dict(run={"stages": "train"}, theory={"L": 6}, flow={}, train={}, coarse={"L": 6},
                   analysis={}),
              {"run.seed", *THEORY, *FLOW, *TRAIN}),
    "fhmc": (dict(run={"stages": "train, fhmc"}, theory={"L": 6}, flow={}, train={}, fhmc={}, coarse={"L": 6},
                  analysis={}),
             {"run.seed", "run.rng", *THEORY, *FLOW, *TRAIN, *(f"fhmc.{k}" for k in HMC_KEYS)}),
}

# A valid other value for every key (None: "a different path", filled in per test).
OTHER = {
    "run": {"name": "other", "seed": 8, "device": "auto", "threads": 1, "io": "gather",
            "checkpoint_every": 3, "progress_every": 1.0, "compile": "auto", "output": None,
            "rng": "philox"},
    "theory": {"L": 8, "beta": 0.45, "lambda": 0.6},
    "hmc": {"replicas": 3, "trajectories": 30, "thermalization": 6, "length": 0.9, "steps": 6,
            "integrator": "omf2", "save_every": 2, "start": "hot"},
    "flow": {"prior": "coarse-volume", "kernel_size": 5, "layers": 2, "block": "single",
             "hidden": "4", "file": None},
    "train": {"iterations": 12, "batch_size": 16, "lr": 0.02, "schedule": "constant",
              "metropolis": 32, "eval_every": 3, "checkpoint_every": 4},
    "coarse": {"beta": 0.45, "L": 8, "replicas": 3, "samples": 32, "eval_samples": 32,
               "spacing": 2, "pilot": 150, "thermalization": 40, "length": 0.9, "steps": 6,
               "integrator": "omf2", "seed": 3, "file": None},
    "analysis": {"S": 1.5, "plateau_min": 1, "compare": "elsewhere"},
}
OTHER["fhmc"] = OTHER["hmc"]


def keys_of(stage):
    from hpcflow.config import SECTIONS, _ini_key
    import dataclasses

    sections, _ = BASES[stage]
    out = []
    for sec in ["run", "theory", *[s for s in sections if s not in ("run", "theory")]]:
        for f in dataclasses.fields(SECTIONS[sec]):
            out.append((stage, f"{sec}.{_ini_key(sec, f.name)}"))
    return out


ALL_KEYS = [k for stage in BASES for k in keys_of(stage)]


def test_every_key_of_every_section_is_covered():
    for stage, key in ALL_KEYS:
        sec, name = key.split(".")
        assert name in OTHER[sec] or (sec, name) == ("run", "stages"), key


def write(directory, stage, change=None):
    sections = {k: dict(v) for k, v in BASES[stage][0].items()}
    sections["run"]["output"] = directory / "out"
    if change is not None:
        (sec, name), value = change
        sections.setdefault(sec, {})[name] = value
    path = directory / "t.ini"
    path.write_text(ini_text(**sections))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    made = {}

    def get(stage):
        if stage not in made:
            d = tmp_path_factory.mktemp(f"base-{stage}")
            assert run.main([str(write(d, stage)), "--quiet"]) == 0
            made[stage] = d / "out"
        return made[stage]
    return get


@pytest.mark.parametrize("stage,key", ALL_KEYS, ids=[f"{s}-{k}" for s, k in ALL_KEYS])
def test_a_changed_key_is_refused_by_name_or_accepted(stage, key, base, tmp_path, capsys):
    sec, name = key.split(".")
    shutil.copytree(base(stage), tmp_path / "out")
    if (sec, name) == ("run", "stages"):
        value = BASES[stage][0]["run"]["stages"] + ", analysis"
    elif OTHER[sec][name] is None:
        value = tmp_path / "elsewhere" / ("flow.pt" if sec == "flow" else "x.h5")
        if sec == "run":
            value = tmp_path / "elsewhere"
    else:
        value = OTHER[sec][name]
    def results():  # every file but the run's lock
        return {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()
                if p.name != ".hpcflow.lock"}

    before = results()
    capsys.readouterr()
    rc = run.main([str(write(tmp_path, stage, ((sec, name), value))), "--quiet"])
    out, err = capsys.readouterr()
    named = f"[{sec}] {name}"
    if key == "run.seed" and stage == "coarse":
        named = "[coarse] seed"  # coarse seed -1: the coarse chains take the run seed
    if key in BASES[stage][1]:
        assert rc == 2, out + err
        assert named in err and "different input" in err and "--force" in err, err
        assert results() == before  # nothing changed
    else:
        assert rc == 0, out + err
        assert "different input" not in out + err


def test_start_cold_then_hot_is_refused_naming_both_values(make_input, tmp_path, capsys):
    """Before: cold -> hot after a finished run printed "complete: skipped"."""
    path = make_input()
    assert run.main([str(path)]) == 0
    path.write_text(path.read_text() + "start = hot\n")
    capsys.readouterr()
    assert run.main([str(path)]) == 2
    assert "[hmc] start was 'cold', now 'hot'" in capsys.readouterr().err


def read(path):
    from conftest import chain_datasets

    with h5py.File(path, "r") as f:
        attrs = dict(f.attrs)
    return chain_datasets(path), attrs


@pytest.mark.parametrize("save_every", [0, 4])
def test_raising_trajectories_continues_the_same_chains(make_input, tmp_path, capsys, save_every):
    """A finished run of 20, raised to 44: bit for bit a run of 44 from the start."""
    short = make_input(trajectories=20, save_every=save_every, checkpoint_every=7)
    assert run.main([str(short)]) == 0
    first, _ = read(tmp_path / "out" / "hmc.h5")
    short.write_text(short.read_text().replace("trajectories = 20", "trajectories = 44"))
    capsys.readouterr()
    assert run.main([str(short)]) == 0
    assert "extended from 25 to 49 trajectories" in capsys.readouterr().out
    extended, attrs = read(tmp_path / "out" / "hmc.h5")
    assert attrs["trajectories"] == 44
    np.testing.assert_array_equal(extended["observables/M"][:, :20], first["observables/M"])

    from conftest import write_input

    (tmp_path / "ref").mkdir()
    ref = write_input(tmp_path / "ref", trajectories=44, save_every=save_every, checkpoint_every=7)
    assert run.main([str(ref)]) == 0
    reference, _ = read(tmp_path / "ref" / "out" / "hmc.h5")
    assert reference.keys() == extended.keys()
    for name in reference:
        np.testing.assert_array_equal(extended[name], reference[name], err_msg=name)
    # fewer trajectories than the file holds: skipped, nothing lost
    short.write_text(short.read_text().replace("trajectories = 44", "trajectories = 30"))
    assert run.main([str(short)]) == 0
    assert "skipped" in capsys.readouterr().out
    assert read(tmp_path / "out" / "hmc.h5")[1]["trajectories"] == 44


def test_a_file_of_an_older_version_is_judged_by_its_stored_input(make_input, tmp_path, capsys):
    """hpcflow <= 0.2.0 stored a fingerprint with the version hashed in and no identity:
    such a file is skipped or resumed when its stored input has the same identity keys,
    whatever version made it, and refused naming the key otherwise."""
    path = make_input(trajectories=30, checkpoint_every=10)
    assert run.main([str(path)]) == 0
    h5 = tmp_path / "out" / "hmc.h5"
    with h5py.File(h5, "r+") as f:
        del f.attrs["identity"]
        f.attrs["hpcflow_version"] = "0.1.0"
        f.attrs["fingerprint"] = "0123456789abcdef"
    capsys.readouterr()
    assert run.main([str(path)]) == 0
    assert "skipped" in capsys.readouterr().out
    path.write_text(path.read_text().replace("trajectories = 30", "trajectories = 40"))
    assert run.main([str(path)]) == 0  # unfinished now: extended and resumed
    assert "resuming" in capsys.readouterr().out
    text = path.read_text()
    path.write_text(text.replace("beta = 0.5", "beta = 0.45"))
    assert run.main([str(path)]) == 2
    assert "[theory] beta was 0.5, now 0.45" in capsys.readouterr().err
    with h5py.File(h5, "r") as f:
        assert f.attrs["hpcflow_version"] == "0.1.0"  # recorded, never compared


def test_the_version_is_recorded_but_not_compared(make_input, tmp_path, capsys, monkeypatch):
    import hpcflow.store

    path = make_input()
    assert run.main([str(path)]) == 0
    monkeypatch.setattr(hpcflow.store, "__version__", "99.0")
    capsys.readouterr()
    assert run.main([str(path)]) == 0
    assert "skipped" in capsys.readouterr().out
