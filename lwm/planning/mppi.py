"""MPPI over discrete action sequences, after TD-MPC2's planner (Hansen et al., 2024).

Like CEM, each plan step has a categorical distribution (B, H, A) that is sampled, scored in
imagination and refitted. The differences are TD-MPC2's: the refit weights the E best sequences
by softmax(J / temperature) instead of equally, so a clearly better sequence dominates and
near-ties share; a share of the candidates comes from a policy prior rolled out in imagination
(drawn once per call, kept in every iteration's elite pool), by default the world model's own Q
head, softmax(Q(h, g) / prior_temperature), as TD-MPC2 uses its policy; and the plan taken is
either the best sequence (greedy) or one drawn from the final elites by their weights. J
bootstraps from the value head at the horizon (`lwm.planning.base`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lwm.models.ssm import BatchState
from lwm.models.world_model import WorldModel
from lwm.planning.base import (
    Candidates,
    Planner,
    PlanResult,
    PolicyPrior,
    PrefixTree,
    SearchConfig,
    WarmStart,
    action_frequencies,
    forbid_first,
    penalize_repeats,
    plan_result,
    sample_prior,
    sample_sequences,
)


@dataclass
class MPPIConfig(SearchConfig):
    """Search budget (`SearchConfig`; K counts the prior's rollouts) and the update rule of
    `MPPI`."""

    elites: int = 64
    """E: best sequences the softmax-weighted refit uses."""
    temperature: float = 0.05
    """tau of the weights softmax(J / tau); J is a probability, so differences are small."""
    prior_share: float = 0.05
    """Share of the K candidates drawn from the policy prior (0: none); TD-MPC2 uses 24/512."""
    q_prior: bool = True
    """Without a prior callable, use the world model's Q head as the prior."""
    policy_prior: bool = False
    """Draw the prior's candidates from the checkpoint's trained policy (`lwm train-policy`):
    `Agent.from_pretrained` passes it as the prior."""
    prior_temperature: float = 0.5
    """Temperature of softmax(Q logits / T), the Q-head prior."""
    greedy: bool = True
    """Take the best sequence; False: draw one from the final elites by their weights."""


class MPPI(Planner):
    """MPPI planner (module docstring), batched over environments.

    prior: optional proposal `prior(h, goal) -> logits` (see `PolicyPrior`); None: the world
    model's Q head if `cfg.q_prior`, else no prior.
    """

    def __init__(self, cfg: MPPIConfig | None = None, prior: PolicyPrior | None = None):
        self.cfg = cfg or MPPIConfig()
        self.prior = prior
        n_prior = round(self.cfg.prior_share * self.cfg.candidates)
        if not 0 < self.cfg.elites <= self.cfg.candidates or n_prior >= self.cfg.candidates:
            raise ValueError(f"need 0 < elites <= candidates > prior rollouts, got {self.cfg}")
        self.warm = WarmStart(self.cfg.horizon, self.cfg.uniform_mix, self.cfg.excluded)

    def proposal(self, model: WorldModel, goal: Tensor | None = None,
                 k: int = 0) -> PolicyPrior | None:
        """The prior candidates are drawn from: the given one, the Q head's, or none. With the
        plan's goals (B, goal_dim) and k rollouts per environment, the Q head's reads Q with
        those goals folded in (`WorldModel.fold_goals`) for the rows of the B*k rollouts
        (environment-major, as `sample_prior` lays them out) instead of folding each row's
        goal again at every step."""
        if self.prior is not None or not self.cfg.q_prior:
            return self.prior
        excluded = list(self.cfg.excluded)
        fold = env = None
        if goal is not None:
            fold = model.fold_goals(goal)
            env = torch.arange(len(goal), device=goal.device).repeat_interleave(k)

        def q_prior(h: Tensor, goal: Tensor) -> Tensor:
            if fold is not None and len(h) == len(env):
                q = model.q_folded(fold, h, env)
            else:
                q = model.q(h, goal)
            logits = q / self.cfg.prior_temperature
            logits[..., excluded] = float("-inf")
            return logits

        return q_prior

    def weights(self, objective: Tensor) -> Tensor:
        """Softmax weights (B, E) of elite objectives (B, E) at the temperature."""
        return torch.softmax(objective / self.cfg.temperature, dim=1)

    @torch.no_grad()
    def plan(
        self,
        model: WorldModel,
        state: BatchState,
        h: Tensor,
        goal: Tensor,
        decode: bool = False,
        generator: torch.Generator | None = None,
        forbid: Tensor | None = None,
        tried: Tensor | None = None,
    ) -> PlanResult:
        """See `Planner.plan`."""
        cfg, A = self.cfg, model.cfg.n_actions
        probs = forbid_first(self.warm.start(h.shape[0], A, h.device), forbid)  # (B, H, A)
        n_prior = round(cfg.prior_share * cfg.candidates)
        prior = self.proposal(model, goal, n_prior)
        n_prior = 0 if prior is None else n_prior
        pool: Candidates | None = None  # the prior's rollouts, scored once, in every pool
        if n_prior:
            pool = penalize_repeats(sample_prior(
                model, state, h, goal, prior, n_prior, cfg.horizon, cfg.discount, generator, forbid,
                cfg.terminal,
            ), tried, cfg.repeat_penalty)
        best = None
        # prefixes shared by iterations; the last step's p, c only for the plan returned
        tree = PrefixTree(model, state, h, goal, cfg.terminal, lazy_last=True)
        for _ in range(cfg.iterations):
            actions = sample_sequences(probs, cfg.candidates - n_prior, generator)  # (B, K', H)
            scored = penalize_repeats(tree.score(actions, cfg.discount), tried, cfg.repeat_penalty)
            # Fresh samples first: top-k breaks ties by position, and a flat objective must not
            # refit to the same prior rollouts every iteration.
            elites = (scored if pool is None else scored.cat(pool)).top(cfg.elites)  # (B, E, ...)
            weights = self.weights(elites.objective)  # (B, E)
            # step 0 of every candidate avoids `forbid`, so the refit keeps it at zero there
            probs = cfg.momentum * probs + (1 - cfg.momentum) * action_frequencies(
                elites.actions, A, weights
            )
            best = elites.top(1) if best is None else best.cat(elites).top(1)
        if not cfg.greedy:
            pick = torch.multinomial(weights, 1, generator=generator)  # (B, 1)
            best = elites.select(pick)
        if cfg.warm_start:
            self.warm.remember(probs)
        return plan_result(model, state, h, tree.complete(best), probs, decode)

    def reset(self) -> None:
        self.warm.reset()

    def reset_envs(self, envs: Sequence[int] | Tensor) -> None:
        self.warm.reset_envs(envs)
