"""What every planner shares: the interface, the objective, and scoring candidates in imagination.

A planner searches over discrete action sequences a_0..a_{H-1} from the current real observation,
for B environments at once, and scores each sequence by rolling the world model forward:

    h_t = next(state_t, z_t, a_t)       z_0: the real latent; then z_{t+1} = encode(ô_{t+1}),
                                        ô_{t+1} = most_likely(decode(h_t))
    p_t = sigmoid(reward(h_t, g))       goal g becomes achieved on arriving at o_{t+1}
    c_t = sigmoid(cont(h_t))            the episode goes on after o_{t+1}
    v   = sigmoid(value(h_{H-1}, g))    discounted chance of achieving g after o_H, counted from o_H

Achieving the goal ends the task, so a reward only counts if the goal was not achieved before and
the episode did not end before:

    alive_0 = 1,   alive_{t+1} = alive_t (1 - p_t) c_t
    J = sum_{t<H} gamma^t alive_t p_t  +  gamma^H alive_H v

J is the discounted probability of achieving the goal, in [0, 1]. The value head must be fitted
to the same quantity seen from o_{t+1}:

    v(h_t) ~ sum_{k>=1} gamma^(k-1) P(g first achieved on arriving at o_{t+k+1}).

The caller's state is never stepped: candidates run on `state.expand(K)`, which owns its memory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from lwm.models.ssm import BatchState
from lwm.models.world_model import WorldModel


class PolicyPrior(Protocol):
    """A proposal distribution over the next action, e.g. a policy trained in imagination."""

    def __call__(self, h: Tensor, z: Tensor, goal: Tensor) -> Tensor:
        """h: (N, d) backbone output of the previous step (zeros before the first), z: (N, d)
        latent of the current observation, goal: (N, goal_dim) -> action logits (N, A)."""
        ...


@dataclass
class PlanResult:
    """What a planner chose for B environments, and the imagined future that justifies it."""

    action: Tensor
    """(B,) int64: the action to take now, the first of `actions`."""
    actions: Tensor
    """(B, H) int64: the best imagined action sequence."""
    reward: Tensor
    """(B, H): predicted probability that the goal is achieved on arriving at o_{t+1}."""
    cont: Tensor
    """(B, H): predicted probability that the episode goes on after o_{t+1}."""
    value: Tensor
    """(B,): predicted terminal value, the discounted chance of achieving the goal after o_H."""
    objective: Tensor
    """(B,): J of `actions`, the discounted probability of achieving the goal (module docstring)."""
    probs: Tensor
    """(B, H, A): the planner's final distribution over actions at each step."""
    image: Tensor | None = None
    """(B, H, 7, 7, 3) int64 imagined views o_1..o_H, when decoded frames were asked for."""
    direction: Tensor | None = None
    """(B, H) int64 imagined agent directions, with `image`."""
    carrying: Tensor | None = None
    """(B, H, 2) int64 imagined carried (type, colour), with `image`."""


class Planner(ABC):
    """Plans from the current real observation of B environments in imagination (MPC).

    Planners over sequence distributions remember the last plan of each environment, shifted by
    one step, to warm-start the next call; `reset` / `reset_envs` forget it when episodes restart.
    """

    @abstractmethod
    def plan(
        self,
        model: WorldModel,
        state: BatchState,
        z: Tensor,
        goal: Tensor,
        h: Tensor | None = None,
        decode: bool = False,
        generator: torch.Generator | None = None,
    ) -> PlanResult:
        """Choose the next action of B environments.

        state: model state after the history up to the previous step (not modified);
        z: (B, d) latent of the current real observation; goal: (B, goal_dim) goal embeddings;
        h: (B, d) backbone output of the previous real step, for a policy prior (None: zeros);
        decode: also return the imagined views of the best sequence.
        """
        raise NotImplementedError(
            "plan(model, state, z: (B, d), goal: (B, goal_dim), h=None, decode=False, "
            "generator=None) -> PlanResult"
        )

    def reset(self) -> None:  # noqa: B027 - a planner without memory needs no reset
        """Forget all remembered plans; the next `plan` may be for any number of environments."""

    def reset_envs(self, envs: Sequence[int] | Tensor) -> None:  # noqa: B027
        """Forget the remembered plans of environments `envs` (their episodes restarted)."""


@dataclass
class Candidates:
    """K imagined action sequences per environment and their predicted outcomes."""

    actions: Tensor
    """(B, K, H) int64."""
    reward: Tensor
    """(B, K, H) goal-achievement probabilities p_t."""
    cont: Tensor
    """(B, K, H) continuation probabilities c_t."""
    value: Tensor
    """(B, K) terminal value probabilities v."""
    objective: Tensor
    """(B, K) J."""

    def select(self, idx: Tensor) -> Candidates:
        """idx: (B, E) candidate indices per environment -> the (B, E, ...) subset."""
        H = self.actions.shape[-1]
        per_step = idx[..., None].expand(-1, -1, H)  # (B, E, H)
        return Candidates(
            self.actions.gather(1, per_step), self.reward.gather(1, per_step),
            self.cont.gather(1, per_step), self.value.gather(1, idx), self.objective.gather(1, idx),
        )

    def cat(self, other: Candidates) -> Candidates:
        """Both sets side by side: (B, K + K', ...)."""
        return Candidates(*(torch.cat([a, b], dim=1) for a, b in zip(
            (self.actions, self.reward, self.cont, self.value, self.objective),
            (other.actions, other.reward, other.cont, other.value, other.objective), strict=True,
        )))

    def top(self, k: int) -> Candidates:
        """The k highest-J candidates per environment, best first."""
        return self.select(self.objective.topk(k, dim=1).indices)


def objective(reward: Tensor, cont: Tensor, value: Tensor, discount: float) -> Tensor:
    """J (module docstring) from p_t, c_t: (..., H) and terminal v: (...) -> (...)."""
    H = reward.shape[-1]
    survive = (1 - reward) * cont  # (..., H): the task goes on past o_{t+1}
    alive = torch.cumprod(F.pad(survive, (1, 0), value=1.0), dim=-1)  # (..., H+1): alive_0..H
    gammas = discount ** torch.arange(H + 1, dtype=reward.dtype, device=reward.device)
    return (gammas[:H] * alive[..., :H] * reward).sum(-1) + gammas[H] * alive[..., H] * value


@torch.no_grad()
def imagine_candidates(
    model: WorldModel,
    state: BatchState,
    z: Tensor,
    goal: Tensor,
    k: int,
    horizon: int,
    discount: float,
    act: Callable[[int, Tensor, Tensor], Tensor],
) -> Candidates:
    """Roll K candidates per environment forward H steps from (state, z) and score them.

    state: the model state of B environments (not modified); z: (B, d); goal: (B, goal_dim).
    act(t, h, z) -> (B*K,) actions at step t, given the previous backbone output h (B*K, d)
    (zeros at t = 0) and the current latent z (B*K, d); candidates of one environment are
    consecutive rows.
    """
    B, d = z.shape
    s = state.expand(k)  # (B*K, ...) and owns its memory: stepping it leaves `state` alone
    z = z.repeat_interleave(k, dim=0)  # (B*K, d)
    h = z.new_zeros(B * k, d)
    hs, actions = [], []
    for t in range(horizon):
        a = act(t, h, z)
        h, s = model.next(s, z, a)
        obs = model.most_likely(model.decode(h))
        z = model.encode(obs["image"], obs["direction"], obs["carrying"])
        hs.append(h)
        actions.append(a)
    h = torch.stack(hs, dim=1).view(B, k, horizon, d)  # (B, K, H, d)
    # The goal broadcasts over candidates and steps, so its projection runs on B rows, not B*K*H.
    reward = torch.sigmoid(model.reward(h, goal[:, None, None]))  # (B, K, H)
    cont = torch.sigmoid(model.cont(h))  # (B, K, H)
    value = torch.sigmoid(model.value(h[:, :, -1], goal[:, None]))  # (B, K)
    actions_ = torch.stack(actions, dim=1).view(B, k, horizon)  # (B, K, H)
    return Candidates(actions_, reward, cont, value, objective(reward, cont, value, discount))


def score_sequences(
    model: WorldModel, state: BatchState, z: Tensor, goal: Tensor, actions: Tensor,
    discount: float,
) -> Candidates:
    """Score given action sequences (B, K, H) from (state, z) for goal (B, goal_dim)."""
    _, k, horizon = actions.shape
    flat = actions.flatten(0, 1)  # (B*K, H)
    return imagine_candidates(
        model, state, z, goal, k, horizon, discount, lambda t, h, z: flat[:, t]
    )


def sample_prior(
    model: WorldModel, state: BatchState, z: Tensor, goal: Tensor, prior: PolicyPrior,
    h: Tensor | None, k: int, horizon: int, discount: float,
    generator: torch.Generator | None = None,
) -> Candidates:
    """K sequences per environment drawn step by step from `prior` in imagination, scored.

    h: (B, d) the backbone output of the last real step (None: zeros), the prior's first input.
    """
    goal_k = goal.repeat_interleave(k, dim=0)  # (B*K, goal_dim)
    h0 = None if h is None else h.repeat_interleave(k, dim=0)  # (B*K, d)

    def act(t: int, h: Tensor, z: Tensor) -> Tensor:
        logits = prior(h0 if t == 0 and h0 is not None else h, z, goal_k)  # (B*K, A)
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]

    return imagine_candidates(model, state, z, goal, k, horizon, discount, act)


def sample_sequences(probs: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """K sequences per environment from independent per-step categoricals (B, H, A) -> (B, K, H)."""
    B, H, A = probs.shape
    draws = torch.multinomial(probs.reshape(B * H, A), k, replacement=True, generator=generator)
    return draws.view(B, H, k).transpose(1, 2)  # (B, K, H)


def action_frequencies(actions: Tensor, n_actions: int, weights: Tensor | None = None) -> Tensor:
    """Per-step action distribution of sequences (B, E, H), uniformly or by weights (B, E)
    summing to 1 -> (B, H, A)."""
    onehot = F.one_hot(actions, n_actions).to(torch.float)  # (B, E, H, A)
    if weights is None:
        return onehot.mean(1)
    return (weights[..., None, None] * onehot).sum(1)


class WarmStart:
    """Per-environment categorical plan distributions (B, H, A) kept between MPC calls.

    After a plan, its final distribution is stored shifted by one step (step t+1 becomes step t;
    the new last step is uniform), since one action of it has now been taken. The next plan
    starts from that, mixed with a share of uniform so no action's probability is zero.
    """

    def __init__(self, horizon: int, uniform_mix: float):
        self.horizon = horizon
        self.uniform_mix = uniform_mix
        self.memory: Tensor | None = None  # (B, H, A) shifted, or None: start uniform

    def reset(self) -> None:
        self.memory = None

    def reset_envs(self, envs: Sequence[int] | Tensor) -> None:
        if self.memory is not None:
            self.memory[torch.as_tensor(envs, dtype=torch.long)] = 1.0 / self.memory.shape[-1]

    def start(self, batch: int, n_actions: int, device: torch.device) -> Tensor:
        """The distribution (B, H, A) the next plan starts from."""
        uniform = torch.full((batch, self.horizon, n_actions), 1.0 / n_actions, device=device)
        if self.memory is None:
            return uniform
        if self.memory.shape != uniform.shape:
            raise ValueError(
                f"planner remembers plans of shape {tuple(self.memory.shape)}, asked to plan "
                f"{tuple(uniform.shape)}: call reset(batch) when the number of envs changes"
            )
        return (1 - self.uniform_mix) * self.memory + self.uniform_mix * uniform

    def remember(self, probs: Tensor) -> None:
        """Store a final distribution (B, H, A), shifted by the step about to be taken."""
        last = torch.full_like(probs[:, :1], 1.0 / probs.shape[-1])  # (B, 1, A)
        self.memory = torch.cat([probs[:, 1:], last], dim=1)


def plan_result(
    model: WorldModel, state: BatchState, z: Tensor, goal: Tensor, best: Candidates,
    probs: Tensor, decode: bool,
) -> PlanResult:
    """Package the best candidate per environment (B, 1, ...) as a `PlanResult`, decoding its
    imagined views (one more rollout of B sequences) when asked."""
    actions = best.actions[:, 0]  # (B, H)
    result = PlanResult(
        action=actions[:, 0], actions=actions, reward=best.reward[:, 0], cont=best.cont[:, 0],
        value=best.value[:, 0], objective=best.objective[:, 0], probs=probs,
    )
    if decode:
        frames = model.imagine(state.clone(), z, actions, decode_frames=True)
        result.image, result.direction, result.carrying = (
            frames["image"], frames["direction"], frames["carrying"]
        )
    return result
