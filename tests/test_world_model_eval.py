"""eval/world_model.py: where view cells lie on the grid, which kind each is, the whole script."""

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.world_model import KINDS, cell_kinds, collect, main  # noqa: E402
from lwm.envs.spatial import view_positions  # noqa: E402
from lwm.models.world_model import WorldModel, preset  # noqa: E402
from lwm.tasks import load_suite  # noqa: E402


def test_view_positions_agree_with_minigrid():
    suite = load_suite("babyai-goto")
    env = suite.make_env()
    base = env.unwrapped
    rng = np.random.default_rng(0)
    checked = 0
    for seed in range(5):
        env.reset(seed=seed)
        for _ in range(15):
            positions = view_positions(tuple(base.agent_pos), base.agent_dir)
            for x in range(7):
                for y in range(7):
                    px, py = positions[x, y]
                    if 0 <= px < base.width and 0 <= py < base.height:
                        assert base.relative_coords(px, py) == (x, y)
                        checked += 1
            env.step(int(rng.integers(0, 3)))
    assert checked > 1000


def test_cell_kinds_follow_what_was_seen():
    suite = load_suite("babyai-goto")
    episodes = collect(suite, 6, seed=0)
    for e in episodes:
        kinds = cell_kinds(suite, e)  # (T, 7, 7)
        assert kinds.shape == (e.num_steps, 7, 7)
        unseen = KINDS.index("unseen")
        np.testing.assert_array_equal(kinds == unseen, e.image[1:, ..., 0] == 0)
        assert not (kinds[0] == KINDS.index("recalled")).any()  # nothing before o_0
        for t, action in enumerate(e.action):
            if action >= 3:  # pick up, drop, toggle, done: the view stays where it is
                assert set(np.unique(kinds[t])) <= {KINDS.index("in view"), unseen}
    assert {KINDS.index(k) for k in ("in view", "recalled", "new")} <= set(
        np.unique(np.concatenate([cell_kinds(suite, e).ravel() for e in episodes])))


def test_the_script_reports_one_step_accuracy_by_kind(tmp_path):
    torch.manual_seed(0)
    WorldModel(preset("debug", decoder="ego")).save_pretrained(tmp_path / "model")
    main([str(tmp_path / "model"), "--episodes", "4", "--json", str(tmp_path / "wm.json")])
    figures = json.loads((tmp_path / "wm.json").read_text())["runs"][str(tmp_path / "model")]
    by = figures["one_step_by_kind"]
    assert abs(sum(by[k]["share"] for k in KINDS) - 1.0) < 1e-9
    assert all(0.0 <= by[k]["accuracy"] <= 1.0 for k in KINDS if by[k]["share"] > 0)
    assert by["known_share"] == 1.0 - by["new"]["share"]
    shares = np.array([by[k]["share"] for k in KINDS])
    overall = sum(by[k]["accuracy"] * by[k]["share"] for k in KINDS if by[k]["share"] > 0)
    assert abs(overall - by["all"]["accuracy"]) < 1e-9 and shares.min() >= 0
