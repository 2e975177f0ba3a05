"""eval/goto_30min.py: the 30-minute GoToLocal recipe's runner and what it reports."""

import importlib.util
import json
from pathlib import Path

from lwm.config import TrainConfig

_spec = importlib.util.spec_from_file_location(
    "lwm_eval_goto_30min", Path(__file__).resolve().parents[1] / "eval" / "goto_30min.py")
goto = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(goto)


def test_the_recipe_is_the_documented_one():
    args = goto.argparse.Namespace(seed=0, threads=2, episodes=3000, updates_per_iter=300,
                                   precision="auto", decoder="ego")
    cfg = goto.recipe(args)
    assert cfg.decoder == "ego"
    assert (cfg.suite, cfg.preset, cfg.backbone, cfg.goal_vocab) == (
        "babyai-goto", "small", "mamba2", "all")
    assert (cfg.collect_per_iter, cfg.updates_per_iter, cfg.batch_size, cfg.seq_len) == (
        100, 300, 8, 64)
    assert (cfg.eval_every, cfg.eval_episodes, cfg.precision) == (500, 200, "auto")


def test_runs_resumes_and_reports_the_curve_the_budget_and_further_seeds(tmp_path, monkeypatch):
    def tiny(args):  # the recipe's shape at the debug preset, so the test takes seconds
        return TrainConfig(preset="debug", seed=args.seed, threads=1, episodes=args.episodes,
                           collect_per_iter=6, updates_per_iter=2, batch_size=4, seq_len=8,
                           eval_every=6, eval_episodes=4, precision=args.precision)

    monkeypatch.setattr(goto, "recipe", tiny)
    run, out = tmp_path / "run", tmp_path / "goto.json"
    argv = ["--run-dir", str(run), "--episodes", "12", "--precision", "bf16", "--threads", "1",
            "--further", "3", "--json", str(out)]
    result = goto.main(argv)
    fig = json.loads(out.read_text())["figures"]
    assert fig == json.loads(json.dumps(result["figures"]))
    assert [p["episodes"] for p in fig["curve"]] == [0, 6, 12]
    assert fig["episodes"] == 12 and fig["updates"] == 4 and fig["bf16"] is True
    assert fig["train_s"] > 0 and fig["within_budget"] is True
    assert fig["success_200"] == fig["curve"][-1]["success"]
    lo, hi = fig["success_200_ci95"]
    assert lo <= fig["success_200"] <= hi
    assert fig["further"]["all"]["n"] == 3 and fig["further"]["skip"] == 400
    # Run again: the finished run is resumed, nothing is trained twice.
    again = goto.main(argv[:-2] + ["--further", "0"])["figures"]
    assert again["updates"] == 4 and again["curve"] == fig["curve"] and "further" not in again
