"""What every planner shares: the interface, the objective, and scoring candidates in imagination.

A planner searches over discrete action sequences a_0..a_{H-1} from the current real observation
o_0, for B environments at once, and scores each sequence by rolling the world model forward
from h_0, the history through o_0, and the backbone state after it:

    p_t = sigmoid(reward(h_t, a_t, g))  goal g becomes achieved on arriving at o_{t+1}
    c_t = sigmoid(cont(h_t, a_t))       the episode goes on after o_{t+1}
    ô_{t+1} = most_likely(decode(h_t, a_t)),  h_{t+1} = next(state, encode(ô_{t+1}), a_t)
    v   = sigmoid(value(h_H, g))        max_a Q: discounted chance of achieving g from o_H on

Achieving the goal ends the task, so a reward only counts if the goal was not achieved before and
the episode did not end before:

    alive_0 = 1,   alive_{t+1} = alive_t (1 - p_t) c_t
    J = sum_{t<H} gamma^t alive_t p_t  +  gamma^H alive_H v

J is the discounted probability of achieving the goal, in [0, 1]; unrolled, it is the world
model's own TD target for Q, Q(h_t, a_t) = p_t + gamma (1 - p_t) c_t max_a Q(h_{t+1}, a), so
gamma must be the discount Q was trained with.

That identity gives a cheaper terminal (`SearchConfig.terminal = "q"`): score the last action by
q = sigmoid(Q(h_{H-1}, a_{H-1}, g)), the model's own estimate of the two terms it replaces,

    J_q = sum_{t<H-1} gamma^t alive_t p_t  +  gamma^(H-1) alive_(H-1) q

so the H actions of a sequence take H - 1 imagined transitions instead of H. The last level of
the prefix tree is its widest (about a third of the rows a CEM call steps), and its transitions
are the ones only the terminal value reads.

The caller's state is never stepped: candidates run on copies (`BatchState.index`, `expand`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from lwm.models.ssm import BatchState
from lwm.models.world_model import WorldModel

TERMINALS = ("value", "q")
"""How a search scores the end of a sequence (`SearchConfig.terminal`)."""


def check_terminal(terminal: str) -> None:
    """Refuse a terminal that is not one of `TERMINALS`, naming the choices."""
    if terminal not in TERMINALS:
        raise ValueError(f"terminal must be one of {', '.join(TERMINALS)}, got {terminal!r}")


@dataclass
class SearchConfig:
    """What every sequence-search planner is configured by: budget, discount, warm start."""

    horizon: int = 8
    """H: imagined steps per candidate sequence."""
    candidates: int = 512
    """K: sequences per environment and iteration."""
    iterations: int = 4
    """Sample-score-refit rounds per action."""
    momentum: float = 0.1
    """Weight of the previous distribution in the refit (0: elite frequencies only)."""
    discount: float = 0.9
    """gamma of the objective J; must be the discount Q was trained with."""
    warm_start: bool = True
    """Start from the previous call's final distribution shifted by one step (MPC)."""
    uniform_mix: float = 0.2
    """Share of the uniform distribution mixed into a warm start, so no action is ruled out."""
    excluded: tuple[int, ...] = (6,)
    """Actions never proposed: minigrid's no-op `done`, which exploration never takes, so the
    world model has never seen its outcome and its imagined futures would be guesses."""
    repeat_penalty: float = 0.0
    """Subtracted from J once for each time a candidate's first action was already taken from
    the same real observation this episode (`tried`, counted by the agent)."""
    terminal: str = "q"
    """How a sequence's tail is scored (module docstring): "q" scores the last action by
    Q(h_{H-1}, a_{H-1}) and steps H - 1 transitions; "value" steps all H and bootstraps with
    v(h_H). "q" is the default: 10-36 % faster a warm CEM call, and on three GoToLocal models
    (100 episodes each) it succeeded as often as "value" or more (README)."""

    def __post_init__(self) -> None:
        check_terminal(self.terminal)


class PolicyPrior(Protocol):
    """A proposal distribution over the next action, e.g. a softmax over the model's Q head."""

    def __call__(self, h: Tensor, goal: Tensor) -> Tensor:
        """h: (N, d) history through the current (real or imagined) observation,
        goal: (N, goal_dim) -> action logits (N, A)."""
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
    """(B,): predicted terminal value, the discounted chance of achieving the goal from o_H on
    (with the "q" terminal: by taking the last action from o_{H-1}, `SearchConfig.terminal`)."""
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


def one_step_plan(model: WorldModel, h: Tensor, action: Tensor, reward: Tensor, cont: Tensor,
                  value: Tensor, probs: Tensor, decode: bool) -> PlanResult:
    """The one-step plan of a planner that does not search (greedy Q, a policy): action (B,),
    its reward and continuation probabilities (B, 1), the value after it (B,) (also the
    objective), the distribution (B, 1, A), and with `decode` the view it leads to."""
    result = PlanResult(action=action, actions=action[:, None], reward=reward, cont=cont,
                        value=value, objective=value, probs=probs)
    if decode:
        obs = model.most_likely(model.decode(h, action))
        result.image = obs["image"][:, None]
        result.direction = obs["direction"][:, None]
        result.carrying = obs["carrying"][:, None]
    return result


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
        h: Tensor,
        goal: Tensor,
        decode: bool = False,
        generator: torch.Generator | None = None,
        forbid: Tensor | None = None,
        tried: Tensor | None = None,
    ) -> PlanResult:
        """Choose the next action of B environments.

        state: the backbone state after the current real observation (not modified);
        h: (B, d) the history through it, as returned with that state by `model.next`;
        goal: (B, goal_dim) goal embeddings; decode: also return the imagined views of the best
        sequence; generator: the source of randomness (None: torch's global one); forbid:
        (B, A) bool, actions not to take now (later imagined steps may still use them), e.g. the
        drop of a key still needed (`lwm.goals.keeps_carried`); tried: (B, A) how often each
        action was already taken from the same real observation in this episode. A policy that
        comes back to a view and leaves it the same way again is likely in a loop, so planners
        with a `repeat_penalty` play such repeats down (0 ignores `tried`).
        """
        raise NotImplementedError(
            "plan(model, state, h: (B, d), goal: (B, goal_dim), decode=False, generator=None,"
            " forbid=None, tried=None) -> PlanResult"
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
    """(B, K) terminal probabilities: v(h_H), or with the "q" terminal q(h_{H-1}, a_{H-1})."""
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
        return Candidates(*(
            torch.cat([getattr(self, f.name), getattr(other, f.name)], dim=1)
            for f in fields(self)
        ))

    def top(self, k: int) -> Candidates:
        """The k highest-J candidates per environment, best first."""
        return self.select(self.objective.topk(k, dim=1).indices)


def objective(reward: Tensor, cont: Tensor, value: Tensor, discount: float,
              terminal: str = "value") -> Tensor:
    """J (module docstring) from p_t, c_t: (..., H) and terminal v: (...) -> (...); with the "q"
    terminal, `value` is q(h_{H-1}, a_{H-1}) and stands for the last step's p and c."""
    check_terminal(terminal)
    if terminal == "q":
        reward, cont = reward[..., :-1], cont[..., :-1]
    H = reward.shape[-1]
    survive = (1 - reward) * cont  # (..., H): the task goes on past o_{t+1}
    alive = torch.cumprod(F.pad(survive, (1, 0), value=1.0), dim=-1)  # (..., H+1): alive_0..H
    gammas = discount ** torch.arange(H + 1, dtype=reward.dtype, device=reward.device)
    return (gammas[:H] * alive[..., :H] * reward).sum(-1) + gammas[H] * alive[..., H] * value


@torch.no_grad()
def imagine_candidates(
    model: WorldModel,
    state: BatchState,
    h: Tensor,
    goal: Tensor,
    k: int,
    horizon: int,
    discount: float,
    act: Callable[[int, Tensor], Tensor],
    terminal: str = "value",
) -> Candidates:
    """Roll K candidates per environment forward H steps, each separately, and score them.

    state, h (B, d): as for `Planner.plan` (state is not modified); goal: (B, goal_dim).
    act(t, h) -> (B*K,) actions at step t given the histories h (B*K, d); the candidates of an
    environment are consecutive rows. terminal: `SearchConfig.terminal`.
    """
    B = h.shape[0]
    psi = model.goal_features(goal)  # goal streams, once per environment
    env = torch.arange(B, device=h.device).repeat_interleave(k)  # (B*K,)
    s = model.branch(state).expand(k)  # (B*K, ...): stepping it leaves `state` alone
    h = h.repeat_interleave(k, dim=0)  # (B*K, d)
    rewards, conts, actions = [], [], []
    for t in range(horizon):
        a = act(t, h)
        rewards.append(model.reward(h, a, psi=psi["reward"][env]))
        conts.append(model.cont(h, a))
        actions.append(a)
        if t == horizon - 1 and terminal == "q":
            last = model.q(h, psi=psi["q"][env]).gather(-1, a[:, None])[:, 0]
            break
        obs = model.most_likely(model.decode(h, a))
        h, s = model.next(s, model.encode(obs["image"], obs["direction"], obs["carrying"]), a)
    else:
        last = model.value(h, psi=psi["q"][env])
    reward = torch.sigmoid(torch.stack(rewards, dim=1)).view(B, k, horizon)
    cont = torch.sigmoid(torch.stack(conts, dim=1)).view(B, k, horizon)
    value = torch.sigmoid(last).view(B, k)
    actions_ = torch.stack(actions, dim=1).view(B, k, horizon)  # (B, K, H)
    return Candidates(actions_, reward, cont, value,
                      objective(reward, cont, value, discount, terminal))


def padded_rows(model: WorldModel, m: int) -> int:
    """How many rows to step for m distinct prefixes: m, or with a compiled backbone step (one
    graph per batch size, seconds to compile each) the next power of two from 8 on, so that a
    whole run needs a handful of graphs."""
    if not model.cfg.backbone_cfg.compile:
        return m
    return max(8, 1 << (m - 1).bit_length())


@torch.no_grad()
def score_sequences(
    model: WorldModel, state: BatchState, h: Tensor, goal: Tensor, actions: Tensor,
    discount: float, terminal: str = "value",
) -> Candidates:
    """Score given action sequences (B, K, H) from (state, h (B, d)) for goal (B, goal_dim);
    terminal: `SearchConfig.terminal`.

    Imagination is deterministic (it feeds back the most likely observation), so candidates
    that share a prefix a_0..a_t share its imagined future up to t. Each distinct prefix is
    stepped once: at most 7 rows per environment at t = 0, 49 at t = 1, and far fewer than K
    at every step once the distribution has concentrated (later iterations, warm starts).
    The scores are those of stepping every candidate separately (`imagine_candidates`).
    """
    B, K, H = actions.shape
    A = model.cfg.n_actions
    flat = actions.reshape(B * K, H)
    psi = model.goal_features(goal)  # goal streams, once per environment
    env = torch.arange(B, device=h.device).repeat_interleave(K)  # (B*K,)
    prefix = env  # (B*K,): each candidate's row in the current histories: its env at t = 0
    s, h_rows, state_rows = model.branch(state), h, B  # a copy: `state` is never stepped
    env_rows = torch.arange(B, device=h.device)  # each history row's environment
    h_pairs, a_pairs, env_pairs, rows = [], [], [], []  # per step, per distinct (h_t, a_t)
    offset = 0  # where this step's distinct pairs start among all steps'
    for t in range(H):
        distinct, prefix_next = torch.unique(prefix * A + flat[:, t], return_inverse=True)
        m = len(distinct)
        # One candidate per distinct prefix a_0..a_t (any: they agree on parent and action).
        first = torch.empty(m, dtype=torch.long, device=h.device).scatter_(
            0, prefix_next, torch.arange(B * K, device=h.device)
        )
        parent, a = prefix[first], flat[first, t]  # (M,) history rows of a_0..a_t-1, a_t
        h_parent = h_rows[parent]  # (M, d)
        h_pairs.append(h_parent)
        a_pairs.append(a)
        env_pairs.append(env[first])
        rows.append(offset + prefix_next)
        prefix, offset = prefix_next, offset + m
        if t == H - 1 and terminal == "q":  # the last action is scored by Q, not stepped
            break
        obs = model.most_likely(model.decode(h_parent, a))
        z = model.encode(obs["image"], obs["direction"], obs["carrying"])  # (M, d)
        n_rows = padded_rows(model, m)  # M' >= M: rows past M are stepped and ignored
        # Rows that stay in place (no prefix branched, same padding) need no gather.
        same = n_rows == state_rows and torch.equal(parent, torch.arange(m, device=h.device))
        if not same:
            s = s.index(F.pad(parent, (0, n_rows - m)))  # (M', ...)
        h_next, s = model.next(s, F.pad(z, (0, 0, 0, n_rows - m)), F.pad(a, (0, n_rows - m)))
        h_rows, state_rows, env_rows = h_next[:m], n_rows, env_pairs[-1]
    # The heads run once on the pairs of all steps: a few large matmuls, not 2H small ones.
    h_all, a_all = torch.cat(h_pairs), torch.cat(a_pairs)  # (R, d), (R,)
    rows_ = torch.stack(rows, dim=1)  # (B*K, H): each candidate's pair at each step
    reward = torch.sigmoid(model.reward(h_all, a_all, psi=psi["reward"][torch.cat(env_pairs)]))
    cont = torch.sigmoid(model.cont(h_all, a_all))
    if terminal == "q":  # q(h_{H-1}, a_{H-1}) of each last pair: (M_{H-1},), from Q of all
        # actions at each distinct h_{H-1} (fewer rows than pairs)
        q = model.q(h_rows, psi=psi["q"][env_rows])  # (rows, A)
        value = torch.sigmoid(q[parent, a])
    else:  # v(h_H) of each last prefix: (M_{H-1},)
        value = torch.sigmoid(model.value(h_rows, psi=psi["q"][env_pairs[-1]]))
    reward, cont = reward[rows_].view(B, K, H), cont[rows_].view(B, K, H)
    value = value[prefix].view(B, K)
    return Candidates(actions, reward, cont, value,
                      objective(reward, cont, value, discount, terminal))


def sample_prior(
    model: WorldModel, state: BatchState, h: Tensor, goal: Tensor, prior: PolicyPrior, k: int,
    horizon: int, discount: float, generator: torch.Generator | None = None,
    forbid: Tensor | None = None, terminal: str = "value",
) -> Candidates:
    """K sequences per environment drawn step by step from `prior` in imagination, scored;
    `forbid` (B, A) rules actions out of the first step; terminal: `SearchConfig.terminal`."""
    goal_k = goal.repeat_interleave(k, dim=0)  # (B*K, goal_dim)
    forbid_k = None if forbid is None else forbid.repeat_interleave(k, dim=0)  # (B*K, A)

    def act(t: int, h: Tensor) -> Tensor:
        logits = prior(h, goal_k)  # (B*K, A)
        if t == 0 and forbid_k is not None:
            logits = logits.masked_fill(forbid_k, float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]

    return imagine_candidates(model, state, h, goal, k, horizon, discount, act, terminal)


def penalize_repeats(c: Candidates, tried: Tensor | None, penalty: float) -> Candidates:
    """Candidates with J lowered by `penalty` for each time their first action was already taken
    from this observation (`tried`: (B, A) counts); unchanged without counts or penalty."""
    if tried is None or penalty == 0.0:
        return c
    repeats = tried.to(c.objective.dtype).gather(1, c.actions[..., 0])  # (B, K)
    return Candidates(c.actions, c.reward, c.cont, c.value, c.objective - penalty * repeats)


def forbid_first(probs: Tensor, forbid: Tensor | None) -> Tensor:
    """Per-step distributions (B, H, A) with the `forbid` (B, A) actions ruled out of step 0."""
    if forbid is None:
        return probs
    first = probs[:, 0].masked_fill(forbid, 0.0)
    total = first.sum(-1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError("forbid rules out every action an environment's plan could start with")
    return torch.cat([(first / total)[:, None], probs[:, 1:]], dim=1)


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

    def __init__(self, horizon: int, uniform_mix: float, excluded: Sequence[int] = ()):
        self.horizon = horizon
        self.uniform_mix = uniform_mix
        self.excluded = tuple(excluded)
        self.memory: Tensor | None = None  # (B, H, A) shifted, or None: start uniform

    def uniform(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """Uniform over the allowed actions (the last dim), zero for excluded ones."""
        probs = torch.ones(shape, device=device)
        probs[..., list(self.excluded)] = 0.0
        return probs / probs.sum(-1, keepdim=True)

    def reset(self) -> None:
        self.memory = None

    def reset_envs(self, envs: Sequence[int] | Tensor) -> None:
        if self.memory is not None:
            idx = torch.as_tensor(envs, dtype=torch.long)
            self.memory[idx] = self.uniform(self.memory[idx].shape, self.memory.device)

    def start(self, batch: int, n_actions: int, device: torch.device) -> Tensor:
        """The distribution (B, H, A) the next plan starts from."""
        uniform = self.uniform((batch, self.horizon, n_actions), device)
        if self.memory is None:
            return uniform
        if self.memory.shape != uniform.shape:
            raise ValueError(
                f"planner remembers plans of shape {tuple(self.memory.shape)}, asked to plan "
                f"{tuple(uniform.shape)}: call reset() when the number of envs changes"
            )
        return (1 - self.uniform_mix) * self.memory + self.uniform_mix * uniform

    def remember(self, probs: Tensor) -> None:
        """Store a final distribution (B, H, A), shifted by the step about to be taken."""
        last = self.uniform(probs[:, :1].shape, probs.device)  # (B, 1, A)
        self.memory = torch.cat([probs[:, 1:], last], dim=1)


def plan_result(
    model: WorldModel, state: BatchState, h: Tensor, best: Candidates, probs: Tensor,
    decode: bool,
) -> PlanResult:
    """Package the best candidate per environment (B, 1, ...) as a `PlanResult`, decoding its
    imagined views (one more rollout of B sequences) when asked."""
    actions = best.actions[:, 0]  # (B, H)
    result = PlanResult(
        action=actions[:, 0], actions=actions, reward=best.reward[:, 0], cont=best.cont[:, 0],
        value=best.value[:, 0], objective=best.objective[:, 0], probs=probs,
    )
    if decode:
        frames = model.imagine(state.clone(), h, actions, decode_frames=True)
        result.image, result.direction, result.carrying = (
            frames["image"], frames["direction"], frames["carrying"]
        )
    return result
