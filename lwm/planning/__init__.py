"""Planning in imagination: CEM and MPPI over action sequences (and greedy Q and a policy trained
by actor-critic in imagination, no search), behind one `Planner` interface.

Planners only talk to a `WorldModel` (tensors in, tensors out); they never touch an environment.
Adding a planner: one file with a `Planner` subclass and its config, one line in `PLANNERS`.
"""

from __future__ import annotations

from typing import Any

from lwm.planning.actor import (
    ActorCriticConfig,
    GoalPolicy,
    PolicyPlanner,
    PolicyPlannerConfig,
)
from lwm.planning.base import (
    Candidates,
    Planner,
    PlanResult,
    PolicyPrior,
    SearchConfig,
    objective,
)
from lwm.planning.cem import CEM, CEMConfig
from lwm.planning.greedy import GreedyQ, GreedyQConfig
from lwm.planning.mppi import MPPI, MPPIConfig

PLANNERS: dict[str, tuple[type[Planner], type]] = {
    "cem": (CEM, CEMConfig),
    "mppi": (MPPI, MPPIConfig),
    "greedy": (GreedyQ, GreedyQConfig),
    "policy": (PolicyPlanner, PolicyPlannerConfig),
}
"""name -> (planner class, its config dataclass)."""


def make_planner(name: str, cfg: Any = None, **kwargs: Any) -> Planner:
    """Build the planner registered as `name` ("cem", "mppi", ...) from its config (None:
    defaults); extra keyword arguments go to the constructor (MPPI's `prior`, the policy
    planner's `policy`)."""
    if name not in PLANNERS:
        raise ValueError(f"unknown planner {name!r}; choose from {sorted(PLANNERS)}")
    cls, cfg_cls = PLANNERS[name]
    if cfg is not None and not isinstance(cfg, cfg_cls):
        raise TypeError(f"planner {name!r} takes a {cfg_cls.__name__}, got {type(cfg).__name__}")
    return cls(cfg, **kwargs)


__all__ = [
    "ActorCriticConfig",
    "CEM",
    "MPPI",
    "PLANNERS",
    "CEMConfig",
    "GreedyQ",
    "GoalPolicy",
    "GreedyQConfig",
    "Candidates",
    "MPPIConfig",
    "PlanResult",
    "Planner",
    "PolicyPlanner",
    "PolicyPlannerConfig",
    "PolicyPrior",
    "SearchConfig",
    "make_planner",
    "objective",
]
