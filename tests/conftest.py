import textwrap
from pathlib import Path

import pytest
import torch

torch.set_default_dtype(torch.float64)


def write_input(directory: Path, name="t", *, stages="hmc", L=4, beta=0.5, lam=0.5,
                replicas=2, trajectories=20, thermalization=5, steps=5, integrator="leapfrog",
                save_every=5, seed=7, checkpoint_every=10, io="auto", extra="") -> Path:
    """A small input file in ``directory`` whose output lies in ``directory/out``."""
    text = textwrap.dedent(f"""\
        [run]
        name = {name}
        output = {directory / 'out'}
        seed = {seed}
        stages = {stages}
        device = cpu
        io = {io}
        checkpoint_every = {checkpoint_every}

        [theory]
        L = {L}
        beta = {beta}
        lambda = {lam}

        [hmc]
        replicas = {replicas}
        trajectories = {trajectories}
        thermalization = {thermalization}
        length = 1.0
        steps = {steps}
        integrator = {integrator}
        save_every = {save_every}
        """) + extra
    path = directory / f"{name}.ini"
    path.write_text(text)
    return path


@pytest.fixture
def make_input(tmp_path):
    def make(**kw):
        return write_input(tmp_path, **kw)
    return make
