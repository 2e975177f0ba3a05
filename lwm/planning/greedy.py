"""The fast policy: act greedily on the world model's goal-conditioned Q head, no search.

One forward pass per action instead of thousands of imagined transitions: the baseline that
shows what imagination adds, and a policy for when planning time is scarce. The plan it reports
is one step long: the chosen action, its predicted reward, continuation and the value after it.

With `epsilon` > 0 it is epsilon-greedy: with that probability the action is drawn from
`explore_probs` (by default the env layer's move-biased `EXPLORATION_PROBS`) instead. A
deterministic argmax can loop forever where Q values nearly tie (left, right, left, ...); a few
random actions break such loops, which `eval/agent.py --epsilon` measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lwm.envs.language import EXPLORATION_PROBS
from lwm.models.ssm import BatchState
from lwm.models.world_model import WorldModel
from lwm.planning.base import Planner, PlanResult

__all__ = ["GreedyQ", "GreedyQConfig"]


@dataclass
class GreedyQConfig:
    """How the greedy policy picks among actions."""

    discount: float = 0.9
    """gamma of the reported objective (Q was trained with the world model's own)."""
    excluded: tuple[int, ...] = (6,)
    """Actions never taken (minigrid's no-op `done`)."""
    epsilon: float = 0.0
    """Chance of a random action (drawn from `explore_probs`) instead of the argmax."""
    explore_probs: tuple[float, ...] = EXPLORATION_PROBS
    """Distribution of the random actions, over all actions (excluded ones get none)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")


class GreedyQ(Planner):
    """argmax_a Q(h, a, g) for B environments at once."""

    def __init__(self, cfg: GreedyQConfig | None = None):
        self.cfg = cfg or GreedyQConfig()

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
        """See `Planner.plan`; `state` is unused (no imagination); `generator` draws the random
        actions of epsilon-greedy."""
        psi = model.goal_features(goal)
        q = model.q(h, psi=psi["q"])  # (B, A)
        if self.cfg.excluded:
            q[:, list(self.cfg.excluded)] = float("-inf")
        action = q.argmax(-1)  # (B,)
        if self.cfg.epsilon > 0:
            probs = torch.tensor(self.cfg.explore_probs, dtype=torch.float, device=h.device)
            if self.cfg.excluded:
                probs[list(self.cfg.excluded)] = 0.0
            b = h.shape[0]
            explore = torch.rand(b, generator=generator, device=h.device) < self.cfg.epsilon
            random = torch.multinomial(probs.expand(b, -1), 1, generator=generator)[:, 0]
            action = torch.where(explore, random, action)
        reward = torch.sigmoid(model.reward(h, action, psi=psi["reward"]))[:, None]  # (B, 1)
        cont = torch.sigmoid(model.cont(h, action))[:, None]
        value = torch.sigmoid(q.gather(-1, action[:, None])[:, 0])
        result = PlanResult(
            action=action, actions=action[:, None], reward=reward, cont=cont, value=value,
            objective=value, probs=F.one_hot(action, q.shape[-1]).float()[:, None],
        )
        if decode:
            obs = model.most_likely(model.decode(h, action))
            result.image = obs["image"][:, None]
            result.direction = obs["direction"][:, None]
            result.carrying = obs["carrying"][:, None]
        return result
