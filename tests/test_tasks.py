"""Task suites: shipped files validate; malformed files get errors naming file, field, want."""

import pytest

from lwm.goals import parse_goal
from lwm.tasks import TaskSpecError, list_suites, load_suite, parse_suite

REQUIRED = {"babyai-goto", "babyai-pickup", "babyai-putnext", "babyai-open", "babyai-seq"}

GOOD = """
name: tiny
description: a test suite
env_id: BabyAI-GoToLocal-v0
max_steps: 10
families:
  - {name: goto, verb: go to, types: [ball], paraphrases: ["walk to the {color} {type}"]}
split:
  train: [[red, ball], [green, ball], [blue, ball], [purple, ball], [yellow, ball]]
  held_out: [[grey, ball]]
"""


def test_shipped_suites_load():
    assert set(list_suites()) >= REQUIRED
    for name in list_suites():
        suite = load_suite(name)
        assert suite.name == name
        env = suite.make_env()
        obs, info = env.reset(seed=suite.seeds.eval_start)
        assert env.unwrapped.max_steps == suite.max_steps
        assert isinstance(obs["mission"], str) and obs["mission"]


@pytest.mark.parametrize(
    ("edit", "field", "expected"),
    [
        (("max_steps: 10", "max_steps: -3"), "max_steps", "greater than 0"),
        (("verb: go to", "verb: teleport"), "families.0.verb", "expected one of"),
        (("types: [ball]", "types: [moon]"), "families.0.types", "expected object types"),
        (("held_out: [[grey, ball]]", "held_out: [[grey, ball], [red, ball]]"), "split",
         "both in train and held_out"),
        (("held_out: [[grey, ball]]", "held_out: []"), "(top level)", "missing [('grey', 'ball')]"),
        (("[[grey, ball]]", "[[gray, ball]]"), "split.held_out", "expected [colour, type] pairs"),
        (("max_steps: 10", "max_steps: 10\ncolour: red"), "colour", "Extra inputs"),
        (("env_id: BabyAI-GoToLocal-v0\n", ""), "env_id", "Field required"),
    ],
)
def test_malformed_suite_errors_name_file_field_and_expectation(edit, field, expected):
    text = GOOD.replace(*edit)
    assert text != GOOD
    with pytest.raises(TaskSpecError) as err:
        parse_suite(text, source="tasks/broken.yaml")
    message = str(err.value)
    assert message.startswith("tasks/broken.yaml: ")
    assert f"field '{field}'" in message
    assert expected in message


def test_not_yaml_and_missing_files(tmp_path):
    with pytest.raises(TaskSpecError, match="broken.yaml: not valid YAML"):
        parse_suite("name: [unclosed", source="broken.yaml")
    with pytest.raises(TaskSpecError, match="unknown task suite 'nope'"):
        load_suite("nope")
    with pytest.raises(TaskSpecError, match="no such task file"):
        load_suite(tmp_path / "missing.yaml")
    path = tmp_path / "tiny.yaml"
    path.write_text(GOOD)
    assert load_suite(path).source == str(path)


def test_split_of_goals_and_episodes():
    suite = load_suite("babyai-goto")
    assert suite.split_of_goal("go to the blue ball") == "held_out"
    assert suite.split_of_goal(parse_goal("go to the red ball")) == "train"
    env = suite.make_env()
    for seed in suite.seeds_for("held_out", 5):
        env.reset(seed=seed)
        assert suite.split_of_episode(env) == "held_out"
    train = suite.seeds_for("train", 5, evaluation=False)
    assert all(s < suite.seeds.eval_start for s in train)
    for seed in train:
        env.reset(seed=seed)
        assert suite.split_of_episode(env) == "train"


def test_paraphrases_fill_templates():
    suite = load_suite("babyai-putnext")
    texts = suite.paraphrases([parse_goal("put the red ball next to the blue key")])
    assert "place the red ball beside the blue key" in texts
    assert all("{" not in t for t in texts)
