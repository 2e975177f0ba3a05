"""Evaluation episodes: what every agent is asked to do, how it went, and who judges it.

    episodes = episodes_for("babyai-goto", 200)          # the same list for every agent
    outcome = worker(episodes[0])                        # a runner's worker -> EpisodeOutcome

An `EvalEpisode` is one evaluation seed of a suite (never a training seed) and the instruction
the agent gets for it: the env's own BabyAI mission ("grammar") or one of the suite's free-form
paraphrases of it ("paraphrase"). Its step limit is BabyAI's own default for the mission (64 steps
per room to cross per navigation, as BALROG uses), capped by the suite's limit.

Every agent is judged the same way, by `Referee`: minigrid's verifier of the episode's own
mission, whatever words the agent was given and whatever it believes it achieved.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import gymnasium as gym

from lwm.envs.language import ACTION_NAMES, instr_goals
from lwm.goals import Goal
from lwm.tasks import TaskSuite, load_suite

__all__ = [
    "EpisodeOutcome",
    "EvalEpisode",
    "Referee",
    "episodes_for",
    "mission_step_limit",
    "suite_ref",
]

Kind = Literal["grammar", "paraphrase"]


@dataclass(frozen=True)
class EvalEpisode:
    """One evaluation episode: everything that determines what the agent faces."""

    suite: str
    """The suite's name, or its YAML path for a suite lwm does not ship."""
    seed: int
    """The env seed: the layout and the mission."""
    instruction: str
    """What the agent is told."""
    kind: Kind
    """'grammar' (the env's own mission) or 'paraphrase' (one of the suite's templates)."""
    split: Literal["train", "held_out"]
    """'held_out' when the mission names a (colour, type) combination training never saw."""
    max_steps: int
    """The step limit of this episode."""
    family: str | None = None
    """The suite's instruction family the mission belongs to ('goto', 'putnext', ...)."""


@dataclass
class EpisodeOutcome:
    """How one agent did on one episode."""

    episode: EvalEpisode
    agent: str
    success: bool
    steps: int
    llm_calls: int = 0
    """Chat-model calls made for this episode (retries included; cached parses are free)."""
    wall_s: float = 0.0
    plan_ms_per_action: float | None = None
    """Mean time to choose an action: lwm's planner search, the LLM call of the LLM-only agent;
    None for agents that don't deliberate (random, the bot)."""
    error: str | None = None
    """Why the agent could not act (an instruction it could not ground, ...); a failure."""
    events: list[str] = field(default_factory=list)
    """The real text events of the episode, in order."""
    actions: list[str] = field(default_factory=list)
    """The actions taken, by name."""
    invalid_actions: int = 0
    """Answers that were not an action (the LLM-only agent)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EpisodeOutcome:
        """The outcome of a dict of its fields (`to_dict`'s, or a runner's that returns dicts:
        the fields it leaves out keep their defaults)."""
        episode = data["episode"]
        if not isinstance(episode, EvalEpisode):
            episode = EvalEpisode(**episode)
        return cls(**{**data, "episode": episode})


def suite_ref(suite: TaskSuite) -> str:
    """How an episode names its suite: the name of a shipped suite, else its file's path."""
    if suite.source == f"tasks/{suite.name}.yaml":
        return suite.name
    return suite.source or suite.name


def mission_step_limit(env) -> int | None:
    """BabyAI's default step limit for the mission of a freshly reset env (`room_size**2` steps
    per room of the grid per navigation the mission needs), or None for non-BabyAI envs."""
    base = env.unwrapped
    if not hasattr(base, "num_navs_needed"):
        return None
    rooms = base.num_rows * base.num_cols
    return base.num_navs_needed(base.instrs) * base.room_size**2 * rooms


def _family(suite: TaskSuite, goals: list[Goal]) -> str | None:
    verbs = [g.verb for g in goals]
    for family in suite.families:
        if verbs == [family.verb] + ([family.then] if family.then else []):
            return family.name
    return None


def episodes_for(
    suite: TaskSuite | str,
    n: int,
    paraphrase_share: float = 0.5,
    start: int | None = None,
    max_steps: int | None = None,
) -> list[EvalEpisode]:
    """`n` episodes on consecutive evaluation seeds of `suite` (from `start`, default the suite's
    first evaluation seed). Same arguments, same list.

    Each seed decides on its own (so an episode does not depend on `n` or `start`) whether it is
    a paraphrase episode, with probability `paraphrase_share`, and which paraphrase; missions
    with no paraphrase (the suite has no template for them, or they leave a colour open) stay
    grammar missions. `max_steps` caps every episode's step limit further.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a whole number of episodes >= 0, got {n!r}")
    if not 0.0 <= paraphrase_share <= 1.0:
        raise ValueError(f"paraphrase_share must be in [0, 1], got {paraphrase_share!r}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps!r}")
    suite = load_suite(suite) if isinstance(suite, str) else suite
    first = suite.seeds.eval_start if start is None else start
    if first < suite.seeds.eval_start:
        raise ValueError(
            f"start={first} is below {suite.name}'s first evaluation seed "
            f"{suite.seeds.eval_start}: those seeds are for training"
        )
    env, ref = suite.make_env(), suite_ref(suite)
    episodes = []
    for seed in range(first, first + n):
        obs, _ = env.reset(seed=seed)
        goals = instr_goals(env.unwrapped.instrs)
        instruction, kind = obs["mission"], "grammar"
        rng = random.Random(seed)
        wants_paraphrase = rng.random() < paraphrase_share
        options = suite.paraphrases(goals) if all(g.is_concrete for g in goals) else []
        if wants_paraphrase and options:
            instruction, kind = options[rng.randrange(len(options))], "paraphrase"
        limits = [suite.max_steps, mission_step_limit(env), max_steps]
        episodes.append(EvalEpisode(
            suite=ref, seed=seed, instruction=instruction, kind=kind,
            split=suite.split_of_episode(env), max_steps=min(v for v in limits if v is not None),
            family=_family(suite, goals),
        ))
    return episodes


class Referee(gym.Wrapper):
    """Wraps a suite env and judges the episode by minigrid's verifier of its own mission.

    `reset(seed=s)` plays the env's mission as usual. `reset(seed=s, options={"instruction":
    text})` (how lwm's agent resets) switches the env's verifier off for the agent; the referee
    keeps its own copy of the mission's verifier and ends the episode on its verdict just as the
    env would. `verdict` is then "success", "failure" (a mission done out of order, say), or None
    while undecided; `events` and `actions` collect the episode's text events and actions.
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self._instrs = None
        self.verdict: str | None = None
        self.events: list[str] = []
        self.actions: list[str] = []
        self.steps = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        instrs = None
        if options and "instruction" in options:
            self.env.reset(seed=seed)  # the same layout, with the env's own mission
            instrs = self.env.unwrapped.instrs
        obs, info = self.env.reset(seed=seed, options=options)
        if instrs is not None:
            instrs.reset_verifier(self.env.unwrapped)  # bind it to this reset's objects
        self._instrs = instrs
        self.verdict, self.events, self.actions, self.steps = None, list(info["events"]), [], 0
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        self.events += info["events"]
        self.actions.append(ACTION_NAMES[int(action)])
        base = self.env.unwrapped
        if self._instrs is None:
            if terminated:
                self.verdict = "success" if reward > 0 else "failure"
        else:
            if action == base.actions.drop:
                base.update_objs_poss(self._instrs)  # what minigrid does for its own verifier
            status = self._instrs.verify(action)
            if status != "continue":
                self.verdict, terminated = status, True
                reward = base._reward() if status == "success" else 0.0
        return obs, reward, terminated, truncated, info

    @property
    def success(self) -> bool:
        return self.verdict == "success"

    def text_observation(self) -> str:
        """The wrapped `LanguageWrapper`'s view in words."""
        return self.env.text_observation()
