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
    PrefixTree,
    SearchConfig,
    WarmStart,
    action_frequencies,
    forbid_first,
    penalize_repeats,
    plan_result,
    sample_sequences,
)


@dataclass
class CEMConfig(SearchConfig):
    """Search budget (`SearchConfig`) and the refit rule of `CEM`."""

    elites: int = 32
    """E: best sequences the distribution is refitted to."""


class CEM(Planner):
    """Cross-entropy method planner (module docstring), batched over environments."""

    def __init__(self, cfg: CEMConfig | None = None):
        self.cfg = cfg or CEMConfig()
        if not 0 < self.cfg.elites <= self.cfg.candidates:
            raise ValueError(f"need 0 < elites <= candidates, got {self.cfg}")
        self.warm = WarmStart(self.cfg.horizon, self.cfg.uniform_mix, self.cfg.excluded)

    @torch.no_grad()
    def plan(
        self,
        model: WorldModel,
        state: BatchState,
        h: Tensor,
        goal: Tensor,
        decode: bool = False,
        generator: torch.Generator | None = None,
        forbid: Tensor | None = None,
        tried: Tensor | None = None,
    ) -> PlanResult:
        """See `Planner.plan`."""
        cfg, A = self.cfg, model.cfg.n_actions
        probs = forbid_first(self.warm.start(h.shape[0], A, h.device), forbid)  # (B, H, A)
        best = None
        # prefixes shared by iterations; the last step's p, c only for the plan returned
        tree = PrefixTree(model, state, h, goal, cfg.terminal, lazy_last=True)
        for _ in range(cfg.iterations):
            actions = sample_sequences(probs, cfg.candidates, generator)  # (B, K, H)
            scored = penalize_repeats(tree.score(actions, cfg.discount), tried, cfg.repeat_penalty)
            elites = scored.top(cfg.elites)  # (B, E, ...)
            # step 0 of every candidate avoids `forbid`, so the refit keeps it at zero there
            probs = cfg.momentum * probs + (1 - cfg.momentum) * action_frequencies(
                elites.actions, A
            )
            best = elites.top(1) if best is None else best.cat(elites).top(1)
        if cfg.warm_start:
            self.warm.remember(probs)
        return plan_result(model, state, h, tree.complete(best), probs, decode)

    def reset(self) -> None:
        self.warm.reset()

    def reset_envs(self, envs: Sequence[int] | Tensor) -> None:
        self.warm.reset_envs(envs)
