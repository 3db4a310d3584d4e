"""Packaging: the console scripts of pyproject.toml run main() and keep its exit status."""

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_scripts_point_at_main():
    scripts = PROJECT["scripts"]
    assert {"hpcflow-run", "hpcflow-analysis", "hpcflow-scan"} <= set(scripts)
    for name, target in scripts.items():
        module, func = target.split(":")
        assert (module, func) == ("hpcflow." + name.removeprefix("hpcflow-"), "main")
        assert callable(getattr(importlib.import_module(module), func))


@pytest.mark.parametrize("name, args", [("hpcflow-run", []), ("hpcflow-analysis", []),
                                        ("hpcflow-scan", ["make"])])
def test_installed_script_exit_status(tmp_path, name, args):
    """The installed command returns main()'s status: 2 for a missing input."""
    script = Path(sys.executable).parent / name
    if not script.exists():
        pytest.skip(f"{name} is not installed beside {sys.executable}")
    r = subprocess.run([str(script), *args, str(tmp_path / "nope.ini")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "nope.ini" in r.stderr
