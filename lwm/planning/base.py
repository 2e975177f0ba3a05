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
from dataclasses import dataclass, field, fields
from itertools import pairwise
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
    fold = model.fold_goals(goal)  # the goal heads with each env's goal folded in
    env = torch.arange(B, device=h.device).repeat_interleave(k)  # (B*K,)
    s = model.branch(state).expand(k)  # (B*K, ...): stepping it leaves `state` alone
    h = h.repeat_interleave(k, dim=0)  # (B*K, d)
    rewards, conts, actions = [], [], []
    for t in range(horizon):
        a = act(t, h)
        rewards.append(model.reward_folded(fold, h, a, env))
        conts.append(model.cont(h, a))
        actions.append(a)
        if t == horizon - 1 and terminal == "q":
            last = model.q_folded(fold, h, env).gather(-1, a[:, None])[:, 0]
            break
        h, s = model.next(s, model.predict_latent(h, a), a)
    else:
        last = model.q_folded(fold, h, env).amax(-1)
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


@dataclass
class _Level:
    """The distinct action prefixes a_0..a_t a `PrefixTree` has imagined at one step t.

    Rows are only ever appended, one chunk per `PrefixTree.score` call that found new
    prefixes, so a row number names its prefix for the whole search. A prefix's code is
    parent_row * A + a_t: its row at step t - 1 (at the root, its environment) and its action,
    so codes are dense and a table indexed by code finds a prefix's row in one lookup.
    """

    codes: Tensor
    """(n,) int64 code of each row's prefix."""
    env: Tensor
    """(n,) each row's environment."""
    h: list[Tensor] = field(default_factory=list)
    """Per chunk, (n_c, latent): the history after the prefix (h_{t+1}); empty where the
    search does not step this level (the last one with the "q" terminal)."""
    states: list[BatchState] = field(default_factory=list)
    """Per chunk, the backbone state after the prefix, beside `h`."""
    starts: list[int] = field(default_factory=list)
    """First row of each chunk."""
    reward: Tensor | None = None
    """(n,) logit that a_t achieves the goal from h_t."""
    cont: Tensor | None = None
    """(n,) continuation logit of (h_t, a_t)."""
    last: Tensor | None = None
    """(n,) at the last step: the terminal logit of the whole sequence (q or v)."""
    table: Tensor | None = None
    """(parent rows * A,) the row of each code, -1 where no prefix has it yet."""
    row_bytes: int = 0
    """Bytes of one row's history and state (the same for every chunk of a level)."""

    def rows_of(self, codes: Tensor, n_codes: int) -> Tensor:
        """codes (M,) of which there are n_codes in all (the parent level's rows times A) ->
        their rows, -1 for prefixes not seen yet."""
        known = 0 if self.table is None else len(self.table)
        if known < n_codes:  # the parent level grew since: room for its new codes
            more = codes.new_full((n_codes - known,), -1)
            self.table = more if self.table is None else torch.cat([self.table, more])
        return self.table[codes]

    def append(self, codes: Tensor, env: Tensor, h: Tensor | None,
               state: BatchState | None) -> None:
        """New prefixes (codes, unseen) from environments env, and with h their histories and
        states, as the next chunk of rows."""
        n = len(self.codes)
        if h is not None:
            self.starts.append(n)
            self.h.append(h)
            self.states.append(state)
        self.table[codes] = torch.arange(n, n + len(codes), device=codes.device)
        self.codes, self.env = torch.cat([self.codes, codes]), torch.cat([self.env, env])

    def gather(self, rows: Tensor, states: bool = True) -> tuple[Tensor, BatchState | None]:
        """Histories and copies of the states of `rows` (ascending); without `states`, the
        histories alone (None for the states)."""
        if len(self.starts) > 1:  # where the chunks begin among the rows
            edges = [0, *torch.searchsorted(rows, torch.tensor(
                self.starts[1:], device=rows.device)).tolist(), len(rows)]
            parts = [(c, a, b) for c, (a, b) in enumerate(pairwise(edges)) if b > a]
        else:
            parts = [(0, 0, len(rows))]
        if len(parts) == 1:  # one chunk: a plain index
            c = parts[0][0]
            local = rows - self.starts[c] if c else rows
            return (self.h[c].index_select(0, local),
                    self.states[c].take(local) if states else None)
        # Several: each chunk's rows are read into their slice of one output, without a cat.
        h = self.h[0].new_empty(len(rows), *self.h[0].shape[1:])
        out = self.states[0].new_rows(len(rows)) if states else None
        for c, a, b in parts:
            local = rows[a:b] - self.starts[c]
            torch.index_select(self.h[c], 0, local, out=h[a:b])
            if states:
                self.states[c].take(local, out, a)
        return h, out


TREE_BYTES = 256 * 2**20
"""Default most bytes of histories and states a `PrefixTree` keeps between `score` calls."""


class PrefixTree:
    """The imagined futures of action prefixes from (state, h) of B environments, kept across
    the `score` calls of one search.

    Imagination is deterministic (it feeds back the most likely observation), so candidates
    that share a prefix a_0..a_t share its imagined future up to t. Each distinct prefix is
    stepped once: at most 7 rows per environment at t = 0, 49 at t = 1, and far fewer than K
    at every step once the distribution has concentrated (later iterations, warm starts). The
    iterations of one CEM or MPPI call sample overlapping sets of sequences, so the tree keeps
    every prefix it has stepped, with its history, state and head outputs, and a later `score`
    steps only the prefixes it has not seen (a step with none is skipped). The scores are those
    of stepping every candidate separately (`imagine_candidates`).

    state, h (B, d): as for `Planner.plan` (state is never stepped); goal: (B, goal_dim);
    terminal: `SearchConfig.terminal`; max_bytes: the most bytes of histories and states the
    tree keeps between calls. A transformer's states grow with its context, and a search that
    has not concentrated keeps up to iterations x K prefixes a step (measured on the `small`
    preset, 4 x 512 uniform sequences of 8, one environment: 160 MB with mamba2, 326 MB with
    a transformer after 16 tokens of context), so past the budget a `score` forgets the tree
    first and steps its own prefixes afresh, as if each call had its own tree.

    lazy_last: with the "q" terminal, J does not read the last step's p and c, and the last
    step holds about 40 % of the pairs a search scores (measured on three models), so `score`
    leaves them NaN, and `complete` computes them for the few candidates a planner returns.
    """

    def __init__(self, model: WorldModel, state: BatchState, h: Tensor, goal: Tensor,
                 terminal: str = "value", max_bytes: int = TREE_BYTES, lazy_last: bool = False):
        check_terminal(terminal)
        self.model, self.terminal, self.max_bytes = model, terminal, max_bytes
        self.lazy_last = lazy_last and terminal == "q"
        self.bytes = 0  # histories and states kept in `levels`
        self.fold = model.fold_goals(goal)  # the goal heads with each env's goal folded in
        env = torch.arange(h.shape[0], device=h.device)  # the root's rows: one per env
        self.root = _Level(env, env, h=[h], states=[model.branch(state)], starts=[0])
        self.levels: list[_Level] = []

    @torch.no_grad()
    def score(self, actions: Tensor, discount: float) -> Candidates:
        """Score action sequences (B, K, H) (H the same at every call) with discount gamma."""
        B, K, H = actions.shape
        if self.levels and len(self.levels) != H:
            raise ValueError(f"this tree holds horizon {len(self.levels)}, asked to score {H}")
        if self.bytes > self.max_bytes:  # over budget: forget, step this call's prefixes afresh
            self.levels, self.bytes = [], 0
        # Inference mode: the tree's own tensors skip autograd's version counting (4 % of a
        # CEM call, measured); what is returned is computed outside it, as ordinary tensors.
        env = torch.arange(B, device=actions.device).repeat_interleave(K)
        with torch.inference_mode():
            rows_ = self._grow(actions.reshape(B * K, H), env)  # (B*K, H)
        reward = torch.sigmoid(torch.stack([lv.reward[rows_[:, t]] for t, lv in
                                            enumerate(self.levels)], dim=1)).view(B, K, H)
        cont = torch.sigmoid(torch.stack([lv.cont[rows_[:, t]] for t, lv in
                                          enumerate(self.levels)], dim=1)).view(B, K, H)
        value = torch.sigmoid(self.levels[-1].last[rows_[:, -1]]).view(B, K)
        return Candidates(actions, reward, cont, value,
                          objective(reward, cont, value, discount, self.terminal))

    @torch.no_grad()
    def complete(self, c: Candidates) -> Candidates:
        """Candidates (B, E, H) this tree scored, with the last step's p and c that `lazy_last`
        left out computed (any others are returned as they are)."""
        missing = c.reward[..., -1].isnan().flatten()  # (B*E,)
        if not bool(missing.any()):
            return c
        B, E, H = c.actions.shape
        env = torch.arange(B, device=missing.device).repeat_interleave(E)[missing]
        last = c.actions.reshape(B * E, H)[missing]
        with torch.inference_mode():  # known prefixes: nothing is stepped
            rows = self._grow(last, env)
        level = self.root if H == 1 else self.levels[H - 2]
        parent = env if H == 1 else rows[:, H - 2]
        parent, order = torch.sort(parent)
        h = torch.empty(len(parent), *level.h[0].shape[1:], dtype=level.h[0].dtype,
                        device=parent.device)
        h[order] = level.gather(parent, states=False)[0]
        a = last[:, -1]
        reward, cont = c.reward.clone(), c.cont.clone()
        reward.view(B * E, H)[missing, -1] = torch.sigmoid(
            self.model.reward_folded(self.fold, h, a, env))
        cont.view(B * E, H)[missing, -1] = torch.sigmoid(self.model.cont(h, a))
        return Candidates(c.actions, reward, cont, c.value, c.objective)

    def _grow(self, flat: Tensor, env: Tensor) -> Tensor:
        """Step the prefixes of sequences flat (M, H) from environments env (M,) not seen
        before and score their pairs; -> each sequence's row at each level (M, H)."""
        model, A = self.model, self.model.cfg.n_actions
        H = flat.shape[1]
        device = flat.device
        rows = env  # in the root, the row of an environment is its index
        parent_level, level_rows = self.root, []
        new_pairs = []  # per step: (level, h_t, a_t, env) of the pairs first seen now
        for t in range(H):
            if len(self.levels) <= t:
                empty = torch.empty(0, dtype=torch.long, device=device)
                self.levels.append(_Level(empty, empty))
            level = self.levels[t]
            codes = rows * A + flat[:, t]
            found = level.rows_of(codes, len(parent_level.codes) * A)
            new = found < 0
            if bool(new.any()):
                fresh = torch.unique(codes[new])  # ascending: their parents are in row order
                parent = fresh.div(A, rounding_mode="floor")
                a, fresh_env = fresh - parent * A, parent_level.env[parent]
                stepped = t < H - 1 or self.terminal == "value"  # else the q terminal's Q
                h_parent, s = parent_level.gather(parent, states=stepped)
                h_next = None
                if stepped:
                    z = model.predict_latent(h_parent, a)  # (M, ...)
                    m = len(a)
                    n_rows = padded_rows(model, m)  # M' >= M: rows past M are stepped, dropped
                    if n_rows == m:
                        h_next, s = model.next(s, z, a)
                    else:
                        s = s.take(F.pad(torch.arange(m, device=device), (0, n_rows - m)))
                        h_next, s = model.next(s, F.pad(z, (0, 0, 0, n_rows - m)),
                                               F.pad(a, (0, n_rows - m)))
                        h_next, s = h_next[:m], s.index(slice(0, m))
                keep = h_next is not None and t < H - 1  # the last level is never a parent
                level.append(fresh, fresh_env, h_next if keep else None, s if keep else None)
                if keep:
                    if not level.row_bytes:  # once a level: walking a state's tensors is slow
                        level.row_bytes = (h_next.nbytes + sum(
                            t.nbytes for t in s.tensors())) // max(len(h_next), 1)
                    self.bytes += level.row_bytes * len(h_next)
                new_pairs.append((level, h_parent, a, fresh_env, h_next, parent))
                found = level.table[codes]
            rows = found  # each sequence's row at step t
            level_rows.append(rows)
            parent_level = level
        self._score_heads(new_pairs)
        return torch.stack(level_rows, dim=1)

    def _score_heads(self, new_pairs: list) -> None:
        """Reward and cont logits of the pairs first seen in this call, and the terminal logit
        of the new last-step ones: the heads run once on all of them, a few large matmuls."""
        if not new_pairs:
            return
        model, fold = self.model, self.fold
        headed = new_pairs  # the pairs whose p and c are computed now
        if self.lazy_last and new_pairs[-1][0] is self.levels[-1]:
            headed = new_pairs[:-1]
        reward, cont = [], []
        if headed:
            h_all = torch.cat([p[1] for p in headed])
            a_all = torch.cat([p[2] for p in headed])
            env_all = torch.cat([p[3] for p in headed])
            sizes = [len(p[2]) for p in headed]
            reward = list(model.reward_folded(fold, h_all, a_all, env_all).split(sizes))
            cont = list(model.cont(h_all, a_all).split(sizes))
        if len(headed) < len(new_pairs):  # left for `complete`
            nan = new_pairs[-1][1].new_full((len(new_pairs[-1][2]),), float("nan"))
            reward.append(nan)
            cont.append(nan)
        for (level, h_t, a, env, h_next, parent), r, c in zip(
                new_pairs, reward, cont, strict=True):
            level.reward = r if level.reward is None else torch.cat([level.reward, r])
            level.cont = c if level.cont is None else torch.cat([level.cont, c])
            if level is not self.levels[-1]:
                continue
            if self.terminal == "q":  # q(h_{H-1}, a_{H-1}), Q read once per distinct h_{H-1}
                # the parents come in row order (`_grow`): each distinct one's first position
                _, inverse, counts = torch.unique_consecutive(parent, return_inverse=True,
                                                              return_counts=True)
                one = counts.cumsum(0) - counts
                last = model.q_folded(fold, h_t[one], env[one])[inverse, a]
            else:  # v(h_H)
                last = model.q_folded(fold, h_next, env).amax(-1)
            level.last = last if level.last is None else torch.cat([level.last, last])


def score_sequences(
    model: WorldModel, state: BatchState, h: Tensor, goal: Tensor, actions: Tensor,
    discount: float, terminal: str = "value",
) -> Candidates:
    """Score given action sequences (B, K, H) from (state, h (B, d)) for goal (B, goal_dim);
    terminal: `SearchConfig.terminal`. Each distinct prefix is stepped once (`PrefixTree`; a
    search that scores several sets of sequences keeps one tree for all of them)."""
    return PrefixTree(model, state, h, goal, terminal).score(actions, discount)


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
