"""The Dyna loop: collect episodes, store them, fit the world model, checkpoint, repeat.

    lwm train --suite babyai-goto --preset small --backbone mamba2 --episodes 2000

A run directory holds everything, so a killed run resumes where it stopped (`--resume` is the
default when the directory has a checkpoint) and loses at most the updates since the last
checkpoint and the episode in progress:

    episodes/        the episode store (one crash-safe .npz per episode)
    model/           config.json + model.safetensors (the latest world model)
    trainer.json     TrainConfig, counters and the numpy RNG state
    optimizer.safetensors + optimizer.json   Adam state, without pickle
    goals.safetensors  the goal vocabulary's embeddings (rows of goals.json)
    tb/              tensorboard scalars

Collection uses an exploration policy (random actions biased towards moving) on training seeds
whose missions are not held out; the planner takes over collection once it exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lwm.config import TrainConfig
from lwm.data import EpisodeRecorder, EpisodeStore, SequenceSampler
from lwm.data.relabel import GoalVocab, relabel
from lwm.envs.language import EXPLORATION_PROBS as env_exploration_probs
from lwm.envs.language import affordance_probs
from lwm.models.world_model import (
    CheckpointError,
    WorldModel,
    WorldModelConfig,
    load_config,
    model_dir,
    preset,
)
from lwm.tasks import TaskSuite, load_suite

__all__ = [
    "EXPLORATION_PROBS", "ExploreJob", "PolicyJob", "TrainConfig", "Trainer", "explore_episode",
    "flatten_optimizer", "trim_padding", "unflatten_optimizer",
]

EXPLORATION_PROBS = np.array(env_exploration_probs)
"""Exploration policy over minigrid's actions (`lwm.envs.EXPLORATION_PROBS`): mostly moving,
never the no-op `done`."""


EXPLORATIONS = ("plain", "affordance")
"""Random policies for exploration (`TrainConfig.exploration`)."""
PRECISIONS = ("fp32", "bf16", "auto")
"""Matmul precisions of training updates (`TrainConfig.precision`)."""


def random_actions(rng: np.random.Generator, exploration: str, obs: list[dict]) -> np.ndarray:
    """One random action per observation: 'plain' draws from `EXPLORATION_PROBS`, 'affordance'
    from `lwm.envs.language.affordance_probs` of the cell in front."""
    if exploration == "plain":
        return rng.choice(len(EXPLORATION_PROBS), size=len(obs), p=EXPLORATION_PROBS)
    if exploration != "affordance":
        raise ValueError(f"unknown exploration {exploration!r}; expected one of {EXPLORATIONS}")
    probs = affordance_probs(np.stack([o["image"] for o in obs]),
                             np.stack([np.asarray(o["carrying"]) for o in obs]))
    u = rng.random((len(obs), 1))
    return np.minimum((probs.cumsum(1) < u).sum(1), probs.shape[1] - 1)


def explore_episode(env, seed: int, rng: np.random.Generator, recorder: EpisodeRecorder,
                    meta: dict[str, Any] | None = None, exploration: str = "plain"):
    """One episode of the exploration policy from `env.reset(seed)`, recorded -> `Episode`."""
    obs, info = env.reset(seed=seed)
    recorder.reset(obs, info, meta=meta)
    episode = None
    while episode is None:
        if exploration == "plain":  # the draws of runs from before the option, unchanged
            action = int(rng.choice(len(EXPLORATION_PROBS), p=EXPLORATION_PROBS))
        else:
            action = int(random_actions(rng, exploration, [obs])[0])
        obs, *rest = env.step(action)
        episode = recorder.step(action, obs, *rest)
    return episode


class Trainer:
    """Runs (or resumes) the Dyna loop in `run_dir`."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, progress: bool = True):
        self.cfg = cfg
        self.dir = Path(run_dir)
        self.progress = progress
        if cfg.exploration not in EXPLORATIONS:
            raise ValueError(f"unknown exploration {cfg.exploration!r}; expected one of "
                             f"{EXPLORATIONS}")
        self.bf16 = _use_bf16(cfg.precision)
        if not 0.0 <= cfg.stepping_stones <= 1.0:
            raise ValueError(f"stepping_stones is a share in [0, 1], got {cfg.stepping_stones}")
        self.suite: TaskSuite = load_suite(cfg.suite)
        torch.set_num_threads(cfg.threads)
        self.dir.mkdir(parents=True, exist_ok=True)
        resumed = (self.dir / "trainer.json").exists()
        if cfg.decoder == "auto":
            cfg = self.cfg = dataclasses.replace(cfg, decoder=self._auto_decoder(resumed))
        self.model_cfg: WorldModelConfig = preset(cfg.preset, backbone=cfg.backbone,
                                                   decoder=cfg.decoder)
        self.state: dict[str, Any] = {"updates": 0, "iterations": 0}
        if resumed:
            self._check_resumable()
        torch.manual_seed(cfg.seed)
        if resumed:
            self.model = WorldModel.from_pretrained(self.dir / "model", expect=self.model_cfg)
        elif cfg.init_from:
            self.model = WorldModel.from_pretrained(model_dir(cfg.init_from),
                                                    expect=self.model_cfg)
        else:
            self.model = WorldModel(self.model_cfg)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.rng = np.random.default_rng(cfg.seed)
        if resumed:
            self._load_trainer_state()
        self.store = EpisodeStore(self.dir / "episodes")
        self.sampler = SequenceSampler(self.store, cfg.seq_len)
        self.vocab, self.goal_table = self._goal_table()
        self._writer = None
        self._collector_obj = None  # built on first use (a Ray cluster starts then)

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, float]:
        """Collect and fit until `episodes` are collected; return the last metrics."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        cfg = self.cfg
        metrics: dict[str, float] = {}
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                   "{task.total}"), TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
        with Progress(*columns, disable=not self.progress) as bar, contextlib.closing(self):
            task = bar.add_task("dyna", total=cfg.episodes, completed=len(self.store), info="")
            if (cfg.eval_every > 0 and (cfg.eval_every <= cfg.episodes or cfg.episodes == 0)
                    and len(self.store) == 0 and "evaluated_at" not in self.state):
                # The curve's first point: what the agent does before it learned anything (its
                # rules alone, or with --init-from the weights it starts from). A run too short
                # for any periodic evaluation gets none; `--episodes 0` only evaluates.
                metrics |= self._timed_evaluation(bar, task)
            while len(self.store) < cfg.episodes:
                n = min(cfg.collect_per_iter, cfg.episodes - len(self.store))
                start = time.perf_counter()
                self.collect(n)
                collected = time.perf_counter()
                bar.update(task, completed=len(self.store), info="fitting")
                metrics = self.fit(cfg.updates_per_iter)
                self.state["iterations"] += 1
                self._add_time("collect_s", collected - start)
                self._add_time("fit_s", time.perf_counter() - collected)
                self._add_time("train_s", time.perf_counter() - start)
                if self._eval_due():
                    metrics |= self._timed_evaluation(bar, task)
                self.save()
                bar.update(task, info=_fmt(metrics))
            if cfg.updates_after_collection and self.state["updates"] < self._planned_updates():
                remaining = self._planned_updates() - self.state["updates"]
                fit_task = bar.add_task("fit", total=remaining, info="")
                while remaining > 0:
                    k = min(cfg.updates_per_iter, remaining)
                    metrics = self.fit(k)
                    remaining -= k
                    self.save()
                    bar.update(fit_task, advance=k, info=_fmt(metrics))
        return metrics

    def _timed_evaluation(self, bar: Any, task: Any) -> dict[str, float]:
        """`evaluate()`, shown on the progress bar, its wall time added to eval_s."""
        bar.update(task, info="evaluating")
        start = time.perf_counter()
        info = self.evaluate()
        self._add_time("eval_s", time.perf_counter() - start)
        return info

    def _add_time(self, key: str, seconds: float) -> None:
        """Wall time by phase in trainer.json: train_s = collect_s + fit_s; eval_s apart."""
        self.state[key] = self.state.get(key, 0.0) + seconds

    def _eval_due(self) -> bool:
        every = self.cfg.eval_every
        done = self.state.get("evaluated_at", 0)
        return every > 0 and len(self.store) // every > done // every

    def evaluate(self, episodes: int | None = None) -> dict[str, float]:
        """Success of the agent on the suite's first `eval_episodes` evaluation seeds, overall
        and on trained / held-out combinations; logged beside the episodes and training wall
        time so far. The agent is `lwm.Agent` as it is deployed without an LLM: BabyAI's
        grammar parser, the greedy Q planner with `eval_repeat_penalty`, BabyAI's
        preconditions first, futile actions skipped; so the learning curve is that of the
        agent users run, not of a bare argmax that can loop."""
        from lwm.agent import Agent
        from lwm.language.mission import BabyAIMissionParser
        from lwm.planning import GreedyQ, GreedyQConfig

        start = time.perf_counter()
        seeds = self.suite.seeds_for(None, episodes or self.cfg.eval_episodes)
        planner = GreedyQ(GreedyQConfig(discount=self.model.cfg.discount,
                                        repeat_penalty=self.cfg.eval_repeat_penalty))
        env = self.suite.make_env()
        rows = []
        try:
            agent = Agent(self.model, planner, BabyAIMissionParser())
            for seed in seeds:
                obs, _ = env.reset(seed=seed)
                split = self.suite.split_of_episode(env)
                rows.append((split, agent.run(obs["mission"], env, seed=seed).success))
        finally:
            self.model.train()
        info = {"eval_success": float(np.mean([ok for _, ok in rows]))}
        for split in ("train", "held_out"):
            part = [ok for s, ok in rows if s == split]
            info[f"eval_success_{split}"] = float(np.mean(part)) if part else float("nan")
        info["eval_s"] = time.perf_counter() - start
        self.state["evaluated_at"] = len(self.store)
        self._log(info | {"train_s": self.state.get("train_s", 0.0)})
        self._write_agent_settings(info, len(seeds))
        return info

    def _write_agent_settings(self, info: dict[str, float], episodes: int) -> None:
        """Recommend the agent just evaluated in the run's `model/agent.json`, so that
        `lwm plan`, `lwm eval` and `Agent.from_pretrained` on this run act as it did."""
        from lwm.agent import AGENT_SETTINGS

        model = self.dir / "model"
        model.mkdir(parents=True, exist_ok=True)
        _write_json(model / AGENT_SETTINGS, {
            "planner": "greedy",
            "planner_cfg": {"epsilon": 0.0, "repeat_penalty": self.cfg.eval_repeat_penalty},
            "measured": (f"the trainer's evaluation after {len(self.store)} episodes: "
                         f"{info['eval_success']:.1%} of the suite's first {episodes} "
                         "evaluation seeds, with BabyAI's grammar parser"),
        })

    def _planned_updates(self) -> int:
        cfg = self.cfg
        iters = -(-cfg.episodes // cfg.collect_per_iter)
        return iters * cfg.updates_per_iter + cfg.updates_after_collection

    def collect(self, n: int) -> None:
        """Collect `n` episodes on training seeds: the exploration policy during warm-up, then a
        `policy_share` of them with the model's own epsilon-greedy Q policy on the mission.

        Episodes are independent work items (seeded by the run seed and the episode seed), so a
        `Collector` (`workers` > 1 or `ray_address`: Ray) collects exactly what one process
        would; they are stored in seed order."""
        cfg = self.cfg
        env = self.suite.make_env()
        # Continue after the newest stored episode's seed, so episodes a killed run stored after
        # its last checkpoint are not collected twice.
        start = self.store[len(self.store) - 1].meta["seed"] + 1 if len(self.store) else None
        seeds = self.suite.iter_seeds("train", evaluation=False, env=env, start=start)
        n_policy = 0
        if len(self.store) >= cfg.warmup_episodes:
            n_policy = int(round(n * cfg.policy_share))
        policy_seeds = [next(seeds) for _ in range(n_policy)]
        explore_seeds = [next(seeds) for _ in range(n - n_policy)]
        collector = self._collector()
        if policy_seeds:
            for episode in self.policy_episodes(policy_seeds, collector):
                self.store.append(episode)
        if explore_seeds:
            job = ExploreJob(suite=cfg.suite, seed=cfg.seed, exploration=cfg.exploration)
            for episode in collector.map(job, explore_seeds):
                self.store.append(episode)

    def policy_episodes(self, seeds: list[int], collector=None, greedy: bool = False) -> list:
        """Episodes of the model's epsilon-greedy Q policy (`greedy`: epsilon 0, and the run's
        RNG untouched) on each seed's own mission, in seed order: chunks of `policy_envs` envs
        step in lockstep (one batched model call per step), one chunk per work item of
        `collector` (in-process by default)."""
        from lwm.eval.collect import LocalCollector

        cfg = self.cfg
        if greedy:
            cfg = dataclasses.replace(cfg, epsilon_min=0.0, epsilon_max=0.0, stepping_stones=0.0)
        job = PolicyJob.from_model(self.model, cfg, self.vocab.texts, self.goal_table)
        width = max(1, cfg.policy_envs)
        chunks = [(tuple(seeds[i : i + width]), 0 if greedy else int(self.rng.integers(2**63)))
                  for i in range(0, len(seeds), width)]
        collector = collector or LocalCollector()
        self.model.eval()
        try:
            return [episode for chunk in collector.map(job, chunks) for episode in chunk]
        finally:
            self.model.train()

    def sample_batch(self) -> dict[str, torch.Tensor]:
        """`batch_size` windows from the store with relabelled goal slots, as the tensors
        `WorldModel.loss` takes (call `sampler.refresh()` first to see new episodes).

        Steps past the longest real window of the batch are cut off: they are padding in every
        window, masked out of every loss term, and the backbone is causal, so the loss is the
        same, at the cost of the real steps only (windows as long as a whole episode are mostly
        padding once the policy succeeds in a few steps)."""
        cfg = self.cfg
        batch = self.sampler.sample(cfg.batch_size, self.rng)
        goals = relabel(batch, self.vocab, self.rng, cfg.n_goals)
        tensors = batch.to_torch()
        prev = tensors["prev_action"]
        tensors.update(prev_action=torch.where(prev < 0, self.model.START, prev),
                       goal=torch.from_numpy(goals.goal),
                       goal_reward=torch.from_numpy(goals.reward),
                       goal_mask=torch.from_numpy(goals.mask))
        return trim_padding(tensors)

    def fit(self, updates: int) -> dict[str, float]:
        """`updates` gradient steps on windows from the store; returns mean metrics."""
        cfg = self.cfg
        self.sampler.refresh()
        self.model.train()
        sums: dict[str, float] = {}
        for _ in range(updates):
            batch = self.sample_batch()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                loss, parts = self.model.loss(batch, self.goal_table)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss {parts} at update {self.state['updates']}; the last "
                    f"checkpoint in {self.dir} is intact: lower --lr and resume"
                )
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.opt.step()
            self.model.update_target()
            self.state["updates"] += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
        metrics = {k: v / max(updates, 1) for k, v in sums.items()}
        self._log(metrics)
        return metrics

    def _collector(self):
        from lwm.eval.collect import make_collector

        if self._collector_obj is None:
            self._collector_obj = make_collector(self.cfg.workers, self.cfg.ray_address)
        return self._collector_obj

    def close(self) -> None:
        """Release the collector's workers (and a Ray cluster this trainer started)."""
        if self._collector_obj is not None:
            self._collector_obj.close()
            self._collector_obj = None

    # ------------------------------------------------------------------ goals

    def _goal_table(self) -> tuple[GoalVocab, torch.Tensor]:
        """The training goal vocabulary (held-out combinations left out) and its embeddings,
        computed once per run and stored beside the checkpoint."""
        from safetensors.torch import load_file, save_file

        vocab = GoalVocab(self.suite.goal_vocabulary(self.cfg.goal_vocab))
        names, table = self.dir / "goals.json", self.dir / "goals.safetensors"
        if names.exists() and table.exists() and json.loads(names.read_text()) == vocab.texts:
            return vocab, load_file(str(table))["embeddings"]
        from lwm.language.embed import GoalEncoder

        emb = GoalEncoder().encode(vocab.texts, as_torch=True)
        save_file({"embeddings": emb.contiguous()}, str(table))
        names.write_text(json.dumps(vocab.texts))
        return vocab, emb

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> None:
        """Write model, optimizer and trainer state (each file atomically)."""
        from safetensors.torch import save_file

        self.model.save_pretrained(self.dir / "model")
        tensors, layout = flatten_optimizer(self.opt)
        tmp = self.dir / "optimizer.safetensors.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, self.dir / "optimizer.safetensors")
        _write_json(self.dir / "optimizer.json", layout)
        _write_json(self.dir / "trainer.json", {
            "config": dataclasses.asdict(self.cfg),
            "state": self.state,
            "rng": self.rng.bit_generator.state,
            "saved_at": time.time(),
        })

    def _saved_config(self) -> dict[str, Any]:
        """The config a run directory was trained with (fields added since: their old values)."""
        saved = json.loads((self.dir / "trainer.json").read_text())["config"]
        saved.setdefault("goal_vocab", "all")  # runs from before the option used every goal
        saved.setdefault("decoder", "mlp")  # ... and the MLP decoder
        return saved

    def _auto_decoder(self, resumed: bool) -> str:
        """What decoder "auto" means here: the run's own when resuming, the starting
        checkpoint's with `init_from` (its weights must fit), otherwise "map"."""
        if resumed:
            return self._saved_config()["decoder"]
        if self.cfg.init_from:
            return load_config(model_dir(self.cfg.init_from)).decoder
        return "map"

    def _check_resumable(self) -> None:
        saved = self._saved_config()
        ours = dataclasses.asdict(self.cfg)
        fixed = ("suite", "preset", "backbone", "decoder", "seq_len", "seed", "goal_vocab")
        diff = [f"{k}: run has {saved.get(k)!r}, asked for {ours[k]!r}" for k in fixed
                if saved.get(k) != ours[k]]
        if diff:
            raise CheckpointError(
                f"{self.dir}: cannot resume with a different setup ({'; '.join(diff)}); "
                "use another run directory"
            )

    def _load_trainer_state(self) -> None:
        from safetensors.torch import load_file

        saved = json.loads((self.dir / "trainer.json").read_text())
        self.state = saved["state"]
        self.rng.bit_generator.state = saved["rng"]
        opt_file = self.dir / "optimizer.safetensors"
        if opt_file.exists():
            layout = json.loads((self.dir / "optimizer.json").read_text())
            self.opt.load_state_dict(unflatten_optimizer(load_file(str(opt_file)), layout))

    def _log(self, metrics: dict[str, float]) -> None:
        """Scalars to tensorboard (tb/) and, one JSON line per call, to metrics.jsonl."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.dir / "tb"))
        step = self.state["updates"]
        for k, v in metrics.items():
            if k.startswith("eval_"):  # learning curves: against episodes collected
                self._writer.add_scalar(f"eval/{k.removeprefix('eval_')}", v, len(self.store))
            else:
                self._writer.add_scalar(f"train/{k}", v, step)
        self._writer.add_scalar("data/episodes", len(self.store), step)
        self._writer.flush()
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"updates": step, "episodes": len(self.store), **metrics}) + "\n")


@dataclasses.dataclass(frozen=True)
class ExploreJob:
    """Builds a worker (in any process) that records one exploration episode per seed, with
    randomness drawn from (run seed, episode seed) alone."""

    suite: str
    seed: int
    exploration: str = "plain"

    def __call__(self):
        suite = load_suite(self.suite)
        env = suite.make_env()
        recorder = EpisodeRecorder(meta={"suite": suite.name, "env_id": suite.env_id,
                                         "policy": "explore"})

        def run(seed: int):
            rng = np.random.default_rng([self.seed, seed])
            return explore_episode(env, seed, rng, recorder, {"seed": seed}, self.exploration)

        return run


@dataclasses.dataclass(frozen=True)
class PolicyJob:
    """Builds a worker (in any process) that runs the model's epsilon-greedy Q policy on a
    chunk of seeds in lockstep: an item is (seeds, rng seed) -> episodes in seed order. Carries
    the weights and the goal table as safetensors bytes (no pickled torch objects)."""

    suite: str
    model_config: str
    weights: bytes
    goal_texts: tuple[str, ...]
    goal_table: bytes
    epsilon_min: float
    epsilon_max: float
    stepping_stones: float = 0.0
    exploration: str = "plain"

    @classmethod
    def from_model(cls, model: WorldModel, cfg: TrainConfig, goal_texts,
                   goal_table: torch.Tensor) -> PolicyJob:
        from safetensors.torch import save

        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        return cls(suite=cfg.suite, model_config=json.dumps(model.cfg.to_dict()),
                   weights=save(state), goal_texts=tuple(goal_texts),
                   goal_table=save({"embeddings": goal_table.contiguous()}),
                   epsilon_min=cfg.epsilon_min, epsilon_max=cfg.epsilon_max,
                   stepping_stones=cfg.stepping_stones, exploration=cfg.exploration)

    def __call__(self):
        from safetensors.torch import load

        model = WorldModel(WorldModelConfig.from_dict(json.loads(self.model_config)))
        model.load_state_dict(load(self.weights))
        table = load(self.goal_table)["embeddings"]
        index = {t: i for i, t in enumerate(self.goal_texts)}
        return _PolicyWorker(load_suite(self.suite), model.eval(), table, index,
                             (self.epsilon_min, self.epsilon_max), self.stepping_stones,
                             self.exploration)


class _PolicyWorker:
    """Runs chunks of Q-policy episodes for `PolicyJob`."""

    def __init__(self, suite: TaskSuite, model: WorldModel, table: torch.Tensor,
                 index: dict[str, int], eps_range: tuple[float, float],
                 stepping_stones: float = 0.0, exploration: str = "plain"):
        self.suite, self.model, self.table, self.index = suite, model, table, index
        self.eps_range = eps_range
        self.stepping_stones = stepping_stones
        self.exploration = exploration
        self.envs: list = []
        self.extra: dict[str, torch.Tensor] = {}

    def goal(self, text: str) -> torch.Tensor:
        """A goal's row of the table, else its encoding (goals outside the vocabulary)."""
        if text in self.index:
            return self.table[self.index[text]]
        if text not in self.extra:
            from lwm.language.embed import GoalEncoder

            self.extra[text] = GoalEncoder().encode(text, as_torch=True)
        return self.extra[text]

    @torch.no_grad()
    def __call__(self, item: tuple[tuple[int, ...], int]) -> list:
        """Each episode draws its epsilon log-uniformly from [epsilon_min, epsilon_max]
        (Ape-X style: some episodes mostly exploit, some mostly explore); a random step samples
        the exploration policy. A `stepping_stones` share of episodes first pursue one or two
        random goals about objects in the scene (`TrainConfig.stepping_stones`)."""
        from lwm.envs.language import (
            carried,
            facing,
            goal_achieved,
            instr_goals,
            locked_doors,
            scene_goals,
        )
        from lwm.goals import acting_goal

        seeds, rng_seed = item
        rng = np.random.default_rng(rng_seed)
        model, b = self.model, len(seeds)
        while len(self.envs) < b:
            self.envs.append(self.suite.make_env())
        envs = self.envs[:b]
        recs, pending, obs_list = [], [], []
        low, high = self.eps_range
        eps = (np.zeros(b) if high <= 0
               else np.exp(rng.uniform(np.log(low), np.log(high), size=b)))
        for env, seed, e in zip(envs, seeds, eps, strict=True):
            obs, info = env.reset(seed=seed)
            rec = EpisodeRecorder(meta={"suite": self.suite.name, "env_id": self.suite.env_id,
                                        "policy": "q-epsilon-greedy"})
            goals = instr_goals(env.unwrapped.instrs)
            meta = {"seed": seed, "epsilon": float(e)}
            if self.stepping_stones > 0 and rng.random() < self.stepping_stones:
                stones = [s for s in scene_goals(env)
                          if not any(g.matches(s, set(), set()) for g in goals)]
                picked = rng.permutation(len(stones))[: rng.integers(1, 3)]
                goals = [stones[j] for j in picked] + goals
                meta["stepping_stones"] = [stones[j].text for j in picked]
            rec.reset(obs, info, meta=meta)
            recs.append(rec)
            pending.append(goals)
            obs_list.append(obs)
        state = model.init_state(b)
        prev = torch.full((b,), model.START)
        episodes: list = [None] * b
        psi, acting = None, None
        locked: list[set[str]] = [set() for _ in range(b)]  # locked doors seen, per env
        allowed = np.flatnonzero(EXPLORATION_PROBS > 0)
        while any(e is None for e in episodes):
            image = torch.from_numpy(np.stack([o["image"] for o in obs_list]))
            direction = torch.tensor([int(o["direction"]) for o in obs_list])
            carrying = torch.from_numpy(np.stack([np.asarray(o["carrying"]) for o in obs_list]))
            h, state = model.next(state, model.encode(image, direction, carrying), prev)
            # preconditions first: the object of a put, the key of a locked door (`acting_goal`)
            for seen, o in zip(locked, obs_list, strict=True):
                seen |= locked_doors(o)
            now = [acting_goal(p[0], carried(o), seen, facing(o)).text
                   for p, o, seen in zip(pending, obs_list, locked, strict=True)]
            if now != acting:  # the goal stream changes only when a goal does
                psi, acting = model.goal_features(torch.stack([self.goal(t) for t in now])), now
            q = model.q(h, psi=psi["q"])  # (b, A)
            greedy = allowed[q[:, allowed].argmax(-1).numpy()]
            explore = rng.random(b) < eps
            random = random_actions(rng, self.exploration, obs_list)
            actions = np.where(explore, random, greedy).tolist()
            for i in range(b):
                if episodes[i] is not None:
                    continue
                step = envs[i].step(actions[i])
                obs_list[i], info = step[0], step[-1]
                if len(pending[i]) > 1 and goal_achieved(pending[i][0], info):
                    pending[i] = pending[i][1:]  # on to the mission's next subgoal
                episodes[i] = recs[i].step(actions[i], *step)
            prev = torch.tensor(actions)
        return episodes


def trim_padding(batch: dict[str, Any]) -> dict[str, Any]:
    """A training batch without the trailing steps that are padding in every window (step
    fields (B, L, ...) keep the longest window's n real steps, observation fields n + 1)."""
    length = batch["mask"].shape[1]
    steps = int(batch["mask"].sum(1).max())
    if steps == length:
        return batch
    return {key: value[:, : steps + value.shape[1] - length]
            if torch.is_tensor(value) and value.dim() >= 2 else value
            for key, value in batch.items()}


def _use_bf16(precision: str) -> bool:
    """Whether `TrainConfig.precision` means bf16 autocast on this CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if precision == "auto":
        return native_bf16()
    if precision == "bf16" and not native_bf16():
        warnings.warn("this CPU has no native bf16 matmuls (AVX-512 bf16 or AMX): bf16 training "
                      "updates will be slower than fp32 here; --precision auto picks fp32",
                      RuntimeWarning, stacklevel=3)
    return precision == "bf16"


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 bf16 or AMX). oneDNN also runs bf16 on
    plain AVX-512 by converting, which is slower than fp32, so that does not count."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in metrics.items())


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as named tensors + a JSON layout (safetensors holds no pickle)."""
    sd = opt.state_dict()
    tensors, layout = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, entries in sd["state"].items():
        layout["state"][str(pid)] = {}
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().contiguous()
                layout["state"][str(pid)][name] = "tensor"
            else:
                layout["state"][str(pid)][name] = value
    return tensors, layout


def unflatten_optimizer(tensors: dict[str, torch.Tensor], layout: dict) -> dict:
    """The optimizer `state_dict` that `flatten_optimizer` wrote as tensors + layout."""
    state = {}
    for pid, entries in layout["state"].items():
        state[int(pid)] = {
            name: tensors[f"{pid}.{name}"] if value == "tensor" else value
            for name, value in entries.items()
        }
    return {"state": state, "param_groups": layout["param_groups"]}
