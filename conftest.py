"""Settings for every test and notebook. Under pytest-xdist (pyproject's addopts run one worker per core) each
worker, and every process it starts (notebook kernels, torchrun ranks, training subprocesses), computes on one
thread: workers on threads of their own would fight over the same cores."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
