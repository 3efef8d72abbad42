"""Shared test setup.

Tests run in parallel (pytest-xdist) on small machines: one intra-op thread per worker avoids
oversubscribing the cores, which otherwise makes tiny-model tests many times slower. Subprocesses
(the real CLI) inherit the same limit through OMP_NUM_THREADS.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)
