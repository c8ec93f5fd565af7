"""Run independent CPU jobs (model trainings, renders) in parallel processes, one thread each."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def pool_map(fn: Callable[[T], R], tasks: Sequence[T], jobs: int) -> list[R]:
    """``[fn(t) for t in tasks]``, in ``jobs`` spawned processes when that helps (``fn`` must be
    a module-level function that sets its own thread count). In-process otherwise, restoring
    this process's torch thread count afterwards."""
    if jobs <= 1 or len(tasks) <= 1:
        threads = torch.get_num_threads()
        try:
            return [fn(t) for t in tasks]
        finally:
            torch.set_num_threads(threads)
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(min(jobs, len(tasks))) as pool:
        return pool.map(fn, tasks, chunksize=1)
