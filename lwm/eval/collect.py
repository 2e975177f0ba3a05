"""Run independent, seeded work items (episodes) in-process or on a Ray cluster.

A `Collector` maps a worker over items and returns the results in item order:

    results = collector.map(make_worker, items)

`make_worker` is a picklable zero-argument callable (a dataclass instance with `__call__`, say)
that builds a worker: a callable item -> result. A worker is built once per process and reused
for many items (it may hold an env, a model, an LLM), so every item must carry everything that
determines its result (its seed above all): then the result of an item does not depend on which
process ran it or in what order, and `LocalCollector` and `RayCollector` return identical lists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = ["Collector", "LocalCollector"]

T = TypeVar("T")
R = TypeVar("R")


class Collector:
    """Maps a worker over items; results come back in item order."""

    def map(
        self,
        make_worker: Callable[[], Callable[[T], R]],
        items: Sequence[T],
        progress: str | None = None,
    ) -> list[R]:
        """Build workers with `make_worker` and return `[worker(item) for item in items]`.
        `progress` names a rich progress bar (none when None)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release workers and clusters this collector started."""

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LocalCollector(Collector):
    """Everything in this process, one item after another."""

    def map(self, make_worker, items, progress=None):
        worker = make_worker()
        if progress is None:
            return [worker(item) for item in items]
        from rich.progress import track

        return [worker(item) for item in track(items, description=progress)]
