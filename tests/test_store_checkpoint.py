"""eval/store_checkpoint.py: what the make_*checkpoint scripts ship."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from lwm.agent import Agent, agent_settings
from lwm.models.world_model import WorldModel, preset

_spec = importlib.util.spec_from_file_location(
    "lwm_eval_store_checkpoint",
    Path(__file__).resolve().parents[1] / "eval" / "store_checkpoint.py")
store = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(store)


def test_a_run_is_stored_in_half_precision_with_its_recipe_and_agent_settings(tmp_path,
                                                                            monkeypatch):
    torch.manual_seed(0)
    model = WorldModel(preset("debug"))
    run, dest = tmp_path / "run", tmp_path / "shipped"
    model.save_pretrained(run / "model")
    (run / "trainer.json").write_text(json.dumps({"config": {"episodes": 7}}))
    monkeypatch.setattr(sys, "argv", ["store", str(run), str(dest), "--suite", "babyai-goto"])
    store.main()
    with safe_open(dest / "model.safetensors", "pt") as f:
        tensors = [f.get_tensor(name) for name in list(f.keys())]
    assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.float16}
    loaded = WorldModel.from_pretrained(dest)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], p, rtol=1e-3, atol=1e-3)
    assert json.loads((dest / "trainer.json").read_text()) == {"config": {"episodes": 7}}
    settings = agent_settings(dest)
    assert settings["planner"] == "greedy" and "not measured" in settings["measured"]
    agent = Agent.from_pretrained(dest, llm="grammar")
    assert agent.planner.cfg.repeat_penalty == 0.1
