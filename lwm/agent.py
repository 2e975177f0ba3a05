"""The agent: instruction -> goal spec -> embeddings -> plan, act, check, critique, re-plan.

    agent = Agent.from_pretrained("runs/train/babyai-goto-mamba2", llm="local")
    result = agent.run("please walk over to the red ball", env, seed=3)

For each subgoal of the spec (in stage order) the agent embeds its canonical text, plans in
imagination from the current real observation (MPC: a new plan every step), acts, and moves on
when the env reports the subgoal achieved. BabyAI's preconditions come first
(`lwm.goals.acting_goal`; `preconditions=False` plans every subgoal as it is): a put of an object
not yet in hand is planned as a pick-up of it, and opening a door as going to it (first picking
up its key when it was seen locked), and any pick-up with something else in hand as dropping
that first; the key, once in hand, is not dropped, nor a put's object anywhere but beside its
target (`lwm.envs.language.forbidden_actions`). A goal with a start-relative location ("the ball
on your left") is planned for as the object seen there once the agent has seen it
(`lwm.envs.spatial.StartFrame`; `locate=False` keeps it as said).
When a subgoal takes longer than its share of the step budget, the critic reads the text trace
and may revise the remaining subgoals (at most `max_critiques` times); at the end it judges the
episode. The instruction wins over the env's own mission: the env's verifier is switched off and
success means every subgoal was achieved.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lwm.envs import goal_achieved
from lwm.envs.language import (
    ACTION_NAMES,
    carried,
    facing,
    forbidden_actions,
    locked_doors,
    noop_actions,
)
from lwm.envs.spatial import StartFrame
from lwm.goals import acting_goal
from lwm.language.critic import Critic, Critique
from lwm.language.embed import GoalEncoder
from lwm.language.spec import GoalParser, GoalSpec
from lwm.models import native
from lwm.models.world_model import CheckpointError, WorldModel, model_dir
from lwm.planning import Planner, PlanResult, SearchConfig, make_planner

__all__ = ["Agent", "EpisodeResult", "StepRecord"]


@dataclass
class StepRecord:
    """One real step and what the planner imagined before taking it."""

    step: int
    subgoal: str
    action: int
    events: list[str]
    achieved: list[str]
    imagined_return: float
    """The planner's objective J for the chosen sequence (discounted chance of the subgoal)."""
    imagined_reward: list[float]
    """Predicted probabilities that the subgoal is achieved at each imagined step."""
    plan_ms: float
    acting: str = ""
    """The goal planned for: the subgoal, or the pick-up its precondition asks for first (the
    object of a put, the key of a locked door: `lwm.goals.acting_goal`)."""
    imagined_image: np.ndarray | None = None
    """(H, 7, 7, 3) decoded imagined views of the chosen sequence, when asked for."""
    real_image: np.ndarray | None = None
    """(7, 7, 3) the real view the action led to (compare with `imagined_image[0]`), when
    imagined views were asked for."""


@dataclass
class EpisodeResult:
    """What happened when the agent followed an instruction."""

    instruction: str
    subgoals: list[str]
    success: bool
    steps: int
    achieved_at: dict[str, int]
    """Subgoal text -> the step at which it was achieved."""
    events: list[str]
    """Real text events in order (the trace the critic reads)."""
    records: list[StepRecord] = field(default_factory=list)
    critiques: list[Critique] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    """parse_s, plan_ms_mean, critic_s, total_s."""

    def summary(self) -> str:
        """A short text summary for people and tool-using LLMs."""
        verdict = "succeeded" if self.success else "failed"
        done = ", ".join(f"{g} (step {s})" for g, s in self.achieved_at.items()) or "nothing"
        text = (f"{verdict} in {self.steps} steps: '{self.instruction}' -> "
                f"{' ; '.join(self.subgoals)}. Achieved: {done}.")
        if self.critiques:
            text += f" Critic: {self.critiques[-1].reason}"
        return text


AGENT_SETTINGS = "agent.json"
"""A checkpoint's recommended agent settings, beside config.json: {"planner": name,
"planner_cfg": {field: value}, "measured": free text saying where the choice comes from}."""


def agent_settings(path: str | Path) -> dict[str, Any]:
    """The `agent.json` of a run or model directory ({} when there is none)."""
    path = Path(path)
    for candidate in (path / AGENT_SETTINGS, path / "model" / AGENT_SETTINGS):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise CheckpointError(f"{candidate}: corrupt agent settings ({err})") from None
            if not isinstance(data, dict) or not isinstance(data.get("planner_cfg", {}), dict):
                raise CheckpointError(f"{candidate}: agent settings must be a JSON object with "
                                      "'planner' and an object 'planner_cfg'")
            return data
    return {}


class Agent:
    """A world model, a planner, a goal parser, a goal encoder and (optionally) a critic.

    `preconditions`: plan a put of an object not yet carried as a pick-up of it first, and the
    opening of a door as going to it (after picking up its key, when seen locked):
    `lwm.goals.acting_goal`.

    `locate`: a goal that names a location relative to the start ("the ball on your left")
    is planned for as the concrete object it must mean ("the blue ball") once the agent has
    seen which objects lie there: `lwm.envs.spatial.StartFrame` keeps the agent's start-relative
    pose by dead reckoning and notes where it saw what. Until then the agent turns to look round
    (once), then plans for the goal as said.

    `search` (off by default): while a goal names an object the agent has not seen yet ("the
    green ball", out of view at the start), it turns to look round (once) before planning; a
    room of BabyAI's Local levels is all in view after four turns. On the shipped checkpoints it
    changed the outcome of at most one episode in 200 (1,000 on GoToLocal) either way.

    `skip_futile`: an action that left the whole observation (view, direction, carried object)
    as it was is not taken again from that observation. The worlds lwm wraps are static (only
    the agent changes them), so it would change nothing again: a step into a wall, a pick-up of
    nothing. Nor is an action minigrid's rules make a no-op from the cell in front
    (`lwm.envs.language.noop_actions`: a pick-up facing nothing portable, a drop with empty
    hands, ...), tried or not. Planners still see how often each action was taken from the
    current view (`tried`), for their `repeat_penalty`.
    """

    def __init__(
        self,
        model: WorldModel,
        planner: Planner,
        parser: GoalParser,
        encoder: GoalEncoder | None = None,
        critic: Critic | None = None,
        max_critiques: int = 1,
        seed: int = 0,
        preconditions: bool = True,
        skip_futile: bool = True,
        locate: bool = True,
        search: bool = False,
    ):
        self.model = model.eval()
        self.planner = planner
        self.parser = parser
        self.encoder = encoder or GoalEncoder()
        self.critic = critic
        self.max_critiques = max_critiques
        self.seed = seed
        self.preconditions = preconditions
        self.skip_futile = skip_futile
        self.locate = locate
        self.search = search
        self.generator = torch.Generator().manual_seed(seed)
        if isinstance(getattr(planner, "cfg", None), SearchConfig) and \
                next(model.parameters()).device.type == "cpu":
            # imagination's native kernels: loaded (built the first time, about 30 s) here
            # rather than inside the first episode's time limit
            native.kernels()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        llm: Any = "local",
        planner: str | None = None,
        planner_cfg: Any = None,
        critic: bool = True,
        **kwargs: Any,
    ) -> Agent:
        """Load the world model of a run directory (or a model directory) and build an agent.

        llm: "local" (the embedded llama.cpp model), a provider string, a langchain chat model,
        or "grammar" (or None) for BabyAI's grammar parser and no critic. planner: "cem",
        "mppi", "greedy" or "policy" (the checkpoint's trained policy, `lwm train-policy`, which
        MPPI also takes as its prior with `policy_prior`); None takes the checkpoint's
        recommendation (`agent_settings`), else "cem". The planner's discount is the one Q was
        trained with unless `planner_cfg` is given.
        """
        from lwm.planning import PLANNERS

        path = Path(path)
        directory = model_dir(path)
        model = WorldModel.from_pretrained(directory)
        settings = agent_settings(path) if planner is None else {}
        planner = planner or settings.get("planner", "cem")
        if planner not in PLANNERS:
            raise ValueError(f"unknown planner {planner!r}; choose from {sorted(PLANNERS)}")
        if planner_cfg is None:
            cfg_cls = PLANNERS[planner][1]
            overrides = settings.get("planner_cfg", {})
            known = {f.name for f in dataclasses.fields(cfg_cls)}
            if set(overrides) - known:
                raise CheckpointError(f"{path}: {AGENT_SETTINGS} sets unknown {planner} settings "
                                      f"{sorted(set(overrides) - known)}")
            planner_cfg = cfg_cls(**{"discount": model.cfg.discount, **overrides})
        extra: dict[str, Any] = {}
        if planner == "policy" or getattr(planner_cfg, "policy_prior", False):
            from lwm.planning.actor import GoalPolicy

            policy = GoalPolicy.from_pretrained(directory, model)
            extra = {"policy": policy} if planner == "policy" else {"prior": policy.prior(model)}
        if llm is None or (isinstance(llm, str) and llm == "grammar"):
            from lwm.language.mission import BabyAIMissionParser

            parser, judge = BabyAIMissionParser(), None
        else:
            from lwm.language.critic import EvidenceFirstCritic
            from lwm.language.parse import GrammarFirstParser

            parser = GrammarFirstParser(llm)
            judge = EvidenceFirstCritic(parser.llm) if critic else None
        return cls(model, make_planner(planner, planner_cfg, **extra), parser, critic=judge,
                   **kwargs)

    # ------------------------------------------------------------------ acting

    @torch.no_grad()
    def run(
        self,
        instruction: str,
        env,
        seed: int | None = None,
        max_steps: int | None = None,
        decode: bool = False,
        on_step: Callable[[StepRecord], None] | None = None,
        spec: GoalSpec | None = None,
        time_limit_s: float | None = None,
    ) -> EpisodeResult:
        """Follow `instruction` in `env` (an lwm env) from `reset(seed)`.

        Raises `InstructionError` before acting when the instruction can't be grounded. `spec`
        skips parsing. `decode` keeps imagined and real views per step (for GIFs); `on_step` is
        called after every step (live displays). The episode stops after `max_steps` steps (the
        env's limit by default) or `time_limit_s` seconds, whichever comes first.
        """
        t_start = time.perf_counter()
        if spec is None:
            spec = self.parser.parse(instruction)
        parse_s = time.perf_counter() - t_start
        obs, _ = env.reset(seed=seed, options={"instruction": instruction})
        if seed is not None:
            # An episode depends on (agent seed, episode seed) only, not on the episodes this
            # agent ran before, so results are the same in any order and in any process.
            self.generator.manual_seed(int(np.random.SeedSequence([self.seed, seed])
                                           .generate_state(1)[0]))
        budget = min(max_steps or env.unwrapped.max_steps, env.unwrapped.max_steps)
        self.planner.reset()

        pending = list(spec.subgoals)
        achieved_at: dict[str, int] = {}
        events: list[str] = []
        records: list[StepRecord] = []
        critiques: list[Critique] = []
        critic_s = 0.0
        state = self.model.init_state(1)
        prev_action = torch.tensor([self.model.START])
        frame = StartFrame(obs)
        subgoal_started = 0
        locked: set[str] = set()  # colours of the locked doors seen so far
        # How often each action was taken from each (acting goal, real observation) so far: a
        # planner with a repeat penalty plays down leaving a view the way it was left before.
        tried: dict[tuple, np.ndarray] = {}
        futile: dict[tuple, set[int]] = {}  # per observation: actions that changed nothing
        # Each subgoal's share of the budget; a critic's revisions need room of their own.
        rounds = len(pending) + (self.max_critiques if self.critic is not None else 0)
        share = max(budget // rounds, 1)
        step = 0
        deadline = t_start + time_limit_s if time_limit_s is not None else float("inf")
        while pending and step < budget and time.perf_counter() < deadline:
            stage = pending[0].stage
            current = pending[0]
            locked |= locked_doors(obs)
            goal = frame.resolve_goal(current.goal) if self.locate else current.goal
            acting = (acting_goal(goal, carried(obs), locked, facing(obs)).text
                      if self.preconditions else goal.text)
            view = _view_key(obs)
            ruled_out = ({ACTION_NAMES.index(a) for a in forbidden_actions(goal, obs, locked)}
                         if self.preconditions else set())
            if self.skip_futile:
                ruled_out |= futile.get(view, set())
                ruled_out |= {ACTION_NAMES.index(a) for a in noop_actions(obs)}
            if not frame.looked_around and (
                    (self.locate and frame.unsettled(current.goal))
                    or (self.search and frame.unseen(goal))):
                # Where the named object is, is not known yet: look round before anything else.
                ruled_out |= set(range(self.model.cfg.n_actions)) - {ACTION_NAMES.index("left")}
            forbid = None
            if ruled_out:
                forbid = torch.zeros(1, self.model.cfg.n_actions, dtype=torch.bool)
                forbid[0, sorted(ruled_out)] = True
            goal_vec = self.encoder.encode(acting, as_torch=True)[None]  # (1, 384)
            z = self.model.encode(*_obs_tensors(obs))  # (1, d)
            h, state = self.model.next(state, z, prev_action)  # history through o_t
            t0 = time.perf_counter()
            seen = tried.setdefault((acting, view), np.zeros(self.model.cfg.n_actions))
            plan: PlanResult = self.planner.plan(
                self.model, state, h, goal_vec, decode=decode, generator=self.generator,
                forbid=forbid, tried=torch.from_numpy(seen)[None])
            plan_ms = (time.perf_counter() - t0) * 1e3
            action = int(plan.action[0])
            seen[action] += 1
            prev_action = plan.action
            before = obs
            obs, _, terminated, truncated, info = env.step(action)
            frame.step(action, before, obs)
            step += 1
            if _view_key(obs) == view:
                futile.setdefault(view, set()).add(action)
            events += info["events"]
            for sub in [s for s in pending if s.stage == stage]:
                if goal_achieved(sub.goal, info):
                    achieved_at[sub.text] = step
                    pending.remove(sub)
            if not pending or pending[0].stage != stage:
                subgoal_started = step
            record = StepRecord(
                step=step, subgoal=current.text, action=action, events=list(info["events"]),
                achieved=list(info["achieved"]), imagined_return=float(plan.objective[0]),
                imagined_reward=plan.reward[0].tolist(), plan_ms=plan_ms, acting=acting,
                imagined_image=plan.image[0].numpy() if decode and plan.image is not None
                else None,
                real_image=obs["image"].copy() if decode else None,
            )
            records.append(record)
            if on_step is not None:
                on_step(record)
            if terminated or truncated:
                break
            stuck = pending and step - subgoal_started >= share
            if stuck and self.critic is not None and len(critiques) < self.max_critiques:
                t0 = time.perf_counter()
                verdict = self.critic.critique(instruction, spec, events)
                critic_s += time.perf_counter() - t0
                critiques.append(verdict)
                subgoal_started = step
                if verdict.revised_subgoals is not None:
                    spec = verdict.revised_subgoals
                    pending = [s for s in spec.subgoals if s.text not in achieved_at]

        success = not pending
        if self.critic is not None and not success and len(critiques) < self.max_critiques:
            t0 = time.perf_counter()
            critiques.append(self.critic.critique(instruction, spec, events))
            critic_s += time.perf_counter() - t0
        plan_times = [r.plan_ms for r in records]
        return EpisodeResult(
            instruction=instruction, subgoals=spec.texts, success=success, steps=step,
            achieved_at=achieved_at, events=events, records=records, critiques=critiques,
            timings={"parse_s": parse_s, "plan_ms_mean": float(np.mean(plan_times)) if plan_times
                     else 0.0, "critic_s": critic_s, "total_s": time.perf_counter() - t_start},
        )


def _view_key(obs: dict) -> tuple:
    """The whole of an observation as a key: the 7x7 view, direction and carried object."""
    return (np.asarray(obs["image"]).tobytes(), int(obs["direction"]),
            np.asarray(obs["carrying"]).tobytes())


def _obs_tensors(obs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An lwm observation dict -> batched (1, ...) image, direction, carrying tensors."""
    return (torch.from_numpy(np.asarray(obs["image"]))[None],
            torch.tensor([int(obs["direction"])]),
            torch.from_numpy(np.asarray(obs["carrying"]))[None])

