"""The model-free baseline (DQN + language hindsight): train, then score on held-out seeds.

    python eval/dqn.py runs/dqn-goto --train 4000 --episodes 200 --json dqn.json
    python eval/dqn.py runs/dqn-goto-k1 --train 4000 --frames 1      # no memory
    python eval/dqn.py runs/dqn-goto-nr --train 14000 --no-relabel    # no hindsight relabeling

Trains (or resumes, or with --train 0 only loads) a run directory, then plays the greedy policy
(epsilon-greedy with --epsilon) on the suite's first `--episodes` evaluation seeds (never trained
on) with the env's own missions.
Reports the success rate with a 95 % Wilson interval, split by trained vs held-out (colour, type)
combinations, mean steps, and from the evaluations during training the episodes and training
wall-clock at which success first reached `--target`. `--fresh N` adds N more evaluation seeds
after those (a check that the first ones were not lucky).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from lwm.baselines.dqn import PRESETS, DQNAgent, DQNPolicy, evaluate, load_config, preset
from lwm.eval.report import wilson
from lwm.report import machine_info, write_json
from lwm.tasks import load_suite


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Success, its 95 % Wilson interval and mean steps: all, trained and held-out combos."""
    out = {}
    for name, split in (("all", None), ("trained combos", "train"),
                        ("held-out combos", "held_out")):
        part = [r for r in rows if split is None or r["split"] == split]
        n, k = len(part), sum(r["success"] for r in part)
        out[name] = {"n": n, "successes": k, "success": k / n if n else float("nan"),
                     "ci95": list(wilson(k, n)),
                     "mean_steps": float(np.mean([r["steps"] for r in part])) if n else None}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--train", type=int, default=4000,
                        help="train (or resume) until this many episodes; 0 only loads")
    parser.add_argument("--suite", default="babyai-goto")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--frames", type=int, default=3, choices=(1, 2, 3, 4))
    parser.add_argument("--no-relabel", action="store_true")
    parser.add_argument("--eval-every", type=int, default=500,
                        help="evaluate during training every this many episodes")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--episodes", type=int, default=200, help="held-out evaluation seeds")
    parser.add_argument("--fresh", type=int, default=0, help="more evaluation seeds after those")
    parser.add_argument("--epsilon", type=float, default=0.0,
                        help="random-action rate while evaluating (seeded per episode; 0: greedy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console()

    t0 = time.perf_counter()
    state = None
    if args.train > 0:
        cfg = preset(args.preset, suite=args.suite, frames=args.frames,
                     relabel=not args.no_relabel, eval_every=args.eval_every,
                     eval_episodes=args.episodes, target_success=args.target, seed=args.seed,
                     threads=args.threads)
        state = DQNAgent(cfg).train(args.train, args.run_dir)
    cfg = load_config(args.run_dir)
    if state is None and (args.run_dir / "trainer.json").exists():
        state = json.loads((args.run_dir / "trainer.json").read_text())["state"]
    train_wall = time.perf_counter() - t0

    suite = load_suite(cfg.suite)
    policy = DQNPolicy.from_pretrained(args.run_dir, epsilon=args.epsilon)
    t1 = time.perf_counter()
    rows = evaluate(policy, suite, suite.seeds_for(None, args.episodes))
    eval_wall = time.perf_counter() - t1
    figures = summarize(rows)
    fresh = None
    if args.fresh:
        seeds = suite.seeds_for(None, args.episodes + args.fresh)[args.episodes:]
        fresh_rows = evaluate(policy, suite, seeds)
        fresh = summarize(fresh_rows)
        rows += [dict(r, fresh=True) for r in fresh_rows]

    evals = state["evals"] if state else []
    reached = next((e for e in evals if e["eval_success"] >= args.target), None)
    title = (f"DQN + {'language hindsight' if cfg.relabel else 'no relabeling'}, k={cfg.frames}, "
             f"{state['episodes'] if state else '?'} training episodes, {suite.name}, "
             + (f"epsilon {args.epsilon}" if args.epsilon else "greedy"))
    table = Table(title=title)
    for c in ("seeds", "n", "success", "95% CI", "mean steps"):
        table.add_column(c)
    for label, summary in [("", figures)] + ([("fresh ", fresh)] if fresh else []):
        for name, f in summary.items():
            table.add_row(label + name, str(f["n"]), f"{f['success']:.3f}",
                          f"[{f['ci95'][0]:.3f}, {f['ci95'][1]:.3f}]", f"{f['mean_steps']:.1f}")
    console.print(table)
    if state:
        console.print(f"training: {state['episodes']} episodes, {state['env_steps']} env steps, "
                      f"{state['updates']} updates, {state['train_s']:.0f} s wall, "
                      f"{state['train_cpu_s']:.0f} s CPU (evaluations and checkpoints excluded)")
    if reached:
        console.print(f"first evaluation >= {args.target:.0%} ({args.episodes} seeds): "
                      f"{reached['episodes']} episodes, {reached['train_s']:.0f} s wall / "
                      f"{reached['train_cpu_s']:.0f} s CPU of training")
    elif evals:
        console.print(f"evaluation during training never reached {args.target:.0%}")

    if args.json:
        write_json(args.json, {
            "machine": machine_info(), "seed": cfg.seed, "run_dir": str(args.run_dir),
            "config": dataclasses.asdict(cfg), "training": state and {
                k: state[k]
                for k in ("episodes", "env_steps", "updates", "train_s", "train_cpu_s")},
            "curve": evals, "target": args.target, "reached": reached,
            "eval_epsilon": args.epsilon,
            "figures": figures, "fresh": fresh, "eval_wall_s": eval_wall,
            "wall_s": train_wall + eval_wall, "episodes": rows,
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
