"""Input files: every kind of mistake is an error naming file, section and key."""

import subprocess
import sys

import pytest

from hpcflow import config
from hpcflow.config import ConfigError

GOOD = """
[run]
name = t
output = out
seed = 1

[theory]
L = 8
beta = 0.576

[hmc]
replicas = 4
trajectories = 100
"""


def test_defaults_and_types():
    cfg = config.parse(GOOD, "good.ini")
    assert cfg.theory.L == 8 and cfg.theory.beta == 0.576 and cfg.theory.lam == 0.5
    assert cfg.hmc.integrator == "leapfrog" and cfg.hmc.steps == 10 and cfg.hmc.length == 1.0
    assert cfg.run.stages == ("hmc", "analysis") and cfg.run.device == "auto"
    assert cfg.analysis.S == 2.0


def with_line(section, line, text=GOOD):
    return text.replace(f"[{section}]\n", f"[{section}]\n{line}\n")


@pytest.mark.parametrize("text, section, key, words", [
    (GOOD + "\n[nonsense]\na = 1\n", "nonsense", None, "unknown section"),
    (with_line("hmc", "stepz = 3"), "hmc", "stepz", "unknown key"),
    (with_line("hmc", "steps = ten"), "hmc", "steps", "expected an integer"),
    (with_line("theory", "lambda = abc"), "theory", "lambda", "expected a finite number"),
    (with_line("theory", "lambda = -0.1"), "theory", "lambda", "must be >= 0"),
    (GOOD.replace("replicas = 4", "replicas = 0"), "hmc", "replicas", "must be > 0"),
    (GOOD.replace("L = 8", "L = 1"), "theory", "L", "must be >= 2"),
    (with_line("hmc", "integrator = verlet"), "hmc", "integrator", "leapfrog, omf2, omf4"),
    (with_line("run", "stages = hmc, fly"), "run", "stages", "unknown stage 'fly'"),
    (with_line("run", "device = tpu"), "run", "device", "auto, cpu, cuda"),
    (GOOD.replace("seed = 1\n", ""), "run", "seed", "required key is missing"),
    (GOOD.replace("beta = 0.576", "beta = 0.6") .replace("[theory]", "[theory]\nlambda = 0"),
     "theory", "beta", "beta < 1/2"),
    (GOOD.replace("[hmc]\nreplicas = 4\ntrajectories = 100\n", ""), "hmc", None, "required section"),
    (with_line("hmc", "steps = 3\nsteps = 4"), "hmc", "steps", "key appears twice"),
])
def test_errors_name_file_section_key(text, section, key, words):
    with pytest.raises(ConfigError) as err:
        config.parse(text, "bad.ini")
    e = err.value
    assert (e.path, e.section, e.key) == ("bad.ini", section, key)
    msg = str(e)
    assert msg.startswith("bad.ini: ") and f"[{section}]" in msg and words in msg
    if key:
        assert f"[{section}] {key}:" in msg


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read input file") as err:
        config.load(tmp_path / "missing.ini")
    assert str(tmp_path / "missing.ini") in str(err.value)
    d = tmp_path / "adir.ini"
    d.mkdir()
    with pytest.raises(ConfigError, match="cannot read input file"):
        config.load(d)


def test_not_ini(tmp_path):
    with pytest.raises(ConfigError, match="not a valid INI file"):
        config.parse("just some words\n", "x.ini")


def test_keys_are_case_sensitive():
    with pytest.raises(ConfigError, match="unknown key"):
        config.parse(GOOD.replace("L = 8", "l = 8"), "x.ini")


def test_reference_lists_every_key():
    """Every key of every section, under its INI name, with its default or (required)."""
    import dataclasses

    ref = config.reference()
    blocks = {b.split("]", 1)[0].lstrip("["): b for b in ref.split("\n\n") if b.strip()}
    assert list(blocks) == list(config.SECTIONS)
    for section, cls in config.SECTIONS.items():
        lines = blocks[section].splitlines()[1:]
        keys = [line.split()[0] for line in lines]
        expect = [config._ini_key(section, f.name) for f in dataclasses.fields(cls)]
        assert keys == expect, section
        for line, f in zip(lines, dataclasses.fields(cls)):
            shown = "(required)" if f.metadata["required"] else f"= {config._show(f.default)}".rstrip()
            assert line.split(None, 1)[1].startswith(shown), line
            assert f.metadata["doc"] and f.metadata["doc"].replace("%%", "%") in line
    assert "lambda " in blocks["theory"] and "lam " not in blocks["theory"]


def test_driver_exit_2_writes_nothing(tmp_path, make_input):
    path = make_input()
    bad = path.read_text().replace("steps = 5", "steps = five")
    path.write_text(bad)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "hpcflow.run", str(path)], capture_output=True, text=True)
    assert r.returncode == 2
    assert f"{path}: [hmc] steps: expected an integer, got 'five'" in r.stderr
    assert not out.exists()


def test_driver_missing_file_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hpcflow.run", str(tmp_path / "nope.ini")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "nope.ini" in r.stderr and "cannot read" in r.stderr
