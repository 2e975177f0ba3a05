"""Cross-entropy method over discrete action sequences, with MPC warm starts.

Each step t of the plan has its own categorical distribution over actions (B, H, A). An
iteration samples K sequences per environment, scores them in imagination (the objective J of
`lwm.planning.base`), and refits each step's distribution to the action frequencies of the E
best sequences, smoothed toward the previous distribution. The plan is the best sequence seen in
any iteration; its first action is taken, and the final distribution, shifted by one step, is
where the next call starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lwm.models.ssm import BatchState
from lwm.models.world_model import WorldModel
from lwm.planning.base import (
    Planner,
    PlanResult,
    WarmStart,
    action_frequencies,
    plan_result,
    sample_sequences,
    score_sequences,
)


@dataclass
class CEMConfig:
    """Search budget and update rule of `CEM`."""

    horizon: int = 8
    """H: imagined steps per candidate sequence."""
    candidates: int = 512
    """K: sequences sampled per environment and iteration."""
    iterations: int = 4
    """Sample-score-refit rounds per action."""
    elites: int = 32
    """E: best sequences the distribution is refitted to."""
    momentum: float = 0.1
    """Weight of the previous distribution in the refit (0: elite frequencies only)."""
    discount: float = 0.9
    """gamma of the objective J; must be the discount the value head was trained with."""
    warm_start: bool = True
    """Start from the previous call's final distribution shifted by one step (MPC)."""
    uniform_mix: float = 0.2
    """Share of the uniform distribution mixed into a warm start, so no action is ruled out."""


class CEM(Planner):
    """Cross-entropy method planner (module docstring), batched over environments."""

    def __init__(self, cfg: CEMConfig | None = None):
        self.cfg = cfg or CEMConfig()
        if not 0 < self.cfg.elites <= self.cfg.candidates:
            raise ValueError(f"need 0 < elites <= candidates, got {self.cfg}")
        self.warm = WarmStart(self.cfg.horizon, self.cfg.uniform_mix)

    @torch.no_grad()
    def plan(
        self,
        model: WorldModel,
        state: BatchState,
        h: Tensor,
        goal: Tensor,
        decode: bool = False,
        generator: torch.Generator | None = None,
    ) -> PlanResult:
        """See `Planner.plan`."""
        cfg, A = self.cfg, model.cfg.n_actions
        probs = self.warm.start(h.shape[0], A, h.device)  # (B, H, A)
        best = None
        for _ in range(cfg.iterations):
            actions = sample_sequences(probs, cfg.candidates, generator)  # (B, K, H)
            scored = score_sequences(model, state, h, goal, actions, cfg.discount)
            elites = scored.top(cfg.elites)  # (B, E, ...)
            probs = cfg.momentum * probs + (1 - cfg.momentum) * action_frequencies(
                elites.actions, A
            )
            best = elites.top(1) if best is None else best.cat(elites).top(1)
        if cfg.warm_start:
            self.warm.remember(probs)
        return plan_result(model, state, h, best, probs, decode)

    def reset(self) -> None:
        self.warm.reset()

    def reset_envs(self, envs: Sequence[int] | Tensor) -> None:
        self.warm.reset_envs(envs)
