"""Planners: shapes, the caller's state left alone, determinism, MPC warm starts, and behaviour:
on a world model whose reward is known, CEM and MPPI find the one rewarded action sequence."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from lwm.models.ssm import BatchState
from lwm.models.world_model import WorldModel, preset
from lwm.planning import (
    CEM,
    MPPI,
    PLANNERS,
    MPPIConfig,
    make_planner,
    objective,
)
from lwm.planning.base import PrefixTree, SearchConfig, imagine_candidates, score_sequences

torch.set_num_threads(1)

SMALL = {"horizon": 4, "candidates": 64, "iterations": 2, "elites": 8}

SEARCH_PLANNERS = ("cem", "mppi")
"""Planners that search over imagined sequences (greedy Q does not)."""


def small_planner(name: str, **overrides) -> CEM | MPPI:
    cfg_cls = PLANNERS[name][1]
    return make_planner(name, cfg_cls(**{**SMALL, **overrides}))


@pytest.fixture(scope="module", params=["mamba2", "gru", "transformer", "mamba2+ego",
                                                "gru+map"])
def model(request) -> WorldModel:
    torch.manual_seed(0)
    backbone, _, decoder = request.param.partition("+")
    return WorldModel(preset("debug", backbone=backbone, decoder=decoder or "mlp")).eval()


def history(model: WorldModel, batch: int, steps: int = 3):
    """The backbone state and history h (B, d) after a few random observations and actions,
    and goal embeddings."""
    gen = torch.Generator().manual_seed(1)
    state = model.init_state(batch)
    prev = torch.full((batch,), model.START)
    with torch.no_grad():
        for _ in range(steps):
            z = model.encode(
                torch.randint(0, 3, (batch, 7, 7, 3), generator=gen),
                torch.randint(0, 4, (batch,), generator=gen),
                torch.zeros(batch, 2, dtype=torch.long),
            )
            h, state = model.next(state, z, prev)
            prev = torch.randint(0, 7, (batch,), generator=gen)
    return state, h, torch.randn(batch, 384, generator=gen)


def tensors(state: BatchState) -> list[Tensor]:
    return list(state.tensors())


@pytest.mark.parametrize("name", SEARCH_PLANNERS)
def test_shapes_for_a_batch_of_envs(model, name):
    B, H = 3, SMALL["horizon"]
    state, h, goal = history(model, B)
    result = small_planner(name).plan(model, state, h, goal, decode=True)
    assert result.action.shape == (B,) and result.action.dtype == torch.long
    assert torch.equal(result.action, result.actions[:, 0])
    assert result.actions.shape == result.reward.shape == result.cont.shape == (B, H)
    assert result.value.shape == result.objective.shape == (B,)
    assert result.probs.shape == (B, H, 7)
    assert result.image.shape == (B, H, 7, 7, 3)
    assert result.direction.shape == (B, H) and result.carrying.shape == (B, H, 2)
    assert ((result.reward >= 0) & (result.reward <= 1)).all()
    cfg = PLANNERS[name][1]
    expect = objective(result.reward, result.cont, result.value, cfg.discount, cfg.terminal)
    torch.testing.assert_close(result.objective, expect)


@pytest.mark.parametrize("name", SEARCH_PLANNERS)
def test_caller_state_is_untouched(model, name):
    state, h, goal = history(model, 2)
    before = state.clone()
    small_planner(name).plan(model, state, h, goal, decode=True)
    after, kept = tensors(state), tensors(before)
    assert after and len(after) == len(kept)
    for a, b in zip(after, kept, strict=True):
        assert torch.equal(a, b)
    assert repr(state) == repr(before)  # step counters too


@pytest.mark.parametrize("name", SEARCH_PLANNERS)
def test_same_generator_seed_same_plan(name):
    torch.manual_seed(0)
    model = WorldModel(preset("debug")).eval()
    state, h, goal = history(model, 2)
    results = [
        small_planner(name).plan(model, state, h, goal, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(results[0].actions, results[1].actions)
    assert torch.equal(results[0].probs, results[1].probs)


@pytest.mark.parametrize("name", SEARCH_PLANNERS)
def test_warm_start_shifts_the_last_plan(name):
    torch.manual_seed(0)
    model = WorldModel(preset("debug")).eval()
    state, h, goal = history(model, 3)
    planner = small_planner(name, uniform_mix=0.2)
    # uniform over the allowed actions: "done" (6) is excluded by default
    uniform = torch.full((3, SMALL["horizon"], 7), 1 / 6)
    uniform[..., 6] = 0.0
    torch.testing.assert_close(planner.warm.start(3, 7, h.device), uniform)

    probs = planner.plan(model, state, h, goal).probs
    assert (probs[..., 6] == 0).all()
    start = planner.warm.start(3, 7, h.device)
    torch.testing.assert_close(start[:, :-1], 0.8 * probs[:, 1:] + 0.2 * uniform[:, 1:])
    torch.testing.assert_close(start[:, -1], uniform[:, -1])

    planner.reset_envs([1])
    start = planner.warm.start(3, 7, h.device)
    torch.testing.assert_close(start[1], uniform[1])
    torch.testing.assert_close(start[0, :-1], 0.8 * probs[0, 1:] + 0.2 * uniform[0, 1:])
    with pytest.raises(ValueError, match="reset"):
        planner.plan(model, *history(model, 2))
    planner.reset()
    torch.testing.assert_close(planner.warm.start(2, 7, h.device), uniform[:2])


@pytest.mark.parametrize("terminal", ["value", "q"])
def test_shared_prefixes_score_as_if_stepped_separately(model, terminal):
    B, K, H = 2, 40, 4
    state, h, goal = history(model, B)
    gen = torch.Generator().manual_seed(3)
    # Few distinct actions, so prefixes repeat a lot; plus one sequence that is all different.
    actions = torch.randint(0, 2, (B, K, H), generator=gen)
    actions[:, 0] = torch.arange(H) + 3
    shared = score_sequences(model, state, h, goal, actions, 0.9, terminal)
    flat = actions.flatten(0, 1)  # (B*K, H)
    separate = imagine_candidates(model, state, h, goal, K, H, 0.9, lambda t, h: flat[:, t],
                                  terminal)
    for name in ("reward", "cont", "value", "objective"):
        torch.testing.assert_close(
            getattr(shared, name), getattr(separate, name), atol=1e-5, rtol=1e-4
        )


def test_the_q_terminal_scores_a_greedy_last_action_as_the_value_of_the_step_before(model):
    # J_q of a_0..a_{H-2} followed by argmax_a Q(h_{H-1}, a) is J of a_0..a_{H-2} with the
    # value terminal: the same terms, with v = max_a Q at h_{H-1}.
    B, K, H = 2, 24, 4
    state, h, goal = history(model, B)
    actions = torch.randint(0, 6, (B, K, H - 1), generator=torch.Generator().manual_seed(4))
    flat, goal_k = actions.flatten(0, 1), goal.repeat_interleave(K, dim=0)

    def act(t: int, h_t: Tensor) -> Tensor:
        return flat[:, t] if t < H - 1 else model.q(h_t, goal_k).argmax(-1)

    greedy_last = imagine_candidates(model, state, h, goal, K, H, 0.9, act, "q")
    shorter = score_sequences(model, state, h, goal, actions, 0.9, "value")
    torch.testing.assert_close(greedy_last.value, shorter.value, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(greedy_last.objective, shorter.objective, atol=1e-5, rtol=1e-4)
    # Any other last action scores no higher than the greedy one.
    other = (greedy_last.actions[..., -1] + 1) % 6
    scored = score_sequences(model, state, h, goal, torch.cat(
        [actions, other[..., None]], dim=-1), 0.9, "q")
    assert bool((scored.value <= greedy_last.value + 1e-6).all())


class CountingNext:
    """Counts the rows `model.next` steps, call by call, while in a `with` block."""

    def __init__(self, model: WorldModel):
        self.model, self.rows = model, []

    def __enter__(self) -> list[int]:
        step = self.model.next

        def counting(s, z, a):
            self.rows.append(len(a))
            return step(s, z, a)

        self.model.next = counting
        return self.rows

    def __exit__(self, *exc) -> None:
        del self.model.next


def distinct_prefixes(actions: Tensor, upto: int) -> set[tuple[int, ...]]:
    """The distinct (env, a_0..a_t) of sequences (B, K, H), for t < upto."""
    return {(b, *seq[: t + 1]) for b, env in enumerate(actions.tolist()) for seq in env
            for t in range(upto)}


@pytest.mark.parametrize("terminal", ["value", "q"])
def test_the_q_terminal_steps_no_transition_for_the_last_action(model, terminal):
    B, K, H = 2, 16, SMALL["horizon"]
    state, h, goal = history(model, B)
    actions = torch.randint(0, 6, (B, K, H), generator=torch.Generator().manual_seed(5))
    stepped = H - (terminal == "q")  # levels, each stepped once
    with CountingNext(model) as rows:
        PrefixTree(model, state, h, goal, terminal).score(actions, 0.9)
    assert len(rows) == stepped and sum(rows) == len(distinct_prefixes(actions, stepped))
    flat = actions.flatten(0, 1)
    with CountingNext(model) as rows:
        imagine_candidates(model, state, h, goal, K, H, 0.9, lambda t, h: flat[:, t], terminal)
    assert rows == [B * K] * stepped


@pytest.mark.parametrize("terminal", ["value", "q"])
def test_a_tree_steps_each_prefix_once_across_scores(model, terminal):
    # The iterations of a search share one tree: a later set of sequences is scored as a fresh
    # tree would score it, stepping only the prefixes no earlier set had.
    B, K, H = 2, 24, SMALL["horizon"]
    state, h, goal = history(model, B)
    gen = torch.Generator().manual_seed(6)
    sets = [torch.randint(0, 3, (B, K, H), generator=gen) for _ in range(3)]
    sets.append(sets[1].clone())  # nothing new
    tree = PrefixTree(model, state, h, goal, terminal)
    stepped_levels = H - (terminal == "q")
    seen: set[tuple[int, ...]] = set()
    for actions in sets:
        with CountingNext(model) as rows:
            kept = tree.score(actions, 0.9)
        new = distinct_prefixes(actions, stepped_levels) - seen
        assert sum(rows) == len(new)
        seen |= new
        fresh = score_sequences(model, state, h, goal, actions, 0.9, terminal)
        for name in ("reward", "cont", "value", "objective"):
            torch.testing.assert_close(getattr(kept, name), getattr(fresh, name),
                                       atol=1e-5, rtol=1e-4)
    assert rows == []  # the repeated set stepped no level at all
    with pytest.raises(ValueError, match="horizon 4, asked to score 3"):
        tree.score(sets[0][..., :3], 0.9)


def test_a_tree_over_its_memory_budget_starts_afresh(model):
    B, K, H = 2, 24, SMALL["horizon"]
    state, h, goal = history(model, B)
    actions = torch.randint(0, 3, (B, K, H), generator=torch.Generator().manual_seed(7))
    fresh = score_sequences(model, state, h, goal, actions, 0.9, "q")
    tree = PrefixTree(model, state, h, goal, "q", max_bytes=1)
    for _ in range(2):  # the second call finds the tree over budget and steps everything again
        with CountingNext(model) as rows:
            kept = tree.score(actions, 0.9)
        assert sum(rows) == len(distinct_prefixes(actions, H - 1))
        torch.testing.assert_close(kept.objective, fresh.objective, atol=1e-5, rtol=1e-4)
    assert tree.bytes > 0


@pytest.mark.parametrize("H", [1, 4])
def test_a_lazy_tree_leaves_the_last_step_to_complete(model, H):
    # With the q terminal J never reads the last step's p and c: a lazy tree leaves them NaN
    # (the same J), and `complete` fills them in as a full tree computes them, for any subset.
    B, K = 2, 24
    state, h, goal = history(model, B)
    actions = torch.randint(0, 4, (B, K, H), generator=torch.Generator().manual_seed(8))
    full = PrefixTree(model, state, h, goal, "q").score(actions, 0.9)
    tree = PrefixTree(model, state, h, goal, "q", lazy_last=True)
    lazy = tree.score(actions, 0.9)
    assert lazy.reward[..., -1].isnan().all() and lazy.cont[..., -1].isnan().all()
    torch.testing.assert_close(lazy.objective, full.objective)
    torch.testing.assert_close(lazy.reward[..., :-1], full.reward[..., :-1])
    pick = torch.tensor([[3, 0, 17], [5, 5, 1]])
    with CountingNext(model) as rows:
        done = tree.complete(lazy.select(pick))
    assert rows == []  # the picked sequences are known: nothing is stepped
    expected = full.select(pick)
    for name in ("reward", "cont", "value", "objective"):
        torch.testing.assert_close(getattr(done, name), getattr(expected, name),
                                   atol=1e-5, rtol=1e-4)
    assert tree.complete(done) is done  # nothing left to fill


def test_one_step_search_with_the_q_terminal_is_greedy_q(model):
    # Horizon 1 steps nothing: each candidate is one action scored by Q, so the plan is Q's
    # argmax over the actions the planner proposes (all but the excluded no-op).
    state, h, goal = history(model, 3)
    result = small_planner("cem", horizon=1, terminal="q").plan(
        model, state, h, goal, generator=torch.Generator().manual_seed(0))
    q = torch.sigmoid(model.q(h, goal))  # (B, A)
    q[:, list(SearchConfig.excluded)] = -1.0
    assert torch.equal(result.action, q.argmax(-1))
    torch.testing.assert_close(result.objective, q.amax(-1))


def test_an_unknown_terminal_is_refused():
    with pytest.raises(ValueError, match="terminal must be one of value, q, got 'mean'"):
        small_planner("cem", terminal="mean")
    reward = torch.rand(2, 3)
    with pytest.raises(ValueError, match="terminal must be one of"):
        objective(reward, reward, reward[:, 0], 0.9, terminal="mean")


@pytest.mark.parametrize("terminal", ["value", "q"])
@pytest.mark.parametrize("name", SEARCH_PLANNERS)
def test_plan_agrees_with_the_world_models_imagination(model, name, terminal):
    state, h, goal = history(model, 2)
    result = small_planner(name, terminal=terminal).plan(model, state, h, goal, decode=True)
    ref = model.imagine(state.clone(), h, result.actions, goal, decode_frames=True)
    if terminal == "q":  # Q of the last action, from the history before it
        q = model.q(ref["h"][:, -2], goal).gather(-1, result.actions[:, -1:])[:, 0]
        ref["value"] = q
    # Batches of other sizes round differently, and an untrained decoder has near-ties that an
    # argmax can then flip in a cell, so agreement is close, not bitwise.
    for key in ("reward", "cont", "value"):
        torch.testing.assert_close(
            getattr(result, key), torch.sigmoid(ref[key]), atol=1e-3, rtol=1e-2
        )
    assert (result.image == ref["image"]).float().mean() > 0.99


def test_objective_treats_the_goal_as_the_end():
    # Certain success at step 0 ends the task: nothing after it counts.
    reward = torch.tensor([1.0, 1.0, 1.0])
    cont = torch.ones(3)
    assert objective(reward, cont, torch.tensor(1.0), 0.9).item() == pytest.approx(1.0)
    # Half a chance at each step, then the value: 0.5 + 0.9 * 0.25 + 0.81 * 0.125 + 0.729 * 0.125
    reward = torch.full((3,), 0.5)
    expect = 0.5 + 0.9 * 0.25 + 0.81 * 0.125 + 0.729 * 0.125 * 1.0
    assert objective(reward, cont, torch.tensor(1.0), 0.9).item() == pytest.approx(expect)
    # An episode that surely ends after step 0 earns neither later rewards nor the value.
    cont = torch.tensor([0.0, 1.0, 1.0])
    assert objective(reward, cont, torch.tensor(1.0), 0.9).item() == pytest.approx(0.5)


def test_make_planner_rejects_unknown_names_and_foreign_configs():
    with pytest.raises(ValueError, match="unknown planner"):
        make_planner("mcts")
    with pytest.raises(TypeError, match="CEMConfig"):
        make_planner("cem", MPPIConfig())
    assert isinstance(make_planner("mppi"), MPPI)


# ------------------------------------------------------------------------------- behaviour


@dataclass
class MatchState(BatchState):
    """matched: (B,) 1 while every action so far equals the target's; t: actions taken."""

    matched: Tensor
    t: int = 0


class TargetSequenceModel(WorldModel):
    """A debug world model whose dynamics and heads are replaced by a known toy: the goal is
    achieved exactly by the action that completes `target`, and never otherwise.

    h carries (matched, actions taken / 10) in its first two channels. Decoding and encoding
    stay the real (untrained) networks, so the planner's imagination loop runs as usual.
    """

    def __init__(self, target: list[int]):
        super().__init__(preset("debug"))
        self.target = target

    def start(self, batch: int) -> tuple[MatchState, Tensor]:
        """The state and history h (B, d) at the first observation."""
        h = torch.zeros(batch, self.cfg.d_model)
        h[:, 0] = 1.0
        return MatchState(torch.ones(batch)), h

    def branch(self, state: MatchState) -> MatchState:
        return state.clone()

    def next(self, state: MatchState, z: Tensor, prev_action: Tensor) -> tuple[Tensor, MatchState]:
        want = self.target[state.t] if state.t < len(self.target) else -1
        matched = state.matched * (prev_action == want)
        h = z.new_zeros(z.shape[0], self.cfg.d_model)
        h[:, 0], h[:, 1] = matched, (state.t + 1) / 10
        return h, MatchState(matched, state.t + 1)

    def steps(self, h: Tensor) -> Tensor:
        return (h[..., 1] * 10).round().long()

    def reward(self, h: Tensor, action: Tensor, g=None, psi=None) -> Tensor:
        last = len(self.target) - 1
        completes = h[..., 0] * (self.steps(h) == last) * (action == self.target[last])
        return 20 * completes - 10

    def cont(self, h: Tensor, action: Tensor) -> Tensor:
        return torch.full_like(h[..., 0], 10.0)

    def q(self, h: Tensor, g=None, psi=None) -> Tensor:
        return torch.full((*h.shape[:-1], self.cfg.n_actions), -10.0)

    def reward_folded(self, fold, h: Tensor, action: Tensor, env: Tensor) -> Tensor:
        return self.reward(h, action)

    def q_folded(self, fold, h: Tensor, env: Tensor) -> Tensor:
        return self.q(h)


def target_prior(target: list[int]):
    """A policy prior that knows the target sequence: reads the step from h."""

    def prior(h: Tensor, goal: Tensor) -> Tensor:
        t = (h[:, 1] * 10).round().long().clamp(max=len(target) - 1)  # (N,)
        return 5.0 * torch.nn.functional.one_hot(torch.tensor(target)[t], 7).float()

    return prior


@pytest.mark.parametrize("name", SEARCH_PLANNERS)
def test_finds_the_rewarded_sequence(name):
    target = [3, 5, 1]  # 1 in 343 random sequences
    model = TargetSequenceModel(target).eval()
    B = 8
    state, h = model.start(B)
    planner = make_planner(
        name, PLANNERS[name][1](horizon=5, candidates=512, iterations=4, elites=16)
    )
    result = planner.plan(
        model, state, h, torch.zeros(B, 384), generator=torch.Generator().manual_seed(0)
    )
    # Chance would pick the first action 3 for 1 env in 7; one random sequence in 343 is right.
    assert (result.action == 3).float().mean() >= 0.75
    hit = (result.actions[:, :3] == torch.tensor(target)).all(1)
    assert hit.float().mean() >= 0.75
    # Achieved on arriving at o_3, two steps after the first reward could come: gamma^2.
    gamma = planner.cfg.discount
    expect = torch.full((int(hit.sum()),), gamma**2)
    torch.testing.assert_close(result.objective[hit], expect, atol=1e-3, rtol=0)  # sigmoid(10) < 1


def test_mppi_uses_its_policy_prior():
    target = [3, 5, 1, 6, 2]  # 1 in 16,807: out of reach of 32 random candidates
    model = TargetSequenceModel(target).eval()
    B = 4
    state, h = model.start(B)
    goal = torch.zeros(B, 384)
    cfg = MPPIConfig(horizon=6, candidates=32, iterations=2, elites=8, prior_share=0.25)
    with_prior = MPPI(cfg, prior=target_prior(target)).plan(
        model, state, h, goal, generator=torch.Generator().manual_seed(0)
    )
    assert (with_prior.actions[:, :5] == torch.tensor(target)).all()
    assert (with_prior.objective > 0.99 * cfg.discount**4).all()
    cfg.q_prior = False
    without = MPPI(cfg).plan(model, state, h, goal, generator=torch.Generator().manual_seed(0))
    assert (without.objective < 0.1).all()


def test_mppi_default_prior_is_the_q_head():
    torch.manual_seed(0)
    model = WorldModel(preset("debug")).eval()
    state, h, goal = history(model, 2)
    planner = MPPI(MPPIConfig(prior_temperature=0.5))
    expected = model.q(h, goal) / 0.5
    expected[:, 6] = float("-inf")  # "done" is excluded
    torch.testing.assert_close(planner.proposal(model)(h, goal), expected)
    # with the plan's goals folded in, for k rollouts an environment laid out env-major
    k = 3
    rows = h.repeat_interleave(k, dim=0) + 0.1 * torch.randn(2 * k, h.shape[1])
    folded = planner.proposal(model, goal, k)(rows, goal.repeat_interleave(k, dim=0))
    expected = model.q(rows, goal.repeat_interleave(k, dim=0)) / 0.5
    expected[:, 6] = float("-inf")
    torch.testing.assert_close(folded, expected, atol=1e-5, rtol=1e-5)
    assert MPPI(MPPIConfig(q_prior=False)).proposal(model) is None


def test_greedy_q_takes_the_best_q_action(model):
    state, h, goal = history(model, 3)
    result = make_planner("greedy").plan(model, state, h, goal, decode=True)
    now = torch.stack([model.reward(h, torch.full((3,), a), goal) for a in range(7)], -1)
    q = torch.maximum(model.q(h, goal), now)  # floored at the reward head
    q[:, 6] = float("-inf")
    assert torch.equal(result.action, q.argmax(-1))
    assert result.actions.shape == (3, 1) and result.image.shape == (3, 1, 7, 7, 3)
    torch.testing.assert_close(result.value, torch.sigmoid(q.amax(-1)))


def test_greedy_q_is_floored_at_the_reward_heads_one_step_success():
    """Q flat, the reward head sure that toggle achieves the goal now: toggle is taken (a
    locked door faced with its key, before TD has carried the reward into Q)."""
    from lwm.planning import GreedyQConfig

    model = TargetSequenceModel([5]).eval()
    state, h = model.start(4)
    goal = torch.zeros(4, 384)
    floored = make_planner("greedy").plan(model, state, h, goal)
    assert (floored.action == 5).all()
    assert (floored.value > 0.99).all()
    flat = make_planner("greedy", GreedyQConfig(reward_floor=False)).plan(model, state, h, goal)
    assert (flat.action == 0).all()  # argmax of a flat Q: the first action


@pytest.mark.parametrize("name", ["greedy", *SEARCH_PLANNERS])
def test_forbidden_actions_are_never_taken_now(name):
    """forbid (B, A) rules actions out of the first step: the rewarded action when it is
    forbidden, and all but one action in another env, which must then take that one."""
    from lwm.planning import GreedyQConfig

    model = TargetSequenceModel([5]).eval()
    state, h = model.start(3)
    goal = torch.zeros(3, 384)
    forbid = torch.zeros(3, 7, dtype=torch.bool)
    forbid[0, 5] = True  # the only rewarded action
    forbid[1, [0, 1, 2, 3, 5]] = True  # leaves drop (4); done (6) is excluded anyway
    cfg = (GreedyQConfig(epsilon=1.0) if name == "greedy"
           else PLANNERS[name][1](**{**SMALL, "horizon": 2}))
    for seed in range(5):
        result = make_planner(name, cfg).plan(
            model, state, h, goal, generator=torch.Generator().manual_seed(seed), forbid=forbid)
        assert result.action[0] != 5 and result.action[1] == 4, result.action
        assert result.action[2] == 5 or name == "greedy"  # greedy here acts at random
    with pytest.raises(ValueError, match="rules out every action"):
        make_planner(name, cfg).plan(model, state, h, goal,
                                     forbid=torch.ones(3, 7, dtype=torch.bool))


@pytest.mark.parametrize("name", ["greedy", *SEARCH_PLANNERS])
def test_repeats_are_played_down_by_the_repeat_penalty(name):
    """Action 5 is the only rewarded one; taken 3 times from this view already, a penalty of
    0.5 a repeat puts it below every other action, and without a penalty the counts are
    ignored."""
    from lwm.planning import GreedyQConfig

    model = TargetSequenceModel([5]).eval()
    state, h = model.start(2)
    goal = torch.zeros(2, 384)
    tried = torch.zeros(2, 7)
    tried[0, 5] = 3.0
    for penalty in (0.0, 0.5):
        cfg = (GreedyQConfig(repeat_penalty=penalty) if name == "greedy"
               else PLANNERS[name][1](**{**SMALL, "horizon": 2, "repeat_penalty": penalty}))
        result = make_planner(name, cfg).plan(
            model, state, h, goal, generator=torch.Generator().manual_seed(0), tried=tried)
        assert result.action[1] == 5  # no repeats in env 1
        assert (result.action[0] == 5) == (penalty == 0.0), (penalty, result.action)


def test_epsilon_greedy_q_mixes_in_the_exploration_distribution(model):
    from lwm.envs import EXPLORATION_PROBS
    from lwm.planning import GreedyQConfig

    state, h, goal = history(model, 1)
    h, goal = h.expand(4000, -1), goal.expand(4000, -1)
    greedy = make_planner("greedy").plan(model, state, h, goal).action
    cfg = GreedyQConfig(epsilon=0.3)
    gen = torch.Generator().manual_seed(0)
    actions = make_planner("greedy", cfg).plan(model, state, h, goal, generator=gen).action
    again = make_planner("greedy", cfg).plan(
        model, state, h, goal, generator=torch.Generator().manual_seed(0)).action
    assert torch.equal(actions, again)  # the episode's generator makes it reproducible
    counts = torch.bincount(actions, minlength=7).float() / len(actions)
    expected = 0.3 * torch.tensor(EXPLORATION_PROBS)
    expected[greedy[0]] += 0.7
    torch.testing.assert_close(counts, expected, atol=0.03, rtol=0)
    assert counts[6] == 0  # never the excluded no-op
    with pytest.raises(ValueError, match="epsilon must be in"):
        GreedyQConfig(epsilon=1.5)
