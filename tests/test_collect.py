"""Collectors: LocalCollector and RayCollector (a local 2-CPU cluster) run real seeded BabyAI
episodes and must return identical results in item order, whatever order the items come in."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import uuid
from dataclasses import dataclass

import numpy as np
import pytest

from lwm.eval.collect import (
    LocalCollector,
    RayCollector,
    WorkerBuildError,
    WorkItemError,
    make_collector,
)
from lwm.tasks import load_suite

ray = pytest.importorskip("ray")
# Ray workers cannot import this module (pytest puts tests/ on the driver's sys.path only), so
# the worker factories below travel by value, as they would from a script's __main__.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class RandomEpisodes:
    """Builds a worker that plays one seeded random-policy episode per seed item."""

    suite: str = "babyai-goto"

    def __call__(self):
        return _RandomEpisodeWorker(load_suite(self.suite).make_env())


class _RandomEpisodeWorker:
    def __init__(self, env):
        self.env = env

    def __call__(self, seed: int) -> tuple[int, int, bool, str]:
        """(seed, steps, success, sha256 of the mission and every observation)."""
        obs, _ = self.env.reset(seed=seed)
        rng = np.random.default_rng(seed)
        digest = hashlib.sha256(obs["mission"].encode())
        steps, success = 0, False
        while True:
            digest.update(obs["image"].tobytes() + bytes([int(obs["direction"])]))
            action = int(rng.integers(self.env.action_space.n))
            obs, reward, terminated, truncated, _ = self.env.step(action)
            steps += 1
            if terminated or truncated:
                success = bool(terminated and reward > 0)
                digest.update(obs["image"].tobytes())
                return seed, steps, success, digest.hexdigest()


@dataclass(frozen=True)
class BuildTag:
    """Builds a worker that answers every item with (tag, an id unique to this build)."""

    tag: str

    def __call__(self):
        build = uuid.uuid4().hex
        return lambda item: (self.tag, build)


@dataclass(frozen=True)
class BrokenFactory:
    """Fails while building its worker, as a missing checkpoint would."""

    def __call__(self):
        raise FileNotFoundError("no checkpoint at /nowhere")


SEEDS = list(range(1000, 1012))


@pytest.fixture(scope="module")
def ray_collector():
    """One local 2-CPU cluster for the module, started (and shut down) by the collector."""
    assert not ray.is_initialized(), "another test left a Ray session running"
    collector = RayCollector(workers=2)
    yield collector
    collector.close()
    assert not ray.is_initialized(), "close() left running the cluster the collector started"


@pytest.fixture(params=["local", "ray"])
def collector(request):
    """Each collector, for the tests both must pass alike."""
    if request.param == "local":
        return LocalCollector()
    return request.getfixturevalue("ray_collector")


@pytest.fixture(scope="module")
def local_results():
    return LocalCollector().map(RandomEpisodes(), SEEDS)


def test_local_results_are_real_distinct_episodes(local_results):
    assert [r[0] for r in local_results] == SEEDS
    assert len({r[3] for r in local_results}) == len(SEEDS)
    assert all(1 <= r[1] <= load_suite("babyai-goto").max_steps for r in local_results)
    assert LocalCollector().map(RandomEpisodes(), SEEDS) == local_results


def test_ray_matches_local_in_item_order(ray_collector, local_results):
    assert ray_collector.map(RandomEpisodes(), SEEDS) == local_results


def test_ray_matches_local_for_shuffled_items_with_progress(ray_collector, local_results):
    by_seed = {r[0]: r for r in local_results}
    shuffled = list(np.random.default_rng(0).permutation(SEEDS).tolist())
    assert shuffled != SEEDS
    results = ray_collector.map(RandomEpisodes(), shuffled, progress="episodes")
    assert results == [by_seed[s] for s in shuffled]
    assert LocalCollector().map(RandomEpisodes(), shuffled, progress="episodes") == results


def test_fewer_items_than_workers_and_no_items(ray_collector, local_results):
    assert ray_collector.map(RandomEpisodes(), SEEDS[:1]) == local_results[:1]
    assert ray_collector.map(RandomEpisodes(), []) == []


def test_worker_exception_names_the_item_index(collector, local_results):
    items = SEEDS[:3] + [-1] + SEEDS[3:]  # the env itself refuses a negative seed
    with pytest.raises(
        WorkItemError, match=r"item 3 \(-1\) failed: gymnasium.error.Error: Seed must be"
    ) as info:
        collector.map(RandomEpisodes(), items)
    assert info.value.index == 3 and info.value.item == -1
    # The workers survive a failing item.
    assert collector.map(RandomEpisodes(), SEEDS[4:]) == local_results[4:]


def test_a_worker_that_cannot_be_built_says_why(collector, local_results):
    message = r"could not build the worker with BrokenFactory\(\): FileNotFoundError: no checkpoint"
    with pytest.raises(WorkerBuildError, match=message):
        collector.map(BrokenFactory(), SEEDS[:4])
    assert collector.map(RandomEpisodes(), SEEDS[:4]) == local_results[:4]


def test_actors_are_reused_for_an_equal_factory_and_rebuilt_for_another(ray_collector):
    items = list(range(8))
    first = ray_collector.map(BuildTag("a"), items)
    again = ray_collector.map(BuildTag("a"), items)
    other = ray_collector.map(BuildTag("b"), items)
    builds = {build for _, build in first}
    assert len(builds) == 2, "two workers, each built once"
    assert {build for _, build in again} <= builds
    assert {tag for tag, _ in other} == {"b"}
    assert not {build for _, build in other} & builds


def test_close_keeps_a_cluster_the_collector_did_not_start(ray_collector):
    # Only constructed: its actors would wait for the CPUs ray_collector's actors hold.
    with RayCollector(workers=2) as joined:
        assert joined.workers == 2
    assert ray.is_initialized()
    assert ray.cluster_resources()["CPU"] == 2


def test_more_workers_than_cluster_cpus_warns(ray_collector):
    with pytest.warns(UserWarning, match="the Ray cluster has 2 CPUs but 3 workers x 1 threads"):
        RayCollector(workers=3).close()


def test_make_collector_picks_local_or_ray(ray_collector):
    assert type(make_collector()) is LocalCollector
    assert type(make_collector(workers=1)) is LocalCollector
    with make_collector(workers=2) as collector:
        assert isinstance(collector, RayCollector)
        assert collector.workers == 2


@pytest.mark.parametrize("workers", [0, -1, 2.0, True])
def test_bad_worker_counts_are_rejected(workers):
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        make_collector(workers=workers)
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        RayCollector(workers=workers)


def test_bad_threads_and_address_are_rejected():
    with pytest.raises(ValueError, match="threads_per_worker must be an integer >= 1, got 0"):
        RayCollector(workers=2, threads_per_worker=0)
    with pytest.raises(ValueError, match="ray_address must be a cluster address .*got ' '"):
        make_collector(workers=2, ray_address=" ")


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'lwm\[ray\]'"):
        RayCollector(workers=2)


def test_importing_collect_does_not_import_ray():
    code = "import sys, lwm.eval.collect; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_on_result_sees_each_result_once_as_it_arrives(collector, local_results):
    seen: dict[int, object] = {}

    def note(index, result):
        assert index not in seen
        seen[index] = result

    assert collector.map(RandomEpisodes(), SEEDS, on_result=note) == local_results
    assert [seen[i] for i in range(len(SEEDS))] == local_results
