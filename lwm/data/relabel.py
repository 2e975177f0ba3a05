"""Language hindsight relabeling: every window teaches the goals it actually achieved.

With a vocabulary of at most G goals (a single-verb suite: "go to" x 14 combinations), every
step is scored against every goal: slot k holds goal k, and nothing is sampled. Otherwise, for
each step t of a `SequenceBatch` window, `relabel` picks G goal slots:

- slot 0: a goal achieved on arriving at observation t+1, when there is one (a reward positive);
- slots 1..n_future: distinct goals achieved later in the window, drawn with weights = how often
  each is achieved there (hindsight "future" goals, whose TD targets carry the discounted
  success back to step t);
- the rest: negatives, half drawn from goals achieved anywhere in the batch (hard: achievable
  here, just not now) and half uniformly from the vocabulary.

The found slots come first (slot 0 holds a later goal when nothing is achieved now). All of it is
whole-array numpy over (B, L, V): a batch of 8 x 64 steps with a 320-goal vocabulary relabels in
a few milliseconds, not the tens a loop over steps took.

The target per slot is `reward` = 1 if the goal is achieved on arriving at o_{t+1}; the world
model learns Q by TD from these rewards, so future goals need no Monte-Carlo value targets (which
would value the behaviour policy, not the best one).
Only goals in the vocabulary take part: a suite's held-out combinations are left out of it, so
training never sees them, not even as negatives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lwm.data.sampler import SequenceBatch

__all__ = ["GoalVocab", "RelabeledGoals", "relabel"]


class GoalVocab:
    """An indexed set of goal texts (index = row of a goal-embedding table)."""

    def __init__(self, texts: Sequence[str]):
        self.texts: list[str] = list(dict.fromkeys(texts))
        self.index: dict[str, int] = {t: i for i, t in enumerate(self.texts)}

    def __len__(self) -> int:
        return len(self.texts)

    def __contains__(self, text: object) -> bool:
        return text in self.index


@dataclass
class RelabeledGoals:
    """Goal slots for every step of a batch of windows."""

    goal: np.ndarray
    """(B, L, G) int64 vocabulary indices."""
    reward: np.ndarray
    """(B, L, G) float32: 1 when the goal is achieved on arriving at observation t+1."""
    mask: np.ndarray
    """(B, L, G) bool: the slot holds a goal and the step is real (not padding)."""


def relabel(
    batch: SequenceBatch,
    vocab: GoalVocab,
    rng: np.random.Generator,
    n_goals: int = 16,
    n_future: int = 3,
) -> RelabeledGoals:
    """Choose goal slots and targets for every step of `batch` (see the module docstring)."""
    if len(vocab) <= n_goals:
        return _every_goal(batch, vocab)
    if n_goals < n_future + 2:
        raise ValueError(f"n_goals ({n_goals}) must leave room for {n_future} future goals, "
                         "one achieved goal and at least one negative")
    hit = _hits(batch, vocab)  # (B, L+1, V): achieved on arriving at each observation
    n_windows, length = batch.action.shape
    n_vocab = len(vocab)
    real = np.asarray(batch.mask, bool)[:, :, None]  # (B, L, 1)
    now = hit[:, 1:]  # (B, L, V): achieved on arriving at observation t+1
    # How often each goal is achieved at observations t+2 .. L of the window (hindsight goals).
    later = np.zeros((n_windows, length + 2, n_vocab), np.int32)
    later[:, : length + 1] = hit[:, ::-1].cumsum(1, dtype=np.int32)[:, ::-1]
    future = later[:, 2:]  # (B, L, V)

    # Slot 0: one of the goals achieved now, uniformly; then up to n_future distinct goals
    # achieved later, drawn without replacement with weights w = how often each is achieved
    # (the top keys w / E, E ~ Exp(1): Efraimidis-Spirakis sampling; 0 for goals never achieved).
    first = np.where(now, rng.random(now.shape), -1.0).argmax(-1)[..., None]  # (B, L, 1)
    # (+1e-30: a float32 draw can be exactly 0, and 0 / 0 would be NaN)
    keys = future / (rng.standard_exponential(future.shape, np.float32) + np.float32(1e-30))
    # The n_future largest keys, in any order (a partition, not a sort: 4.5x faster at V = 320;
    # this path has V > n_goals > n_future).
    top = np.argpartition(-keys, n_future - 1, axis=-1)[..., :n_future]  # (B, L, n_future)
    found = np.concatenate([now.any(-1, keepdims=True),
                            np.take_along_axis(future, top, -1) > 0], axis=-1)
    picks = np.concatenate([first, top], axis=-1)
    order = np.argsort(~found, axis=-1, kind="stable")  # found slots first, in slot order
    picks = np.take_along_axis(picks, order, -1)
    n_slots = found.sum(-1, keepdims=True)  # (B, L, 1)

    # The rest: negatives, half from goals achieved anywhere in the batch, half uniform.
    in_batch = np.flatnonzero(hit.any((0, 1)))
    shape = (n_windows, length, n_goals)
    n_hard = (n_goals - n_slots) // 2 if len(in_batch) else np.zeros_like(n_slots)
    slot = np.arange(n_goals)
    hard = in_batch[rng.integers(len(in_batch), size=shape)] if len(in_batch) else 0
    negatives = np.where(slot < n_slots + n_hard, hard, rng.integers(n_vocab, size=shape))
    padded = np.zeros(shape, np.int64)
    padded[..., : picks.shape[-1]] = picks
    goal = np.where(slot < n_slots, padded, negatives).astype(np.int64) * real
    mask = np.broadcast_to(real, shape).copy()
    reward = (np.take_along_axis(now, goal, -1) & mask).astype(np.float32)
    return RelabeledGoals(goal=goal, reward=reward, mask=mask)


def _hits(batch: SequenceBatch, vocab: GoalVocab) -> np.ndarray:
    """(B, L+1, V) bool: vocabulary goal v is achieved on arriving at observation j of window
    b (goals outside the vocabulary are left out)."""
    n_windows, length = batch.action.shape
    hit = np.zeros((n_windows, length + 1, len(vocab)), bool)
    for b, window in enumerate(batch.achieved):
        for j, step in enumerate(window):
            for text in step:
                if (i := vocab.index.get(text)) is not None:
                    hit[b, j, i] = True
    return hit


def _every_goal(batch: SequenceBatch, vocab: GoalVocab) -> RelabeledGoals:
    """Slot k of every real step holds vocabulary goal k (G = len(vocab))."""
    n_windows, length = batch.action.shape
    hit = _hits(batch, vocab).astype(np.float32)  # achieved on arrival
    mask = np.broadcast_to(batch.mask[:, :, None], (n_windows, length, len(vocab))).copy()
    goal = np.broadcast_to(np.arange(len(vocab)), mask.shape).copy()
    return RelabeledGoals(goal=goal, reward=hit[:, 1:] * mask, mask=mask)
