"""World-model quality metrics on tensors: open-loop grid accuracy and reward AUROC."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lwm.models.world_model import WorldModel

__all__ = ["auroc", "open_loop_accuracy", "reward_scores", "teacher_forced"]


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for binary `labels` (rank statistic, ties averaged);
    NaN when only one class is present."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def open_loop_accuracy(
    model: WorldModel, image: Tensor, direction: Tensor, carrying: Tensor, action: Tensor,
    start: int, horizons: tuple[int, ...] = (1, 5, 15),
) -> dict[int, float]:
    """Cell accuracy of open-loop predictions k steps ahead.

    image (N, T+1, 7, 7, 3), direction (N, T+1), carrying (N, T+1, 2), action (N, T) of N real
    episodes from their reset (each at least start + max(horizons) steps long). The model takes
    in the real history through observation `start`, then imagines under the real actions,
    feeding back its own decoded observations; a cell counts as right when type, colour and
    state all match the real one. Returns {k: accuracy}.
    """
    k_max = max(horizons)
    n = image.shape[0]
    z = model.encode(image[:, : start + 1], direction[:, : start + 1],
                     carrying[:, : start + 1])  # (N, start+1, d)
    prev = torch.cat([torch.full((n, 1), model.START), action[:, :start]], dim=1)
    state = model.init_state(n)
    for t in range(start + 1):
        h, state = model.next(state, z[:, t], prev[:, t])
    out = model.imagine(state, h, action[:, start : start + k_max], decode_frames=True)
    pred = out["image"]  # (N, k_max, 7, 7, 3)
    real = image[:, start + 1 : start + 1 + k_max].long()
    right = (pred == real).all(dim=-1).float().mean(dim=(-1, -2))  # (N, k_max)
    return {k: float(right[:, k - 1].mean()) for k in horizons}


@torch.no_grad()
def teacher_forced(
    model: WorldModel, image: Tensor, direction: Tensor, carrying: Tensor, action: Tensor,
) -> Tensor:
    """The histories h (T, latent_dim) through o_0..o_T-1 of one real episode: image (T+1, 7, 7,
    3), direction (T+1,), carrying (T+1, 2), action (T,), each observation taken in with the
    action that led to it."""
    steps = action.shape[0]
    z = model.encode(image[None, :steps], direction[None, :steps], carrying[None, :steps])
    prev = torch.cat([torch.tensor([model.START]), action[:-1]])[None]  # (1, T)
    return model.sequence(z, prev)[0]


@torch.no_grad()
def reward_scores(
    model: WorldModel, image: Tensor, direction: Tensor, carrying: Tensor, action: Tensor,
    goal_table: Tensor,
) -> Tensor:
    """Teacher-forced reward probabilities for every goal at every step of one episode.

    image (T+1, 7, 7, 3), direction (T+1,), carrying (T+1, 2), action (T,); goal_table
    (V, goal_dim) -> (T, V) probabilities that the action taken at step t achieves each goal on
    arriving at the next observation.
    """
    h = teacher_forced(model, image, direction, carrying, action)  # (T, d)
    psi = model.goal_features(goal_table)["reward"]  # (V, k + 1)
    return torch.sigmoid(model.reward(h[:, None, :], action[:, None], psi=psi[None]))  # (T, V)
