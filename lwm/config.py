"""Run configs as dataclasses, and their command-line options.

A config dataclass has one docstring per field; `options_from` turns the fields into `--options`
of a typer command with those docstrings as help, so nothing is configured by editing code:

    @app.command()
    @options_from(TrainConfig)
    def train(run_dir: Path, **cfg): ...     # called with every TrainConfig field as a keyword

This module imports nothing heavy, so `lwm --help` stays fast.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["TrainConfig", "field_docs", "options_from"]


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def options_from(cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a typer command one `--option` per field of dataclass `cls` (defaults and help from
    the dataclass); the command receives them as keyword arguments."""
    import typer

    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(fn).parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]
        extra = [
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name],
                default=typer.Option(f.default, "--" + f.name.replace("_", "-"),
                                     help=docs.get(f.name, "")),
            )
            for f in dataclasses.fields(cls)
        ]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        wrapper.__signature__ = inspect.Signature(own + extra)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {}
        return wrapper

    return decorate


@dataclass
class TrainConfig:
    """Settings of a Dyna training run (the CLI's `lwm train` options)."""

    suite: str = "babyai-goto"
    """Task suite to train on (name or YAML path)."""
    preset: str = "small"
    """World-model size preset: debug, small or base."""
    backbone: str = "mamba2"
    """Sequence backbone: mamba2, gru or transformer."""
    decoder: str = "auto"
    """Next-view decoder: 'mlp' (from the history alone), 'ego' (also copies the current
    view's cells along the action's view shift, gated per cell), 'map' (copies them from a map
    of every cell seen so far; see `WorldModelConfig`) or 'auto': the run's own when resuming,
    the starting checkpoint's with --init-from, otherwise 'map'."""
    episodes: int = 2000
    """Episodes to collect in total."""
    collect_per_iter: int = 100
    """Episodes collected per Dyna iteration."""
    updates_per_iter: int = 100
    """Gradient updates per Dyna iteration."""
    batch_size: int = 32
    """Windows per gradient update."""
    seq_len: int = 32
    """Window length (steps)."""
    lr: float = 3e-4
    """Adam learning rate."""
    precision: str = "fp32"
    """Matmul precision of the training updates: 'fp32', 'bf16' (the loss runs under CPU bf16
    autocast: matmuls in bf16, weights, optimizer and losses in fp32; a 1.35x faster update at 2
    threads on a CPU with AVX-512 bf16, slower on one without) or 'auto' (bf16 where the CPU
    multiplies bf16 natively, else fp32)."""
    grad_clip: float = 10.0
    """Gradient-norm clip."""
    n_goals: int = 16
    """Relabelled goal slots per step (a vocabulary this small or smaller: every goal, every
    step)."""
    goal_vocab: str = "suite"
    """Relabelling vocabulary: 'suite' (goals with the suite's verbs and object types) or 'all'
    (every concrete goal); held-out combinations are left out of both."""
    seed: int = 0
    """Seed of the sampler, relabeling, exploration and model init."""
    threads: int = 1
    """torch threads (two 1-thread jobs use 2 cores better than one 2-thread job)."""
    updates_after_collection: int = 0
    """Extra gradient updates once all episodes are collected."""
    warmup_episodes: int = 200
    """Episodes collected by the exploration policy alone before the model's own policy joins."""
    policy_share: float = 0.8
    """After warm-up, the share of each iteration's episodes collected by the model's
    epsilon-greedy Q policy on the episode's mission (the rest: exploration policy)."""
    epsilon_min: float = 0.03
    """Smallest per-episode epsilon of the Q policy (drawn log-uniformly per episode)."""
    epsilon_max: float = 0.5
    """Largest per-episode epsilon of the Q policy."""
    exploration: str = "plain"
    """Random actions of exploration episodes and of epsilon-greedy steps: 'plain' (mostly
    moving, `lwm.envs.EXPLORATION_PROBS`) or 'affordance' (the same moves, but pick up, toggle
    and drop only where the cell in front allows it, and then often:
    `lwm.envs.language.affordance_probs`), which opens locked doors with their keys by chance."""
    stepping_stones: float = 0.0
    """Share of Q-policy episodes that first pursue one or two random goals about objects in
    the scene (go to / pick up / open), then the mission: exploration that chains skills the
    model has into states the mission's own policy does not reach yet (a key carried to a
    locked door), so hindsight relabeling sees goals that random actions never achieve."""
    policy_envs: int = 16
    """Envs stepped in lockstep (one batched model call per step) when the Q policy collects."""
    eval_every: int = 500
    """Evaluate the agent every this many collected episodes (0: never), so a run records its
    own learning curve (`eval/curves.py` plots it); a run that reaches its first periodic
    evaluation also evaluates before training (episode 0), and `episodes=0` only does that."""
    eval_episodes: int = 200
    """Evaluation episodes, on the suite's first evaluation seeds (never trained on)."""
    eval_repeat_penalty: float = 0.1
    """The evaluated agent's repeat penalty: it acts as `lwm.Agent` does with BabyAI's grammar
    parser and the greedy Q planner (the shipped checkpoints' recommendation), preconditions
    first and futile actions skipped. 0: a plain argmax of max(Q, reward) (with those rules)."""
    workers: int = 1
    """Collection processes (more than 1: a local Ray cluster; needs the `ray` extra)."""
    ray_address: str | None = None
    """Address of a running Ray cluster to collect on (e.g. "auto" or "ray://host:10001")."""
    init_from: str | None = None
    """Start from this world model's weights instead of a fresh init (fine-tuning): a run or
    checkpoint directory, or 'shipped:<suite>' for the checkpoint lwm ships for that suite.
    Its config must match `preset` and `backbone`. Read once, when the run starts; a resumed
    run ignores it."""
