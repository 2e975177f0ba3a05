"""Agent success on held-out seeds of a task suite.

    python eval/agent.py runs/train/babyai-goto-mamba2 --episodes 200 --planner cem --json a.json

Episodes use the suite's evaluation seeds (never seen in training). The instruction is the
episode's own BabyAI mission, or with `--paraphrase` one of the suite's free-form paraphrases of
it (then `--llm local` is needed to parse it). Reports the success rate with a 95 % Wilson
interval, split by trained vs held-out (colour, type) combinations, mean steps, planning ms per
action and imagined transitions per second.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from lwm.agent import Agent
from lwm.envs.language import instr_goals
from lwm.eval.report import wilson
from lwm.planning import PLANNERS
from lwm.report import machine_info, write_json
from lwm.tasks import load_suite


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="run or model directory")
    parser.add_argument("--suite", default="babyai-goto")
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--skip", type=int, default=0,
                        help="skip this many evaluation seeds first (a separate range to tune "
                        "settings on, e.g. --skip 200, before measuring on the first 200)")
    parser.add_argument("--planner", default=None, choices=sorted(PLANNERS),
                        help="default: the checkpoint's agent.json, else cem")
    parser.add_argument("--candidates", type=int, default=None, help="override the planner's K")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--horizon", type=int, default=None)
    parser.add_argument("--terminal", default=None, choices=("value", "q"),
                        help="search planners: score the last action by Q (q, the default) or "
                        "step it (value)")
    parser.add_argument("--epsilon", type=float, default=None,
                        help="greedy planner: chance of a random (move-biased) action")
    parser.add_argument("--reward-floor", default=None, action=argparse.BooleanOptionalAction,
                        help="greedy planner: score by max(Q, reward head) (default) or Q alone")
    parser.add_argument("--repeat-penalty", type=float, default=None,
                        help="lower an action's score this much for each time it was already "
                        "taken from the same view this episode (0: off)")
    parser.add_argument("--skip-futile", default=True, action=argparse.BooleanOptionalAction,
                        help="never repeat an action that left the observation unchanged "
                        "from that observation (default on)")
    parser.add_argument("--locate", default=True, action=argparse.BooleanOptionalAction,
                        help="plan for a goal with a start-relative location ('the ball on your "
                        "left') as the object seen there, once seen (default on)")
    parser.add_argument("--search", default=False, action=argparse.BooleanOptionalAction,
                        help="look round first while the goal's object has not been seen "
                        "(default off)")
    parser.add_argument("--policy-prior", action="store_true",
                        help="mppi: draw the prior's candidates from the checkpoint's trained "
                        "policy (lwm train-policy) instead of the Q head")
    parser.add_argument("--llm", default="grammar", help="grammar, local, or a provider string")
    parser.add_argument("--paraphrase", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console()

    agent = Agent.from_pretrained(args.checkpoint, llm=args.llm,
                                  planner=args.planner, seed=args.seed,
                                  skip_futile=args.skip_futile, locate=args.locate,
                                  search=args.search)
    cfg = agent.planner.cfg
    planner = next(name for name, (cls, _) in PLANNERS.items() if isinstance(agent.planner, cls))
    for name in ("candidates", "iterations", "horizon", "terminal", "epsilon", "reward_floor",
                 "repeat_penalty"):
        if getattr(args, name) is not None:
            if not hasattr(cfg, name):
                parser.error(f"--{name.replace('_', '-')} does not apply to the {planner} planner")
            setattr(cfg, name, getattr(args, name))
    if args.policy_prior:
        if not hasattr(cfg, "policy_prior"):
            parser.error(f"--policy-prior does not apply to the {planner} planner")
        from lwm.models.world_model import model_dir
        from lwm.planning.actor import GoalPolicy

        policy = GoalPolicy.from_pretrained(model_dir(args.checkpoint), agent.model)
        agent.planner.prior, cfg.policy_prior = policy.prior(agent.model), True
    suite = load_suite(args.suite)
    env = suite.make_env()
    rows = []
    t0 = time.perf_counter()
    for seed in suite.seeds_for(None, args.skip + args.episodes)[args.skip:]:
        obs, _ = env.reset(seed=seed)
        split = suite.split_of_episode(env)
        instruction = obs["mission"]
        goals = instr_goals(env.unwrapped.instrs)
        if args.paraphrase and all(g.is_concrete for g in goals):
            options = suite.paraphrases(goals)
            instruction = options[seed % len(options)] if options else instruction
        result = agent.run(instruction, env, seed=seed)
        rows.append({"seed": seed, "split": split, "instruction": instruction,
                     "success": result.success, "steps": result.steps,
                     "plan_ms": result.timings["plan_ms_mean"],
                     "parse_s": result.timings["parse_s"]})
        console.print(f"{seed} {split:8} {'ok ' if result.success else 'NO '} "
                      f"{result.steps:3d} steps {result.timings['plan_ms_mean']:5.0f} ms  "
                      f"{instruction}")
    wall = time.perf_counter() - t0

    figures: dict = {"suite": suite.name, "checkpoint": str(args.checkpoint),
                     "planner": planner, "planner_cfg": vars(cfg), "llm": args.llm,
                     "paraphrase": args.paraphrase, "episodes": len(rows), "skip": args.skip,
                     "skip_futile": args.skip_futile, "locate": args.locate, "search": args.search,
                     "wall_s": wall}
    table = Table(title=f"lwm agent on {suite.name} ({planner}, {len(rows)} held-out seeds)")
    for c in ("episodes", "n", "success", "95% CI", "mean steps", "ms/action"):
        table.add_column(c)
    for name, subset in (("all", rows), ("trained combos", [r for r in rows
                                                            if r["split"] == "train"]),
                         ("held-out combos", [r for r in rows if r["split"] == "held_out"])):
        n, k = len(subset), sum(r["success"] for r in subset)
        lo, hi = wilson(k, n)
        steps = float(np.mean([r["steps"] for r in subset])) if subset else float("nan")
        ms = float(np.mean([r["plan_ms"] for r in subset])) if subset else float("nan")
        figures[name] = {"n": n, "success": k / n if n else float("nan"), "ci95": [lo, hi],
                         "mean_steps": steps, "plan_ms": ms}
        table.add_row(name, str(n), f"{k / n:.3f}" if n else "-", f"[{lo:.3f}, {hi:.3f}]",
                      f"{steps:.1f}", f"{ms:.0f}")
    console.print(table)
    if args.json:
        write_json(args.json, {"machine": machine_info(), "seed": args.seed, "figures": figures,
                               "episodes": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
