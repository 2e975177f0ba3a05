"""eval/curves.py: learning curves read from run directories (lwm's Trainer and the DQN's)."""

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "lwm_eval_curves", Path(__file__).resolve().parents[1] / "eval" / "curves.py")
curves = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(curves)


def _run(path: Path, config_file: str, config: dict, successes: list[float]) -> Path:
    path.mkdir()
    (path / config_file).write_text(json.dumps(config))
    lines = [{"updates": 10, "episodes": 50, "loss": 1.0}]  # a training line: not a point
    lines += [{"episodes": 100 * i, "eval_success": s, "train_s": 10.0 * i}
              for i, s in enumerate(successes)]
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_curves_read_both_kinds_of_run_and_report_first_crossings(tmp_path):
    wm = _run(tmp_path / "wm", "trainer.json",
              {"config": {"suite": "babyai-goto", "backbone": "gru"}},
              [0.3, 0.5, 0.92, 0.9, 0.99])
    dqn = _run(tmp_path / "dqn", "config.json",
               {"format": "lwm-dqn", "config": {"suite": "babyai-goto", "frames": 3}}, [0.4, 0.6])
    out = curves.main([str(wm), str(dqn), "--out", str(tmp_path / "c.png"),
                       "--json", str(tmp_path / "c.json")])
    first, second = out["runs"]
    assert first["label"] == "wm: world model (gru)" and second["label"].startswith("dqn: DQN")
    assert [p["episodes"] for p in first["points"]] == [0, 100, 200, 300, 400]  # 0: untrained
    assert first["reached"]["0.9"]["episodes"] == 200
    assert first["reached"]["0.99"] == {"episodes": 400, "eval_success": 0.99,
                                        "eval_success_train": None,
                                        "eval_success_held_out": None, "train_s": 40.0}
    assert second["reached"]["0.9"] is None
    assert (tmp_path / "c.png").stat().st_size > 0
    assert json.loads((tmp_path / "c.json").read_text())["ppo_episodes_to_99"]["babyai-goto"]


def test_curves_refuse_a_directory_without_metrics(tmp_path):
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        curves.main([str(tmp_path), "--out", str(tmp_path / "c.png")])
