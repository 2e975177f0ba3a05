"""Model-free baseline: a goal-conditioned DQN with language hindsight relabeling.

The strongest simple alternative to a world model (issue #6): the same envs, goal vocabulary and
MiniLM goal embeddings as lwm, no model and no planning.

    agent = DQNAgent(DQNConfig(suite="babyai-goto", frames=3))
    agent.train(4000, "runs/dqn-goto")                 # resumes when the directory has a run
    policy = DQNPolicy.from_pretrained("runs/dqn-goto")
    result = policy.run(env, seed=1_000_000)           # follows the env's own mission

Q(s, g, a) reads a stack of the last k symbolic views (7x7x3, with each frame's direction and what
is carried now) and a goal embedding, and scores the six useful actions (never minigrid's no-op
`done`). Memory matters: a greedy policy over one view loops between two poses it cannot tell
apart; three frames break most of those loops.

Goal conditioning is FiLM reduced to its multiplicative core: the goal embedding gives H query
vectors; each cell's (type + colour + state) embedding is scored against each query, giving H
goal-match maps per frame, and an MLP reads the maps. "Go to the red ball" is an AND of colour
and type at one cell, which a product of goal and cell features states directly and a
concatenation of goal and observation vectors (two streams) has to learn from sums; the cell
features are computed once per transition and shared by every relabelled goal, so G goals per
transition cost little more than one. The query bias lets some maps ignore the goal (walls,
obstacles).

Language hindsight relabeling: a transition stores the vocabulary goals achieved on arriving at
its next observation (`info["achieved"]`) and the goals achieved anywhere in its episode. Each
update pairs it with G goals: the goal the policy pursued, one achieved on arrival (reward 1 and
terminal for that goal), goals of the same episode (achievable here, not achieved now) and
uniform vocabulary goals. The vocabulary holds training combinations only, so a suite's held-out
(colour, type) combinations are never a mission nor a relabelled goal.

A run directory holds everything; a killed run resumes from its last checkpoint:

    config.json + model.safetensors  the policy (what `DQNPolicy.from_pretrained` reads)
    goals.json + goals.safetensors   the goal vocabulary and its embeddings (rows = goal ids)
    trainer.json                     config, counters, RNG state, optimizer layout, and the name
    trainer-<episodes>.safetensors   of this file: online + target weights, Adam state, replay
    metrics.jsonl, tb/               training and evaluation scalars
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lwm.data.relabel import GoalVocab
from lwm.envs import goal_achieved
from lwm.envs.language import OBJECT_TO_IDX, instr_goals
from lwm.goals import COLORS, Goal, parse_goal
from lwm.models.world_model import CheckpointError, check_tensors, read_safetensors
from lwm.tasks import TaskSuite, load_suite

__all__ = [
    "DQNAgent",
    "DQNConfig",
    "DQNEpisode",
    "DQNPolicy",
    "DQNRunner",
    "FrameStack",
    "GoalQNetwork",
    "PRESETS",
    "Replay",
    "evaluate",
    "preset",
    "relabel",
]

FORMAT = "lwm-dqn"
N_ACTIONS = 6
"""minigrid's actions left, right, forward, pickup, drop, toggle; `done` (6) is never taken."""
N_TYPES, N_COLORS, N_STATES = len(OBJECT_TO_IDX), len(COLORS), 3
MAX_ACHIEVED = 6
"""Goals kept per transition as achieved on arrival (a drop beside five objects achieves six)."""
MAX_EPISODE_GOALS = 16
"""Distinct goals kept per episode as hard negatives (a GoToLocal room has at most 9 objects)."""


@dataclass
class DQNConfig:
    """Settings of a DQN run; `PRESETS` has `debug` (tests) and `small` (the default)."""

    suite: str = "babyai-goto"
    """Task suite to train on (name or YAML path)."""
    frames: int = 3
    """Frame stack k: the policy sees the last k views (1 = no memory)."""
    cell_dim: int = 16
    """Width of a cell's type + colour + state embedding."""
    goal_maps: int = 4
    """H: goal-match maps per frame (queries the goal embedding gives)."""
    hidden: int = 128
    """Width of the two hidden layers of the Q head."""
    goal_dim: int = 384
    """Width of goal embeddings (all-MiniLM-L6-v2 gives 384)."""
    vocab: str = "suite"
    """Relabelling vocabulary: 'suite' (the suite's verbs and object types) or 'all' (every
    concrete goal); held-out combinations are left out of both."""
    relabel: bool = True
    """Language hindsight relabeling; off trains on the pursued mission goal only."""
    goals_per_transition: int = 8
    """G: goals each sampled transition is trained on (with relabel)."""
    episode_goals: int = 3
    """Of those, goals drawn from the ones achieved anywhere in the transition's episode."""
    lr: float = 5e-4
    """Adam learning rate."""
    batch_size: int = 32
    """Transitions per update."""
    replay_size: int = 100_000
    """Replay capacity (transitions)."""
    learning_starts: int = 1_000
    """Transitions to collect before the first update."""
    updates_per_step: float = 0.25
    """Gradient updates per environment step."""
    eps_start: float = 1.0
    """Exploration rate at the start."""
    eps_end: float = 0.05
    """Exploration rate after the decay."""
    eps_decay_steps: int = 20_000
    """Environment steps over which epsilon falls linearly from eps_start to eps_end."""
    discount: float = 0.9
    """gamma: reaching a goal k steps from now is worth gamma**k."""
    target_tau: float = 0.01
    """Polyak factor of the target network, per update."""
    grad_clip: float = 10.0
    """Gradient-norm clip."""
    n_envs: int = 8
    """Environments stepped together (one batched forward chooses all their actions)."""
    eval_every: int = 500
    """Evaluate the greedy policy every this many episodes (0: never)."""
    eval_episodes: int = 200
    """Evaluation episodes, on the suite's first evaluation seeds (never trained on)."""
    target_success: float = 0.95
    """Record the episodes and training time at which evaluation first reaches this."""
    save_every: int = 500
    """Checkpoint every this many episodes."""
    seed: int = 0
    """Seed of exploration, replay sampling, relabeling and initialization."""
    threads: int = 1
    """torch threads."""

    def __post_init__(self) -> None:
        problems = []
        if self.frames < 1:
            problems.append(f"frames must be >= 1, got {self.frames}")
        if self.vocab not in ("suite", "all"):
            problems.append(f"vocab must be 'suite' or 'all', got {self.vocab!r}")
        if self.relabel and self.goals_per_transition < self.episode_goals + 2:
            problems.append(
                f"goals_per_transition ({self.goals_per_transition}) must leave room for the "
                f"pursued goal, one achieved goal and {self.episode_goals} episode goals")
        if not 0 < self.discount < 1:
            problems.append(f"discount must be in (0, 1), got {self.discount}")
        if problems:
            raise ValueError("DQNConfig: " + "; ".join(problems))


PRESETS: dict[str, DQNConfig] = {
    "debug": DQNConfig(cell_dim=8, goal_maps=2, hidden=32, batch_size=16, replay_size=2_000,
                       learning_starts=64, eps_decay_steps=500, n_envs=4, eval_episodes=8,
                       eval_every=0, save_every=10),
    "small": DQNConfig(),
}
"""Named settings: `debug` shrinks everything (tests use it), `small` is the CPU default."""


def preset(name: str, **overrides: Any) -> DQNConfig:
    """A copy of preset `name` with fields replaced (frames=1, relabel=False, ...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown DQN preset {name!r}; choose from {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


# Settings a run cannot change when it resumes: they shape the network, the data or the goals.
_FIXED = ("suite", "frames", "cell_dim", "goal_maps", "hidden", "goal_dim", "vocab", "relabel",
          "replay_size", "seed")


# ---------------------------------------------------------------------------------- the network

_CELL_OFFSETS = torch.tensor([0, N_TYPES, N_TYPES + N_COLORS])
"""Where the type, colour and state one-hots start in a cell's 20-wide multi-hot vector."""


def _multi_hot(index: Tensor, width: int) -> Tensor:
    """(..., n) indices -> (..., width) float with ones at them (F.one_hot, but without its
    per-call range check, which dominated the forward pass of small batches)."""
    out = torch.zeros(*index.shape[:-1], width)
    return out.scatter_(-1, index, 1.0)


class GoalQNetwork(nn.Module):
    """Q(s, g, .) over a stack of k symbolic views (see the module docstring)."""

    def __init__(self, cfg: DQNConfig):
        super().__init__()
        self.cfg = cfg
        c, h, k = cfg.cell_dim, cfg.goal_maps, cfg.frames
        # Sum of type, colour and state embeddings, as one matmul of one-hots (its backward is
        # several times faster on CPU than three embedding lookups').
        self.cell = nn.Linear(N_TYPES + N_COLORS + N_STATES, c, bias=False)
        self.query = nn.Linear(cfg.goal_dim, h * c)
        n_in = k * 49 * h + k * 4 + N_TYPES + N_COLORS
        self.head = nn.Sequential(
            nn.Linear(n_in, cfg.hidden), nn.ReLU(),
            nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(),
            nn.Linear(cfg.hidden, N_ACTIONS),
        )

    def cells(self, image: Tensor) -> Tensor:
        """Cell embeddings of views (B, k, 7, 7, 3) int -> (B, k, 49, C)."""
        index = image.long().flatten(2, 3) + _CELL_OFFSETS  # (B, k, 49, 3)
        return self.cell(_multi_hot(index, N_TYPES + N_COLORS + N_STATES))

    def forward(self, image: Tensor, direction: Tensor, carrying: Tensor, goal: Tensor) -> Tensor:
        """Q-values (B, G, 6) of views (B, k, 7, 7, 3), directions (B, k), what is carried (B, 2)
        and G goal embeddings per transition (B, G, D)."""
        b, g = goal.shape[:2]
        cells = self.cells(image)  # (B, k, 49, C)
        queries = self.query(goal).view(b, g, self.cfg.goal_maps, -1)  # (B, G, H, C)
        maps = torch.einsum("bknc,bghc->bgknh", cells, queries) / cells.shape[-1] ** 0.5
        k = direction.shape[1]
        index = torch.cat([direction.long() + 4 * torch.arange(k),
                           carrying.long() + torch.tensor([4 * k, 4 * k + N_TYPES])], dim=1)
        state = _multi_hot(index, 4 * k + N_TYPES + N_COLORS)  # (B, k * 4 + 17)
        x = torch.cat([maps.flatten(2), state[:, None].expand(b, g, -1)], dim=2)
        return self.head(x)  # (B, G, 6)


# ---------------------------------------------------------------------------------- frames


class FrameStack:
    """The last k observations of one episode; at reset the first is repeated k times."""

    def __init__(self, frames: int):
        self.k = frames
        self.image = np.zeros((frames, 7, 7, 3), np.uint8)
        self.direction = np.zeros(frames, np.uint8)
        self.carrying = np.zeros(2, np.uint8)

    def reset(self, obs: dict[str, Any]) -> FrameStack:
        self.image[:] = obs["image"]
        self.direction[:] = obs["direction"]
        self.carrying[:] = obs["carrying"]
        return self

    def push(self, obs: dict[str, Any]) -> None:
        self.image[:-1] = self.image[1:].copy()
        self.image[-1] = obs["image"]
        self.direction[:-1] = self.direction[1:].copy()
        self.direction[-1] = obs["direction"]
        self.carrying[:] = obs["carrying"]

    def arrays(self) -> dict[str, np.ndarray]:
        """Copies: image (k, 7, 7, 3), direction (k,), carrying (2,)."""
        return {"image": self.image.copy(), "direction": self.direction.copy(),
                "carrying": self.carrying.copy()}


def _batch(stacks: Sequence[FrameStack]) -> dict[str, Tensor]:
    return {
        "image": torch.from_numpy(np.stack([s.image for s in stacks])),
        "direction": torch.from_numpy(np.stack([s.direction for s in stacks])),
        "carrying": torch.from_numpy(np.stack([s.carrying for s in stacks])),
    }


# ---------------------------------------------------------------------------------- replay


def goal_ids(texts: Sequence[str], vocab: GoalVocab, width: int) -> np.ndarray:
    """Vocabulary ids of the goal texts that are in `vocab` (others, held-out ones included, are
    dropped), padded with -1 to `width` (int32)."""
    ids = [vocab.index[t] for t in dict.fromkeys(texts) if t in vocab.index][:width]
    return np.array(ids + [-1] * (width - len(ids)), np.int32)


class Replay:
    """A ring buffer of transitions with the goals achieved on arrival and in their episode.

    Transitions arrive one episode at a time (`add_episode`), so that each knows the goals its
    whole episode achieved. The next frame stack is the stack shifted by one plus `next_image`.
    """

    def __init__(self, capacity: int, frames: int):
        self.capacity = capacity
        self.frames = frames
        n, k = capacity, frames
        self.data: dict[str, np.ndarray] = {
            "image": np.zeros((n, k, 7, 7, 3), np.uint8),
            "direction": np.zeros((n, k), np.uint8),
            "carrying": np.zeros((n, 2), np.uint8),
            "action": np.zeros(n, np.uint8),
            "next_image": np.zeros((n, 7, 7, 3), np.uint8),
            "next_direction": np.zeros(n, np.uint8),
            "next_carrying": np.zeros((n, 2), np.uint8),
            "behaviour": np.zeros(n, np.int32),
            "achieved": np.zeros((n, MAX_ACHIEVED), np.int32),
            "episode_goals": np.zeros((n, MAX_EPISODE_GOALS), np.int32),
        }
        self.size = 0
        self.pos = 0

    def __len__(self) -> int:
        return self.size

    def add_episode(self, steps: Sequence[dict[str, Any]]) -> None:
        """Append one episode's transitions: dicts with the keys of `data` except
        `episode_goals` (`achieved`: ids padded with -1, as `goal_ids` gives)."""
        if not steps:
            return
        achieved = np.concatenate([s["achieved"] for s in steps])
        seen = list(dict.fromkeys(int(i) for i in achieved if i >= 0))[:MAX_EPISODE_GOALS]
        episode = np.array(seen + [-1] * (MAX_EPISODE_GOALS - len(seen)), np.int32)
        for step in steps:
            i = self.pos
            for key, value in step.items():
                self.data[key][i] = value
            self.data["episode_goals"][i] = episode
            self.pos = (self.pos + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def sample(self, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        idx = rng.integers(self.size, size=n)
        return {k: v[idx] for k, v in self.data.items()}

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The filled part, for a checkpoint."""
        return {k: v[: self.size] for k, v in self.data.items()}

    def load_arrays(self, arrays: dict[str, np.ndarray], pos: int) -> None:
        size = len(arrays["action"])
        if size > self.capacity or set(arrays) != set(self.data):
            raise CheckpointError(f"replay state does not fit this buffer (size {size}, "
                                  f"fields {sorted(arrays)})")
        for k, v in arrays.items():
            self.data[k][:size] = v
        self.size, self.pos = size, pos


def _pick(ids: np.ndarray, rng: np.random.Generator, fallback: np.ndarray) -> np.ndarray:
    """One valid entry per row of -1-padded `ids` (N, W) (valid entries first), or `fallback`
    where a row has none."""
    count = (ids >= 0).sum(1)
    col = np.minimum((rng.random(len(ids)) * count).astype(np.int64), ids.shape[1] - 1)
    picked = ids[np.arange(len(ids)), col]
    return np.where(count > 0, picked, fallback)


def relabel(
    batch: dict[str, np.ndarray],
    n_vocab: int,
    rng: np.random.Generator,
    n_goals: int = 8,
    n_episode: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Goals (B, G) int64 and rewards (B, G) float32 for a batch of transitions.

    Slot 0: the goal the policy pursued (a uniform vocabulary goal when it had none); slot 1: a
    goal achieved on arrival, when there is one; then `n_episode` goals achieved in the same
    episode; the rest uniform vocabulary goals. A goal's reward is 1 exactly when it is among the
    goals achieved on arrival; reward 1 also ends the goal's episode (terminal).
    """
    b = len(batch["behaviour"])
    goal = rng.integers(n_vocab, size=(b, n_goals))
    goal[:, 0] = np.where(batch["behaviour"] >= 0, batch["behaviour"], goal[:, 0])
    goal[:, 1] = _pick(batch["achieved"], rng, goal[:, 1])
    for j in range(2, 2 + n_episode):
        goal[:, j] = _pick(batch["episode_goals"], rng, goal[:, j])
    return goal, _rewards(goal, batch["achieved"])


def _rewards(goal: np.ndarray, achieved: np.ndarray) -> np.ndarray:
    return (goal[:, :, None] == achieved[:, None, :]).any(-1).astype(np.float32)


# ---------------------------------------------------------------------------------- episodes


@dataclass
class DQNEpisode:
    """What happened when the policy followed goals from `reset(seed)`."""

    seed: int
    goals: list[str]
    """Canonical texts of the goals success is judged on (in order)."""
    instruction: list[str]
    """The texts the policy was conditioned on (one per goal, or one for a free-form text)."""
    success: bool
    steps: int
    wall_s: float
    act_ms: float
    """Mean time to choose an action (the Q forward pass, shared by the episodes run at once)."""


class _Follower:
    """One env following goals: a frame stack, the pending goals and their conditioning texts.

    On the env's own mission, minigrid's verifier judges success (as the evaluation harness does);
    with `goals` given instead, success is every goal achieved, in order.
    """

    def __init__(self, env, frames: int):
        self.env = env
        self.stack = FrameStack(frames)
        self.seed: int | None = None
        self.goals: list[Goal] = []
        self.pending: list[Goal] = []
        self.done = True

    def reset(self, seed: int, goals: Sequence[Goal | str] | None = None,
              instruction: str | None = None, max_steps: int | None = None) -> dict[str, Any]:
        """Reset to `seed`. `goals` (default: the env's own mission) judge success; the policy is
        conditioned on `instruction` when given, else on each pending goal's canonical text. The
        episode stops after `max_steps` steps or at the env's own limit."""
        self.seed, self.t0, self.act_s = seed, time.perf_counter(), 0.0
        self.max_steps = max_steps
        self.rng = np.random.default_rng(seed)
        self.own_mission = goals is None
        if goals is None:
            obs, _ = self.env.reset(seed=seed)
            self.goals = instr_goals(self.env.unwrapped.instrs)
        else:
            self.goals = [parse_goal(g) if isinstance(g, str) else g for g in goals]
            if not self.goals:
                raise ValueError("goals: expected at least one goal to follow")
            text = " then ".join(g.text for g in self.goals)
            obs, _ = self.env.reset(seed=seed, options={"instruction": text})
        self.pending = list(self.goals)
        self.instruction = instruction
        self.stack.reset(obs)
        self.steps, self.done, self.success = 0, False, False
        return obs

    @property
    def text(self) -> str:
        """What the policy is conditioned on now (the last goal once none is pending)."""
        if self.instruction is not None:
            return self.instruction
        return (self.pending or self.goals[-1:])[0].text

    def step(self, action: int) -> tuple[dict[str, Any], dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        self.stack.push(obs)
        while self.pending and goal_achieved(self.pending[0], info):
            self.pending.pop(0)
        self.success = bool(terminated and reward > 0) if self.own_mission else not self.pending
        out_of_steps = self.max_steps is not None and self.steps >= self.max_steps
        self.done = self.success or terminated or truncated or out_of_steps
        return obs, info

    def result(self) -> DQNEpisode:
        instruction = [self.instruction] if self.instruction is not None else [
            g.text for g in self.goals]
        return DQNEpisode(self.seed, [g.text for g in self.goals], instruction, self.success,
                          self.steps, time.perf_counter() - self.t0,
                          1e3 * self.act_s / max(self.steps, 1))


# ---------------------------------------------------------------------------------- the policy


class DQNPolicy:
    """The policy of a trained Q-network, with its goal vocabulary and embeddings.

    `run` is greedy by default; with `epsilon` > 0 each step is a uniform random action with that
    chance. A policy that sees only the last k views cannot tell some poses apart, and a greedy
    one can loop between them until the step limit; a little randomness breaks such loops (DQN's
    Atari evaluation used epsilon 0.05).
    """

    def __init__(self, net: GoalQNetwork, vocab: GoalVocab, table: Tensor,
                 encoder: Any = None, epsilon: float = 0.0):
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        self.net = net.eval()
        self.cfg = net.cfg
        self.epsilon = epsilon
        self.vocab = vocab
        self.table = table
        self._encoder = encoder
        self._extra: dict[str, Tensor] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, epsilon: float = 0.0) -> DQNPolicy:
        """Load a run directory written by `DQNAgent.train` (never unpickles)."""
        path = Path(path)
        cfg = load_config(path)
        net = GoalQNetwork(cfg)
        net.load_state_dict(_load_tensors(path / "model.safetensors", net.state_dict()))
        vocab, table = _load_goal_table(path)
        return cls(net, vocab, table, epsilon=epsilon)

    def embed(self, texts: Sequence[str]) -> Tensor:
        """Goal embeddings (N, D): rows of the vocabulary table, MiniLM for other texts (held-out
        combinations, free-form instructions)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self.vocab and t not in self._extra]
        if missing:
            if self._encoder is None:
                from lwm.language.embed import GoalEncoder

                self._encoder = GoalEncoder()
            self._extra.update(zip(missing, self._encoder.encode(missing, as_torch=True),
                                   strict=True))
        return torch.stack([self.table[self.vocab.index[t]] if t in self.vocab else self._extra[t]
                            for t in texts])

    @torch.no_grad()
    def q_values(self, obs: dict[str, np.ndarray | Tensor], goal: np.ndarray | Tensor) -> Tensor:
        """Q (N, 6) of batched frame stacks (image (N, k, 7, 7, 3), direction (N, k), carrying
        (N, 2)) and goal embeddings (N, D)."""
        t = {k: torch.as_tensor(v) for k, v in obs.items()}
        goal = torch.as_tensor(goal, dtype=torch.float32)
        k = self.cfg.frames
        if t["image"].shape[1:] != (k, 7, 7, 3) or goal.shape != (len(t["image"]),
                                                                  self.cfg.goal_dim):
            raise ValueError(
                f"expected images (N, {k}, 7, 7, 3) and goals (N, {self.cfg.goal_dim}); got "
                f"{tuple(t['image'].shape)} and {tuple(goal.shape)}")
        return self.net(t["image"], t["direction"], t["carrying"], goal[:, None])[:, 0]

    def act(self, obs: dict[str, np.ndarray | Tensor], goal: np.ndarray | Tensor) -> np.ndarray:
        """Greedy actions (N,) in 0..5 for batched frame stacks and goal embeddings."""
        return self.q_values(obs, goal).argmax(-1).numpy()

    def run(self, env, seed: int, goals: Sequence[Goal | str] | None = None,
            instruction: str | None = None, max_steps: int | None = None) -> DQNEpisode:
        """One episode of `env` (an lwm env) from `reset(seed)`: greedy, or epsilon-greedy with
        a random stream seeded by `seed` (the same episode whatever ran before it).

        `goals`: canonical goal texts (or `Goal`s) to achieve in order, which then replace the
        env's mission; by default the env's own mission (`instr_goals`). The policy is conditioned
        on each pending goal's canonical text, or on `instruction` (say a paraphrase) when given.
        The episode stops after `max_steps` steps (default: the env's limit).
        """
        return self.run_many(lambda: env, [seed], goals=goals, instruction=instruction,
                             max_steps=max_steps, n_envs=1)[0]

    def run_many(self, make_env: Callable[[], Any], seeds: Sequence[int],
                 goals: Sequence[Goal | str] | None = None, instruction: str | None = None,
                 max_steps: int | None = None, n_envs: int = 16) -> list[DQNEpisode]:
        """`run` over many seeds, `n_envs` episodes at a time (one batched forward per step)."""
        followers = [_Follower(make_env(), self.cfg.frames)
                     for _ in range(min(n_envs, len(seeds)))]
        queue = list(enumerate(seeds))[::-1]
        results: dict[int, DQNEpisode] = {}
        slot_item: dict[int, int] = {}

        def start(i: int) -> None:
            item, seed = queue.pop()
            followers[i].reset(seed, goals, instruction, max_steps)
            slot_item[i] = item

        for i in range(len(followers)):
            start(i)
        while True:
            live = [i for i, f in enumerate(followers) if not f.done]
            if not live:
                break
            t0 = time.perf_counter()
            obs = _batch([followers[i].stack for i in live])
            actions = self.act(obs, self.embed([followers[i].text for i in live]))
            share = (time.perf_counter() - t0) / len(live)
            for i, a in zip(live, actions, strict=True):
                f = followers[i]
                f.act_s += share
                if self.epsilon and f.rng.random() < self.epsilon:
                    a = f.rng.integers(N_ACTIONS)
                f.step(int(a))
                if f.done:
                    results[slot_item[i]] = f.result()
                    if queue:
                        start(i)
        return [results[i] for i in range(len(seeds))]


def evaluate(policy: DQNPolicy, suite: TaskSuite, seeds: Sequence[int], n_envs: int = 16
             ) -> list[dict[str, Any]]:
    """The policy's episodes on the env's own missions: one row per seed with seed, split (of
    the mission's combinations), mission, success, steps."""
    splits: dict[int, str] = {}
    probe = suite.make_env()
    missions: dict[int, str] = {}
    for seed in seeds:
        obs, _ = probe.reset(seed=seed)
        splits[seed] = suite.split_of_episode(probe)
        missions[seed] = obs["mission"]
    return [{"seed": r.seed, "split": splits[r.seed], "mission": missions[r.seed],
             "success": r.success, "steps": r.steps}
            for r in policy.run_many(suite.make_env, seeds, n_envs=n_envs)]


# ---------------------------------------------------------------------------------- training


class DQNAgent:
    """Trains a `GoalQNetwork` by DQN with language hindsight relabeling (see the module
    docstring); `train` runs or resumes a run directory."""

    def __init__(self, cfg: DQNConfig | None = None, progress: bool = True):
        self.cfg = cfg = cfg or DQNConfig()
        self.progress = progress
        torch.set_num_threads(cfg.threads)
        self.suite: TaskSuite = load_suite(cfg.suite)
        torch.manual_seed(cfg.seed)
        self.net = GoalQNetwork(cfg)
        self.target = GoalQNetwork(cfg)
        self.target.load_state_dict(self.net.state_dict())
        self.target.requires_grad_(False)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, fused=True)
        self.rng = np.random.default_rng(cfg.seed)
        self.replay = Replay(cfg.replay_size, cfg.frames)
        self.state: dict[str, Any] = {
            "episodes": 0, "env_steps": 0, "updates": 0, "next_seed": None, "train_s": 0.0,
            "train_cpu_s": 0.0, "reached": None, "evals": [],
        }
        self.dir: Path | None = None
        self.vocab: GoalVocab | None = None
        self.table: Tensor | None = None
        self._writer = None
        self._update_debt = 0.0
        self._losses: list[dict[str, float]] = []
        self._recent: list[float] = []

    @property
    def epsilon(self) -> float:
        cfg = self.cfg
        frac = min(self.state["env_steps"] / max(cfg.eps_decay_steps, 1), 1.0)
        return cfg.eps_start + frac * (cfg.eps_end - cfg.eps_start)

    def policy(self) -> DQNPolicy:
        """The current greedy policy (shares the online network)."""
        assert self.vocab is not None and self.table is not None, "call open(run_dir) first"
        return DQNPolicy(self.net, self.vocab, self.table)

    # ------------------------------------------------------------------ run directory

    def open(self, run_dir: str | Path) -> DQNAgent:
        """Use `run_dir`: resume its checkpoint if it has one, else start it."""
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if (self.dir / "trainer.json").exists():
            self._resume()
        self.vocab, self.table = self._goal_table()
        if not self.cfg.relabel:
            self._check_concrete_missions()
        return self

    def _goal_table(self) -> tuple[GoalVocab, Tensor]:
        """The training vocabulary (held-out combinations left out) and its MiniLM embeddings,
        computed once per run and stored beside the checkpoint."""
        from safetensors.torch import save_file

        vocab = GoalVocab(self.suite.goal_vocabulary(self.cfg.vocab))
        assert self.dir is not None
        if (self.dir / "goals.json").exists():
            saved, table = _load_goal_table(self.dir)
            if saved.texts == vocab.texts:
                return vocab, table
        from lwm.language.embed import GoalEncoder

        table = GoalEncoder().encode(vocab.texts, as_torch=True)
        _atomic(self.dir / "goals.safetensors",
                lambda p: save_file({"embeddings": table.contiguous()}, str(p)))
        _atomic(self.dir / "goals.json", lambda p: p.write_text(json.dumps(vocab.texts)))
        return vocab, table

    def _check_concrete_missions(self) -> None:
        env = self.suite.make_env()
        seed = next(self.suite.iter_seeds("train", evaluation=False, env=env))
        env.reset(seed=seed)
        for goal in instr_goals(env.unwrapped.instrs):
            if goal.text not in self.vocab:
                raise ValueError(
                    f"relabel=False trains on mission goals only, so missions must be concrete "
                    f"vocabulary goals; {self.suite.name} has {goal.text!r} (seed {seed})")

    # ------------------------------------------------------------------ the loop

    def train(self, episodes: int, run_dir: str | Path) -> dict[str, Any]:
        """Collect and learn until `episodes` episodes (in all, counting a resumed run's) are done;
        evaluate and checkpoint on the way. Returns the final state (counters, evaluations).

        `n_envs` episodes run at once, on consecutive training seeds whose missions are not held
        out. `train_s` (wall) and `train_cpu_s` (this process's CPU time, which other jobs on a
        shared machine inflate far less) count collection and learning, not evaluations and
        checkpoints."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.open(run_dir)
        cfg = self.cfg
        seeds = self.suite.iter_seeds("train", evaluation=False, env=self.suite.make_env(),
                                      start=self.state["next_seed"])
        collectors = [_Collector(self.suite.make_env(), cfg.frames) for _ in range(cfg.n_envs)]

        def start_next(collector: _Collector) -> None:
            in_flight = sum(not c.done for c in collectors)
            if self.state["episodes"] + in_flight < episodes:
                collector.begin(next(seeds), self.vocab, self.rng)

        columns = (TextColumn("{task.description}"), BarColumn(),
                   TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                   TextColumn("{task.fields[info]}"))
        with Progress(*columns, disable=not self.progress) as bar:
            task = bar.add_task("dqn", total=episodes, completed=self.state["episodes"], info="")
            for collector in collectors:
                start_next(collector)
            clock = _Clock()
            while live := [c for c in collectors if not c.done]:
                finished = self._collect_step(live)
                self._learn(len(live))
                for collector in finished:
                    self.replay.add_episode(collector.transitions)
                    self._recent = (self._recent + [float(collector.follower.success)])[-100:]
                    self.state["episodes"] += 1
                    clock.charge(self.state)
                    info = self._on_episode(episodes, collectors)
                    bar.update(task, completed=self.state["episodes"], **info)
                    clock = _Clock()
                for collector in finished:  # once all of them count as done
                    start_next(collector)
        self.state["next_seed"] = _next_seed(collectors, self.state["next_seed"])
        self.save()
        return dict(self.state)

    def _collect_step(self, live: list[_Collector]) -> list[_Collector]:
        """One epsilon-greedy step in every live env; the collectors whose episode ended."""
        actions = self._explore(live)
        self.state["env_steps"] += len(live)
        return [c for c, a in zip(live, actions, strict=True) if c.step(int(a), self.vocab)]

    def _learn(self, new_steps: int) -> None:
        """`updates_per_step` updates per new env step, once the replay holds `learning_starts`."""
        if len(self.replay) < self.cfg.learning_starts:
            return
        self._update_debt += self.cfg.updates_per_step * new_steps
        while self._update_debt >= 1:
            self._losses.append(self.update())
            self._update_debt -= 1

    def _on_episode(self, episodes: int, collectors: list[_Collector]) -> dict[str, str]:
        """Log, evaluate and checkpoint when the episode count says so."""
        cfg, n = self.cfg, self.state["episodes"]
        info = {}
        if n % 100 == 0 or n == episodes:
            self._log(_mean_dicts(self._losses) | {"train_success_100": np.mean(self._recent),
                                                   "epsilon": self.epsilon})
            self._losses = []
        if cfg.eval_every and (n % cfg.eval_every == 0 or n == episodes):
            info["info"] = f"eval {self.evaluate_now()['eval_success']:.3f}"
        if n % cfg.save_every == 0 and n < episodes:
            self.state["next_seed"] = _next_seed(collectors, self.state["next_seed"])
            self.save()
        return info

    def _explore(self, live: list[_Collector]) -> np.ndarray:
        """Epsilon-greedy actions for the live collectors, one batched forward."""
        obs = _batch([a.follower.stack for a in live])
        goals = self.table[torch.tensor([a.behaviour for a in live])]
        with torch.no_grad():
            q = self.net(obs["image"], obs["direction"], obs["carrying"], goals[:, None])[:, 0]
        greedy = q.argmax(-1).numpy()
        explore = self.rng.random(len(live)) < self.epsilon
        return np.where(explore, self.rng.integers(N_ACTIONS, size=len(live)), greedy)

    # ------------------------------------------------------------------ learning

    def td_loss(self, batch: dict[str, np.ndarray], goal: np.ndarray, reward: np.ndarray
                ) -> tuple[Tensor, Tensor]:
        """Huber TD error of the Double-DQN target on a batch, and the mean Q of taken actions.

        target = r + gamma (1 - r) Q_target(s', argmax_a Q(s', a, g), g): reaching g ends g's
        episode; any other end of the episode is a time limit, not a terminal, for g.
        """
        t = {k: torch.from_numpy(v) for k, v in batch.items()}
        g = self.table[torch.from_numpy(goal)]  # (B, G, D)
        r = torch.from_numpy(reward)  # (B, G)
        q = self.net(t["image"], t["direction"], t["carrying"], g)  # (B, G, 6)
        action = t["action"].long()[:, None, None].expand(-1, g.shape[1], 1)
        q_taken = q.gather(2, action)[..., 0]  # (B, G)
        next_image = torch.cat([t["image"][:, 1:], t["next_image"][:, None]], 1)
        next_dir = torch.cat([t["direction"][:, 1:], t["next_direction"][:, None]], 1)
        with torch.no_grad():
            best = self.net(next_image, next_dir, t["next_carrying"], g).argmax(-1, keepdim=True)
            q_next = self.target(next_image, next_dir, t["next_carrying"], g).gather(2, best)
            target = r + self.cfg.discount * (1 - r) * q_next[..., 0]
        return F.smooth_l1_loss(q_taken, target), q_taken.detach().mean()

    def sample(self) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """A replay batch with its goals (B, G) and rewards (B, G)."""
        cfg = self.cfg
        batch = self.replay.sample(cfg.batch_size, self.rng)
        if cfg.relabel:
            goal, reward = relabel(batch, len(self.vocab), self.rng, cfg.goals_per_transition,
                                   cfg.episode_goals)
        else:
            goal = batch["behaviour"][:, None].astype(np.int64)
            reward = _rewards(goal, batch["achieved"])
        return batch, goal, reward

    def update(self) -> dict[str, float]:
        """One gradient step on a replay batch, then the Polyak target update."""
        loss, q_mean = self.td_loss(*self.sample())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite TD loss at update {self.state['updates']}; the last checkpoint in "
                f"{self.dir} is intact: lower lr and resume")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
        self.opt.step()
        with torch.no_grad():
            for p, tp in zip(self.net.parameters(), self.target.parameters(), strict=True):
                tp.lerp_(p, self.cfg.target_tau)
        self.state["updates"] += 1
        return {"td_loss": loss.item(), "q_mean": q_mean.item()}

    def evaluate_now(self) -> dict[str, Any]:
        """Greedy success on the suite's first `eval_episodes` evaluation seeds, logged; records
        when `target_success` is first reached."""
        t0 = time.perf_counter()
        seeds = self.suite.seeds_for(None, self.cfg.eval_episodes)
        self.net.eval()
        rows = evaluate(self.policy(), self.suite, seeds)
        self.net.train()
        success = float(np.mean([r["success"] for r in rows]))
        info = {"episodes": self.state["episodes"], "train_s": self.state["train_s"],
                "train_cpu_s": self.state["train_cpu_s"], "eval_success": success,
                "eval_s": time.perf_counter() - t0}
        for split in ("train", "held_out"):
            part = [r["success"] for r in rows if r["split"] == split]
            info[f"eval_success_{split}"] = float(np.mean(part)) if part else float("nan")
        self.state["evals"].append(info)
        if self.state["reached"] is None and success >= self.cfg.target_success:
            self.state["reached"] = {k: info[k] for k in ("episodes", "train_s", "train_cpu_s",
                                                          "eval_success")}
        self._log({k: v for k, v in info.items()
                   if k not in ("episodes", "train_s", "train_cpu_s")})
        return info

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> None:
        """Write the policy, then the trainer state, then `trainer.json` (the commit point: it
        names the trainer file, so a kill mid-save leaves the previous checkpoint intact)."""
        from safetensors.torch import save_file

        from lwm.train import flatten_optimizer

        assert self.dir is not None
        save_pretrained(self.net, self.dir)
        opt_tensors, layout = flatten_optimizer(self.opt)
        tensors = {f"online.{k}": v for k, v in self.net.state_dict().items()}
        tensors |= {f"target.{k}": v for k, v in self.target.state_dict().items()}
        tensors |= {f"opt.{k}": v for k, v in opt_tensors.items()}
        tensors |= {f"replay.{k}": torch.from_numpy(np.ascontiguousarray(v))
                    for k, v in self.replay.state_arrays().items()}
        name = f"trainer-{self.state['episodes']:08d}.safetensors"
        _atomic(self.dir / name, lambda p: save_file(
            {k: v.detach().contiguous() for k, v in tensors.items()}, str(p)))
        old = _trainer_json(self.dir).get("tensors") if (self.dir / "trainer.json").exists() \
            else None
        _atomic(self.dir / "trainer.json", lambda p: p.write_text(json.dumps({
            "format": FORMAT, "config": dataclasses.asdict(self.cfg), "state": self.state,
            "rng": self.rng.bit_generator.state, "optimizer": layout,
            "replay_pos": self.replay.pos, "update_debt": self._update_debt, "tensors": name,
            "saved_at": time.time(),
        }, indent=1)))
        if old and old != name:
            (self.dir / old).unlink(missing_ok=True)

    def _resume(self) -> None:
        from lwm.train import unflatten_optimizer

        assert self.dir is not None
        saved = _trainer_json(self.dir)
        ours = dataclasses.asdict(self.cfg)
        diff = [f"{k}: run has {saved['config'].get(k)!r}, asked for {ours[k]!r}"
                for k in _FIXED if saved["config"].get(k) != ours[k]]
        if diff:
            raise CheckpointError(f"{self.dir}: cannot resume with a different setup "
                                  f"({'; '.join(diff)}); use another run directory")
        file = self.dir / saved["tensors"]
        tensors = read_safetensors(file)

        def part(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.net.load_state_dict(check_tensors(file, part("online."), self.net.state_dict()))
        self.target.load_state_dict(check_tensors(file, part("target."),
                                                   self.target.state_dict()))
        self.opt.load_state_dict(unflatten_optimizer(part("opt."), saved["optimizer"]))
        self.replay.load_arrays({k: v.numpy() for k, v in part("replay.").items()},
                                saved["replay_pos"])
        self.state = saved["state"]
        self.rng.bit_generator.state = saved["rng"]
        self._update_debt = saved["update_debt"]

    def _log(self, metrics: dict[str, float]) -> None:
        """Scalars to tensorboard (tb/) and one JSON line to metrics.jsonl."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.dir / "tb"))
        step = self.state["episodes"]
        for k, v in metrics.items():
            self._writer.add_scalar(f"dqn/{k}", v, step)
        self._writer.flush()
        counters = {k: self.state[k]
                    for k in ("episodes", "env_steps", "updates", "train_s", "train_cpu_s")}
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(counters | {k: float(v) for k, v in metrics.items()}) + "\n")


class _Clock:
    """Wall and process CPU time since creation, charged to a run's counters."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def charge(self, state: dict[str, Any]) -> None:
        state["train_s"] += time.perf_counter() - self.wall
        state["train_cpu_s"] += time.process_time() - self.cpu


def _next_seed(collectors: list[_Collector], default: int | None) -> int | None:
    """Where a resumed run continues: after every seed begun (in-flight episodes are lost)."""
    begun = [c.follower.seed for c in collectors if c.follower.seed is not None]
    return max(begun) + 1 if begun else default


class _Collector:
    """One training env: follows its mission's pending goal and records transitions."""

    def __init__(self, env, frames: int):
        self.follower = _Follower(env, frames)
        self.transitions: list[dict[str, Any]] = []
        self.behaviour = -1

    @property
    def done(self) -> bool:
        return self.follower.done

    def begin(self, seed: int, vocab: GoalVocab, rng: np.random.Generator) -> None:
        self.follower.reset(seed)
        self.transitions = []
        self._choose_behaviour(vocab, rng)

    def _choose_behaviour(self, vocab: GoalVocab, rng: np.random.Generator) -> None:
        """The pending mission goal when the vocabulary has it, else a random vocabulary goal
        (the episode still explores, and relabeling still teaches what it achieves)."""
        pending = self.follower.pending
        text = pending[0].text if pending else None
        self.behaviour = vocab.index[text] if text in vocab.index else int(
            rng.integers(len(vocab)))

    def step(self, action: int, vocab: GoalVocab) -> bool:
        """Act, record the transition; True when the episode ended."""
        f = self.follower
        before = f.stack.arrays()
        n_pending = len(f.pending)
        obs, info = f.step(action)
        self.transitions.append({
            "image": before["image"], "direction": before["direction"],
            "carrying": before["carrying"], "action": action,
            "next_image": obs["image"], "next_direction": obs["direction"],
            "next_carrying": obs["carrying"], "behaviour": self.behaviour,
            "achieved": goal_ids(info["achieved"], vocab, MAX_ACHIEVED),
        })
        if len(f.pending) != n_pending and f.pending:
            self.behaviour = vocab.index.get(f.pending[0].text, self.behaviour)
        return f.done


# ---------------------------------------------------------------------------------- files


def save_pretrained(net: GoalQNetwork, path: str | Path) -> Path:
    """Write `config.json` and `model.safetensors` into directory `path` (atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "version": 1, "config": dataclasses.asdict(net.cfg)}
    _atomic(path / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    _atomic(path / "model.safetensors", lambda p: save_file(tensors, str(p)))
    return path


def load_config(path: str | Path) -> DQNConfig:
    """The `DQNConfig` of a run directory, with clear errors for missing and foreign files."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: not an lwm DQN checkpoint (no config.json)")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: corrupt config ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise CheckpointError(f"{file}: not an lwm DQN config (format {found!r}, "
                              f"expected {FORMAT!r})")
    known = {f.name for f in dataclasses.fields(DQNConfig)}
    fields = data.get("config")
    if not isinstance(fields, dict) or set(fields) - known:
        extra = sorted(set(fields) - known) if isinstance(fields, dict) else fields
        raise CheckpointError(f"{file}: malformed config (unknown fields {extra})")
    try:
        return DQNConfig(**fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: malformed config ({err})") from None


def _load_tensors(file: Path, expected: dict[str, Tensor]) -> dict[str, Tensor]:
    return check_tensors(file, read_safetensors(file), expected)


def _load_goal_table(path: Path) -> tuple[GoalVocab, Tensor]:
    names = path / "goals.json"
    if not names.is_file():
        raise CheckpointError(f"{path}: checkpoint has no goals.json (the goal vocabulary)")
    try:
        texts = json.loads(names.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{names}: corrupt goal vocabulary ({err})") from None
    table = read_safetensors(path / "goals.safetensors").get("embeddings")
    if not isinstance(texts, list) or table is None or table.shape[0] != len(texts):
        raise CheckpointError(f"{path}: goals.json and goals.safetensors do not match")
    return GoalVocab(texts), table


def _trainer_json(path: Path) -> dict[str, Any]:
    file = path / "trainer.json"
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: corrupt trainer state ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not the trainer state of an lwm DQN run")
    return data


def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _mean_dicts(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


# ---------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class DQNRunner:
    """The DQN as a runner of the evaluation harness (`lwm.eval.runners`): a picklable factory of
    workers `EvalEpisode -> EpisodeOutcome`.

    The worker loads the policy once and keeps one `Referee`-wrapped env per suite, so the
    episode is judged like every other agent's, by minigrid's verifier of the env's own mission.
    A "paraphrase" episode conditions the policy on the instruction's words as given (MiniLM
    embeds them; the DQN has no parser), a "grammar" one on the mission's canonical goal texts.
    """

    checkpoint: str
    """A run directory written by `DQNAgent.train`."""
    epsilon: float = 0.0
    """Random-action rate while acting, seeded per episode (0: greedy)."""
    name: str = "dqn"

    def __call__(self) -> Callable[[Any], Any]:
        from lwm.eval.episodes import EpisodeOutcome, Referee

        policy = DQNPolicy.from_pretrained(self.checkpoint, epsilon=self.epsilon)
        envs: dict[str, Referee] = {}

        def work(episode: Any) -> EpisodeOutcome:
            if episode.suite not in envs:
                envs[episode.suite] = Referee(load_suite(episode.suite).make_env())
            env = envs[episode.suite]
            instruction = episode.instruction if episode.kind == "paraphrase" else None
            result = policy.run(env, episode.seed, instruction=instruction,
                                max_steps=episode.max_steps)
            return EpisodeOutcome(episode=episode, agent=self.name, success=env.success,
                                  steps=env.steps, wall_s=result.wall_s,
                                  plan_ms_per_action=result.act_ms, events=list(env.events),
                                  actions=list(env.actions))

        return work
