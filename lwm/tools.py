"""lwm as a tool for tool-using LLMs (langchain).

    from lwm.tools import FollowInstructionTool
    tool = FollowInstructionTool(checkpoint="runs/train/babyai-goto-mamba2")
    agent = langchain.agents.create_agent(model, tools=[tool])

The tool runs one episode of the lwm agent on a BabyAI task and returns a short text summary for
the LLM, with the full `EpisodeResult` (as a dict) as the artifact. Steps and wall time are
bounded, so a looping LLM cannot hang it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from langchain_core.callbacks import CallbackManagerForToolRun
from langchain_core.tools import BaseTool
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["FollowInstructionArgs", "FollowInstructionTool", "result_artifact"]

MAX_STEPS = 256
"""The most steps one tool call may take, whatever the caller asks."""


class FollowInstructionArgs(BaseModel):
    """Arguments of one call: what to do, where, from which start."""

    instruction: str = Field(
        description="What the agent should do, in plain language, e.g. 'pick up the red ball, "
        "then go to the blue key'.", min_length=1, max_length=500,
    )
    task: str = Field(
        "babyai-goto",
        description="A task suite name (babyai-goto, babyai-pickup, babyai-putnext, babyai-open, "
        "babyai-seq) or a BabyAI env id such as BabyAI-GoToLocal-v0.",
    )
    seed: int = Field(0, ge=0, description="Seed of the episode's layout.")
    max_steps: int = Field(64, ge=1, le=MAX_STEPS, description="Step budget of the episode.")


class FollowInstructionTool(BaseTool):
    """Runs the lwm agent on one instruction in a BabyAI world and reports what happened."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str = "lwm_follow_instruction"
    description: str = (
        "Carry out a plain-language instruction in a BabyAI grid world with lwm's world-model "
        "planning agent (go to, pick up, open, put next to, and sequences of these). Returns "
        "whether it succeeded, the subgoals it pursued, and the events that happened."
    )
    args_schema: type[BaseModel] = FollowInstructionArgs
    response_format: str = "content_and_artifact"

    checkpoint: str | None = None
    """Run or model directory of a trained world model (used when `agent` is not given)."""
    llm: Any = "local"
    """Chat model for parsing and critique: "local", a provider string, a model, or None."""
    agent: Any = None
    """A ready `lwm.Agent`; built from `checkpoint` on first use when None."""
    time_limit_s: float = 120.0
    """Wall-clock limit of one call, in seconds."""

    def _get_agent(self):
        if self.agent is None:
            if self.checkpoint is None:
                raise ValueError("FollowInstructionTool needs `agent` or `checkpoint`")
            from lwm.agent import Agent

            self.agent = Agent.from_pretrained(self.checkpoint, llm=self.llm)
        return self.agent

    def _run(
        self,
        instruction: str,
        task: str = "babyai-goto",
        seed: int = 0,
        max_steps: int = 64,
        run_manager: CallbackManagerForToolRun | None = None,
    ) -> tuple[str, dict[str, Any]]:
        from lwm.envs import make_env
        from lwm.language.spec import InstructionError
        from lwm.tasks import list_suites, load_suite

        env = load_suite(task).make_env() if task in list_suites() else make_env(task)
        try:
            result = self._get_agent().run(
                instruction, env, seed=seed, max_steps=min(max_steps, MAX_STEPS),
                time_limit_s=self.time_limit_s,
            )
        except InstructionError as err:
            return f"could not follow the instruction: {err}", {"error": str(err)}
        return result.summary(), result_artifact(result)


def result_artifact(result) -> dict[str, Any]:
    """An `EpisodeResult` as JSON-friendly data (views and arrays left out)."""
    data = dataclasses.asdict(result)
    for record in data["records"]:
        record.pop("imagined_image", None)
        record.pop("real_image", None)
    data["critiques"] = [c.model_dump() for c in result.critiques]
    return data
