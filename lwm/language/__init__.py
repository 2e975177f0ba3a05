"""The language layer: instructions → goal specs → goal embeddings, and critique of episodes.

- `get_chat_model`: any langchain chat model, or lwm's local llama.cpp model (the default).
- `parse_instruction` / `GrammarFirstParser`: text → `GoalSpec`, lwm's default: BabyAI's grammar
  parser for missions in its grammar, a vocabulary check, then a chat model for the rest;
  `LLMGoalParser`: the chat model alone;
  `parse_babyai_mission` / `BabyAIMissionParser`: BabyAI's own grammar, deterministic, no LLM.
- `GoalEncoder`: goal texts → 384-d normalized embeddings (all-MiniLM-L6-v2, offline).
- `EvidenceFirstCritic` (the agents' default) / `LLMCritic` / `critique`: did the episode do
  what was asked, and what is left? The first reads the verdict from the trace's event sentences
  and asks the chat model only what is left after a failure.

Names load on first access (PEP 562), so `import lwm.language` costs nothing until a name is
used, and llama-cpp and sentence-transformers load only when a model first runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Critic": "critic", "Critique": "critic", "EvidenceFirstCritic": "critic",
    "LLMCritic": "critic", "critique": "critic",
    "format_trace": "critic",
    "EMBED_DIM": "embed", "GoalEncoder": "embed",
    "GGUFError": "llm", "LocalChatModel": "llm", "StructuredOutputError": "llm",
    "get_chat_model": "llm",
    "BabyAIMissionParser": "mission", "parse_babyai_mission": "mission",
    "GrammarFirstParser": "parse", "LLMGoalParser": "parse", "clear_parse_cache": "parse",
    "parse_instruction": "parse",
    "GoalParser": "spec", "GoalSpec": "spec", "InstructionError": "spec", "ObjectSpec": "spec",
    "Subgoal": "spec",
}

__all__ = [
    "BabyAIMissionParser",
    "Critic",
    "Critique",
    "EMBED_DIM",
    "EvidenceFirstCritic",
    "GGUFError",
    "GoalEncoder",
    "GoalParser",
    "GoalSpec",
    "GrammarFirstParser",
    "InstructionError",
    "LLMCritic",
    "LLMGoalParser",
    "LocalChatModel",
    "ObjectSpec",
    "StructuredOutputError",
    "Subgoal",
    "clear_parse_cache",
    "critique",
    "format_trace",
    "get_chat_model",
    "parse_babyai_mission",
    "parse_instruction",
]

if TYPE_CHECKING:
    from lwm.language.critic import (
        Critic,
        Critique,
        EvidenceFirstCritic,
        LLMCritic,
        critique,
        format_trace,
    )
    from lwm.language.embed import EMBED_DIM, GoalEncoder
    from lwm.language.llm import GGUFError, LocalChatModel, StructuredOutputError, get_chat_model
    from lwm.language.mission import BabyAIMissionParser, parse_babyai_mission
    from lwm.language.parse import (
        GrammarFirstParser,
        LLMGoalParser,
        clear_parse_cache,
        parse_instruction,
    )
    from lwm.language.spec import GoalParser, GoalSpec, InstructionError, ObjectSpec, Subgoal


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lwm.language' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lwm.language.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
