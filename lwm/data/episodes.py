"""One finished episode as numpy arrays, and the recorder that builds it step by step.

An episode of T steps holds T+1 observations (index 0 is the reset observation, index t the one
reached by action t-1) and T actions and rewards (action t is taken from observation t). The
per-observation text fields follow the same indexing: `events[t]`, `achieved[t]` and
`achieved_locs[t]` are what the environment reported on arriving at observation t, so index 0 is
what it said at reset.

Fed the environment layer's observation dicts and infos:

    recorder = EpisodeRecorder(meta={"env_id": env_id, "suite": "babyai-goto"})
    obs, info = env.reset(seed=seed)
    recorder.reset(obs, info, meta={"seed": seed})
    episode = None
    while episode is None:
        action = policy(obs)
        obs, reward, terminated, truncated, info = env.step(action)
        episode = recorder.step(action, obs, reward, terminated, truncated, info)
    store.append(episode)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Episode", "EpisodeRecorder"]


def _as_array(name: str, value: Any, dtype: np.dtype | type, casting: str) -> np.ndarray:
    """`value` as an array of `dtype`, refusing casts that could change values silently."""
    array = np.asarray(value)
    if not np.can_cast(array.dtype, dtype, casting):
        raise ValueError(f"{name}: dtype {array.dtype} cannot be stored as {np.dtype(dtype)}")
    return array.astype(dtype, copy=False)


def _as_text_lists(name: str, value: Any, length: int) -> list[list[str]]:
    """`value` checked to be `length` lists of strings; copied so the episode owns it."""
    if not isinstance(value, list | tuple) or len(value) != length:
        got = len(value) if isinstance(value, list | tuple) else type(value).__name__
        raise ValueError(f"{name}: expected {length} lists of str (one per observation), got {got}")
    out = []
    for t, texts in enumerate(value):
        if not isinstance(texts, list | tuple) or not all(isinstance(s, str) for s in texts):
            raise ValueError(f"{name}[{t}]: expected a list of str, got {texts!r}")
        out.append(list(texts))
    return out


def _as_locs(value: Any, achieved: list[list[str]]) -> list[list[list[list[str]]]]:
    """`achieved_locs` checked against `achieved` (one [obj_locs, target_locs] pair per goal)."""
    if value is None:
        return [[[[], []] for _ in texts] for texts in achieved]
    if not isinstance(value, list | tuple) or len(value) != len(achieved):
        raise ValueError(f"achieved_locs: expected {len(achieved)} lists, one per observation")
    out = []
    for t, (pairs, texts) in enumerate(zip(value, achieved, strict=True)):
        if not isinstance(pairs, list | tuple) or len(pairs) != len(texts):
            raise ValueError(f"achieved_locs[{t}]: expected one pair per achieved goal {texts}")
        step = []
        for pair in pairs:
            ok = isinstance(pair, list | tuple) and len(pair) == 2 and all(
                isinstance(locs, list | tuple) and all(isinstance(s, str) for s in locs)
                for locs in pair
            )
            if not ok:
                raise ValueError(f"achieved_locs[{t}]: expected [[str, ...], [str, ...]], "
                                 f"got {pair!r}")
            step.append([list(pair[0]), list(pair[1])])
        out.append(step)
    return out


@dataclass(eq=False)
class Episode:
    """One finished episode of T ≥ 1 steps.

    Arrays are validated and normalised to the dtypes below on construction; a mismatch raises
    `ValueError` naming the field.
    """

    image: np.ndarray
    """(T+1, H, W, C) uint8: minigrid's symbolic view (7×7×3 for BabyAI: object, colour, state)."""
    direction: np.ndarray
    """(T+1,) int64: the agent's heading, 0..3."""
    carrying: np.ndarray
    """(T+1, 2) int64: (object type index, colour index) carried; (1, 0) when carrying nothing."""
    action: np.ndarray
    """(T,) int64: action t was taken from observation t."""
    reward: np.ndarray
    """(T,) float32: reward received for action t."""
    terminated: bool
    """Whether the last step ended the episode by reaching a terminal state."""
    truncated: bool
    """Whether the last step ended the episode by a time limit (or other cut-off)."""
    events: list[list[str]]
    """T+1 lists of short English sentences; index 0 is what the env reported at reset."""
    achieved: list[list[str]]
    """T+1 lists of canonical goal texts that became true on arriving at each observation."""
    mission: str
    """The instruction the environment gave at reset."""
    meta: dict[str, Any] = field(default_factory=dict)
    """JSON-serialisable provenance: env_id, seed, suite, ..."""
    achieved_locs: list[list[list[list[str]]]] | None = None
    """T+1 lists aligned with `achieved`: per achieved goal, [object locations, target locations]
    relative to the agent's start pose ("left", "front", ...), which BabyAI missions like "the
    ball on your left" need for relabeling. None on construction means none known: empty pairs."""

    def __post_init__(self) -> None:
        self.image = _as_array("image", self.image, np.uint8, "safe")
        self.direction = _as_array("direction", self.direction, np.int64, "safe")
        self.carrying = _as_array("carrying", self.carrying, np.int64, "safe")
        self.action = _as_array("action", self.action, np.int64, "safe")
        self.reward = _as_array("reward", self.reward, np.float32, "same_kind")
        if self.action.ndim != 1 or len(self.action) < 1:
            raise ValueError(f"action: expected shape (T,) with T >= 1, got {self.action.shape}")
        steps = len(self.action)
        expected = {
            "image": (self.image, (steps + 1, *self.image.shape[1:]), 4),
            "direction": (self.direction, (steps + 1,), 1),
            "carrying": (self.carrying, (steps + 1, 2), 2),
            "reward": (self.reward, (steps,), 1),
        }
        for name, (array, shape, ndim) in expected.items():
            if array.ndim != ndim or array.shape != shape:
                raise ValueError(f"{name}: expected shape {shape} for T={steps}, got {array.shape}")
        self.events = _as_text_lists("events", self.events, steps + 1)
        self.achieved = _as_text_lists("achieved", self.achieved, steps + 1)
        self.achieved_locs = _as_locs(self.achieved_locs, self.achieved)
        if not isinstance(self.mission, str):
            raise ValueError(f"mission: expected str, got {type(self.mission).__name__}")
        self.terminated = bool(self.terminated)
        self.truncated = bool(self.truncated)
        # Fail here, where the episode is made, rather than later when it is written.
        try:
            json.dumps(self.meta)
        except TypeError as exc:
            raise ValueError(f"meta: not JSON-serialisable ({exc})") from exc

    @property
    def num_steps(self) -> int:
        """T, the number of actions taken."""
        return len(self.action)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Episode):
            return NotImplemented
        for name in ("image", "direction", "carrying", "action", "reward"):
            a, b = getattr(self, name), getattr(other, name)
            if a.dtype != b.dtype or not np.array_equal(a, b):
                return False
        for name in ("terminated", "truncated", "events", "achieved", "achieved_locs", "mission",
                     "meta"):
            if getattr(self, name) != getattr(other, name):
                return False
        return True

    __hash__ = None  # mutable, compared by value


def _obs_field(obs: Mapping[str, Any], key: str) -> Any:
    try:
        return obs[key]
    except KeyError:
        raise KeyError(
            f"observation has no {key!r} (keys: {sorted(obs)}); expected the environment "
            "layer's dict with image, direction, carrying and mission"
        ) from None


def _info_locs(info: Mapping[str, Any]) -> list[list[list[str]]]:
    if "achieved_locs" in info:
        return [[list(obj), list(target)] for obj, target in info["achieved_locs"]]
    return [[[], []] for _ in info.get("achieved", ())]


class EpisodeRecorder:
    """Builds an `Episode` from `reset` followed by `step` calls.

    `meta` given here is shared by every episode the recorder builds; `reset(..., meta=)` adds
    per-episode entries (e.g. the seed). Infos without `events` / `achieved` count as empty, and
    without `achieved_locs` as no locations known.
    """

    def __init__(self, meta: Mapping[str, Any] | None = None) -> None:
        self._base_meta = dict(meta or {})
        self._started = False

    def reset(
        self, obs: Mapping[str, Any], info: Mapping[str, Any], meta: Mapping[str, Any] | None = None
    ) -> None:
        """Start a new episode at the reset observation, dropping any unfinished one."""
        self._images = [np.array(_obs_field(obs, "image"))]
        self._directions = [int(_obs_field(obs, "direction"))]
        self._carrying = [np.array(_obs_field(obs, "carrying"))]
        self._mission = str(_obs_field(obs, "mission"))
        self._events = [list(info.get("events", ()))]
        self._achieved = [list(info.get("achieved", ()))]
        self._achieved_locs = [_info_locs(info)]
        self._actions: list[int] = []
        self._rewards: list[float] = []
        self._meta = {**self._base_meta, **(meta or {})}
        self._started = True

    def step(
        self,
        action: int,
        obs: Mapping[str, Any],
        reward: float,
        terminated: bool,
        truncated: bool,
        info: Mapping[str, Any],
    ) -> Episode | None:
        """Record one transition; return the finished `Episode` when the step ends it, else None."""
        if not self._started:
            raise RuntimeError("EpisodeRecorder.step called before reset or after the end")
        self._actions.append(int(action))
        self._rewards.append(float(reward))
        # Copies: an env may reuse its observation buffers from step to step.
        self._images.append(np.array(_obs_field(obs, "image")))
        self._directions.append(int(_obs_field(obs, "direction")))
        self._carrying.append(np.array(_obs_field(obs, "carrying")))
        self._events.append(list(info.get("events", ())))
        self._achieved.append(list(info.get("achieved", ())))
        self._achieved_locs.append(_info_locs(info))
        if not (terminated or truncated):
            return None
        self._started = False
        return Episode(
            image=np.stack(self._images),
            direction=np.array(self._directions),
            carrying=np.stack(self._carrying),
            action=np.array(self._actions),
            reward=np.array(self._rewards),
            terminated=terminated,
            truncated=truncated,
            events=self._events,
            achieved=self._achieved,
            achieved_locs=self._achieved_locs,
            mission=self._mission,
            meta=self._meta,
        )
