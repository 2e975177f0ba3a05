"""Gymnasium environments: BabyAI / MiniGrid with dict observations and text events.

Importing this module registers, in gymnasium's `lwm` namespace, a `LanguageWrapper`-wrapped
copy of every `BabyAI-*` and `MiniGrid-*` env (`gymnasium.make("lwm/BabyAI-GoToLocal-v0")`; not
minigrid's `MiniGrid-WFC-*`, which its wheel can't build) and lwm's own levels
(`lwm/BabyAI-PickupThenGoToLocal-v0`). Keyword arguments of `make` go to the underlying env
(`max_steps`, `render_mode`, level options).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import minigrid  # noqa: F401  (registers the BabyAI-* and MiniGrid-* ids)

from lwm.envs.language import (
    ACTION_NAMES,
    DIRECTION_NAMES,
    EXPLORATION_PROBS,
    NOTHING_CARRIED,
    OBJECT_TO_IDX,
    LanguageWrapper,
    goal_achieved,
)
from lwm.envs.levels import MixedLocal, PickupThenGoToLocal

__all__ = [
    "ACTION_NAMES",
    "DIRECTION_NAMES",
    "EXPLORATION_PROBS",
    "NOTHING_CARRIED",
    "OBJECT_TO_IDX",
    "LanguageWrapper",
    "MixedLocal",
    "PickupThenGoToLocal",
    "goal_achieved",
    "make_env",
    "LWM_LEVELS",
]

LWM_LEVELS: dict[str, str] = {
    "BabyAI-PickupThenGoToLocal-v0": "lwm.envs.levels:PickupThenGoToLocal",
    "BabyAI-MixedLocal-v0": "lwm.envs.levels:MixedLocal",
}
"""lwm's own levels: id (without the `lwm/` namespace) -> entry point of the unwrapped env."""


def make_env(env_id: str, **kwargs: Any) -> LanguageWrapper:
    """Make a wrapped env from a base id ("BabyAI-GoToLocal-v0") or an lwm id ("lwm/...")."""
    base_id = env_id.removeprefix("lwm/")
    if base_id in LWM_LEVELS:
        base = gym.make(f"lwm-base/{base_id}", **kwargs)
    else:
        base = gym.make(base_id, **kwargs)
    return LanguageWrapper(base)


def _register() -> None:
    for base_id, entry_point in LWM_LEVELS.items():
        if f"lwm-base/{base_id}" not in gym.registry:
            gym.register(f"lwm-base/{base_id}", entry_point=entry_point)
    # minigrid's WFC levels need data files its wheel does not ship: they fail on make.
    base_ids = [
        k for k in gym.registry
        if k.startswith(("BabyAI-", "MiniGrid-")) and not k.startswith("MiniGrid-WFC-")
    ]
    for base_id in [*base_ids, *LWM_LEVELS]:
        if f"lwm/{base_id}" not in gym.registry:
            gym.register(
                f"lwm/{base_id}",
                entry_point="lwm.envs:make_env",
                kwargs={"env_id": base_id},
                disable_env_checker=True,
            )


_register()
