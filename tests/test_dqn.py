"""The DQN + language-hindsight baseline: relabeling, the Q-network, checkpoints, resume, and a
short real training run on GoToLocal."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from lwm.baselines.dqn import (
    MAX_ACHIEVED,
    N_ACTIONS,
    DQNAgent,
    DQNPolicy,
    DQNRunner,
    GoalQNetwork,
    Replay,
    goal_ids,
    preset,
    relabel,
)
from lwm.data.relabel import GoalVocab
from lwm.envs.language import ACTION_NAMES, instr_goals
from lwm.models.world_model import CheckpointError
from lwm.tasks import load_suite

SUITE = load_suite("babyai-goto")


def _debug(**overrides):
    return preset("debug", **overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A debug run of 8 episodes on GoToLocal (real envs, real MiniLM goal embeddings)."""
    run = tmp_path_factory.mktemp("dqn")
    agent = DQNAgent(_debug(), progress=False)
    state = agent.train(8, run)
    return run, agent, state


# ---------------------------------------------------------------------------------- relabeling


def test_training_goals_leave_held_out_combinations_out():
    goals = SUITE.goal_vocabulary()
    assert len(goals) == len(SUITE.split.train)  # one "go to" goal per training combination
    assert all(g.startswith("go to the ") for g in goals)
    everything = SUITE.goal_vocabulary("all")
    assert set(goals) < set(everything)
    assert all(SUITE.split_of_goal(g) == "train" for g in everything)
    assert "go to the blue ball" not in everything and "pick up the blue ball" not in everything


def _hand_built_episode(vocab, frames=3):
    """Six steps; what is achieved on arriving at each next observation (held-out and
    out-of-vocabulary texts included, as the env reports them)."""
    achieved = [
        [],
        ["go to the red ball"],
        ["go to the blue ball"],  # held out in babyai-goto
        [],
        ["pick up the red ball", "go to the green key"],  # "pick up" is not a suite goal
        [],
    ]
    rng = np.random.default_rng(0)
    steps = [{
        "image": rng.integers(0, 3, (frames, 7, 7, 3), dtype=np.uint8),
        "direction": rng.integers(0, 4, frames).astype(np.uint8),
        "carrying": np.array([1, 0], np.uint8), "action": t % N_ACTIONS,
        "next_image": rng.integers(0, 3, (7, 7, 3), dtype=np.uint8),
        "next_direction": 0, "next_carrying": np.array([1, 0], np.uint8),
        "behaviour": vocab.index["go to the green key"],
        "achieved": goal_ids(texts, vocab, MAX_ACHIEVED),
    } for t, texts in enumerate(achieved)]
    return steps, achieved


def test_relabel_rewards_exactly_the_goals_achieved_at_each_step():
    vocab = GoalVocab(SUITE.goal_vocabulary())
    steps, achieved = _hand_built_episode(vocab)
    replay = Replay(capacity=100, frames=3)
    replay.add_episode(steps)
    assert len(replay) == 6
    rng = np.random.default_rng(1)
    batch = {k: v[:6] for k, v in replay.data.items()}  # every step, in order
    positives_at = set()
    for _ in range(50):
        goal, reward = relabel(batch, len(vocab), rng, n_goals=8, n_episode=3)
        assert goal.shape == reward.shape == (6, 8)
        assert goal.min() >= 0 and goal.max() < len(vocab)  # vocabulary goals only
        for t in range(6):
            for g, r in zip(goal[t], reward[t], strict=True):
                assert r == (vocab.texts[g] in achieved[t]), (t, vocab.texts[g], r)
                positives_at |= {t} if r else set()
            # the pursued goal sits in slot 0
            assert goal[t, 0] == vocab.index["go to the green key"]
            # a step that achieved a vocabulary goal always gets it as a positive (slot 1)
            if t in (1, 4):
                assert reward[t, 1] == 1
            # slots 2..4 are goals the episode achieved (red ball, green key)
            assert {vocab.texts[g] for g in goal[t, 2:5]} <= {"go to the red ball",
                                                               "go to the green key"}
    # positives exactly at the achieving steps; the held-out "go to the blue ball" pays nothing
    assert positives_at == {1, 4}
    assert "go to the blue ball" not in vocab


def test_relabel_samples_vocabulary_goals_uniformly_in_the_free_slots():
    vocab = GoalVocab(SUITE.goal_vocabulary())
    steps, _ = _hand_built_episode(vocab)
    replay = Replay(capacity=10, frames=3)
    replay.add_episode(steps)
    goal, _ = relabel(replay.sample(400, np.random.default_rng(0)), len(vocab),
                      np.random.default_rng(0), n_goals=8, n_episode=3)
    counts = np.bincount(goal[:, 5:].ravel(), minlength=len(vocab))
    assert counts.min() > 0.5 * counts.mean()  # every training goal shows up as a negative


def test_replay_is_a_ring_and_stacks_next_frames():
    vocab = GoalVocab(SUITE.goal_vocabulary())
    steps, _ = _hand_built_episode(vocab)
    replay = Replay(capacity=4, frames=3)
    replay.add_episode(steps)
    assert len(replay) == 4 and replay.pos == 2
    # the two newest transitions overwrote the oldest slots
    assert (replay.data["image"][0] == steps[4]["image"]).all()
    assert (replay.data["image"][1] == steps[5]["image"]).all()
    ids = replay.data["episode_goals"][0]
    assert sorted(vocab.texts[i] for i in ids if i >= 0) == ["go to the green key",
                                                             "go to the red ball"]


# ---------------------------------------------------------------------------------- network


def test_q_network_shapes_and_no_done_action():
    cfg = _debug(frames=3)
    net = GoalQNetwork(cfg)
    image = torch.randint(0, 3, (5, 3, 7, 7, 3), dtype=torch.uint8)
    q = net(image, torch.randint(0, 4, (5, 3)), torch.tensor([[5, 2]] * 5),
            torch.randn(5, 7, cfg.goal_dim))
    assert q.shape == (5, 7, N_ACTIONS)
    # the six useful actions; minigrid's `done` (index 6) has no Q-value, so it is never chosen
    assert N_ACTIONS == ACTION_NAMES.index("done") == 6
    # each goal slot is scored independently: changing one goal changes only its own row
    g = torch.randn(1, 2, cfg.goal_dim)
    g2 = g.clone()
    g2[0, 1] = torch.randn(cfg.goal_dim)
    a, b = net(image[:1], torch.zeros(1, 3), torch.tensor([[1, 0]]), g), net(
        image[:1], torch.zeros(1, 3), torch.tensor([[1, 0]]), g2)
    assert torch.equal(a[0, 0], b[0, 0]) and not torch.equal(a[0, 1], b[0, 1])


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="frames must be >= 1"):
        _debug(frames=0)
    with pytest.raises(ValueError, match="goals_per_transition"):
        _debug(goals_per_transition=3, episode_goals=3)
    with pytest.raises(ValueError, match="unknown DQN preset"):
        preset("huge")


# ---------------------------------------------------------------------------------- training


def test_training_stores_only_training_goals_and_writes_a_run(trained):
    run, agent, state = trained
    assert state["episodes"] == 8 and state["env_steps"] > 0 and state["updates"] > 0
    assert len(agent.replay) == state["env_steps"]  # every step of the 8 episodes is stored
    data = agent.replay.state_arrays()
    for key in ("achieved", "episode_goals", "behaviour"):
        ids = data[key][data[key] >= 0]
        assert ids.max() < len(agent.vocab)
        assert all(SUITE.split_of_goal(agent.vocab.texts[i]) == "train" for i in set(ids))
    for name in ("config.json", "model.safetensors", "goals.json", "goals.safetensors",
                 "trainer.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "trainer.json").read_text())
    assert (run / saved["tensors"]).is_file()
    assert len(list(run.glob("trainer-*.safetensors"))) == 1  # older trainer states are removed
    assert json.loads((run / "goals.json").read_text()) == agent.vocab.texts


def test_checkpoint_round_trip_gives_the_same_actions(trained):
    run, agent, _ = trained
    policy = DQNPolicy.from_pretrained(run)
    env = SUITE.make_env()
    obs, _ = env.reset(seed=SUITE.seeds_for(None, 1)[0])
    rng = np.random.default_rng(0)
    stack = {"image": rng.integers(0, 3, (4, 3, 7, 7, 3)).astype(np.uint8),
             "direction": rng.integers(0, 4, (4, 3)), "carrying": np.array([[1, 0]] * 4)}
    goal = agent.table[:4]
    with torch.no_grad():
        expected = agent.net(torch.as_tensor(stack["image"]), torch.as_tensor(stack["direction"]),
                             torch.as_tensor(stack["carrying"]), goal[:, None])[:, 0]
    assert torch.allclose(policy.q_values(stack, goal), expected)
    assert (policy.act(stack, goal) == expected.argmax(-1).numpy()).all()
    # a greedy episode is deterministic and never takes `done`
    seed = SUITE.seeds_for(None, 1)[0]
    a, b = policy.run(env, seed), policy.run(env, seed)
    assert (a.success, a.steps) == (b.success, b.steps)
    assert a.goals == [g.text for g in instr_goals(env.unwrapped.instrs)]
    with pytest.raises(ValueError, match=r"expected images \(N, 3, 7, 7, 3\)"):
        policy.act({**stack, "image": stack["image"][:, :1]}, goal)


def test_refuses_corrupt_and_foreign_checkpoints(trained, tmp_path):
    run, _, _ = trained
    with pytest.raises(CheckpointError, match="not an lwm DQN checkpoint"):
        DQNPolicy.from_pretrained(tmp_path / "nothing-here")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(run, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="corrupt weights"):
        DQNPolicy.from_pretrained(corrupt)
    # the shipped world model is a checkpoint, but not a DQN one
    from lwm.resources import checkpoint

    with pytest.raises(CheckpointError, match="not an lwm DQN config"):
        DQNPolicy.from_pretrained(checkpoint("babyai-goto"))
    resized = tmp_path / "resized"
    shutil.copytree(run, resized)
    cfg = json.loads((resized / "config.json").read_text())
    cfg["config"]["hidden"] += 1
    (resized / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has shape"):
        DQNPolicy.from_pretrained(resized)


def test_resume_continues_counters_and_refuses_a_different_setup(trained, tmp_path):
    run, _, first = trained
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run, resumed_dir)
    # a kill between writing a new trainer state and committing it leaves a stray file behind
    (resumed_dir / "trainer-99999999.safetensors").write_bytes(b"half written")
    agent = DQNAgent(_debug(), progress=False).open(resumed_dir)
    assert agent.state["episodes"] == first["episodes"]
    assert agent.state["env_steps"] == first["env_steps"] == len(agent.replay)
    before = dict(agent.state)
    state = DQNAgent(_debug(), progress=False).train(12, resumed_dir)
    assert state["episodes"] == 12
    assert state["env_steps"] > before["env_steps"] and state["updates"] > before["updates"]
    assert state["next_seed"] > before["next_seed"]  # training seeds are never reused
    lines = [json.loads(x) for x in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["episodes"] == 12
    with pytest.raises(CheckpointError, match="frames: run has 3, asked for 1"):
        DQNAgent(_debug(frames=1), progress=False).open(resumed_dir)


def _checkpoint_with_updates(run) -> bool:
    file = run / "trainer.json"  # written atomically: absent or complete
    return file.exists() and json.loads(file.read_text())["state"]["updates"] > 0


def test_resume_after_sigkill(trained, tmp_path):
    """SIGKILL a training process after a checkpoint; a new agent resumes from it."""
    run, _, _ = trained
    for name in ("goals.json", "goals.safetensors"):  # spares the child loading MiniLM
        shutil.copy(run / name, tmp_path / name)
    code = ("import torch\ntorch.set_num_threads(1)\n"
            "from lwm.baselines.dqn import DQNAgent, preset\n"
            "agent = DQNAgent(preset('debug', save_every=4), progress=False)\n"
            f"agent.train(100_000, {str(tmp_path)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": "."},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not _checkpoint_with_updates(tmp_path):
            assert proc.poll() is None and time.time() < deadline, "training died or stalled"
            time.sleep(0.2)
        time.sleep(0.5)  # let it run past the checkpoint
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = json.loads((tmp_path / "trainer.json").read_text())
    assert saved["state"]["episodes"] >= 4 and saved["state"]["updates"] > 0
    agent = DQNAgent(_debug(), progress=False).open(tmp_path)
    assert agent.state == saved["state"]
    assert agent.rng.bit_generator.state == saved["rng"]
    state = agent.train(saved["state"]["episodes"] + 4, tmp_path)
    assert state["episodes"] == saved["state"]["episodes"] + 4
    assert state["updates"] > saved["state"]["updates"]
    assert state["next_seed"] > saved["state"]["next_seed"]


def test_short_training_lowers_the_td_loss(tmp_path):
    torch.manual_seed(0)
    agent = DQNAgent(_debug(lr=3e-3, updates_per_step=0.0), progress=False)
    agent.train(6, tmp_path)  # collect only: ~300 steps of GoToLocal
    assert len(agent.replay) >= 200
    agent.rng = np.random.default_rng(0)
    fixed = agent.sample()

    def loss() -> float:
        with torch.no_grad():
            return agent.td_loss(*fixed)[0].item()

    start = loss()
    for _ in range(300):
        agent.update()
    assert loss() < 0.5 * start


def test_runner_plays_harness_episodes_like_the_policy(trained):
    import pickle

    from lwm.eval.episodes import EpisodeOutcome, episodes_for

    run, _, _ = trained
    work = pickle.loads(pickle.dumps(DQNRunner(str(run))))()
    episodes = episodes_for(SUITE, 6, paraphrase_share=0.5)
    assert {e.kind for e in episodes} == {"grammar", "paraphrase"}
    policy = DQNPolicy.from_pretrained(run)
    env = SUITE.make_env()
    for episode in episodes:
        out = work(episode)
        assert isinstance(out, EpisodeOutcome) and out.episode is episode and out.agent == "dqn"
        # a paraphrase conditions the policy on its own words; the mission is the env's either way
        words = episode.instruction if episode.kind == "paraphrase" else None
        direct = policy.run(env, episode.seed, instruction=words, max_steps=episode.max_steps)
        assert (out.success, out.steps) == (direct.success, direct.steps)
        assert out.steps == len(out.actions) > 0 and "done" not in out.actions
        assert out.plan_ms_per_action > 0


def test_run_follows_given_goals_instead_of_the_mission(trained):
    run, _, _ = trained
    policy = DQNPolicy.from_pretrained(run)
    env = SUITE.make_env()
    seed = SUITE.seeds_for(None, 1)[0]
    result = policy.run(env, seed, goals=["go to the purple key"])  # a held-out combination
    assert result.goals == result.instruction == ["go to the purple key"]
    assert env.unwrapped.mission == "go to the purple key"
    assert result.steps == SUITE.max_steps or result.success
    with pytest.raises(ValueError, match="not a canonical goal text"):
        policy.run(env, seed, goals=["fetch me a sandwich"])


def test_epsilon_greedy_episodes_are_seeded_per_episode(trained):
    run, _, _ = trained
    env = SUITE.make_env()
    seeds = SUITE.seeds_for(None, 8)
    policy = DQNPolicy.from_pretrained(run, epsilon=0.5)
    one_by_one = [policy.run(env, s) for s in seeds]
    batched = policy.run_many(SUITE.make_env, seeds[::-1], n_envs=3)[::-1]
    assert [(r.success, r.steps) for r in one_by_one] == [(r.success, r.steps) for r in batched]
    assert len({r.steps for r in one_by_one}) > 2  # episodes of different lengths were compared
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\]"):
        DQNPolicy.from_pretrained(run, epsilon=1.5)
