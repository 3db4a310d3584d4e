"""The run's C allocator settings (hpcflow.allocator)."""

import json
import subprocess
import sys

import pytest

from hpcflow import allocator

PROBE = ("import json; from hpcflow import allocator; "
         "print(json.dumps([allocator.tune(), allocator.tune() is allocator.tune()]))")


def probe(env_extra):
    import os

    env = {k: v for k, v in os.environ.items()
           if k not in (*allocator.MALLOC_ENV, "HPCFLOW_MALLOC", "LD_PRELOAD")}
    p = subprocess.run([sys.executable, "-c", PROBE], env={**env, **env_extra},
                       capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


def test_glibc_gets_the_settings_once():
    import platform

    state, same = probe({})
    assert same  # once per process: the second call returns the first result
    if platform.libc_ver()[0] != "glibc":
        assert "skipped" in state
        return
    assert state["applied"] == {k: v for k, (_, v) in allocator.MALLOC_SETTINGS.items()}
    assert state["glibc"] == platform.libc_ver()[1]


@pytest.mark.parametrize("env,reason", [
    ({"HPCFLOW_MALLOC": "default"}, "HPCFLOW_MALLOC=default"),
    ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, "MALLOC_TRIM_THRESHOLD_ is set"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}, "GLIBC_TUNABLES is set"),
])
def test_the_users_choice_is_left_alone(env, reason):
    state, _ = probe(env)
    assert state == {"skipped": reason}


def test_make_world_tunes_the_allocator(monkeypatch):
    from hpcflow import parallel

    monkeypatch.setattr(allocator, "_state", None)
    monkeypatch.setenv("HPCFLOW_MALLOC", "default")  # this test process keeps its allocator
    parallel.make_world("cpu", 1)
    assert allocator._state == {"skipped": "HPCFLOW_MALLOC=default"}
