"""Splitting a file list between the worker processes of a data loader (PyTorch's ``DataLoader`` with
``num_workers > 0``): each worker process runs the dataset's ``__iter__`` on its own copy, so a dataset
that iterates the whole list yields every record once per worker.

Invariant: over workers ``0 .. n-1`` the shares are disjoint, cover the list, and keep its order within
each share. No torch import: the caller passes ``torch.utils.data.get_worker_info()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

T = TypeVar("T")


class WorkerInfo(Protocol):
    """What ``torch.utils.data.get_worker_info()`` returns inside a worker (None outside one)."""

    id: int
    num_workers: int


def worker_share(items: Sequence[T], info: WorkerInfo | None) -> list[T]:
    """This worker's share of ``items``: every ``num_workers``-th item from the worker's ``id``
    (``items[id::num_workers]``); all of them when ``info`` is None (no worker processes).

    A share is one reader process's list: give it to ``iter_resolve`` (with ``shuffle_seed`` each worker
    shuffles its own share and announces that order to the daemon). Raises ValueError for an ``info``
    whose id is not within ``0 .. num_workers - 1``."""
    if info is None:
        return list(items)
    n, i = int(info.num_workers), int(info.id)
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"worker id {i} of {n} workers: not a worker of this loader")
    return list(items[i::n])
