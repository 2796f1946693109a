"""Forward passes on few rows run on one torch thread, so their results do not depend on the thread count.

torch 2.13's CPU float32 matrix product (MKL's sgemm) on 5-11 rows gives other last bits at 2 intra-op
threads than at 1 (measured on layers of 10-784 inputs and 8-784 outputs: 1, 3 and 4 threads agree, 2 and 8
differ; 1-4 and >= 12 rows agree at every count tried), which moved attacks and margins between
``--threads 1`` and ``--threads 2`` (session 9). Products that small gain nothing from a second thread,
so :class:`robbench.checks.CheckedModel` runs encode/decode calls on fewer than :data:`FEW_ROWS` rows
inside :func:`one_thread_if_few_rows`, and so does the ``torch`` attack engine's autograd backward
(:func:`robbench.projection._grad`), whose products on few rows were the last thread-dependent source
found (an aten-op trace at 1 vs 2 threads, session 10; README ``--threads``).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

FEW_ROWS = 12


@contextmanager
def one_thread_if_few_rows(t: Tensor) -> Iterator[None]:
    """torch's intra-op threads set to 1 inside the block when ``t`` (rows, ...) is a CPU tensor with fewer
    than FEW_ROWS rows (its first dimension), restored after; otherwise nothing changes."""
    before = torch.get_num_threads()
    if (before == 1 or not isinstance(t, Tensor) or t.device.type != "cpu" or t.dim() == 0
            or t.shape[0] >= FEW_ROWS):
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
