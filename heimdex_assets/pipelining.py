"""Overlapping input loading with model work, in bounded memory."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetch_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int = 4, window: int = 64) -> Iterator[R]:
    """``map(fn, items)`` in order, computed by ``workers`` threads at most ``window`` items ahead.

    The caller consumes results (e.g. runs a model on them) while the threads read and decode the
    next ones; I/O, PIL and OpenCV release the GIL. Unlike ``Executor.map``, which submits every
    item at once, no more than ``window`` results are held at a time.
    """
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
