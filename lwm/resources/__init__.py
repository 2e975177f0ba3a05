"""Data shipped with lwm: task suites (the top-level `tasks/` folder) and prompt templates
(`prompts/`).

A built wheel packages those folders as `lwm/resources/tasks` and `lwm/resources/prompts`; in a
source checkout (and an editable install) they are read from the repository's top level.
"""

from __future__ import annotations

import importlib.resources
from importlib.resources.abc import Traversable
from pathlib import Path

__all__ = ["checkpoint", "files"]

_KNOWN = ("tasks", "prompts")


def files(name: str) -> Traversable:
    """The folder of shipped data `name` ("tasks" or "prompts")."""
    if name not in _KNOWN:
        raise ValueError(f"unknown resource folder {name!r}; expected one of {_KNOWN}")
    packaged = importlib.resources.files(__name__) / name
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / name


def checkpoint(suite: str) -> Path | None:
    """The small world-model checkpoint lwm ships for `suite` (reproduced by
    `eval/make_checkpoint.sh`), or None when there is none."""
    path = Path(__file__).resolve().parent / "checkpoints" / suite
    return path if (path / "config.json").exists() else None
