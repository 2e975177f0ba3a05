"""Train a goal-conditioned policy for a trained world model, by actor-critic in imagination.

    lwm train-policy --checkpoint lwm/resources/checkpoints/babyai-goto --out runs/policy/goto

Imagination starts from real states: `envs` episodes on the suite's training seeds (missions in
held-out combinations never) step in lockstep with the policy's own actions, with an `epsilon`
share of exploration-policy actions. Each update imagines `horizon` steps from the current state
of every episode still running (`GoalPolicy.loss`), then each of them takes one real step; when
too few are left running, a new batch of episodes starts (those still running are cut off and
count as failures in the reported real success rate). The world model is never changed.

The output directory is a complete checkpoint: the world model's files (copied) and the policy
(`policy.safetensors`, `policy.json`), so `lwm eval --checkpoint OUT --planner policy` and
`Agent.from_pretrained(OUT, planner="policy")` act on it, and MPPI draws its prior candidates
from it with `policy_prior`. Every `save_every` updates the policy, the Adam state and the
counters are written (atomically); a killed run resumes from there with the same command.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lwm.envs.language import (
    EXPLORATION_PROBS,
    carried,
    facing,
    goal_achieved,
    instr_goals,
    locked_doors,
)
from lwm.goals import acting_goal
from lwm.models.world_model import CheckpointError, WorldModel, model_dir
from lwm.planning.actor import POLICY_CONFIG, ActorCriticConfig, GoalPolicy
from lwm.tasks import TaskSuite, load_suite

__all__ = ["PolicyTrainConfig", "PolicyTrainer"]

STATE_FILE = "policy_trainer.json"
OPTIMIZER_FILE = "policy_optimizer.safetensors"
MODEL_FILES = ("config.json", "model.safetensors", "agent.json")
"""The world model's files copied into the output directory (agent.json if there is one)."""


@dataclass
class PolicyTrainConfig:
    """A policy training run: where the start states come from, and how long."""

    suite: str | None = None
    """Task suite whose training seeds to play (default: the checkpoint's, from trainer.json)."""
    updates: int = 2000
    envs: int = 64
    """Episodes stepping in lockstep: the start states of one update."""
    min_running: float = 0.25
    """Start new episodes when fewer than this share of `envs` is still running."""
    epsilon: float = 0.1
    """Share of real actions drawn from the exploration policy instead of the actor."""
    seed: int = 0
    threads: int = 1
    save_every: int = 250
    actor: ActorCriticConfig = field(default_factory=ActorCriticConfig)

    def __post_init__(self) -> None:
        if self.updates < 0 or self.envs < 1 or self.save_every < 1:
            raise ValueError(f"need updates >= 0, envs >= 1 and save_every >= 1, got {self}")
        if not 0.0 <= self.epsilon <= 1.0 or not 0.0 < self.min_running <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1] and min_running in (0, 1], got {self}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Episodes:
    """`n` episodes on training seeds stepping in lockstep with one batched backbone state."""

    def __init__(self, suite: TaskSuite, model: WorldModel, goal_of, seeds, n: int):
        self.model, self.goal_of = model, goal_of
        self.envs = [suite.make_env() for _ in range(n)]
        self.obs, self.pending, self.locked = [], [], []
        for env in self.envs:
            obs, _ = env.reset(seed=next(seeds))
            self.obs.append(obs)
            self.pending.append(instr_goals(env.unwrapped.instrs))
            self.locked.append(set())
        self.running = np.ones(n, dtype=bool)
        self.success = np.zeros(n, dtype=bool)
        self.state = model.init_state(n)
        self.prev = torch.full((n,), model.START)
        self.h: torch.Tensor
        self.goal: torch.Tensor
        self._observe()

    @torch.no_grad()
    def _observe(self) -> None:
        """Step the backbone over the newest observations and pick each episode's acting goal."""
        o = self.obs
        image = torch.from_numpy(np.stack([x["image"] for x in o]))
        direction = torch.tensor([int(x["direction"]) for x in o])
        carrying = torch.from_numpy(np.stack([np.asarray(x["carrying"]) for x in o]))
        self.h, self.state = self.model.next(self.state, self.model.encode(
            image, direction, carrying), self.prev)
        goals = []
        for obs, pending, seen in zip(o, self.pending, self.locked, strict=True):
            seen |= locked_doors(obs)
            goals.append(acting_goal(pending[0], carried(obs), seen, facing(obs)).text)
        self.goal = torch.stack([self.goal_of(t) for t in goals])

    def step(self, actions: np.ndarray) -> None:
        """One real step of every running episode (finished ones stand still)."""
        for i in np.flatnonzero(self.running):
            obs, reward, terminated, truncated, info = self.envs[i].step(int(actions[i]))
            self.obs[i] = obs
            if len(self.pending[i]) > 1 and goal_achieved(self.pending[i][0], info):
                self.pending[i] = self.pending[i][1:]
            if terminated or truncated:
                self.running[i] = False
                self.success[i] = terminated and reward > 0
        self.prev = torch.as_tensor(actions, dtype=torch.long)
        self._observe()


class PolicyTrainer:
    """Trains (or resumes training) the policy of the world model at `checkpoint` (a run or
    model directory, or 'shipped:SUITE') into `out`."""

    def __init__(self, checkpoint: str | Path, out: str | Path, cfg: PolicyTrainConfig,
                 progress: bool = True):
        self.cfg, self.progress = cfg, progress
        source = model_dir(checkpoint)
        self.out = Path(out)
        torch.set_num_threads(cfg.threads)
        self.model = WorldModel.from_pretrained(source).eval().requires_grad_(False)
        suite = cfg.suite or _suite_of(source)
        if suite is None:
            raise ValueError(f"{checkpoint} does not say which suite it was trained on "
                             "(no trainer.json): pass --suite")
        self.suite = load_suite(suite)
        actor = dataclasses.replace(cfg.actor, discount=self.model.cfg.discount)
        self.policy = GoalPolicy(actor, self.model)
        self.opt = _adam(self.policy)
        self.state: dict[str, Any] = {"updates": 0, "episodes": 0, "successes": 0,
                                      "next_seed": self.suite.seeds.train_start}
        self.rng = np.random.default_rng(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        if (self.out / STATE_FILE).is_file():
            self._resume()
        else:
            self._copy_model(source)
        self._goals: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ setup

    def _copy_model(self, source: Path) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if source.resolve() == self.out.resolve():
            return
        for name in MODEL_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, self.out / name)
        if not (source / "agent.json").is_file() and (source.parent / "agent.json").is_file():
            shutil.copy2(source.parent / "agent.json", self.out / "agent.json")

    def _resume(self) -> None:
        from safetensors.torch import load_file

        from lwm.train import unflatten_optimizer

        saved = json.loads((self.out / STATE_FILE).read_text())
        ours = json.loads(json.dumps(self.cfg.to_dict()))
        fixed = ("suite", "envs", "epsilon", "seed", "actor", "min_running")
        diff = [k for k in fixed if saved["config"].get(k) != ours.get(k)]
        if diff:
            raise CheckpointError(f"{self.out}: cannot resume a policy run with other settings "
                                  f"({', '.join(diff)} differ); use another --out")
        self.policy = GoalPolicy.from_pretrained(self.out, self.model).train()
        self.opt = _adam(self.policy)
        self.opt.load_state_dict(unflatten_optimizer(
            load_file(str(self.out / OPTIMIZER_FILE)), saved["optimizer"]))
        self.state = saved["state"]
        self.rng.bit_generator.state = saved["rng"]
        self.generator.manual_seed(int(saved["state"]["updates"]) + self.cfg.seed)

    def goal(self, text: str) -> torch.Tensor:
        if text not in self._goals:
            from lwm.language.embed import GoalEncoder

            self._goals[text] = GoalEncoder().encode(text, as_torch=True)
        return self._goals[text]

    def _seeds(self):
        env = self.suite.make_env()
        for seed in self.suite.iter_seeds("train", evaluation=False, env=env,
                                          start=self.state["next_seed"]):
            self.state["next_seed"] = seed + 1
            yield seed

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, float]:
        """Update until `updates` are done; returns the last metrics (with the real episodes'
        success rate since the start)."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        cfg = self.cfg
        seeds = self._seeds()
        episodes = _Episodes(self.suite, self.model, self.goal, seeds, cfg.envs)
        probs = np.array(EXPLORATION_PROBS)
        metrics: dict[str, float] = {}
        self.policy.train()
        t0 = time.perf_counter()
        with Progress(TextColumn("policy"), BarColumn(), TextColumn("{task.completed}/"
                      "{task.total}"), TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                      disable=not self.progress) as bar:
            task = bar.add_task("policy", total=cfg.updates, completed=self.state["updates"],
                                info="")
            while self.state["updates"] < cfg.updates:
                if episodes.running.sum() < max(1, round(cfg.min_running * cfg.envs)):
                    self._count(episodes)
                    episodes = _Episodes(self.suite, self.model, self.goal, seeds, cfg.envs)
                rows = torch.from_numpy(np.flatnonzero(episodes.running))
                loss, metrics = self.policy.loss(self.model, episodes.state.index(rows),
                                                 episodes.h[rows], episodes.goal[rows],
                                                 self.generator)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite policy loss {metrics} at update "
                                             f"{self.state['updates']}; the last save in "
                                             f"{self.out} is intact")
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(),
                                               self.policy.cfg.grad_clip)
                self.opt.step()
                self.policy.update_target()
                self.state["updates"] += 1
                with torch.no_grad():
                    logits = self.policy.logits(self.model, episodes.h, episodes.goal)
                    act = torch.multinomial(logits.softmax(-1), 1, generator=self.generator)[:, 0]
                explore = self.rng.random(cfg.envs) < cfg.epsilon
                random = self.rng.choice(len(probs), size=cfg.envs, p=probs)
                episodes.step(np.where(explore, random, act.numpy()))
                done = self.state["episodes"]
                metrics["real_success"] = self.state["successes"] / done if done else float("nan")
                bar.update(task, completed=self.state["updates"],
                           info=f"return {metrics['return']:.3f} real success "
                                f"{metrics['real_success']:.3f} ({done} episodes)")
                if self.state["updates"] % cfg.save_every == 0:
                    self.save(metrics)
        self._count(episodes, running_too=False)
        metrics["wall_s"] = time.perf_counter() - t0
        self.save(metrics)
        return metrics

    def _count(self, episodes: _Episodes, running_too: bool = True) -> None:
        """Add a batch's finished episodes (and, `running_too`, the unfinished ones as failures)
        to the real success count."""
        finished = ~episodes.running
        n = len(finished) if running_too else int(finished.sum())
        self.state["episodes"] += n
        self.state["successes"] += int(episodes.success.sum())

    def save(self, metrics: dict[str, float]) -> None:
        """Policy, optimizer and counters, each file replaced atomically."""
        from safetensors.torch import save_file

        from lwm.models.world_model import _atomic_write
        from lwm.train import flatten_optimizer

        tensors, layout = flatten_optimizer(self.opt)
        self.policy.save_pretrained(self.out, extra={"trained": {
            "suite": self.suite.name, "updates": self.state["updates"],
            "real_episodes": self.state["episodes"],
            "real_success": metrics.get("real_success")}})
        _atomic_write(self.out / OPTIMIZER_FILE, lambda tmp: save_file(tensors, str(tmp)))
        data = {"config": self.cfg.to_dict(), "state": self.state, "optimizer": layout,
                "rng": self.rng.bit_generator.state}
        tmp = self.out / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.out / STATE_FILE)


def _adam(policy: GoalPolicy) -> torch.optim.Adam:
    """Adam over the actor and the critic (the critic's slow copy follows by EMA)."""
    return torch.optim.Adam([p for p in policy.parameters() if p.requires_grad],
                            lr=policy.cfg.lr)


def _suite_of(source: Path) -> str | None:
    """The suite the model in directory `source` was trained on: its run's trainer.json, else
    the suite its policy was trained on (policy.json)."""
    for candidate in (source / "trainer.json", source.parent / "trainer.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())["config"]["suite"]
    policy = source / POLICY_CONFIG
    if policy.is_file():
        return json.loads(policy.read_text()).get("trained", {}).get("suite")
    return None
