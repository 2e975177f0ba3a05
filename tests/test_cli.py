"""The command line: verbs listed, demo runs real envs and writes GIFs, usage errors say why."""

from PIL import Image
from typer.testing import CliRunner

from lwm.cli import app

runner = CliRunner()


def test_help_lists_the_verbs():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for verb in ("demo", "train", "train-policy", "plan", "eval", "suites"):
        assert verb in result.output


def test_eval_without_a_suite_is_a_usage_error_naming_the_option():
    result = runner.invoke(app, ["eval"])
    assert result.exit_code == 2
    assert "--suite" in result.output


def test_demo_runs_episodes_and_writes_gifs(tmp_path):
    result = runner.invoke(app, ["demo", "--suite", "babyai-putnext", "--episodes", "1",
                                 "--policy", "bot", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "you picked up" in result.output and "achieved put the" in result.output
    (gif,) = tmp_path.glob("babyai-putnext-seed*.gif")
    with Image.open(gif) as img:
        assert img.n_frames > 3


def test_suites_lists_shipped_suites():
    result = runner.invoke(app, ["suites"])
    assert result.exit_code == 0
    assert "babyai-goto" in result.output and "BabyAI-PutNextLocal-v0" in result.output


def test_train_options_come_from_the_config_dataclass(tmp_path):
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    assert "--updates-per-iter" in result.output and "Gradient updates per Dyna" in result.output
    result = runner.invoke(app, [
        "train", "--run-dir", str(tmp_path), "--preset", "debug", "--episodes", "4",
        "--collect-per-iter", "4", "--updates-per-iter", "2", "--batch-size", "2",
        "--seq-len", "4",
    ])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model" / "config.json").exists()
    assert "updates in fp32 (--precision fp32)" in result.output


def test_agent_demo_and_plan_with_a_small_checkpoint(tmp_path):
    from lwm.models.world_model import WorldModel, preset

    WorldModel(preset("debug")).save_pretrained(tmp_path / "ckpt")
    result = runner.invoke(app, [
        "demo", "--episodes", "2", "--checkpoint", str(tmp_path / "ckpt"), "--llm", "grammar",
        "--planner", "greedy", "--out", str(tmp_path / "gifs"),
    ])
    assert result.exit_code == 0, result.output
    # the grammar parser follows the mission and refuses the paraphrase (an LLM's job)
    assert "paraphrase" in result.output and "refused" in result.output
    assert "success 0/2" in result.output or "success 1/2" in result.output
    assert len(list((tmp_path / "gifs").glob("*.gif"))) == 1
    result = runner.invoke(app, [
        "plan", "go to the red ball", "--checkpoint", str(tmp_path / "ckpt"), "--llm", "grammar",
        "--planner", "greedy", "--max-steps", "3", "--gif", str(tmp_path / "plan.gif"),
    ])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "plan.gif").exists()
    refused = runner.invoke(app, ["plan", "fly to the moon", "--checkpoint",
                                  str(tmp_path / "ckpt"), "--llm", "grammar"])
    assert refused.exit_code == 1 and "cannot follow this instruction" in refused.output
