"""The agents `lwm eval` compares, as runners: picklable factories of episode workers.

A runner is a dataclass whose `__call__()` builds a worker, `EvalEpisode -> EpisodeOutcome`: the
contract of `lwm.eval.collect.Collector.map`, so the same runner evaluates in-process or on a Ray
cluster. A worker is built once per process (it holds envs, a world model, an LLM) and resets
everything that depends on the episode from the episode's seed, so an outcome does not depend on
which process ran it or in what order.

    runner = make_runner("lwm-grammar", checkpoint="runs/train/babyai-goto-mamba2")
    outcomes = collector.map(runner, episodes_for("babyai-goto", 200))

`RUNNERS` names them: random, bot, lwm, lwm-grammar, lwm-no-critic, llm-only, llm-only-greedy,
dqn. Another runner is one line in `RUNNERS` (or a `register_runner` call), its factory given as
a class or as "module:Class" so its module loads only when it runs (DQN + HER lives in
`lwm.baselines`).
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

import numpy as np
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import HumanMessage, SystemMessage
from pydantic import BaseModel, ValidationError

from lwm.envs.language import ACTION_NAMES
from lwm.eval.episodes import EpisodeOutcome, EvalEpisode, Referee
from lwm.language.prompts import load_prompt, render_prompt
from lwm.tasks import load_suite

__all__ = [
    "RUNNERS",
    "ActionChoice",
    "BotRunner",
    "LLMOnlyRunner",
    "LLM_ACTIONS",
    "LwmRunner",
    "RandomRunner",
    "RunnerEntry",
    "make_runner",
    "parse_action",
    "register_runner",
    "runner_options",
]

Worker = Callable[[EvalEpisode], EpisodeOutcome]
NOOP = ACTION_NAMES.index("done")
"""minigrid's `done`: a step that changes nothing (what an unusable answer costs)."""


def episode_seed(base: int, seed: int) -> int:
    """One 63-bit seed from a runner's seed and an episode's (independent of episode order)."""
    return int(np.random.SeedSequence([base, seed]).generate_state(2, np.uint64)[0] >> 1)


class _Worker:
    """Holds one `Referee`-wrapped env per suite the episodes come from."""

    def __init__(self, name: str):
        self.name = name
        self._envs: dict[str, Referee] = {}

    def env(self, suite: str) -> Referee:
        if suite not in self._envs:
            self._envs[suite] = Referee(load_suite(suite).make_env())
        return self._envs[suite]

    def play(self, env: Referee, episode: EvalEpisode, act: Callable[[], int]) -> None:
        """Step `act()` until the referee decides, the env ends or the step limit is reached."""
        while env.verdict is None and env.steps < episode.max_steps:
            _, _, terminated, truncated, _ = env.step(act())
            if terminated or truncated:
                return

    def outcome(self, episode: EvalEpisode, env: Referee, t0: float, **kw: Any) -> EpisodeOutcome:
        return EpisodeOutcome(episode=episode, agent=self.name, success=env.success,
                              steps=env.steps, wall_s=time.perf_counter() - t0,
                              events=list(env.events), actions=list(env.actions), **kw)


# ---------------------------------------------------------------------- random and bot


@dataclass(frozen=True)
class RandomRunner:
    """Uniform over the six actions other than `done`, seeded per episode: the floor."""

    seed: int = 0
    """Mixed with each episode's seed."""
    name: str = "random"

    def __call__(self) -> Worker:
        return _RandomWorker(self)


class _RandomWorker(_Worker):
    def __init__(self, cfg: RandomRunner):
        super().__init__(cfg.name)
        self.cfg = cfg

    def __call__(self, episode: EvalEpisode) -> EpisodeOutcome:
        t0 = time.perf_counter()
        env = self.env(episode.suite)
        env.reset(seed=episode.seed)
        rng = np.random.default_rng([self.cfg.seed, episode.seed])
        self.play(env, episode, lambda: int(rng.integers(NOOP)))
        return self.outcome(episode, env, t0)


@dataclass(frozen=True)
class BotRunner:
    """BabyAI's bot, which reads the true env state: the oracle upper bound. The words of the
    instruction do not matter to it (it follows the env's own mission)."""

    name: str = "bot"

    def __call__(self) -> Worker:
        return _BotWorker(self)


class _BotWorker(_Worker):
    def __init__(self, cfg: BotRunner):
        super().__init__(cfg.name)

    def __call__(self, episode: EvalEpisode) -> EpisodeOutcome:
        from lwm.envs.bot import BotPolicy

        t0 = time.perf_counter()
        env = self.env(episode.suite)
        env.reset(seed=episode.seed)
        self.play(env, episode, BotPolicy(env).act)
        return self.outcome(episode, env, t0)


# ---------------------------------------------------------------------- LLM call counting


class _CallCounter(BaseCallbackHandler):
    """Counts chat-model calls (each retry is a call)."""

    def __init__(self) -> None:
        self.calls = 0

    def on_chat_model_start(self, serialized, messages, **kwargs: Any) -> None:
        self.calls += 1

    def on_llm_start(self, serialized, prompts, **kwargs: Any) -> None:
        self.calls += 1


def _count_calls(llms: list[Any]) -> _CallCounter:
    """A counter attached to every distinct chat model in `llms`."""
    counter = _CallCounter()
    seen = set()
    for llm in llms:
        if llm is None or id(llm) in seen:
            continue
        seen.add(id(llm))
        llm.callbacks = [*(llm.callbacks or []), counter]
    return counter


# ---------------------------------------------------------------------- lwm


@dataclass(frozen=True)
class LwmRunner:
    """lwm's agent: parse the instruction, plan in imagination with the world model, act, critique.

    An instruction the parser cannot ground is a failure with the reason recorded.
    """

    checkpoint: str
    """A run or model directory."""
    llm: str = "local"
    """'local' (the embedded model), a provider string, or 'grammar' (BabyAI's grammar parser,
    no LLM and no critic)."""
    critic: bool = True
    """Let the LLM critique and revise the subgoals (only with an LLM)."""
    planner: str | None = None
    """cem, mppi, greedy or policy (the checkpoint's trained policy)."""
    planner_cfg: dict[str, Any] = field(default_factory=dict)
    """Overrides of the planner's config ({"candidates": 256, "horizon": 6}, ...)."""
    seed: int = 0
    """Mixed with each episode's seed for the planner's sampling."""
    preconditions: bool = True
    """Act on BabyAI's preconditions first (`lwm.goals.acting_goal`); False: the ablation."""
    name: str = "lwm"

    def __call__(self) -> Worker:
        return _LwmWorker(self)

    def defaults(self) -> dict[str, Any]:
        """The planners' default settings, which `planner_cfg` overrides (part of the journal's
        key: a changed default plays the episodes again)."""
        from lwm.planning import PLANNERS

        return {name: asdict(cfg()) for name, (_, cfg) in sorted(PLANNERS.items())}


class _LwmWorker(_Worker):
    def __init__(self, cfg: LwmRunner):
        from lwm.agent import Agent

        super().__init__(cfg.name)
        self.agent = Agent.from_pretrained(cfg.checkpoint, llm=cfg.llm, planner=cfg.planner,
                                           critic=cfg.critic, preconditions=cfg.preconditions)
        planner_cfg = self.agent.planner.cfg
        for key, value in cfg.planner_cfg.items():
            if not hasattr(planner_cfg, key):
                raise ValueError(f"planner {type(self.agent.planner).__name__} has no setting "
                                 f"{key!r}")
            setattr(planner_cfg, key, value)
        self.cfg = cfg
        self.counter = _count_calls([getattr(self.agent.parser, "llm", None),
                                     getattr(self.agent.critic, "llm", None)])

    def __call__(self, episode: EvalEpisode) -> EpisodeOutcome:
        from lwm.language.llm import StructuredOutputError
        from lwm.language.spec import InstructionError

        t0 = time.perf_counter()
        calls = self.counter.calls
        env = self.env(episode.suite)
        self.agent.generator.manual_seed(episode_seed(self.cfg.seed, episode.seed))
        try:
            result = self.agent.run(episode.instruction, env, seed=episode.seed,
                                    max_steps=episode.max_steps)
        except (InstructionError, StructuredOutputError) as err:
            return EpisodeOutcome(episode=episode, agent=self.name, success=False, steps=0,
                                  llm_calls=self.counter.calls - calls,
                                  wall_s=time.perf_counter() - t0,
                                  error=f"{type(err).__name__}: {err}")
        return self.outcome(episode, env, t0, llm_calls=self.counter.calls - calls,
                            plan_ms_per_action=result.timings["plan_ms_mean"] if result.steps
                            else None)


# ---------------------------------------------------------------------- LLM only


class ActionChoice(BaseModel):
    """The LLM-only agent's answer: one action name."""

    action: Literal["left", "right", "forward", "pickup", "drop", "toggle"]


LLM_ACTIONS: tuple[str, ...] = get_args(ActionChoice.model_fields["action"].annotation)
"""The actions the LLM-only agent is offered: BALROG's six for BabyAI (minigrid's `done` is a
no-op in BabyAI, and BALROG does not offer it)."""


def parse_action(text: str) -> str | None:
    """The action name a free-text answer gives ('forward', '"left".', '{"action": "toggle"}'),
    or None when it gives none."""
    text = text.strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = text
    if isinstance(data, dict):
        data = data.get("action")
    if not isinstance(data, str):
        return None
    name = data.strip().strip("`'\".!").strip().lower()
    return name if name in LLM_ACTIONS else None


@dataclass(frozen=True)
class LLMOnlyRunner:
    """The LLM acts alone, as BALROG runs LLMs on BabyAI: every step it reads the instruction and
    `text_observation()` (and what its last actions did) and names one of BALROG's six actions
    (`LLM_ACTIONS`), sampled at BALROG's temperature.

    Models with structured output (the local one: constrained decoding) can only answer an
    action name; others answer in text, and an answer that is no action name is counted in
    `invalid_actions` and costs a step that does nothing. The episode ends when the referee
    decides or at its step limit.
    """

    llm: Any = "local"
    """'local', a provider string, or a langchain chat model (an instance keeps its own
    temperature unless it has a `temperature` field)."""
    temperature: float = 1.0
    """Sampling temperature, BALROG's default 1.0. At 0 (greedy) the local 1.5B model turned
    in none of 5,248 steps (49 episodes): its most likely action is nearly always 'forward' or
    'toggle', left and right each getting about a tenth of its probability. The local model
    seeds each step's sample from the prompt, so the same episode plays the same way again."""
    history: int = 4
    """How many of its own recent actions (with their events) the LLM sees at least: it sees
    from `history` to 2 × `history` - 1 of them, in a window that moves `history` lines at a
    time, so consecutive prompts share everything before the newest line and llama.cpp
    evaluates only the new line and the observation (it reuses the prefix it evaluated last)."""
    name: str = "llm-only"

    def __call__(self) -> Worker:
        return _LLMOnlyWorker(self)


class _LLMOnlyWorker(_Worker):
    def __init__(self, cfg: LLMOnlyRunner):
        from lwm.language.llm import get_chat_model

        super().__init__(cfg.name)
        if cfg.llm == "grammar":
            raise ValueError("the llm-only agent needs an LLM ('local' or a provider), "
                             "not 'grammar'")
        self.cfg = cfg
        self.chat = get_chat_model(cfg.llm)
        if "temperature" in type(self.chat).model_fields:
            self.chat = self.chat.model_copy(update={"temperature": cfg.temperature})
        try:
            self.structured = self.chat.with_structured_output(ActionChoice)
        except NotImplementedError:
            self.structured = None
        self.counter = _count_calls([self.chat])

    def choose(self, instruction: str, observation: str, history: list[str]) -> str | None:
        """The LLM's next action name, or None when its answer names none."""
        shown = history[_window_start(len(history), self.cfg.history):] \
            if self.cfg.history > 0 else []
        user = render_prompt(
            "llm_agent_user.txt", instruction=json.dumps(instruction), observation=observation,
            history="\n".join(f"- {line}" for line in shown) or "- none yet",
        )
        messages = [SystemMessage(load_prompt("llm_agent_system.txt")), HumanMessage(user)]
        if self.structured is None:
            return parse_action(self.chat.invoke(messages).text)
        try:
            answer = self.structured.invoke(messages)
        except (OutputParserException, ValidationError):
            return None
        return ActionChoice.model_validate(answer).action if isinstance(answer, dict) \
            else answer.action

    def __call__(self, episode: EvalEpisode) -> EpisodeOutcome:
        t0 = time.perf_counter()
        calls = self.counter.calls
        env = self.env(episode.suite)
        env.reset(seed=episode.seed, options={"instruction": episode.instruction})
        history: list[str] = []
        invalid, think_s = 0, 0.0
        while env.verdict is None and env.steps < episode.max_steps:
            t = time.perf_counter()
            name = self.choose(episode.instruction, env.text_observation(), history)
            think_s += time.perf_counter() - t
            if name is None:
                invalid += 1
            base = env.unwrapped
            pose = (tuple(base.agent_pos), base.agent_dir)
            _, _, terminated, truncated, info = env.step(NOOP if name is None
                                                         else ACTION_NAMES.index(name))
            history.append(_what_happened(name, pose, (tuple(base.agent_pos), base.agent_dir),
                                          info["events"]))
            if terminated or truncated:
                break
        decisions = self.counter.calls - calls
        return self.outcome(episode, env, t0, llm_calls=decisions, invalid_actions=invalid,
                            plan_ms_per_action=1e3 * think_s / decisions if decisions else None)


def _window_start(n: int, size: int) -> int:
    """Where a history of `n` lines starts being shown: a multiple of `size` that leaves from
    `size` to 2 × `size` - 1 lines (all of them while there are fewer)."""
    return max(0, (n - size) // size * size)


def _what_happened(name: str | None, before: tuple, after: tuple, events: list[str]) -> str:
    """One history line for the LLM: its action and what came of it, truthfully (a step forward
    with no event still moved, a blocked one did nothing)."""
    if name is None:
        return "(an answer that was no action): nothing happened"
    if events:
        return f"{name}: " + "; ".join(events)
    if after[0] != before[0]:
        return f"{name}: you moved one step"
    if after[1] != before[1]:
        return f"{name}: you turned"
    return f"{name}: nothing happened"


# ---------------------------------------------------------------------- registry


@dataclass(frozen=True)
class RunnerEntry:
    """A named runner: its factory and the settings the name fixes."""

    factory: type | str
    """A runner class, or "module:Class" (imported when the runner is made)."""
    description: str
    preset: dict[str, Any] = field(default_factory=dict)

    def resolve(self) -> type:
        if isinstance(self.factory, type):
            return self.factory
        module, _, attr = self.factory.partition(":")
        return getattr(importlib.import_module(module), attr)


RUNNERS: dict[str, RunnerEntry] = {
    "random": RunnerEntry(RandomRunner, "uniform random actions (no 'done')"),
    "bot": RunnerEntry(BotRunner, "BabyAI's bot, reading the true state: the oracle"),
    "lwm": RunnerEntry(LwmRunner, "lwm: grammar-first parse (the LLM outside BabyAI's "
                       "grammar), world-model planning, LLM critic"),
    "lwm-grammar": RunnerEntry(LwmRunner, "lwm with BabyAI's grammar parser, no LLM",
                               {"llm": "grammar"}),
    "lwm-no-critic": RunnerEntry(LwmRunner, "lwm with its default parser but no critic",
                                 {"critic": False}),
    "llm-only": RunnerEntry(LLMOnlyRunner, "the LLM picks every action from text, sampled at "
                            "temperature 1 (BALROG)"),
    "llm-only-greedy": RunnerEntry(LLMOnlyRunner, "llm-only with greedy decoding (temperature 0)",
                                   {"temperature": 0.0}),
    "dqn": RunnerEntry("lwm.baselines.dqn:DQNRunner", "model-free DQN + language hindsight "
                       "relabeling, the same MiniLM goal embeddings (--dqn-checkpoint)"),
}
"""Runner names for `lwm eval --agents`."""


def register_runner(name: str, factory: type | str, description: str,
                    **preset: Any) -> None:
    """Add a runner under `name` (see `RunnerEntry`)."""
    if name in RUNNERS:
        raise ValueError(f"a runner named {name!r} exists already")
    RUNNERS[name] = RunnerEntry(factory, description, preset)


def _entry(name: str) -> RunnerEntry:
    if name not in RUNNERS:
        raise ValueError(f"unknown agent {name!r}; choose from {', '.join(RUNNERS)}")
    return RUNNERS[name]


def runner_options(name: str) -> frozenset[str]:
    """The settings `make_runner(name, ...)` takes (its runner's fields less those the name
    fixes)."""
    entry = _entry(name)
    taken = {f.name for f in fields(entry.resolve())}
    return frozenset(taken - set(entry.preset) - {"name"})


def make_runner(name: str, **opts: Any):
    """The runner registered as `name`, with settings `opts` (see `runner_options`)."""
    entry = _entry(name)
    unknown = sorted(set(opts) - runner_options(name))
    if unknown:
        raise TypeError(f"agent {name!r} takes {sorted(runner_options(name))}, not {unknown}")
    return entry.resolve()(name=name, **entry.preset, **opts)
