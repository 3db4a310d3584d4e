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


def randomised(module, seed=0, std=0.3):
    """module with every parameter redrawn from a normal distribution, far from the identity.

    Conv weights get standard deviation std * 3 / sqrt(fan-in), i.e. ``std`` for one 3x3
    input channel (s and t are then O(1) before their tanh); scalars (the global log scale)
    get ``std``.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            scale = std * 3 / p[0].numel() ** 0.5 if p.dim() > 1 else std
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


@pytest.fixture
def make_input(tmp_path):
    def make(**kw):
        return write_input(tmp_path, **kw)
    return make
