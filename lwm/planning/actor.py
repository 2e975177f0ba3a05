"""A goal-conditioned policy trained by actor-critic in imagination (Dreamer style), usable
alone as a fast policy (`PolicyPlanner`, planner "policy") and as MPPI's proposal distribution.

From real states (the backbone state and history h_0 after a real observation, and the goal g
pursued there) the actor rolls the world model forward H steps with its own sampled actions:

    a_t ~ pi(. | h_t, g),  p_t = sigmoid(reward(h_t, a_t, g)),  c_t = sigmoid(cont(h_t, a_t))
    h_{t+1} = next(state, encode(most_likely(decode(h_t, a_t))), a_t)

Achieving the goal ends the task (the world model's own TD target for Q), so the lambda-return
of step t is

    R_H = v'(h_H),  R_t = p_t + gamma (1 - p_t) c_t ((1 - lambda) v'(h_{t+1}) + lambda R_{t+1})

with v' the slow (EMA) copy of the critic. The critic v(h, g) (a probability, fitted by binary
cross-entropy to R_t) is the baseline; the actor follows REINFORCE, log pi(a_t) (R_t - v(h_t)),
plus an entropy bonus, each step weighted by the chance the task is still going on there,
prod_{s<t} (1 - p_s) c_s. Gradients never reach the world model, which stays as trained.

With `q_base` the actor's logits are the world model's Q-head logits / `q_temperature` plus a
learned residual that starts at zero: training starts from the softmax policy of the Q head the
greedy planner acts on, and imagination moves it from there.

    policy = GoalPolicy(ActorCriticConfig(), model)
    loss, metrics = policy.loss(model, state, h, goal)       # one batch of real start states
    policy.save_pretrained(model_dir)                        # policy.safetensors + policy.json
    planner = PolicyPlanner(policy=GoalPolicy.from_pretrained(model_dir, model))

`lwm train-policy` (lwm.train_policy) trains one for a checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lwm.models.ssm import BatchState
from lwm.models.world_model import CheckpointError, WorldModel, _atomic_write, check_tensors
from lwm.planning.base import Planner, PlanResult, PolicyPrior, one_step_plan

__all__ = [
    "POLICY_CONFIG",
    "POLICY_FILE",
    "ActorCriticConfig",
    "GoalPolicy",
    "PolicyPlanner",
    "PolicyPlannerConfig",
    "lambda_returns",
]

POLICY_FILE = "policy.safetensors"
POLICY_CONFIG = "policy.json"
FORMAT = "lwm-goal-policy"
VERSION = 1


@dataclass
class ActorCriticConfig:
    """The policy's network and how it learns in imagination."""

    hidden: int = 256
    """Width of the actor's and the critic's MLPs."""
    q_base: bool = True
    """Actor logits = Q logits / q_temperature + a learned residual (zero at the start)."""
    q_temperature: float = 0.1
    """Temperature of the Q-head base: 0.1 makes its most likely action about 0.64 likely on
    GoToLocal start states (the shipped model), where 1 would leave it near uniform."""
    horizon: int = 8
    """Imagined steps per start state."""
    discount: float = 0.9
    """gamma; the world model's (its Q and continuation heads were trained with it)."""
    lam: float = 0.95
    """lambda of the lambda-returns."""
    entropy: float = 1e-3
    """Weight of the actor's entropy bonus."""
    critic_ema: float = 0.98
    """Decay of the critic's slow copy that bootstraps the returns."""
    lr: float = 3e-4
    grad_clip: float = 10.0
    excluded: tuple[int, ...] = (6,)
    """Actions the policy never takes (minigrid's no-op `done`: the world model never saw it)."""

    def __post_init__(self) -> None:
        if self.horizon < 1 or self.hidden < 1:
            raise ValueError(f"horizon and hidden must be >= 1, got {self}")
        if not 0.0 <= self.lam <= 1.0 or not 0.0 < self.discount <= 1.0:
            raise ValueError(f"lam must be in [0, 1] and discount in (0, 1], got {self}")
        if self.q_temperature <= 0:
            raise ValueError(f"q_temperature must be > 0, got {self.q_temperature}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ActorCriticConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        if set(data) - known:
            raise CheckpointError(f"unknown policy settings {sorted(set(data) - known)}")
        data = dict(data)
        if "excluded" in data:
            data["excluded"] = tuple(data["excluded"])
        return cls(**data)


def lambda_returns(p: Tensor, c: Tensor, v: Tensor, discount: float, lam: float) -> Tensor:
    """Lambda-returns (H, ...) of goal probabilities p_t and continuations c_t (H, ...) with
    values v (H+1, ...) of the states reached: R_H = v_H, R_t = p_t + gamma (1 - p_t) c_t
    ((1 - lambda) v_{t+1} + lambda R_{t+1}). lambda = 0 is the TD target of Q, lambda = 1 the
    Monte-Carlo return bootstrapped at H."""
    returns = torch.empty_like(p)
    ret = v[-1]
    for t in reversed(range(p.shape[0])):
        ret = p[t] + discount * (1 - p[t]) * c[t] * ((1 - lam) * v[t + 1] + lam * ret)
        returns[t] = ret
    return returns


class _Head(nn.Module):
    """An MLP of the history h, modulated by the goal embedding g (FiLM): (h, g) -> (N, n_out)."""

    def __init__(self, latent_dim: int, goal_dim: int, hidden: int, n_out: int):
        super().__init__()
        self.h_in = nn.Linear(latent_dim, hidden)
        self.g_in = nn.Linear(goal_dim, 2 * hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, n_out)

    def forward(self, h: Tensor, g: Tensor) -> Tensor:
        scale, shift = self.g_in(g).chunk(2, dim=-1)
        h = h[..., : self.h_in.in_features]  # the features: not the map decoder's cell ids
        x = F.silu(F.layer_norm(self.h_in(h), (self.h_in.out_features,)) * (1 + scale) + shift)
        return self.out(F.silu(self.mid(x)))


class GoalPolicy(nn.Module):
    """Actor pi(a | h, g) and critic v(h, g) for one world model's histories and goals."""

    def __init__(self, cfg: ActorCriticConfig, model: WorldModel):
        super().__init__()
        self.cfg = cfg
        self.model_config = model.cfg.to_dict()
        mc = model.cfg
        self.n_actions = mc.n_actions
        self.actor = _Head(model.feature_dim, mc.goal_dim, cfg.hidden, mc.n_actions)
        self.critic = _Head(model.feature_dim, mc.goal_dim, cfg.hidden, 1)
        if cfg.q_base:  # start exactly as softmax(Q / T)
            nn.init.zeros_(self.actor.out.weight)
            nn.init.zeros_(self.actor.out.bias)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        mask = torch.zeros(mc.n_actions, dtype=torch.bool)
        mask[list(cfg.excluded)] = True
        self.register_buffer("excluded", mask, persistent=False)

    # ------------------------------------------------------------------ acting

    def logits(self, model: WorldModel, h: Tensor, goal: Tensor,
               psi_q: Tensor | None = None) -> Tensor:
        """h (N, latent_dim), goal (N, goal_dim) -> action logits (N, A), excluded actions at
        -inf. `psi_q`: the goals' Q features (`model.goal_features(goal)["q"]`), if at hand."""
        logits = self.actor(h, goal)
        if self.cfg.q_base:
            with torch.no_grad():
                q = model.q(h, goal) if psi_q is None else model.q(h, psi=psi_q)
            logits = logits + q / self.cfg.q_temperature
        return logits.masked_fill(self.excluded, float("-inf"))

    def value(self, h: Tensor, goal: Tensor, target: bool = False) -> Tensor:
        """The critic's logit (N,) of the discounted chance of achieving the goal under pi."""
        return (self.critic_target if target else self.critic)(h, goal)[..., 0]

    def prior(self, model: WorldModel) -> PolicyPrior:
        """This policy as a planner's proposal: (h, goal) -> logits (MPPI's `prior`)."""

        @torch.no_grad()
        def propose(h: Tensor, goal: Tensor) -> Tensor:
            return self.logits(model, h, goal)

        return propose

    # ------------------------------------------------------------------ learning

    def loss(self, model: WorldModel, state: BatchState, h: Tensor, goal: Tensor,
             generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """Actor and critic loss of one imagination of H steps from B real start states.

        state, h (B, latent_dim): the backbone state and history after each real observation
        (`state` is not modified); goal (B, goal_dim): the goal pursued there."""
        cfg = self.cfg
        hs, actions, rewards, conts = [h], [], [], []
        with torch.no_grad():
            psi = model.goal_features(goal)
            s = state.clone()
            for _ in range(cfg.horizon):
                probs = self.logits(model, hs[-1], goal, psi["q"]).softmax(-1)
                a = torch.multinomial(probs, 1, generator=generator)[:, 0]
                rewards.append(torch.sigmoid(model.reward(hs[-1], a, psi=psi["reward"])))
                conts.append(torch.sigmoid(model.cont(hs[-1], a)))
                h_next, s = model.next(s, model.predict_latent(hs[-1], a), a)
                hs.append(h_next)
                actions.append(a)
            p, c = torch.stack(rewards), torch.stack(conts)  # (H, B)
            h_all = torch.stack(hs)  # (H+1, B, latent)
            goal_all = goal.expand(cfg.horizon + 1, *goal.shape)
            slow = torch.sigmoid(self.value(h_all, goal_all, target=True))  # (H+1, B)
            returns = lambda_returns(p, c, slow, cfg.discount, cfg.lam)
            going = torch.cumprod(F.pad((1 - p) * c, (0, 0, 1, 0), value=1.0), dim=0)[:-1]
        h_in, g_in = h_all[:-1], goal_all[:-1]  # (H, B, ...)
        logits = self.logits(model, h_in.flatten(0, 1), g_in.flatten(0, 1),
                             psi["q"].repeat(cfg.horizon, 1))  # (H*B, A)
        logp_all = logits.log_softmax(-1)
        taken = torch.stack(actions).flatten()  # (H*B,)
        logp = logp_all.gather(-1, taken[:, None])[:, 0].view(cfg.horizon, -1)
        # excluded actions: p = 0 and log p = -inf; 0 * -inf would poison the gradient
        entropy = -(logp_all.exp() * logp_all.masked_fill(self.excluded, 0.0)).sum(-1)
        entropy = entropy.view(cfg.horizon, -1)
        v_logit = self.value(h_in, g_in)  # (H, B)
        advantage = returns - torch.sigmoid(v_logit).detach()
        weight = going / going.sum().clamp(min=1e-6)
        actor_loss = -(weight * (logp * advantage + cfg.entropy * entropy)).sum()
        critic_loss = (weight * F.binary_cross_entropy_with_logits(
            v_logit, returns, reduction="none")).sum()
        total = actor_loss + critic_loss
        metrics = {"actor": actor_loss, "critic": critic_loss, "return": returns[0].mean(),
                   "entropy": entropy[0].mean(), "value": torch.sigmoid(v_logit[0]).mean()}
        return total, {k: float(v.detach()) for k, v in metrics.items()}

    @torch.no_grad()
    def update_target(self) -> None:
        """Move the critic's slow copy towards the critic (EMA)."""
        decay = self.cfg.critic_ema
        for slow, fast in zip(self.critic_target.parameters(), self.critic.parameters(),
                              strict=True):
            slow.lerp_(fast, 1 - decay)

    # ------------------------------------------------------------------ save / load

    def save_pretrained(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write `policy.safetensors` (fp32) and `policy.json` (this config, the world model's
        config it was trained for, and `extra`) into the directory `path`; returns it."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().contiguous() for k, v in self.state_dict().items()}
        meta = {"format": FORMAT, "version": VERSION, "config": self.cfg.to_dict(),
                "world_model": self.model_config, **(extra or {})}
        _atomic_write(path / POLICY_FILE, lambda tmp: save_file(tensors, str(tmp)))
        _atomic_write(path / POLICY_CONFIG,
                      lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, model: WorldModel) -> GoalPolicy:
        """The policy in directory `path`, refused (`CheckpointError`) when it is missing,
        corrupt, not an lwm policy, or trained for a world model with another config."""
        from lwm.models.world_model import read_safetensors

        path = Path(path)
        config_file, weights = path / POLICY_CONFIG, path / POLICY_FILE
        if not config_file.is_file() or not weights.is_file():
            raise CheckpointError(f"no trained policy in {path} (expected {POLICY_CONFIG} and "
                                  f"{POLICY_FILE}; train one with `lwm train-policy`)")
        try:
            meta = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{config_file}: corrupt policy config ({err})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"{config_file} is not an lwm goal policy")
        if meta.get("version") != VERSION:
            raise CheckpointError(f"{config_file}: policy format version {meta.get('version')}, "
                                  f"this lwm reads version {VERSION}")
        if meta.get("world_model") != json.loads(json.dumps(model.cfg.to_dict())):
            raise CheckpointError(f"the policy in {path} was trained for a world model with "
                                  "another config; retrain it with `lwm train-policy`")
        policy = cls(ActorCriticConfig.from_dict(meta["config"]), model)
        tensors = read_safetensors(weights)
        check_tensors(weights, tensors, policy.state_dict())
        policy.load_state_dict(tensors)
        return policy.eval()


# ---------------------------------------------------------------------- the planner


@dataclass
class PolicyPlannerConfig:
    """How the policy planner acts on the trained policy."""

    discount: float = 0.9
    """gamma of the reported objective."""
    greedy: bool = True
    """Take the most likely action (else sample it)."""
    repeat_penalty: float = 0.0
    """Subtracted from an action's probability once for each time it was already taken from
    the same real observation this episode (`tried`), as for the greedy Q planner."""


class PolicyPlanner(Planner):
    """Acts on a trained `GoalPolicy`: one actor pass per action, no search. The plan it reports
    is one step: the action, its predicted reward and continuation, the critic's value."""

    def __init__(self, cfg: PolicyPlannerConfig | None = None, policy: GoalPolicy | None = None):
        if policy is None:
            raise ValueError("the policy planner needs a trained policy (`lwm train-policy`)")
        self.cfg = cfg or PolicyPlannerConfig()
        self.policy = policy.eval()

    @torch.no_grad()
    def plan(self, model, state, h, goal, decode=False, generator=None, forbid=None,
             tried=None) -> PlanResult:
        """See `Planner.plan`; `state` is unused."""
        logits = self.policy.logits(model, h, goal)
        if forbid is not None:
            logits = logits.masked_fill(forbid, float("-inf"))
        if not bool(torch.isfinite(logits).any(-1).all()):
            raise ValueError("forbid rules out every action an environment could take")
        probs = logits.softmax(-1)
        if self.cfg.greedy:
            score = probs
            if tried is not None and self.cfg.repeat_penalty:
                score = probs - self.cfg.repeat_penalty * tried.to(probs.dtype)
            action = score.masked_fill(~torch.isfinite(logits), float("-inf")).argmax(-1)
        else:
            action = torch.multinomial(probs, 1, generator=generator)[:, 0]
        psi = model.goal_features(goal)
        reward = torch.sigmoid(model.reward(h, action, psi=psi["reward"]))[:, None]
        cont = torch.sigmoid(model.cont(h, action))[:, None]
        value = torch.sigmoid(self.policy.value(h, goal))
        return one_step_plan(model, h, action, reward, cont, value, probs[:, None], decode)
