"""The policy trained by actor-critic in imagination: returns, losses, the planner, checkpoints,
the training run and its resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lwm.agent import Agent
from lwm.envs import make_env
from lwm.models.world_model import CheckpointError, WorldModel, preset
from lwm.planning import MPPI, PolicyPlanner, make_planner
from lwm.planning.actor import (
    POLICY_CONFIG,
    POLICY_FILE,
    ActorCriticConfig,
    GoalPolicy,
    PolicyPlannerConfig,
    lambda_returns,
)
from lwm.train_policy import OPTIMIZER_FILE, STATE_FILE, PolicyTrainConfig, PolicyTrainer

torch.set_num_threads(1)


def _model(seed: int = 0) -> WorldModel:
    torch.manual_seed(seed)
    return WorldModel(preset("debug")).eval()


def _start(model: WorldModel, b: int = 5, seed: int = 0):
    """B real-looking start states: a few random observations stepped through the backbone."""
    g = torch.Generator().manual_seed(seed)
    state, prev = model.init_state(b), torch.full((b,), model.START)
    for _ in range(3):
        image = torch.stack([torch.randint(0, n, (b, 7, 7), generator=g) for n in (11, 6, 3)], -1)
        z = model.encode(image, torch.randint(0, 4, (b,), generator=g),
                         torch.zeros(b, 2, dtype=torch.long))
        h, state = model.next(state, z, prev)
        prev = torch.randint(0, 6, (b,), generator=g)
    goal = torch.randn(b, model.cfg.goal_dim, generator=g)
    return state, h, goal


def test_lambda_returns_by_hand():
    p = torch.tensor([[0.1], [0.5]])
    c = torch.tensor([[0.9], [1.0]])
    v = torch.tensor([[0.2], [0.3], [0.4]])
    gamma, lam = 0.9, 0.5
    r1 = 0.5 + gamma * 0.5 * 1.0 * 0.4  # the last step: (1 - lam) v2 + lam R2 = v2
    r0 = 0.1 + gamma * 0.9 * 0.9 * ((1 - lam) * 0.3 + lam * r1)
    assert lambda_returns(p, c, v, gamma, lam)[:, 0].tolist() == pytest.approx([r0, r1])
    td = lambda_returns(p, c, v, gamma, 0.0)[:, 0]  # lambda 0: Q's TD target from v
    assert td.tolist() == pytest.approx([0.1 + gamma * 0.9 * 0.9 * 0.3, r1])


def test_a_fresh_policy_is_the_q_heads_softmax_and_the_planner_acts_on_it():
    model = _model()
    policy = GoalPolicy(ActorCriticConfig(q_temperature=0.5), model)
    state, h, goal = _start(model)
    logits = policy.logits(model, h, goal)
    q = model.q(h, goal)
    assert torch.isinf(logits[:, 6]).all()  # `done` is never proposed
    assert torch.allclose(logits[:, :6], q[:, :6] / 0.5, atol=1e-5)
    plan = PolicyPlanner(policy=policy).plan(model, state, h, goal, decode=True)
    assert torch.equal(plan.action, q[:, :6].argmax(-1))
    assert plan.image.shape == (5, 1, 7, 7, 3) and plan.probs.shape == (5, 1, 7)
    assert ((plan.value >= 0) & (plan.value <= 1)).all()
    forbid = torch.zeros(5, 7, dtype=torch.bool)
    forbid[torch.arange(5), plan.action] = True
    other = PolicyPlanner(policy=policy).plan(model, state, h, goal, forbid=forbid)
    assert not (other.action == plan.action).any()
    tried = torch.zeros(5, 7)
    tried[torch.arange(5), plan.action] = 100.0  # taken from this view over and over
    penalized = PolicyPlanner(PolicyPlannerConfig(repeat_penalty=0.1), policy)
    assert not (penalized.plan(model, state, h, goal, tried=tried).action == plan.action).any()
    with pytest.raises(ValueError, match="needs a trained policy"):
        PolicyPlanner()


def test_the_loss_trains_only_the_policy_and_leaves_the_start_state_alone():
    model = _model().requires_grad_(False)
    policy = GoalPolicy(ActorCriticConfig(horizon=4), model)
    state, h, goal = _start(model)
    kept = state.clone()
    slow = [p.clone() for p in policy.critic_target.parameters()]
    loss, metrics = policy.loss(model, state, h, goal, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and 0.0 <= metrics["return"] <= 1.0
    assert _same_state(state, kept)
    grads = {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for n, g in grads.items()
               if not n.startswith("critic_target"))
    assert grads["actor.out.weight"].abs().sum() > 0 and grads["critic.out.weight"].abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    policy.update_target()
    moved = [not torch.equal(a, b) for a, b in zip(slow, policy.critic_target.parameters(),
                                                    strict=True)]
    assert not any(moved)  # the critic itself has not stepped yet: the EMA stays put
    with torch.no_grad():
        for p in policy.critic.parameters():
            p.add_(1.0)
    policy.update_target()
    assert all(not torch.equal(a, b) for a, b in zip(slow, policy.critic_target.parameters(),
                                                     strict=True))


def _same_state(a, b) -> bool:
    flat_a, flat_b = [], []
    a.map(lambda t: flat_a.append(t) or t)
    b.map(lambda t: flat_b.append(t) or t)
    return all(torch.equal(x, y) for x, y in zip(flat_a, flat_b, strict=True))


def test_save_and_load_round_trip_and_refusals(tmp_path):
    model = _model()
    policy = GoalPolicy(ActorCriticConfig(hidden=32), model)
    with torch.no_grad():
        policy.actor.out.weight.normal_()
    policy.save_pretrained(tmp_path)
    loaded = GoalPolicy.from_pretrained(tmp_path, model)
    _, h, goal = _start(model)
    assert torch.equal(loaded.logits(model, h, goal), policy.logits(model, h, goal))
    assert loaded.cfg == policy.cfg

    other = WorldModel(preset("debug", backbone="gru"))
    with pytest.raises(CheckpointError, match="another config"):
        GoalPolicy.from_pretrained(tmp_path, other)
    with pytest.raises(CheckpointError, match="no trained policy"):
        GoalPolicy.from_pretrained(tmp_path / "nowhere", model)
    meta = json.loads((tmp_path / POLICY_CONFIG).read_text())
    (tmp_path / POLICY_CONFIG).write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(CheckpointError, match="not an lwm goal policy"):
        GoalPolicy.from_pretrained(tmp_path, model)
    (tmp_path / POLICY_CONFIG).write_text(json.dumps(meta))
    (tmp_path / POLICY_FILE).write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt weights"):
        GoalPolicy.from_pretrained(tmp_path, model)


def _checkpoint(tmp_path):
    path = tmp_path / "wm"
    _model().save_pretrained(path)
    return path


def test_training_writes_a_complete_checkpoint_and_resumes_after_a_stop(tmp_path):
    source, out = _checkpoint(tmp_path), tmp_path / "out"
    actor = ActorCriticConfig(hidden=16, horizon=2)
    cfg = PolicyTrainConfig(suite="babyai-goto", updates=3, envs=4, save_every=2, actor=actor)
    PolicyTrainer(source, out, cfg, progress=False).run()
    for name in ("config.json", "model.safetensors", POLICY_FILE, POLICY_CONFIG, STATE_FILE,
                 OPTIMIZER_FILE):
        assert (out / name).is_file(), name
    first = GoalPolicy.from_pretrained(out, WorldModel.from_pretrained(out))
    assert json.loads((out / STATE_FILE).read_text())["state"]["updates"] == 3

    longer = PolicyTrainConfig(suite="babyai-goto", updates=5, envs=4, save_every=2, actor=actor)
    trainer = PolicyTrainer(source, out, longer, progress=False)
    assert trainer.state["updates"] == 3  # resumed, not restarted
    assert all(torch.equal(a, b) for a, b in zip(trainer.policy.state_dict().values(),
                                                 first.state_dict().values(), strict=True))
    trainer.run()
    assert json.loads((out / STATE_FILE).read_text())["state"]["updates"] == 5

    other = PolicyTrainConfig(suite="babyai-goto", updates=6, envs=8, actor=actor)
    with pytest.raises(CheckpointError, match="envs differ"):
        PolicyTrainer(source, out, other, progress=False)
    with pytest.raises(ValueError, match="pass --suite"):
        PolicyTrainer(source, tmp_path / "out2", PolicyTrainConfig(updates=1), progress=False)


def test_agents_act_on_the_trained_policy_alone_and_as_mppis_prior(tmp_path):
    source, out = _checkpoint(tmp_path), tmp_path / "out"
    cfg = PolicyTrainConfig(suite="babyai-goto", updates=1, envs=2,
                            actor=ActorCriticConfig(hidden=16, horizon=2))
    PolicyTrainer(source, out, cfg, progress=False).run()
    agent = Agent.from_pretrained(out, llm=None, planner="policy")
    assert isinstance(agent.planner, PolicyPlanner)
    env = make_env("BabyAI-GoToLocal-v0")
    result = agent.run("go to the red ball", env, seed=1, max_steps=5)
    assert 1 <= result.steps <= 5 and all(0 <= r.action < 6 for r in result.records)
    (out / "agent.json").write_text(json.dumps(
        {"planner": "mppi", "planner_cfg": {"policy_prior": True, "candidates": 16,
                                            "elites": 4, "horizon": 2, "iterations": 1}}))
    mppi = Agent.from_pretrained(out, llm=None).planner
    assert isinstance(mppi, MPPI) and mppi.prior is not None
    assert Agent.from_pretrained(out, llm=None).run("go to the red ball", env, seed=1,
                                                    max_steps=2).steps >= 1
    with pytest.raises(CheckpointError, match="no trained policy"):
        Agent.from_pretrained(source, llm=None, planner="policy")
    assert isinstance(make_planner("policy", policy=GoalPolicy(ActorCriticConfig(),
                                                               _model())), PolicyPlanner)
    assert np.isfinite(json.loads((out / POLICY_CONFIG).read_text())["trained"]["updates"])


def test_cli_train_policy(tmp_path):
    from typer.testing import CliRunner

    from lwm.cli import app

    source, out = _checkpoint(tmp_path), tmp_path / "out"
    result = CliRunner().invoke(app, ["train-policy", "--checkpoint", str(source), "--out",
                                      str(out), "--suite", "babyai-goto", "--updates", "2",
                                      "--envs", "2", "--horizon", "2"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "--planner policy" in " ".join(result.output.split())
    assert json.loads((out / POLICY_CONFIG).read_text())["trained"]["updates"] == 2
    assert json.loads((out / POLICY_CONFIG).read_text())["config"]["horizon"] == 2
    missing = CliRunner().invoke(app, ["train-policy", "--checkpoint", "shipped:babyai-nope",
                                       "--out", str(tmp_path / "x")], terminal_width=200)
    assert missing.exit_code == 2 and "ships no checkpoint for suite 'babyai-nope'" in \
        missing.output
