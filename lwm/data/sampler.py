"""Fixed-length training windows drawn from stored episodes.

A window of length L starting at step s of an episode with T steps covers observations s..s+L and
actions / rewards s..s+L-1. Windows are drawn uniformly over all valid (episode, start) pairs, so
every full-length window in the data is equally likely and a long episode is drawn more often
than a short one, in proportion to its windows. Valid starts are 0..T-L; an episode shorter than
L has the single start 0 and its window is padded at the end (zeros, `mask` False).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from lwm.data.episodes import Episode
from lwm.data.storage import EpisodeStore, load_episode

if TYPE_CHECKING:
    import torch

__all__ = ["SequenceBatch", "SequenceSampler"]


@dataclass
class SequenceBatch:
    """B windows of L steps. Observation fields have L+1 entries per window, step fields L.

    Observation k of a window is real iff k == 0 or `mask[:, k-1]`; padded entries are zero.
    """

    image: np.ndarray
    """(B, L+1, H, W, C) uint8."""
    direction: np.ndarray
    """(B, L+1) int64."""
    carrying: np.ndarray
    """(B, L+1, 2) int64."""
    action: np.ndarray
    """(B, L) int64: action k leads from observation k to k+1."""
    reward: np.ndarray
    """(B, L) float32."""
    mask: np.ndarray
    """(B, L) bool: True for real steps, False for padding past the episode's end."""
    is_first: np.ndarray
    """(B, L+1) bool: the observation is its episode's reset observation."""
    is_last: np.ndarray
    """(B, L+1) bool: the observation is its episode's final one (terminated or truncated)."""
    is_terminal: np.ndarray
    """(B, L+1) bool: the final observation of a terminated (not merely truncated) episode."""
    episode: np.ndarray
    """(B,) int64: the store index of each window's episode."""
    start: np.ndarray
    """(B,) int64: the step each window starts at."""
    prev_action: np.ndarray
    """(B,) int64: the action that led to each window's first observation; -1 at a reset."""
    mission: list[str]
    """B missions."""
    achieved: list[list[list[str]]]
    """B × (L+1) lists of goal texts achieved on arriving at each observation (empty if padded)."""
    achieved_locs: list[list[list[list[list[str]]]]]
    """B × (L+1) lists aligned with `achieved`: [object locations, target locations] per goal."""

    def to_torch(self, device: str | torch.device = "cpu") -> dict[str, Any]:
        """The array fields as torch tensors on `device`; text fields are passed through."""
        import torch  # lazily: lwm.data itself needs only numpy

        return {
            f.name: torch.from_numpy(value).to(device)
            if isinstance(value := getattr(self, f.name), np.ndarray) else value
            for f in fields(self)
        }


class SequenceSampler:
    """Draws `SequenceBatch`es of `seq_len` steps from the episodes of an `EpisodeStore`.

    Episodes are loaded into memory once; `refresh()` loads the ones that landed on disk since
    (the Dyna loop writes while training reads). Sampling is a pure function of the loaded
    episodes and the `numpy.random.Generator` passed in.
    """

    def __init__(self, store: EpisodeStore, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.store = store
        self.seq_len = seq_len
        self._episodes: list[Episode] = []
        self._store_index: list[int] = []
        # _window_end[i] = number of valid windows in episodes 0..i, for inverse-CDF sampling.
        self._window_end = np.zeros(0, dtype=np.int64)
        self.refresh()

    @property
    def num_episodes(self) -> int:
        """Episodes loaded so far."""
        return len(self._episodes)

    @property
    def num_windows(self) -> int:
        """Valid (episode, start) pairs the sampler draws from."""
        return int(self._window_end[-1]) if len(self._window_end) else 0

    def refresh(self) -> int:
        """Load episodes added to the store since the last call; return how many."""
        self.store.refresh()
        loaded = set(self._store_index)
        new = [i for i in self.store.indices if i not in loaded]
        for index in new:
            path = self.store.file(index)
            episode = load_episode(path)
            # Batches stack views, so every episode must share the first one's view shape.
            if self._episodes and episode.image.shape[1:] != self._episodes[0].image.shape[1:]:
                raise ValueError(
                    f"{path}: image shape {episode.image.shape[1:]} differs from the "
                    f"{self._episodes[0].image.shape[1:]} of the episodes already loaded"
                )
            self._episodes.append(episode)
            self._store_index.append(index)
        counts = [max(e.num_steps - self.seq_len, 0) + 1 for e in self._episodes]
        self._window_end = np.cumsum(counts, dtype=np.int64)
        return len(new)

    def sample(self, batch_size: int, rng: np.random.Generator) -> SequenceBatch:
        """Draw `batch_size` windows uniformly over all valid (episode, start) pairs."""
        if not self._episodes:
            raise ValueError(f"{self.store.path}: no episodes to sample from")
        length = self.seq_len
        draws = rng.integers(0, self.num_windows, size=batch_size)
        which = np.searchsorted(self._window_end, draws, side="right")  # (B,)
        starts = draws - np.concatenate([[0], self._window_end])[which]  # (B,)

        first = self._episodes[0]
        image = np.zeros((batch_size, length + 1, *first.image.shape[1:]), np.uint8)
        direction = np.zeros((batch_size, length + 1), np.int64)
        carrying = np.zeros((batch_size, length + 1, 2), np.int64)
        action = np.zeros((batch_size, length), np.int64)
        reward = np.zeros((batch_size, length), np.float32)
        mask = np.zeros((batch_size, length), bool)
        is_first = np.zeros((batch_size, length + 1), bool)
        is_last = np.zeros((batch_size, length + 1), bool)
        is_terminal = np.zeros((batch_size, length + 1), bool)
        prev_action = np.full(batch_size, -1, np.int64)
        missions, achieved, achieved_locs = [], [], []
        for b, (i, s) in enumerate(zip(which, starts, strict=True)):
            ep = self._episodes[i]
            if s > 0:
                prev_action[b] = ep.action[s - 1]
            n = min(length, ep.num_steps - s)  # real steps in this window
            image[b, : n + 1] = ep.image[s : s + n + 1]
            direction[b, : n + 1] = ep.direction[s : s + n + 1]
            carrying[b, : n + 1] = ep.carrying[s : s + n + 1]
            action[b, :n] = ep.action[s : s + n]
            reward[b, :n] = ep.reward[s : s + n]
            mask[b, :n] = True
            is_first[b, 0] = s == 0
            if s + n == ep.num_steps:
                is_last[b, n] = True
                is_terminal[b, n] = ep.terminated
            missions.append(ep.mission)
            padding = [[] for _ in range(length - n)]
            achieved.append([list(texts) for texts in ep.achieved[s : s + n + 1]] + padding)
            locs = ep.achieved_locs[s : s + n + 1]
            achieved_locs.append(
                [[[list(o), list(g)] for o, g in step] for step in locs] + [[] for _ in padding]
            )
        return SequenceBatch(
            image=image,
            direction=direction,
            carrying=carrying,
            action=action,
            reward=reward,
            mask=mask,
            is_first=is_first,
            is_last=is_last,
            is_terminal=is_terminal,
            episode=np.asarray(self._store_index, np.int64)[which],
            start=starts.astype(np.int64),
            prev_action=prev_action,
            mission=missions,
            achieved=achieved,
            achieved_locs=achieved_locs,
        )
