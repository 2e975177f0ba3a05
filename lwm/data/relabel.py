"""Language hindsight relabeling: every window teaches the goals it actually achieved.

With a vocabulary of at most G goals (a single-verb suite: "go to" x 14 combinations), every
step is scored against every goal: slot k holds goal k, and nothing is sampled. Otherwise, for
each step t of a `SequenceBatch` window, `relabel` picks G goal slots:

- slot 0: a goal achieved on arriving at observation t+1, when there is one (a reward positive);
- slots 1..n_future: goals achieved later in the window (hindsight "future" goals, whose TD
  targets carry the discounted success back to step t);
- the rest: negatives, half drawn from goals achieved anywhere in the batch (hard: achievable
  here, just not now) and half uniformly from the vocabulary.

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
    n_windows, length = batch.action.shape
    # achieved[b][j]: vocabulary indices achieved on arriving at observation j of window b.
    achieved = [
        [[vocab.index[g] for g in step if g in vocab.index] for step in window]
        for window in batch.achieved
    ]
    in_batch = np.array(sorted({i for w in achieved for s in w for i in s}), dtype=np.int64)

    goal = np.zeros((n_windows, length, n_goals), np.int64)
    mask = np.zeros((n_windows, length, n_goals), bool)
    for b in range(n_windows):
        for t in range(length):
            if not batch.mask[b, t]:
                continue
            now = achieved[b][t + 1]
            future = [i for step in achieved[b][t + 2 :] for i in step]
            slots = []
            if now:
                slots.append(now[rng.integers(len(now))])
            if future:
                picks = rng.choice(len(future), size=min(n_future, len(future)), replace=False)
                slots += [future[k] for k in picks]
            n_neg = n_goals - len(slots)
            n_hard = n_neg // 2 if len(in_batch) else 0
            negs = np.concatenate([
                in_batch[rng.integers(len(in_batch), size=n_hard)] if n_hard else [],
                rng.integers(len(vocab), size=n_neg - n_hard),
            ]).astype(np.int64)
            goal[b, t, : len(slots)] = slots
            goal[b, t, len(slots) :] = negs
            mask[b, t] = True

    reward = np.zeros(goal.shape, np.float32)
    for b in range(n_windows):
        for t in range(length):
            if batch.mask[b, t]:
                now = set(achieved[b][t + 1])
                reward[b, t] = [float(int(i) in now) for i in goal[b, t]]
    return RelabeledGoals(goal=goal, reward=reward, mask=mask)


def _every_goal(batch: SequenceBatch, vocab: GoalVocab) -> RelabeledGoals:
    """Slot k of every real step holds vocabulary goal k (G = len(vocab))."""
    n_windows, length = batch.action.shape
    hit = np.zeros((n_windows, length + 1, len(vocab)), np.float32)  # achieved on arrival
    for b, window in enumerate(batch.achieved):
        for j, step in enumerate(window):
            for text in step:
                if text in vocab.index:
                    hit[b, j, vocab.index[text]] = 1.0
    mask = np.broadcast_to(batch.mask[:, :, None], (n_windows, length, len(vocab))).copy()
    goal = np.broadcast_to(np.arange(len(vocab)), mask.shape).copy()
    return RelabeledGoals(goal=goal, reward=hit[:, 1:] * mask, mask=mask)
