"""The BabyAI bot as a policy: an oracle that reads the true env state (not the observation).

It is the upper-bound baseline, a source of expert episodes, and what `lwm demo` runs before a
trained world model exists. It solves GoToLocal, PickupLoc, PutNextLocal, the door levels and
lwm's own PickupThenGoToLocal.
"""

from __future__ import annotations

from minigrid.utils.baby_ai_bot import BabyAIBot

from lwm.envs.language import LanguageWrapper

__all__ = ["BotPolicy"]


class BotPolicy:
    """`BotPolicy(env)` after `env.reset(...)`; then `act()` once per step."""

    def __init__(self, env: LanguageWrapper):
        self._bot = BabyAIBot(env.unwrapped)

    def act(self) -> int:
        """The bot's next action for the current state."""
        return int(self._bot.replan())
