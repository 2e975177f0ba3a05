"""Episode recording, crash-safe storage, and sequence sampling (lwm.data)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import gymnasium
import minigrid  # noqa: F401  (registers the BabyAI-* ids)
import numpy as np
import pytest
from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX

from lwm.data import (
    FORMAT_VERSION,
    Episode,
    EpisodeFormatError,
    EpisodeRecorder,
    EpisodeStore,
    SequenceSampler,
    load_episode,
    save_episode,
)

WRITER = Path(__file__).with_name("episode_writer.py")
_spec = importlib.util.spec_from_file_location("episode_writer", WRITER)
_writer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_writer)
synthetic_episode = _writer.synthetic_episode


def _store_with(path: Path, steps: list[int]) -> EpisodeStore:
    store = EpisodeStore(path)
    for seed, n in enumerate(steps):
        store.append(synthetic_episode(seed, n))
    return store


# --- Episode and recorder ---------------------------------------------------------------------


def test_recorder_builds_episode_with_reset_at_index_0():
    def obs(t):
        return {"image": np.full((7, 7, 3), t, np.uint8), "direction": t % 4,
                "carrying": np.array([1, 0]), "mission": "go to the red ball"}

    recorder = EpisodeRecorder(meta={"env_id": "test"})
    recorder.reset(obs(0), {"events": ["you see a red ball"]}, meta={"seed": 3})
    assert recorder.step(2, obs(1), 0.0, False, False, {}) is None
    episode = recorder.step(1, obs(2), 0.5, True, False,
                            {"events": ["you are at the red ball"],
                             "achieved": ["go to the red ball"],
                             "achieved_locs": [[["left"], []]]})
    assert episode.num_steps == 2
    assert episode.image[:, 0, 0, 0].tolist() == [0, 1, 2]
    assert episode.action.tolist() == [2, 1] and episode.reward.dtype == np.float32
    assert episode.events == [["you see a red ball"], [], ["you are at the red ball"]]
    assert episode.achieved == [[], [], ["go to the red ball"]]
    assert episode.achieved_locs == [[], [], [[["left"], []]]]
    assert (episode.terminated, episode.truncated) == (True, False)
    assert episode.meta == {"env_id": "test", "seed": 3}
    with pytest.raises(RuntimeError, match="before reset"):
        recorder.step(0, obs(3), 0.0, False, False, {})


def test_episode_rejects_inconsistent_fields():
    good = synthetic_episode(0, 4)
    with pytest.raises(ValueError, match="image: expected shape"):
        Episode(**{**vars(good), "image": good.image[:-1]})
    with pytest.raises(ValueError, match="image: dtype int64"):
        Episode(**{**vars(good), "image": good.image.astype(np.int64)})
    with pytest.raises(ValueError, match="achieved: expected 5 lists"):
        Episode(**{**vars(good), "achieved": good.achieved[:-1]})
    with pytest.raises(ValueError, match=r"achieved_locs\[4\]: expected one pair per"):
        Episode(**{**vars(good), "achieved_locs": [[] for _ in range(5)]})
    assert Episode(**{**vars(good), "achieved_locs": None}).achieved_locs[4] == [[[], []]] * 2
    with pytest.raises(ValueError, match="meta: not JSON"):
        Episode(**{**vars(good), "meta": {"seed": object()}})


# --- file format ------------------------------------------------------------------------------


def test_round_trip(tmp_path):
    episode = synthetic_episode(7, 12)
    episode.events[3].append("ünïcode — and \"quotes\"")
    save_episode(episode, tmp_path / "e.npz")
    assert load_episode(tmp_path / "e.npz") == episode
    assert sorted(os.listdir(tmp_path)) == ["e.npz"]  # no temp file left behind
    with np.load(tmp_path / "e.npz", allow_pickle=False) as archive:
        assert int(archive["format_version"]) == FORMAT_VERSION


def test_truncated_file_gets_error_naming_it(tmp_path):
    path = tmp_path / "00000000.npz"
    save_episode(synthetic_episode(0, 30), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(EpisodeFormatError, match=str(path)):
        load_episode(path)
    path.write_bytes(b"definitely not an archive")
    with pytest.raises(EpisodeFormatError, match=str(path)):
        load_episode(path)


def test_foreign_npz_gets_error_naming_it(tmp_path):
    path = tmp_path / "00000000.npz"
    np.savez(path, x=np.zeros(3))
    with pytest.raises(EpisodeFormatError, match=rf"{path}: not an lwm episode file.*'image'"):
        load_episode(path)


def _rewrite(path: Path, **changes: np.ndarray) -> None:
    with np.load(path, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    with open(path, "wb") as f:
        np.savez(f, **{**arrays, **changes})


def test_wrong_version_or_shape_gets_error_naming_it(tmp_path):
    path = tmp_path / "00000000.npz"
    save_episode(synthetic_episode(0, 5), path)
    _rewrite(path, format_version=np.int64(FORMAT_VERSION + 1))
    with pytest.raises(EpisodeFormatError, match=rf"{path}: episode format version 2"):
        load_episode(path)
    save_episode(synthetic_episode(0, 5), path)
    _rewrite(path, reward=np.zeros(4, np.float32))
    with pytest.raises(EpisodeFormatError, match=rf"{path}: .*reward: expected shape \(5,\)"):
        load_episode(path)


# --- the store --------------------------------------------------------------------------------


def test_store_indices_continue_after_reopening(tmp_path):
    with _store_with(tmp_path / "store", [3, 4]) as store:
        assert len(store) == 2
    with EpisodeStore(tmp_path / "store") as store:
        assert store.append(synthetic_episode(2, 5)) == 2
        assert [e.num_steps for e in store] == [3, 4, 5]
        assert store[2] == synthetic_episode(2, 5)
        assert sorted(os.listdir(store.path)) == [".lock", "00000000.npz", "00000001.npz",
                                                  "00000002.npz"]


def test_one_writer_many_readers(tmp_path):
    writer = _store_with(tmp_path, [3])
    with pytest.raises(RuntimeError, match="another process is writing"):
        EpisodeStore(tmp_path)
    reader = EpisodeStore(tmp_path, mode="r")
    writer.append(synthetic_episode(1, 3))
    assert len(reader) == 1 and reader.refresh() == 1 and len(reader) == 2
    with pytest.raises(RuntimeError, match="not open for writing"):
        reader.append(synthetic_episode(2, 3))
    writer.close()
    EpisodeStore(tmp_path).close()  # the lock is free again
    with pytest.raises(FileNotFoundError):
        EpisodeStore(tmp_path / "missing", mode="r")


def test_stale_temp_file_ignored_by_readers_and_cleaned_by_writer(tmp_path):
    _store_with(tmp_path, [3, 3]).close()
    stale = tmp_path / ".00000002.npz.12345.tmp"
    data = (tmp_path / "00000000.npz").read_bytes()
    stale.write_bytes(data[: len(data) // 3])  # what a writer killed mid-write leaves
    assert len(EpisodeStore(tmp_path, mode="r")) == 2 and stale.exists()
    with EpisodeStore(tmp_path) as store:
        assert not stale.exists()
        assert store.append(synthetic_episode(2, 3)) == 2


def test_killed_writer_loses_at_most_the_episode_in_progress(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), str(tmp_path), "300"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1],
    )
    watchdog = threading.Timer(60, proc.kill)  # never hang the suite on a stuck writer
    watchdog.start()
    try:
        reported = []
        while len(reported) < 3 and (line := proc.stdout.readline()):
            reported.append(int(line))
        # Kill once the next episode's temp file exists: mid-write, unless the rename just won.
        while not any(n.endswith(".tmp") for n in os.listdir(tmp_path)) and proc.poll() is None:
            time.sleep(0.0005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        watchdog.cancel()
        proc.stdout.close()
    assert reported == [0, 1, 2], "the writer died before appending three episodes"

    reader = EpisodeStore(tmp_path, mode="r")
    landed = list(reader.indices)
    # Everything reported is there, nothing is skipped, and every file is whole.
    assert landed == list(range(len(landed))) and len(landed) >= 3
    for index, episode in zip(landed, reader, strict=True):
        assert episode == synthetic_episode(index, 300)
    temps = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert temps in ([], [f".{len(landed):08d}.npz.{proc.pid}.tmp"])

    with EpisodeStore(tmp_path) as store:
        assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
        assert store.append(synthetic_episode(len(landed), 300)) == len(landed)
    assert reader.refresh() == 1


def test_records_and_reloads_a_real_babyai_episode(tmp_path):
    env = gymnasium.make("BabyAI-GoToLocal-v0")
    rng = np.random.default_rng(0)

    def as_obs(raw):
        carried = env.unwrapped.carrying
        carrying = ((OBJECT_TO_IDX["empty"], 0) if carried is None
                    else (OBJECT_TO_IDX[carried.type], COLOR_TO_IDX[carried.color]))
        return {"image": raw["image"], "direction": raw["direction"],
                "carrying": np.array(carrying, np.int64), "mission": raw["mission"]}

    recorder = EpisodeRecorder(meta={"env_id": "BabyAI-GoToLocal-v0"})
    raw, info = env.reset(seed=5)
    recorder.reset(as_obs(raw), info, meta={"seed": 5})
    episode = None
    while episode is None:
        action = int(rng.integers(env.action_space.n))
        raw, reward, terminated, truncated, info = env.step(action)
        episode = recorder.step(action, as_obs(raw), reward, terminated, truncated, info)
    env.close()

    assert episode.image.shape == (episode.num_steps + 1, 7, 7, 3)
    assert episode.mission.startswith("go to")
    with EpisodeStore(tmp_path) as store:
        index = store.append(episode)
    assert EpisodeStore(tmp_path, mode="r")[index] == episode


def test_records_the_env_layers_wrapper_as_is(tmp_path):
    """The env layer's obs and info dicts feed the recorder unchanged, events and achieved too."""
    import lwm.envs  # noqa: F401  (registers the lwm/ ids)

    env = gymnasium.make("lwm/BabyAI-PickupLoc-v0")
    rng = np.random.default_rng(1)
    recorder = EpisodeRecorder(meta={"env_id": "lwm/BabyAI-PickupLoc-v0"})
    recorder.reset(*env.reset(seed=1))
    episode = None
    while episode is None:
        action = int(rng.integers(env.action_space.n))
        episode = recorder.step(action, *env.step(action))
    env.close()
    assert any(episode.events) and any(episode.achieved)
    with EpisodeStore(tmp_path) as store:
        assert store[store.append(episode)] == episode


# --- the sampler ------------------------------------------------------------------------------


def test_sampler_shapes_masks_and_content(tmp_path):
    store = _store_with(tmp_path, [3, 10])
    sampler = SequenceSampler(store, seq_len=5)
    assert sampler.num_windows == 1 + 6
    batch = sampler.sample(64, np.random.default_rng(0))
    assert batch.image.shape == (64, 6, 7, 7, 3) and batch.image.dtype == np.uint8
    assert batch.direction.shape == (64, 6) and batch.carrying.shape == (64, 6, 2)
    assert batch.action.shape == batch.reward.shape == batch.mask.shape == (64, 5)
    assert batch.is_first.shape == batch.is_last.shape == (64, 6)
    assert len(batch.achieved) == 64 and all(len(a) == 6 for a in batch.achieved)

    for b in range(64):
        episode = synthetic_episode(int(batch.episode[b]), [3, 10][batch.episode[b]])
        s, n = int(batch.start[b]), int(batch.mask[b].sum())
        assert n == min(5, episode.num_steps - s)
        assert batch.mask[b].tolist() == [True] * n + [False] * (5 - n)
        np.testing.assert_array_equal(batch.image[b, : n + 1], episode.image[s : s + n + 1])
        np.testing.assert_array_equal(batch.action[b, :n], episode.action[s : s + n])
        assert not batch.image[b, n + 1 :].any() and not batch.reward[b, n:].any()
        assert batch.is_first[b].tolist() == [s == 0] + [False] * 5
        ends = s + n == episode.num_steps
        assert batch.is_last[b].tolist() == [k == n and ends for k in range(6)]
        assert batch.is_terminal[b, n] == (ends and episode.terminated)
        assert batch.achieved[b][: n + 1] == episode.achieved[s : s + n + 1]
        assert batch.achieved_locs[b][: n + 1] == episode.achieved_locs[s : s + n + 1]
        assert batch.achieved[b][n + 1 :] == batch.achieved_locs[b][n + 1 :] == [[]] * (5 - n)
        assert batch.mission[b] == episode.mission
    short = batch.episode == 0  # T=3 < L=5: always start 0, padded
    assert short.any() and (batch.start[short] == 0).all() and (batch.mask[short].sum(1) == 3).all()


def test_sampler_is_uniform_over_windows_and_deterministic(tmp_path):
    sampler = SequenceSampler(_store_with(tmp_path, [2, 9]), seq_len=4)  # 1 + 6 windows
    one = sampler.sample(7000, np.random.default_rng(1))
    two = sampler.sample(7000, np.random.default_rng(1))
    for name in ("image", "action", "mask", "is_last", "episode", "start"):
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name))
    assert one.achieved == two.achieved
    assert not np.array_equal(one.start, sampler.sample(7000, np.random.default_rng(2)).start)
    windows = one.episode * 10 + one.start
    counts = np.unique(windows, return_counts=True)[1]
    assert len(counts) == 7 and counts.min() > 850 and counts.max() < 1150  # 1000 expected each


def test_sampler_refresh_picks_up_new_episodes(tmp_path):
    store = EpisodeStore(tmp_path)
    sampler = SequenceSampler(EpisodeStore(tmp_path, mode="r"), seq_len=4)
    with pytest.raises(ValueError, match="no episodes"):
        sampler.sample(2, np.random.default_rng(0))
    store.append(synthetic_episode(0, 6))
    store.append(synthetic_episode(1, 6))
    assert sampler.refresh() == 2 and sampler.num_windows == 6
    assert sampler.refresh() == 0
    assert set(sampler.sample(50, np.random.default_rng(0)).episode) == {0, 1}


def test_batch_to_torch(tmp_path):
    torch = pytest.importorskip("torch")
    batch = SequenceSampler(_store_with(tmp_path, [6]), seq_len=4).sample(
        3, np.random.default_rng(0))
    tensors = batch.to_torch()
    assert tensors["image"].dtype == torch.uint8 and tensors["image"].shape == (3, 5, 7, 7, 3)
    assert tensors["mask"].dtype == torch.bool and tensors["reward"].dtype == torch.float32
    assert tensors["mission"] == batch.mission
