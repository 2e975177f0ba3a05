"""lwm: language-conditioned world-model planning.

    import lwm
    agent = lwm.Agent.from_pretrained("runs/train/babyai-goto-mamba2", llm="local")
    env = lwm.load_suite("babyai-goto").make_env()
    result = agent.run("walk over to the red ball", env, seed=3)

Names load on first use, so `import lwm` stays cheap (no torch until a model is needed).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Agent": "lwm.agent",
    "EpisodeResult": "lwm.agent",
    "WorldModel": "lwm.models.world_model",
    "make_env": "lwm.envs",
    "load_suite": "lwm.tasks",
    "list_suites": "lwm.tasks",
    "FollowInstructionTool": "lwm.tools",
}

__all__ = [
    "Agent",
    "EpisodeResult",
    "FollowInstructionTool",
    "WorldModel",
    "list_suites",
    "load_suite",
    "make_env",
]

if TYPE_CHECKING:
    from lwm.agent import Agent, EpisodeResult
    from lwm.envs import make_env
    from lwm.models.world_model import WorldModel
    from lwm.tasks import list_suites, load_suite
    from lwm.tools import FollowInstructionTool


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lwm' has no attribute {name!r}")
