"""Task suites: YAML files in the top-level `tasks/` folder, loaded and validated here.

A suite names a gymnasium env id, an episode limit, the instruction families it exercises (a verb,
optionally a second verb for two-step instructions, the object types, and paraphrase templates
for language evaluation) and an explicit train / held-out split of (colour, type) combinations
for compositional generalization: an episode is held out when its mission names a held-out
combination, and training never sees held-out missions or relabelled goals.

    suite = load_suite("babyai-goto")
    env = suite.make_env()
    seeds = suite.seeds_for("held_out", 200)      # evaluation seeds whose mission is held out

A malformed file raises `TaskSpecError` naming the file, the field and what was expected.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lwm import resources
from lwm.goals import COLORS, OBJECT_TYPES, VERBS, Goal, ObjRef, all_concrete_goals, parse_goal

Split = Literal["train", "held_out"]


class TaskSpecError(ValueError):
    """A task suite file is missing or malformed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Family(_Strict):
    """One instruction family: missions of one shape, with paraphrase templates."""

    name: str = Field(description="short name of the family")
    verb: str = Field(description="the goal verb of the (first) step, e.g. 'go to'")
    then: str | None = Field(None, description="the verb of the second step, for two-step tasks")
    types: list[str] = Field(min_length=1, description="object types the missions name")
    paraphrases: list[str] = Field(
        default_factory=list,
        description="free-form templates with {color}, {type} (and {color2}, {type2})",
    )

    @field_validator("verb", "then")
    @classmethod
    def _known_verb(cls, v: str | None) -> str | None:
        if v is not None and v not in VERBS:
            raise ValueError(f"expected one of {list(VERBS)}, got {v!r}")
        return v

    @field_validator("types")
    @classmethod
    def _known_types(cls, v: list[str]) -> list[str]:
        for t in v:
            if t not in OBJECT_TYPES:
                raise ValueError(f"expected object types from {list(OBJECT_TYPES)}, got {t!r}")
        return v

    @field_validator("paraphrases")
    @classmethod
    def _templates(cls, v: list[str]) -> list[str]:
        for template in v:
            if "{color}" not in template:
                raise ValueError(f"a paraphrase must contain {{color}}: {template!r}")
        return v


class SeedRanges(_Strict):
    """Where training and evaluation seeds start; evaluation seeds never overlap training's."""

    train_start: int = Field(0, ge=0)
    eval_start: int = Field(1_000_000, ge=0)


class SplitSpec(_Strict):
    """The explicit train / held-out split of (colour, type) combinations."""

    train: list[tuple[str, str]]
    held_out: list[tuple[str, str]]

    @field_validator("train", "held_out")
    @classmethod
    def _pairs(cls, v: list[tuple[str, str]]) -> list[tuple[str, str]]:
        for color, type_ in v:
            if color not in COLORS or type_ not in OBJECT_TYPES:
                raise ValueError(
                    f"expected [colour, type] pairs with colour in {list(COLORS)} and type in "
                    f"{list(OBJECT_TYPES)}, got [{color}, {type_}]"
                )
        return v

    @model_validator(mode="after")
    def _disjoint(self) -> SplitSpec:
        both = set(self.train) & set(self.held_out)
        if both:
            raise ValueError(f"combinations both in train and held_out: {sorted(both)}")
        return self


class TaskSuite(_Strict):
    """A task suite: env, episode limit, instruction families and the generalization split."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    description: str
    env_id: str = Field(description="a gymnasium id: BabyAI-*, MiniGrid-* or lwm/*")
    max_steps: int = Field(gt=0, description="episode limit (steps)")
    families: list[Family] = Field(min_length=1)
    split: SplitSpec
    seeds: SeedRanges = SeedRanges()
    source: str | None = Field(None, description="the file it was loaded from")

    @model_validator(mode="after")
    def _split_covers_families(self) -> TaskSuite:
        types = {t for f in self.families for t in f.types}
        named = set(self.split.train) | set(self.split.held_out)
        missing = sorted((c, t) for c in COLORS for t in types if (c, t) not in named)
        if missing:
            raise ValueError(
                f"split: every (colour, type) of the families' types must be in train or "
                f"held_out; missing {missing}"
            )
        return self

    # ------------------------------------------------------------------ splits

    def split_of_object(self, obj: ObjRef) -> Split:
        """'held_out' when the object's (colour, type) is held out; colourless refs are 'train'."""
        return "held_out" if (obj.color, obj.type) in set(self.split.held_out) else "train"

    def split_of_goal(self, goal: Goal | str) -> Split:
        """'held_out' when any object the goal names is a held-out combination."""
        goal = parse_goal(goal) if isinstance(goal, str) else goal
        objs = [goal.obj] if goal.target is None else [goal.obj, goal.target]
        held = any(self.split_of_object(o) == "held_out" for o in objs)
        return "held_out" if held else "train"

    def split_of_episode(self, env) -> Split:
        """The split of the mission of a freshly reset env: held out when any object the mission
        can refer to (minigrid's matching object set, so "a ball" counts every ball) is."""
        held = set(self.split.held_out)
        for desc in _mission_descs(env.unwrapped.instrs):
            if any((o.color, o.type) in held for o in desc.obj_set):
                return "held_out"
        return "train"

    def goal_vocabulary(self, which: str = "suite", held_out: bool = False) -> list[str]:
        """Canonical texts of concrete goals: with 'suite', only those with the suite's verbs and
        object types ('all': every verb and type); held-out combinations only with `held_out`.
        Without them this is what training may use (its relabelling vocabulary)."""
        if which not in ("suite", "all"):
            raise ValueError(f"goal vocabulary must be 'suite' or 'all', got {which!r}")
        verbs = {v for f in self.families for v in (f.verb, f.then) if v}
        types = {t for f in self.families for t in f.types}
        keep = []
        for goal in all_concrete_goals():
            if not held_out and self.split_of_goal(goal) != "train":
                continue
            objs = [goal.obj] if goal.target is None else [goal.obj, goal.target]
            if which == "all" or (goal.verb in verbs and goal.obj.type in types
                                  and all(o.type in types or o.type == "door" for o in objs)):
                keep.append(goal.text)
        return keep

    # ------------------------------------------------------------------ envs and seeds

    def make_env(self, **kwargs: Any):
        """A `LanguageWrapper` env for this suite, with the suite's episode limit."""
        from lwm.envs import make_env

        kwargs.setdefault("max_steps", self.max_steps)
        return make_env(self.env_id, **kwargs)

    def iter_seeds(
        self, split: Split | None, *, evaluation: bool, env=None, start: int | None = None
    ) -> Iterator[int]:
        """Seeds, in order, whose mission falls in `split` (all when None), from the training or
        the evaluation seed range (from `start` when given)."""
        env = env if env is not None else self.make_env()
        seed = self.seeds.eval_start if evaluation else self.seeds.train_start
        seed = seed if start is None else start
        while True:
            if split is None:
                yield seed
            else:
                env.reset(seed=seed)
                if self.split_of_episode(env) == split:
                    yield seed
            seed += 1

    def seeds_for(self, split: Split | None, n: int, *, evaluation: bool = True) -> list[int]:
        """The first `n` seeds of `iter_seeds`."""
        it = self.iter_seeds(split, evaluation=evaluation)
        return [next(it) for _ in range(n)]

    # ------------------------------------------------------------------ instructions

    def paraphrases(self, goals: list[Goal]) -> list[str]:
        """Every paraphrase of the families matching `goals` (concrete), filled in."""
        out = []
        for family in self.families:
            verbs = [family.verb] + ([family.then] if family.then else [])
            if [g.verb for g in goals] != verbs:
                continue
            objs = [g.obj for g in goals] if family.then else [goals[0].obj, goals[0].target]
            fill = {"color": objs[0].color, "type": objs[0].type}
            if len(objs) > 1 and objs[1] is not None:
                fill |= {"color2": objs[1].color, "type2": objs[1].type}
            out += [t.format(**fill) for t in family.paraphrases]
        return out


def _mission_descs(instrs) -> list:
    """minigrid ObjDesc objects of a (possibly sequential) BabyAI instruction."""
    descs = []
    for attr in ("desc", "desc_move", "desc_fixed"):
        if hasattr(instrs, attr):
            descs.append(getattr(instrs, attr))
    for attr in ("instr_a", "instr_b"):
        if hasattr(instrs, attr):
            descs += _mission_descs(getattr(instrs, attr))
    return descs


def _suites_dir():
    return resources.files("tasks")


def list_suites() -> list[str]:
    """Names of the task suites lwm ships."""
    return sorted(
        p.name.removesuffix(".yaml")
        for p in _suites_dir().iterdir()
        if p.name.endswith(".yaml") and _is_suite_file(p.read_text())
    )


def _is_suite_file(text: str) -> bool:
    data = yaml.safe_load(text)
    return isinstance(data, dict) and "env_id" in data


def load_suite(name_or_path: str | Path) -> TaskSuite:
    """Load and validate a suite by name ("babyai-goto") or from a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise TaskSpecError(f"{path}: no such task file")
        return parse_suite(path.read_text(), source=str(path))
    resource = _suites_dir() / f"{name_or_path}.yaml"
    if not resource.is_file():
        raise TaskSpecError(
            f"unknown task suite {str(name_or_path)!r}; lwm ships {list_suites()} "
            "(or pass a path to a YAML file)"
        )
    return parse_suite(resource.read_text(), source=f"tasks/{name_or_path}.yaml")


def parse_suite(text: str, source: str = "<string>") -> TaskSuite:
    """Validate suite YAML text; errors name `source`, the field and what was expected."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise TaskSpecError(f"{source}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise TaskSpecError(f"{source}: expected a mapping of suite fields at the top level")
    data.setdefault("source", source)
    try:
        return TaskSuite.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"]) or "(top level)"
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(f"field '{field}': {msg} (got {e.get('input')!r})")
        raise TaskSpecError(f"{source}: " + "; ".join(problems)) from None
