"""hpcflow: HMC and flow HMC for trivializing flows in 2D phi^4 lattice theory."""

__version__ = "0.2.0"
