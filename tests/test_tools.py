"""The langchain tool: langchain's standard tool tests, summary + artifact, refusals."""

import pytest
from langchain_tests.unit_tests import ToolsUnitTests
from pydantic import ValidationError

from lwm.agent import EpisodeResult, StepRecord
from lwm.language.spec import InstructionError
from lwm.tools import MAX_STEPS, FollowInstructionTool


class _StubAgent:
    """Stands in for lwm.Agent: records the call and returns a fixed result (orchestration only)."""

    def __init__(self, error: Exception | None = None):
        self.calls = []
        self.error = error

    def run(self, instruction, env, seed=None, max_steps=None, time_limit_s=None):
        self.calls.append(dict(instruction=instruction, env=env, seed=seed, max_steps=max_steps,
                               time_limit_s=time_limit_s))
        if self.error:
            raise self.error
        record = StepRecord(step=1, subgoal="go to the red ball", action=2,
                            events=["you are in front of the red ball"],
                            achieved=["go to the red ball"], imagined_return=0.9,
                            imagined_reward=[0.9], plan_ms=12.0)
        return EpisodeResult(instruction=instruction, subgoals=["go to the red ball"],
                             success=True, steps=1, achieved_at={"go to the red ball": 1},
                             events=record.events, records=[record])


class TestFollowInstructionToolStandard(ToolsUnitTests):
    @property
    def tool_constructor(self):
        return FollowInstructionTool

    @property
    def tool_constructor_params(self):
        return {"agent": _StubAgent()}

    @property
    def tool_invoke_params_example(self):
        return {"instruction": "go to the red ball", "task": "babyai-goto", "seed": 3,
                "max_steps": 20}


def test_tool_returns_summary_and_artifact_and_bounds_the_run():
    agent = _StubAgent()
    tool = FollowInstructionTool(agent=agent, time_limit_s=5.0)
    message = tool.invoke({"type": "tool_call", "id": "1", "name": tool.name, "args": {
        "instruction": "walk to the red ball", "task": "babyai-goto", "seed": 3}})
    assert message.content.startswith("succeeded in 1 steps")
    assert message.artifact["achieved_at"] == {"go to the red ball": 1}
    call = agent.calls[0]
    assert call["seed"] == 3 and call["max_steps"] <= MAX_STEPS and call["time_limit_s"] == 5.0
    assert call["env"].unwrapped.spec.id.endswith("BabyAI-GoToLocal-v0")


def test_tool_reports_ungroundable_instructions():
    tool = FollowInstructionTool(agent=_StubAgent(InstructionError("'the moon' is not an object")))
    message = tool.invoke({"type": "tool_call", "id": "1", "name": tool.name,
                           "args": {"instruction": "fly to the moon"}})
    assert "could not follow the instruction" in message.content and "moon" in message.content


def test_tool_rejects_out_of_bounds_budgets():
    tool = FollowInstructionTool(agent=_StubAgent())
    with pytest.raises(ValidationError, match="max_steps"):
        tool.invoke({"instruction": "go to the red ball", "max_steps": 10_000})
