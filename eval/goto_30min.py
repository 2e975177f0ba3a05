"""GoToLocal within 30 minutes of training: run the recipe, then measure what it reached.

    python eval/goto_30min.py --run-dir runs/train/goto-30min --json runs/goto-30min.json

Trains a `small` mamba2 world model with the Dyna loop on BabyAI GoToLocal (2 threads, bf16
training updates where the CPU has native bf16 matmuls, 300 updates of 8 whole-episode windows
per 100 episodes, every concrete goal relabelled), evaluating the agent on the suite's first 200
evaluation seeds every 500 episodes. Then the finished model plays `--further` more evaluation
seeds (after the first 400, which training evaluates on and settings were tuned on) with the
agent's deployed settings: BabyAI's grammar parser, greedy Q with a repeat penalty of 0.1.

Writes the learning curve (success against episodes and training wall time), the wall time by
phase (train_s = collection + updates; evaluations apart), both success rates with 95 % Wilson
intervals, the machine and the seed. Resumable: run the same command again after a kill.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from eval.agent import main as agent_main  # noqa: E402
from eval.curves import read_run  # noqa: E402
from lwm.config import TrainConfig  # noqa: E402
from lwm.eval.report import wilson  # noqa: E402
from lwm.models.world_model import DECODERS  # noqa: E402
from lwm.report import machine_info, write_json  # noqa: E402
from lwm.train import PRECISIONS, Trainer  # noqa: E402

BUDGET_S = 30 * 60
FURTHER_SKIP = 400
"""Further seeds start after the first 400: training evaluates on the first 200, and settings
were tuned on the next 200."""


def recipe(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(suite="babyai-goto", preset="small", backbone="mamba2", seed=args.seed,
                       threads=args.threads, episodes=args.episodes, collect_per_iter=100,
                       updates_per_iter=args.updates_per_iter, batch_size=8, seq_len=64,
                       goal_vocab="all", eval_every=500, eval_episodes=200,
                       precision=args.precision, decoder=args.decoder)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/train/goto-30min"))
    parser.add_argument("--episodes", type=int, default=3000)
    parser.add_argument("--updates-per-iter", type=int, default=300)
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decoder", default="mlp", choices=DECODERS,
                        help="next-view decoder of the world model (see WorldModelConfig)")
    parser.add_argument("--further", type=int, default=1000,
                        help="evaluation seeds after the first 400 played by the final model "
                        "(0: none)")
    parser.add_argument("--json", type=Path, help="write all figures here")
    args = parser.parse_args(argv)

    cfg = recipe(args)
    trainer = Trainer(cfg, args.run_dir)
    trainer.run()
    state = trainer.state
    curve = [{"episodes": p["episodes"], "train_s": p["train_s"], "success": p["eval_success"],
              "success_held_out": p["eval_success_held_out"]}
             for p in read_run(args.run_dir)["points"]]
    last = curve[-1]
    n200 = cfg.eval_episodes
    figures: dict[str, Any] = {
        "episodes": len(trainer.store),
        "updates": state["updates"],
        "train_s": state["train_s"],
        "collect_s": state["collect_s"],
        "fit_s": state["fit_s"],
        "eval_s": state.get("eval_s", 0.0),
        "s_per_update": state["fit_s"] / max(state["updates"], 1),
        "bf16": trainer.bf16,
        "curve": curve,
        "success_200": last["success"],
        "success_200_ci95": wilson(round(last["success"] * n200), n200),
        "within_budget": state["train_s"] <= BUDGET_S,
    }
    trainer.close()
    if args.further:
        figures["further"] = further_seeds(args)
    result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "recipe": dataclasses.asdict(cfg),
              "machine": machine_info(), "seed": args.seed, "figures": figures}
    report(result)
    if args.json:
        write_json(args.json, result)
    return result


def further_seeds(args: argparse.Namespace) -> dict[str, Any]:
    """The final model on `--further` evaluation seeds after the first `FURTHER_SKIP`
    (eval/agent.py)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "agent.json"
        agent_main([str(args.run_dir), "--planner", "greedy", "--repeat-penalty", "0.1",
                    "--skip", str(FURTHER_SKIP), "--episodes", str(args.further),
                    "--threads", str(args.threads), "--json", str(out)])
        figures = json.loads(out.read_text())["figures"]
    return {"episodes": args.further, "skip": FURTHER_SKIP,
            **{k: figures[k] for k in ("all", "trained combos", "held-out combos")}}


def report(result: dict[str, Any]) -> None:
    fig = result["figures"]
    table = Table(title="GoToLocal: success of the greedy agent (first 200 evaluation seeds) "
                        "against training")
    for col in ("episodes", "train min", "success", "held-out combos"):
        table.add_column(col, justify="right")
    for point in fig["curve"]:
        table.add_row(str(point["episodes"]), f"{point['train_s'] / 60:.1f}",
                      f"{point['success']:.1%}", f"{point['success_held_out']:.1%}")
    console = Console()
    console.print(table)
    lo, hi = fig["success_200_ci95"]
    console.print(f"{fig['episodes']} episodes, {fig['updates']} updates in "
                  f"{fig['train_s'] / 60:.1f} min of training (collection "
                  f"{fig['collect_s'] / 60:.1f}, updates {fig['fit_s'] / 60:.1f}; "
                  f"{fig['s_per_update'] * 1e3:.0f} ms an update, bf16 {fig['bf16']}); "
                  f"{fig['success_200']:.1%} [{lo:.1%}, {hi:.1%}] on 200 seeds; within 30 min: "
                  f"{fig['within_budget']}")
    if "further" in fig:
        more = fig["further"]["all"]
        lo, hi = more["ci95"]
        console.print(f"{more['n']} further seeds: {more['success']:.1%} [{lo:.1%}, {hi:.1%}], "
                      f"held-out combos {fig['further']['held-out combos']['success']:.1%}")


if __name__ == "__main__":
    main()
