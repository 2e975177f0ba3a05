"""Run independent, seeded work items (episodes) in-process or on a Ray cluster.

A `Collector` maps a worker over items and returns the results in item order:

    results = collector.map(make_worker, items)

`make_worker` is a picklable zero-argument callable (a dataclass instance with `__call__`, say)
that builds a worker: a callable item -> result. A worker is built once per process and reused
for many items (it may hold an env, a model, an LLM), so every item must carry everything that
determines its result (its seed above all): then the result of an item does not depend on which
process ran it or in what order, and `LocalCollector` and `RayCollector` return identical lists.

    with make_collector(workers=4) as collector:  # a local Ray cluster of 4 CPUs
        results = collector.map(make_worker, seeds, progress="episodes")

A failing item raises `WorkItemError` naming its index, chained to the worker's exception; a
`make_worker` that fails raises `WorkerBuildError`.
Ray is optional (extra `ray`) and imported only when a `RayCollector` is built.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = [
    "Collector",
    "LocalCollector",
    "RayCollector",
    "WorkItemError",
    "WorkerBuildError",
    "make_collector",
]

T = TypeVar("T")
R = TypeVar("R")


class WorkItemError(RuntimeError):
    """A worker failed on one item; `index` is the item's position, `__cause__` the failure."""

    def __init__(self, index: int, item: Any, reason: str):
        shown = repr(item)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"item {index} ({shown}) failed: {reason}")
        self.index = index
        self.item = item


class WorkerBuildError(RuntimeError):
    """`make_worker()` failed; `__cause__` (in-process) or the message (Ray) says why."""


class Collector:
    """Maps a worker over items; results come back in item order."""

    def map(
        self,
        make_worker: Callable[[], Callable[[T], R]],
        items: Sequence[T],
        progress: str | None = None,
        on_result: Callable[[int, R], None] | None = None,
    ) -> list[R]:
        """Build workers with `make_worker` and return `[worker(item) for item in items]`.
        `progress` names a rich progress bar (none when None). `on_result(index, result)` is
        called with each result as soon as it is there (in the order items finish), so a caller
        can save work that an interruption would otherwise lose."""
        raise NotImplementedError

    def close(self) -> None:
        """Release workers and clusters this collector started."""

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _describe(exc: BaseException) -> str:
    """`ValueError: ...`, `gymnasium.error.Error: ...`: the class in full unless a builtin."""
    cls = type(exc)
    name = (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
    return f"{name}: {exc}"


def _build(make_worker: Callable[[], Callable[[T], R]]) -> Callable[[T], R]:
    try:
        return make_worker()
    except Exception as exc:
        raise WorkerBuildError(
            f"could not build the worker with {make_worker!r}: {_describe(exc)}"
        ) from exc


class LocalCollector(Collector):
    """Everything in this process, one item after another."""

    def map(self, make_worker, items, progress=None, on_result=None):
        worker = _build(make_worker)
        indexed = enumerate(items)
        if progress is not None:
            from rich.progress import track

            indexed = track(indexed, total=len(items), description=progress)
        results = []
        for index, item in indexed:
            try:
                results.append(worker(item))
            except Exception as exc:
                raise WorkItemError(index, item, _describe(exc)) from exc
            if on_result is not None:
                on_result(index, results[-1])
        return results


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            "RayCollector needs Ray, which is optional: pip install 'lwm[ray]'"
        ) from exc
    return ray


class _RayWorker:
    """The body of one Ray actor: builds its worker once, then runs items on it.

    A failed build is kept and raised by `run`: Ray reports an exception raised in an actor's
    constructor only as a dead actor, without the exception itself."""

    def __init__(self, make_worker: Callable[[], Callable[[Any], Any]], threads: int):
        self.worker = None
        self.build_error: WorkerBuildError | None = None
        try:
            self.worker = _build(make_worker)
        except WorkerBuildError as exc:
            self.build_error = exc
        # Ray sets OMP_NUM_THREADS to the actor's CPUs, which torch reads when first imported;
        # this covers a torch imported earlier. Importing torch here would cost seconds per
        # actor for workers that never use it.
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)

    def run(self, item: Any) -> Any:
        if self.build_error is not None:
            raise self.build_error
        return self.worker(item)


class RayCollector(Collector):
    """Items spread over `workers` Ray actors; a free actor takes the next item.

    Uses the Ray session this process already has, if any; else connects to the cluster at
    `address` ("auto", "ray://host:10001", ...) when one is given (its nodes need lwm
    installed); else starts a local cluster with `workers * threads_per_worker` CPUs.
    Each actor reserves `threads_per_worker` CPUs and runs torch with that many threads.
    Actors are kept across `map` calls with an equal `make_worker`, so models and envs are built
    once, and hold their CPUs until `close()`: on a small cluster, close one collector before
    mapping with another. `close()` kills the actors, and shuts down the cluster only if this
    collector started it; a later `map` starts new actors.
    """

    def __init__(self, workers: int, address: str | None = None, threads_per_worker: int = 1):
        _check_count("workers", workers)
        _check_count("threads_per_worker", threads_per_worker)
        ray = _import_ray()
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        self._started_cluster = False
        if ray.is_initialized():
            pass  # this process is already connected (a test fixture, an earlier collector)
        elif address is not None:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(
                num_cpus=workers * threads_per_worker,
                include_dashboard=False,
                logging_level=logging.WARNING,
            )
            self._started_cluster = True
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < workers * threads_per_worker:
            warnings.warn(
                f"the Ray cluster has {cpus:g} CPUs but {workers} workers x {threads_per_worker} "
                "threads reserve more; the rest wait until CPUs free up or nodes join",
                stacklevel=2,
            )
        self._actor_class = ray.remote(num_cpus=threads_per_worker)(_RayWorker)
        self._actors: list[Any] = []
        self._make_worker: Callable[[], Callable[[Any], Any]] | None = None

    def _actors_for(self, make_worker) -> list[Any]:
        if self._actors and self._make_worker == make_worker:
            return self._actors
        self._kill_actors()
        self._actors = [
            self._actor_class.remote(make_worker, self.threads_per_worker)
            for _ in range(self.workers)
        ]
        self._make_worker = make_worker
        return self._actors

    def map(self, make_worker, items, progress=None, on_result=None):
        ray = _import_ray()
        items = list(items)
        if not items:
            return []
        actors = self._actors_for(make_worker)
        results: list[Any] = [None] * len(items)
        pending: dict[Any, tuple[int, Any]] = {}  # ObjectRef -> (item index, actor)
        next_index = 0

        def submit(actor) -> None:
            nonlocal next_index
            ref = actor.run.remote(items[next_index])
            pending[ref] = (next_index, actor)
            next_index += 1

        bar = None
        if progress is not None:
            from rich.progress import Progress

            bar = Progress()
            task = bar.add_task(progress, total=len(items))
            bar.start()
        try:
            for actor in actors[: len(items)]:
                submit(actor)
            while pending:
                [done], _ = ray.wait(list(pending), num_returns=1)
                index, actor = pending.pop(done)
                try:
                    results[index] = ray.get(done)
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if exc.cause is not None else exc
                    if isinstance(cause, WorkerBuildError):
                        self._kill_actors()  # a later map may find what was missing
                        raise WorkerBuildError(str(cause)) from exc
                    raise WorkItemError(index, items[index], _describe(cause)) from exc
                except ray.exceptions.RayActorError as exc:
                    self._kill_actors()  # a dead actor poisons the set: rebuild all next time
                    reason = f"its Ray worker died ({_describe(exc)})"
                    raise WorkItemError(index, items[index], reason) from exc
                if on_result is not None:
                    on_result(index, results[index])
                if bar is not None:
                    bar.advance(task)
                if next_index < len(items):
                    submit(actor)
        finally:
            if bar is not None:
                bar.stop()
        return results

    def _kill_actors(self) -> None:
        if self._actors:
            ray = _import_ray()
            for actor in self._actors:
                ray.kill(actor)
        self._actors = []
        self._make_worker = None

    def close(self) -> None:
        self._kill_actors()
        if self._started_cluster:
            _import_ray().shutdown()
            self._started_cluster = False


def make_collector(workers: int = 1, ray_address: str | None = None) -> Collector:
    """A `LocalCollector` for one worker and no cluster address, else a `RayCollector`."""
    _check_count("workers", workers)
    if ray_address is not None and not ray_address.strip():
        raise ValueError(
            f"ray_address must be a cluster address such as 'auto', got {ray_address!r}"
        )
    if workers == 1 and ray_address is None:
        return LocalCollector()
    return RayCollector(workers, address=ray_address)
