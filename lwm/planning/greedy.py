"""The fast policy: act greedily on the world model's goal-conditioned Q head, no search.

One forward pass per action instead of thousands of imagined transitions: the baseline that
shows what imagination adds, and a policy for when planning time is scarce. The plan it reports
is one step long: the chosen action, its predicted reward, continuation and the value after it.

With `epsilon` > 0 it is epsilon-greedy: with that probability the action is drawn from
`explore_probs` (by default the env layer's move-biased `EXPLORATION_PROBS`) instead. A
deterministic argmax can loop forever where Q values nearly tie (left, right, left, ...). A few
random actions break such loops (`eval/agent.py --epsilon`); so does `repeat_penalty`, which
lowers an action's score for each time it was already taken from the same real observation
(the agent counts them), and it breaks them without random steps: on GoToLocal and the
BALROG-style suite it is the setting the shipped checkpoints' `agent.json` recommend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lwm.envs.language import EXPLORATION_PROBS
from lwm.models.ssm import BatchState
from lwm.models.world_model import WorldModel
from lwm.planning.base import Planner, PlanResult, one_step_plan

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
    reward_floor: bool = True
    """Score each action by max(Q, reward): the discounted chance of achieving the goal is at
    least the chance that this action achieves it now, and the reward head, trained on every
    step's outcome, learns that one-step fact before TD has carried it into Q (a locked door
    faced with its key: reward says toggle, Q is still flat)."""

    repeat_penalty: float = 0.0
    """Subtracted from an action's chance of achieving the goal once for each time it was
    already taken from the same real observation this episode (`tried`): a deterministic argmax
    that comes back to a view leaves it the way it did before, round the same loop."""

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
        forbid: Tensor | None = None,
        tried: Tensor | None = None,
    ) -> PlanResult:
        """See `Planner.plan`; `state` is unused (no imagination); `generator` draws the random
        actions of epsilon-greedy; `forbid` rules actions out of both the argmax and the random
        draws; `tried` lowers the argmax's scores (`repeat_penalty`)."""
        psi = model.goal_features(goal)
        q = model.q(h, psi=psi["q"])  # (B, A) logits
        b, n_actions = q.shape
        now = None  # (B, A) reward logits of every action, when the floor needs them
        if self.cfg.reward_floor:
            every = torch.arange(n_actions, device=h.device).expand(b, -1)  # (B, A)
            now = model.reward(h[:, None].expand(-1, n_actions, -1), every,
                               psi=psi["reward"][:, None].expand(-1, n_actions, -1))
            q = torch.maximum(q, now)  # sigmoid is monotonic: the max of the probabilities
        allowed = torch.ones_like(q, dtype=torch.bool)
        if self.cfg.excluded:
            allowed[:, list(self.cfg.excluded)] = False
        if forbid is not None:
            allowed &= ~forbid
        if not bool(allowed.any(-1).all()):
            raise ValueError("forbid rules out every action an environment could take")
        score = torch.sigmoid(q)
        if tried is not None and self.cfg.repeat_penalty:
            score = score - self.cfg.repeat_penalty * tried.to(score.dtype)
        action = score.masked_fill(~allowed, float("-inf")).argmax(-1)  # (B,)
        if self.cfg.epsilon > 0:
            probs = torch.tensor(self.cfg.explore_probs, dtype=torch.float, device=h.device)
            probs = probs.expand(b, -1) * allowed  # (B, A)
            # A row whose random actions are all ruled out draws uniformly from what is allowed.
            probs = torch.where(probs.sum(-1, keepdim=True) > 0, probs, allowed.float())
            explore = torch.rand(b, generator=generator, device=h.device) < self.cfg.epsilon
            random = torch.multinomial(probs, 1, generator=generator)[:, 0]
            action = torch.where(explore, random, action)
        reward = torch.sigmoid(model.reward(h, action, psi=psi["reward"]) if now is None
                               else now.gather(-1, action[:, None])[:, 0])[:, None]  # (B, 1)
        cont = torch.sigmoid(model.cont(h, action))[:, None]
        value = torch.sigmoid(q.gather(-1, action[:, None])[:, 0])
        probs = F.one_hot(action, q.shape[-1]).float()[:, None]
        return one_step_plan(model, h, action, reward, cont, value, probs, decode)
