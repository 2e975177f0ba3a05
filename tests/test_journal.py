"""The evaluation journal: finished episodes on disk, an interrupted `lwm eval` resumed."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from lwm.cli import app
from lwm.eval.collect import LocalCollector
from lwm.eval.episodes import episodes_for
from lwm.eval.journal import JOURNAL_NAME, EpisodeJournal, JournalError, run_agents, runner_key
from lwm.eval.runners import BotRunner, LLMOnlyRunner, RandomRunner, make_runner
from lwm.tasks import load_suite

GOTO = load_suite("babyai-goto")
EPISODES = episodes_for(GOTO, 6)
played: list[tuple[str, int]] = []
"""(runner name, seed) of every episode a `Counting` runner played, in order."""
stop_at: list[int] = []
"""Seeds at which a `Counting` runner's worker is interrupted (not a runner field: a field
would give the interrupted run other settings than the one that resumes it)."""


@dataclass(frozen=True)
class Counting:
    """RandomRunner's episodes, each noted in played; Ctrl-C (KeyboardInterrupt) at stop_at."""

    seed: int = 0
    name: str = "random"

    def __call__(self):
        inner = RandomRunner(seed=self.seed, name=self.name)()

        def play(episode):
            if episode.seed in stop_at:
                raise KeyboardInterrupt
            played.append((self.name, episode.seed))
            return inner(episode)

        return play


@pytest.fixture(autouse=True)
def _clear_played():
    played.clear()
    stop_at.clear()


def test_a_resumed_run_plays_only_the_episodes_it_lacks_and_equals_an_unbroken_one(tmp_path):
    journal = EpisodeJournal(tmp_path / JOURNAL_NAME)
    seeds = [e.seed for e in EPISODES]
    stop_at.append(seeds[3])
    with pytest.raises(KeyboardInterrupt):
        run_agents({"random": Counting()}, EPISODES, LocalCollector(), journal,
                   progress=False)
    assert played == [("random", s) for s in seeds[:3]]
    assert len(EpisodeJournal(tmp_path / JOURNAL_NAME)) == 3  # on disk before the interruption

    played.clear()
    stop_at.clear()
    resumed, reused = run_agents({"random": Counting()}, EPISODES, LocalCollector(),
                                 EpisodeJournal(tmp_path / JOURNAL_NAME), progress=False)
    assert played == [("random", s) for s in seeds[3:]] and reused == {"random": 3}
    unbroken, none = run_agents({"random": Counting()}, EPISODES, LocalCollector(),
                                progress=False)
    assert none == {"random": 0}
    strip = [(o.episode, o.success, o.steps, o.actions) for o in unbroken]
    assert [(o.episode, o.success, o.steps, o.actions) for o in resumed] == strip


def test_other_settings_or_other_episodes_are_played_again(tmp_path):
    path = tmp_path / JOURNAL_NAME
    run_agents({"random": Counting()}, EPISODES[:3], LocalCollector(), EpisodeJournal(path),
               progress=False)
    played.clear()
    _, reused = run_agents({"random": Counting(seed=1)}, EPISODES[:3], LocalCollector(),
                           EpisodeJournal(path), progress=False)
    assert reused == {"random": 0} and len(played) == 3  # another agent seed: all again
    capped = episodes_for(GOTO, 3, max_steps=5)  # the same seeds, another step limit
    played.clear()
    _, reused = run_agents({"random": Counting()}, capped, LocalCollector(),
                           EpisodeJournal(path), progress=False)
    assert reused == {"random": 0} and len(played) == 3
    played.clear()
    _, reused = run_agents({"random": Counting()}, EPISODES, LocalCollector(),
                           EpisodeJournal(path), progress=False)
    assert reused == {"random": 3} and played == [("random", e.seed) for e in EPISODES[3:]]


def test_runner_key_follows_settings_and_the_contents_of_a_named_checkpoint(tmp_path):
    assert runner_key(RandomRunner()) == runner_key(RandomRunner())
    assert runner_key(RandomRunner()) != runner_key(RandomRunner(seed=1))
    assert runner_key(RandomRunner()) != runner_key(BotRunner())
    assert runner_key(LLMOnlyRunner()) != runner_key(LLMOnlyRunner(history=8))
    ckpt = tmp_path / "ckpt"
    (ckpt / "model").mkdir(parents=True)
    (ckpt / "model" / "model.safetensors").write_bytes(b"weights one")
    (ckpt / "notes.txt").write_text("not part of the model")
    runner = make_runner("lwm-grammar", checkpoint=str(ckpt))
    before = runner_key(runner)
    (ckpt / "notes.txt").write_text("changed")
    assert runner_key(runner) == before
    (ckpt / "model" / "model.safetensors").write_bytes(b"weights two")  # retrained in place
    assert runner_key(runner) != before


def test_runner_key_of_a_planning_runner_follows_the_planners_defaults(monkeypatch):
    from lwm import planning

    runner = make_runner("lwm-grammar", checkpoint="some/checkpoint")
    before, random_before = runner_key(runner), runner_key(RandomRunner())
    planner, cfg = planning.PLANNERS["cem"]

    @dataclass
    class OldDefaults(cfg):
        terminal: str = "value"

    monkeypatch.setitem(planning.PLANNERS, "cem", (planner, OldDefaults))
    assert runner_key(runner) != before
    assert runner_key(RandomRunner()) == random_before  # it plans nothing
    monkeypatch.undo()
    assert runner_key(runner) == before


def test_a_torn_last_line_is_dropped_and_a_damaged_earlier_line_refused(tmp_path):
    path = tmp_path / JOURNAL_NAME
    run_agents({"random": Counting()}, EPISODES[:2], LocalCollector(), EpisodeJournal(path),
               progress=False)
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed mid-write
    journal = EpisodeJournal(path)
    assert len(journal) == 1
    played.clear()
    run_agents({"random": Counting()}, EPISODES[:2], LocalCollector(), journal, progress=False)
    assert played == [("random", EPISODES[1].seed)]
    assert len(EpisodeJournal(path)) == 2  # the torn line was cut off before the new entry
    path.write_text(lines[0] + "\n" + lines[1])  # whole, but its newline never written
    assert len(EpisodeJournal(path)) == 1

    path.write_text("{not json\n" + "\n".join(lines) + "\n")
    with pytest.raises(JournalError, match=r"line 1 is not an lwm evaluation journal entry"):
        EpisodeJournal(path)
    path.write_text(json.dumps({"some": "other file"}) + "\n" + lines[0] + "\n")
    with pytest.raises(JournalError, match=r"pass --fresh"):
        EpisodeJournal(path)


def test_cli_eval_resumes_from_its_journal_and_fresh_starts_over(tmp_path):
    out = tmp_path / "goto"
    args = ["eval", "--suite", "babyai-goto", "--agents", "random,bot", "--out", str(out)]
    first = CliRunner().invoke(app, [*args, "--episodes", "3"], terminal_width=200)
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(app, [*args, "--episodes", "5"], terminal_width=200)
    assert again.exit_code == 0, again.output
    assert "random: 3 of 5 episodes resumed" in again.output
    data = json.loads((out / "report.json").read_text())
    assert data["meta"]["resumed_episodes"] == {"random": 3, "bot": 3}
    assert data["summary"]["bot"]["n"] == 5 and data["summary"]["bot"]["success"] == 1.0
    assert len((out / JOURNAL_NAME).read_text().splitlines()) == 10

    fresh = CliRunner().invoke(app, [*args, "--episodes", "2", "--fresh"], terminal_width=200)
    assert fresh.exit_code == 0 and "resumed" not in fresh.output
    assert len((out / (JOURNAL_NAME + ".old")).read_text().splitlines()) == 10
    assert len((out / JOURNAL_NAME).read_text().splitlines()) == 4

    (out / JOURNAL_NAME).write_text("garbage\n{}\n")
    broken = CliRunner().invoke(app, [*args, "--episodes", "2"], terminal_width=200)
    assert broken.exit_code == 2 and "is not an lwm evaluation journal" in broken.output


@dataclass(frozen=True)
class Unbuildable:
    """A runner whose worker cannot be built (a model that is not there)."""

    name: str = "random"

    def __call__(self):
        raise AssertionError("a worker was built with nothing left to play")


def test_a_fully_resumed_agent_builds_no_worker(tmp_path):
    path = tmp_path / JOURNAL_NAME
    key_runner = Unbuildable()
    journal = EpisodeJournal(path)
    for outcome in run_agents({"random": Counting()}, EPISODES[:2], LocalCollector(),
                              progress=False)[0]:
        journal.record(runner_key(key_runner), outcome)
    outcomes, reused = run_agents({"random": key_runner}, EPISODES[:2], LocalCollector(),
                                  EpisodeJournal(path), progress=False)
    assert reused == {"random": 2} and [o.episode for o in outcomes] == list(EPISODES[:2])
