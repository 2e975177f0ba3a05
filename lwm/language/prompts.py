"""Prompt templates, kept as plain text files in the top-level `prompts/` folder.

The folder ships as `lwm.resources.prompts`; `lwm.resources.files("prompts")` finds it both in a
built wheel and in a source checkout (where an editable install does not resolve the package name
by itself). Prompts can be read and edited without touching code. Templates use `{name}`
placeholders (langchain f-string templates).
"""

from __future__ import annotations

from functools import cache

from langchain_core.prompts import PromptTemplate

from lwm.resources import files

__all__ = ["load_prompt", "render_prompt"]


@cache
def load_prompt(name: str) -> str:
    """The text of prompt file `name` (e.g. "parse_system.txt")."""
    return files("prompts").joinpath(name).read_text(encoding="utf-8")


def render_prompt(name: str, **values: str) -> str:
    """Prompt file `name` with its `{placeholders}` filled from `values`."""
    return PromptTemplate.from_template(load_prompt(name)).format(**values)
