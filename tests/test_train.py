"""Hindsight relabeling and the Dyna trainer: targets, checkpoints, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import lwm.train
from lwm.agent import Agent, agent_settings
from lwm.data.relabel import GoalVocab, relabel
from lwm.goals import parse_goal
from lwm.language.mission import BabyAIMissionParser
from lwm.models.world_model import CheckpointError
from lwm.planning import GreedyQ, GreedyQConfig
from lwm.tasks import load_suite
from lwm.train import TrainConfig, Trainer, trim_padding

DEBUG = dict(preset="debug", collect_per_iter=6, updates_per_iter=3, batch_size=4, seq_len=8)


class _Batch:
    """The fields of a SequenceBatch that relabel reads."""

    def __init__(self, achieved, mask):
        self.achieved = achieved
        self.mask = np.array(mask)
        self.action = np.zeros(self.mask.shape, np.int64)


def test_relabel_targets():
    vocab = GoalVocab(["go to the red ball", "pick up the red ball", "go to the blue key",
                       "open the red door", "go to the green box", "drop the grey key",
                       "open the blue door"])  # more goals than slots: slots are sampled
    # arriving at obs 2: go to the red ball; at obs 3: pick it up; obs 4 is padding.
    batch = _Batch([[[], [], ["go to the red ball"], ["pick up the red ball", "held out"], []]],
                   [[True, True, True, False]])
    goals = relabel(batch, vocab, np.random.default_rng(0), n_goals=6, n_future=2)
    assert goals.goal.shape == (1, 4, 6)
    assert not goals.mask[0, 3].any() and goals.mask[0, :3].all()
    go, pick = vocab.index["go to the red ball"], vocab.index["pick up the red ball"]
    # step 1 leads to obs 2 where "go to" is achieved: slot 0 holds it, with reward 1
    assert goals.goal[0, 1, 0] == go and goals.reward[0, 1, 0] == 1
    # step 0: both achievements lie ahead: they fill the hindsight slots, with reward 0
    assert set(goals.goal[0, 0, :2].tolist()) == {go, pick}
    # every slot's reward agrees with what is achieved at the next observation
    for t in range(3):
        for k, g in enumerate(goals.goal[0, t]):
            assert goals.reward[0, t, k] == (vocab.texts[g] in batch.achieved[0][t + 1])


def test_relabel_draws_distinct_future_goals_weighted_by_how_often_they_are_achieved():
    vocab = GoalVocab([f"go to the {c} ball" for c in ("red", "blue", "green", "grey", "purple",
                                                       "yellow")])
    red, blue = "go to the red ball", "go to the blue ball"
    # nothing is achieved at obs 1; red later at obs 2, 3 and 4, blue once at obs 5
    batch = _Batch([[[], [], [red], [red], [red], [blue]]], [[True] * 5])
    rng = np.random.default_rng(0)
    draws = [relabel(batch, vocab, rng, n_goals=4, n_future=1) for _ in range(2000)]
    share = np.mean([d.goal[0, 0, 0] == vocab.index[red] for d in draws])
    assert share == pytest.approx(0.75, abs=0.04)  # red is achieved 3 times of 4 later on
    # with room for two, step 0 always holds both, once each, and rewards stay 0 (nothing now)
    two = relabel(batch, vocab, rng, n_goals=4, n_future=2)
    assert sorted(two.goal[0, 0, :2].tolist()) == sorted([vocab.index[red], vocab.index[blue]])
    assert not two.reward[0, 0].any()
    # step 3 arrives where red is achieved: slot 0 holds it; blue (later) follows in slot 1
    assert two.goal[0, 3, :2].tolist() == [vocab.index[red], vocab.index[blue]]
    assert two.reward[0, 3].tolist() == [float(g == vocab.index[red]) for g in two.goal[0, 3]]


def test_a_small_vocabulary_scores_every_goal_at_every_step():
    vocab = GoalVocab(["go to the red ball", "go to the blue key", "go to the green box"])
    batch = _Batch([[[], ["go to the blue key"], ["go to the red ball", "held out"], []]],
                   [[True, True, False]])
    goals = relabel(batch, vocab, np.random.default_rng(0), n_goals=4)
    assert goals.goal.shape == (1, 3, 3)
    assert (goals.goal[0] == np.arange(3)).all()
    assert goals.mask[0, :2].all() and not goals.mask[0, 2].any()
    # step 0 arrives where the blue key is reached, step 1 where the red ball is; step 2 is padding
    assert goals.reward[0].tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 0]]


def test_trimming_padding_leaves_the_loss_unchanged(tmp_path):
    cfg = TrainConfig(episodes=8, **{**DEBUG, "seq_len": 80, "batch_size": 3})
    trainer = Trainer(cfg, tmp_path, progress=False)
    trainer.collect(8)
    trainer.sampler.refresh()
    batch = trainer.sampler.sample(3, np.random.default_rng(1))
    goals = relabel(batch, trainer.vocab, np.random.default_rng(2), cfg.n_goals)
    full = batch.to_torch() | {
        "prev_action": torch.full((3,), trainer.model.START),
        "goal": torch.from_numpy(goals.goal), "goal_reward": torch.from_numpy(goals.reward),
        "goal_mask": torch.from_numpy(goals.mask)}
    trimmed = trim_padding(full)
    steps = int(batch.mask.sum(1).max())
    assert steps < 80  # babyai-goto episodes end within 64 steps
    assert trimmed["action"].shape[1] == steps and trimmed["image"].shape[1] == steps + 1
    torch.manual_seed(0)
    _, a = trainer.model.loss(full, trainer.goal_table)
    _, b = trainer.model.loss(trimmed, trainer.goal_table)
    assert a == pytest.approx(b, rel=1e-5)


def test_bf16_precision_runs_the_loss_in_bf16_and_keeps_fp32_weights(tmp_path):
    trainer = Trainer(TrainConfig(episodes=8, precision="bf16", **DEBUG), tmp_path,
                      progress=False)
    trainer.collect(8)
    seen = []
    hook = trainer.model.reward_head.state_mlp[0].register_forward_hook(
        lambda module, args, out: seen.append(out.dtype))
    metrics = trainer.fit(2)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert np.isfinite(list(metrics.values())).all()
    seen.clear()
    trainer.bf16 = False
    hook = trainer.model.reward_head.state_mlp[0].register_forward_hook(
        lambda module, args, out: seen.append(out.dtype))
    trainer.fit(1)
    hook.remove()
    assert set(seen) == {torch.float32}
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        Trainer(TrainConfig(episodes=8, precision="fp16", **DEBUG), tmp_path / "other",
                progress=False)
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("avx512_bf16, amx, expected", [
    (False, False, False), (True, False, True), (False, True, True)])
def test_auto_precision_is_bf16_only_on_cpus_that_multiply_bf16_natively(
        monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16,
                        raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert lwm.train._use_bf16("auto") is expected
    assert not lwm.train._use_bf16("fp32")
    if expected:
        assert lwm.train._use_bf16("bf16")
    else:  # asked for, and done, but the user hears it will be slow here
        with pytest.warns(RuntimeWarning, match="no native bf16 matmuls"):
            assert lwm.train._use_bf16("bf16")


def test_trainer_runs_saves_and_refuses_a_different_setup(tmp_path):
    cfg = TrainConfig(episodes=12, **DEBUG)
    metrics = Trainer(cfg, tmp_path, progress=False).run()
    assert np.isfinite(list(metrics.values())).all()
    state = json.loads((tmp_path / "trainer.json").read_text())["state"]
    assert state["updates"] == 6 and state["iterations"] == 2
    assert state["collect_s"] > 0 and state["fit_s"] > 0
    assert state["train_s"] == pytest.approx(state["collect_s"] + state["fit_s"], rel=1e-3)
    assert len(list((tmp_path / "episodes").glob("*.npz"))) == 12
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["episodes"] == 12
    with pytest.raises(CheckpointError, match="backbone: run has 'mamba2', asked for 'gru'"):
        Trainer(TrainConfig(episodes=12, backbone="gru", **DEBUG), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="decoder: run has 'map', asked for 'ego'"):
        Trainer(TrainConfig(episodes=12, decoder="ego", **DEBUG), tmp_path, progress=False)


def test_the_auto_decoder_is_map_for_new_runs_and_the_runs_own_otherwise(tmp_path):
    new = Trainer(TrainConfig(episodes=6, **DEBUG), tmp_path / "new", progress=False)
    assert TrainConfig().decoder == "auto"
    assert new.cfg.decoder == new.model.cfg.decoder == "map"
    new.store.close()
    Trainer(TrainConfig(episodes=6, decoder="mlp", **DEBUG), tmp_path / "mlp", progress=False).run()
    resumed = Trainer(TrainConfig(episodes=12, **DEBUG), tmp_path / "mlp", progress=False)
    assert resumed.cfg.decoder == resumed.model.cfg.decoder == "mlp"
    assert resumed.state["updates"] == 3  # resumed (one iteration of 3 updates), not refused
    resumed.store.close()
    started = Trainer(TrainConfig(episodes=0, init_from=str(tmp_path / "mlp"), **DEBUG),
                      tmp_path / "tuned", progress=False)
    assert started.model.cfg.decoder == "mlp"  # the weights it starts from fit
    started.save()
    saved = json.loads((tmp_path / "tuned" / "trainer.json").read_text())["config"]
    assert saved["decoder"] == "mlp"  # what "auto" meant is written down


def test_init_from_starts_a_new_run_from_another_runs_weights(tmp_path):
    source = Trainer(TrainConfig(episodes=6, **DEBUG), tmp_path / "source", progress=False)
    source.run()
    weights = {k: v.clone() for k, v in source.model.state_dict().items()}
    fresh = Trainer(TrainConfig(episodes=0, seed=1, **DEBUG), tmp_path / "fresh", progress=False)
    tuned = Trainer(TrainConfig(episodes=0, seed=1, init_from=str(tmp_path / "source"), **DEBUG),
                    tmp_path / "tuned", progress=False)
    for name, value in tuned.model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert any(not torch.equal(v, weights[k]) for k, v in fresh.model.state_dict().items())
    tuned.save()  # a resumed run reads its own checkpoint, not `init_from` again
    tuned.store.close()
    (tmp_path / "source" / "model" / "model.safetensors").unlink()
    again = Trainer(TrainConfig(episodes=0, seed=1, init_from=str(tmp_path / "source"), **DEBUG),
                    tmp_path / "tuned", progress=False)
    assert all(torch.equal(v, weights[k]) for k, v in again.model.state_dict().items())
    with pytest.raises(CheckpointError, match="checkpoint config does not match"):
        Trainer(TrainConfig(episodes=0, backbone="gru", init_from=str(tmp_path / "source"),
                            **DEBUG), tmp_path / "gru", progress=False)
    with pytest.raises(CheckpointError, match="ships no checkpoint"):
        Trainer(TrainConfig(episodes=0, init_from="shipped:no-such-suite", **DEBUG),
                tmp_path / "none", progress=False)


def test_held_out_goals_never_enter_training(tmp_path):
    trainer = Trainer(TrainConfig(episodes=6, **DEBUG), tmp_path, progress=False)
    assert "go to the blue ball" not in trainer.vocab  # held out in babyai-goto
    assert "go to the red ball" in trainer.vocab
    assert trainer.goal_table.shape == (len(trainer.vocab), 384)
    # the suite vocabulary: babyai-goto's verb and types only
    assert "pick up the red ball" not in trainer.vocab
    assert "go to the red door" not in trainer.vocab
    everything = Trainer(TrainConfig(episodes=6, goal_vocab="all", **DEBUG), tmp_path / "all",
                         progress=False).vocab
    assert {"pick up the red ball", "go to the red ball"} <= set(everything.texts)
    assert "go to the blue ball" not in everything


def test_resume_after_kill_loses_nothing_on_disk(tmp_path):
    """SIGKILL a training process after its first checkpoint; a new Trainer resumes from it."""
    code = (
        "from lwm.train import TrainConfig, Trainer, trim_padding\n"
        f"Trainer(TrainConfig(episodes=600, **{DEBUG!r}), {str(tmp_path)!r}, "
        "progress=False).run()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": "."},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "trainer.json").exists():
            assert proc.poll() is None and time.time() < deadline, "trainer died or stalled"
            time.sleep(0.2)
        time.sleep(2.0)  # let it store episodes past the checkpoint
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = json.loads((tmp_path / "trainer.json").read_text())["state"]
    stored = len(list((tmp_path / "episodes").glob("*.npz")))
    assert stored >= 6 and saved["updates"] >= 3
    resumed = Trainer(TrainConfig(episodes=stored + 6, **DEBUG), tmp_path, progress=False)
    assert resumed.state == saved and len(resumed.store) == stored
    resumed.run()
    assert len(resumed.store) == stored + 6
    assert resumed.state["updates"] == saved["updates"] + 3
    # training seeds continue where the killed run stopped: no episode is collected twice
    seeds = [resumed.store[i].meta["seed"] for i in range(len(resumed.store))]
    assert len(seeds) == len(set(seeds))


def test_policy_collection_after_warmup(tmp_path):
    # warm-up: the first 6 episodes explore; then 4 of every 6 come from the Q policy
    cfg = TrainConfig(episodes=12, warmup_episodes=6, policy_share=0.67, policy_envs=3, **DEBUG)
    trainer = Trainer(cfg, tmp_path, progress=False)
    trainer.run()
    metas = [trainer.store[i].meta for i in range(len(trainer.store))]
    policies = [m["policy"] for m in metas]
    assert policies[:6] == ["explore"] * 6
    assert policies[6:].count("q-epsilon-greedy") == 4 and policies[6:].count("explore") == 2
    seeds = [m["seed"] for m in metas]
    assert len(set(seeds)) == 12  # no training seed is collected twice
    for m in metas:
        if m["policy"] == "q-epsilon-greedy":
            assert cfg.epsilon_min <= m["epsilon"] <= cfg.epsilon_max
    # every episode ends on termination or the step limit, and its mission's split is "train"
    env = trainer.suite.make_env()
    for i in range(len(trainer.store)):
        ep = trainer.store[i]
        assert ep.num_steps <= trainer.suite.max_steps
        env.reset(seed=ep.meta["seed"])
        assert trainer.suite.split_of_episode(env) == "train"


def test_stepping_stone_episodes_pursue_scene_goals_before_the_mission(tmp_path):
    from lwm.envs.language import instr_goals, scene_goals

    cfg = TrainConfig(episodes=0, suite="balrog-babyai", stepping_stones=1.0,
                      exploration="affordance", **DEBUG)
    trainer = Trainer(cfg, tmp_path, progress=False)
    seeds = trainer.suite.seeds_for("train", 6, evaluation=False)
    episodes = trainer.policy_episodes(seeds)
    env = trainer.suite.make_env()
    for ep in episodes:
        stones = ep.meta["stepping_stones"]
        assert 1 <= len(stones) <= 2 and len(set(stones)) == len(stones)
        env.reset(seed=ep.meta["seed"])
        assert set(stones) <= {g.text for g in scene_goals(env)}
        mission = instr_goals(env.unwrapped.instrs)
        assert not any(g.matches(parse_goal(t), set(), set()) for g in mission for t in stones)
    plain = Trainer(TrainConfig(episodes=0, suite="balrog-babyai", **DEBUG), tmp_path / "p",
                    progress=False)
    assert all("stepping_stones" not in e.meta for e in plain.policy_episodes(seeds))


def test_affordance_exploration_opens_locked_doors_that_plain_exploration_never_opens(tmp_path):
    from lwm.data import EpisodeRecorder
    from lwm.train import explore_episode

    env = load_suite("balrog-babyai").make_env()
    seeds = [s for s in range(600) if env.reset(seed=s) and
             env.unwrapped.instrs.surface(env.unwrapped).startswith("open")][:40]
    opened = {}
    for exploration in ("plain", "affordance"):
        rng = np.random.default_rng(0)
        episodes = [explore_episode(env, s, rng, EpisodeRecorder(), exploration=exploration)
                    for s in seeds]
        opened[exploration] = sum(any(g.startswith("open") for step in e.achieved for g in step)
                                  for e in episodes)
    assert opened["affordance"] >= 3 and opened["plain"] == 0
    with pytest.raises(ValueError, match="unknown exploration 'greedy'"):
        Trainer(TrainConfig(episodes=0, exploration="greedy", **DEBUG), tmp_path / "x",
                progress=False)


def test_policy_episodes_follow_the_greedy_q_policy_without_exploration(tmp_path):
    cfg = TrainConfig(episodes=0, epsilon_min=1e-9, epsilon_max=1e-9, **DEBUG)
    trainer = Trainer(cfg, tmp_path, progress=False)
    seeds = trainer.suite.seeds_for("train", 2, evaluation=False)
    a = trainer.policy_episodes(seeds)
    b = trainer.policy_episodes(seeds)  # batched (2 envs) and greedy: deterministic
    assert [e.action.tolist() for e in a] == [e.action.tolist() for e in b]
    assert all(6 not in e.action.tolist() for e in a)  # never "done"


def test_periodic_greedy_evaluation_logs_a_learning_curve_and_leaves_training_alone(tmp_path):
    common = dict(episodes=12, warmup_episodes=6, policy_envs=3, eval_episodes=5, **DEBUG)
    plain = Trainer(TrainConfig(eval_every=0, **common), tmp_path / "plain", progress=False)
    plain.run()
    curve = Trainer(TrainConfig(eval_every=6, **common), tmp_path / "curve", progress=False)
    curve.run()
    lines = [json.loads(x) for x in (tmp_path / "curve" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval_success" in x]
    # the first point is the agent before any training (episode 0)
    assert [x["episodes"] for x in evals] == [0, 6, 12]
    assert [x["updates"] for x in evals][0] == 0 and evals[0]["train_s"] == 0
    assert all(0 <= x["eval_success"] <= 1 for x in evals)
    assert all(x["train_s"] > 0 for x in evals[1:])
    # --episodes 0: only the evaluation before training; a run shorter than eval_every: none
    only = Trainer(TrainConfig(**{**common, "episodes": 0, "eval_every": 6}), tmp_path / "only",
                   progress=False)
    assert "eval_success" in only.run() and len(only.store) == 0
    short = Trainer(TrainConfig(**{**common, "episodes": 6, "eval_every": 50}), tmp_path / "short",
                    progress=False)
    assert "eval_success" not in short.run()
    # the logged rate is the deployed agent's (grammar parser, greedy Q with the repeat penalty)
    # on the first evaluation seeds (held out from training)
    assert curve.model.training  # evaluation hands the model back in training mode
    seeds = curve.suite.seeds_for(None, 5)
    agent = Agent(curve.model, GreedyQ(GreedyQConfig(discount=curve.model.cfg.discount,
                                                     repeat_penalty=0.1)), BabyAIMissionParser())
    env = curve.suite.make_env()
    again = [agent.run(env.reset(seed=s)[0]["mission"], env, seed=s).success for s in seeds]
    assert evals[-1]["eval_success"] == np.mean(again)
    # ... and the run recommends that agent: loaded from the run, it acts as it was evaluated
    assert not (tmp_path / "plain" / "model" / "agent.json").exists()
    settings = agent_settings(tmp_path / "curve")
    assert settings["planner"] == "greedy" and settings["planner_cfg"]["repeat_penalty"] == 0.1
    assert f"after 12 episodes: {evals[-1]['eval_success']:.1%}" in settings["measured"]
    loaded = Agent.from_pretrained(tmp_path / "curve", llm="grammar")
    assert isinstance(loaded.planner, GreedyQ) and loaded.planner.cfg.repeat_penalty == 0.1
    assert not set(seeds) & {curve.store[i].meta["seed"] for i in range(len(curve.store))}
    # evaluating draws nothing from the run's RNG: the same episodes are collected and trained on
    for i in range(12):
        assert plain.store[i].action.tolist() == curve.store[i].action.tolist()
    for a, b in zip(plain.model.parameters(), curve.model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "options",
    [{}, {"suite": "balrog-babyai", "exploration": "affordance", "stepping_stones": 0.5}],
    ids=["defaults", "affordance-stepping-stones"],
)
def test_ray_collection_equals_in_process_collection(tmp_path, options):
    pytest.importorskip("ray")
    common = dict(episodes=12, warmup_episodes=6, policy_share=0.5, policy_envs=2, **options,
                  **DEBUG)
    local = Trainer(TrainConfig(**common), tmp_path / "local", progress=False)
    local.run()
    ray_trainer = Trainer(TrainConfig(workers=2, **common), tmp_path / "ray", progress=False)
    ray_trainer.run()
    assert len(local.store) == len(ray_trainer.store) == 12
    for i in range(12):
        a, b = local.store[i], ray_trainer.store[i]
        assert a.meta == b.meta
        np.testing.assert_array_equal(a.action, b.action)
        np.testing.assert_array_equal(a.image, b.image)
    if options:  # the options reached the workers: some policy episodes took stepping stones
        assert any("stepping_stones" in local.store[i].meta for i in range(12))
