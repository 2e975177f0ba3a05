"""World-model quality on held-out episodes: open-loop grid accuracy and reward AUROC.

    python eval/world_model.py runs/wm-goto-mamba2 runs/wm-goto-gru --episodes 200 --json wm.json

Episodes are collected fresh with the exploration policy on the suite's *evaluation* seeds (never
seen in training). For each run directory (written by `lwm train`):

- grid accuracy k = 1, 5, 15: the model filters the real history up to step `start`, then
  imagines under the real actions, feeding back its own predictions; the share of the 49 view
  cells whose type, colour and state are all right, averaged over starts 0, 8, 16, 24.
- reward AUROC: teacher-forced reward probabilities of every concrete goal at every step,
  achieved (positive) vs not achieved (negative), for goals of trained (colour, type)
  combinations and, separately, of held-out ones.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from lwm.data import EpisodeRecorder
from lwm.models.metrics import auroc, open_loop_accuracy, reward_scores
from lwm.models.world_model import WorldModel, model_dir
from lwm.report import machine_info, write_json
from lwm.tasks import load_suite
from lwm.train import explore_episode

STARTS = (0, 8, 16, 24)
HORIZONS = (1, 5, 15)


def collect(suite, n: int, seed: int) -> list:
    env, rng, recorder = suite.make_env(), np.random.default_rng(seed), EpisodeRecorder()
    return [explore_episode(env, s, rng, recorder) for s in suite.seeds_for(None, n)]


def evaluate(model: WorldModel, episodes: list, suite, goal_texts, goal_table) -> dict:
    model.eval()
    figures: dict[str, float] = {}
    for k in HORIZONS:
        figures[f"grid_acc_k{k}"] = []
    for start in STARTS:
        long = [e for e in episodes if e.num_steps >= start + max(HORIZONS)]
        if not long:
            continue
        t = start + max(HORIZONS)
        acc = open_loop_accuracy(
            model,
            torch.from_numpy(np.stack([e.image[: t + 1] for e in long])),
            torch.from_numpy(np.stack([e.direction[: t + 1] for e in long])),
            torch.from_numpy(np.stack([e.carrying[: t + 1] for e in long])),
            torch.from_numpy(np.stack([e.action[:t] for e in long])),
            start, HORIZONS,
        )
        for k, v in acc.items():
            figures[f"grid_acc_k{k}"].append((v, len(long)))
    for k in HORIZONS:
        parts = figures[f"grid_acc_k{k}"]
        figures[f"grid_acc_k{k}"] = (sum(v * n for v, n in parts) / sum(n for _, n in parts)
                                     if parts else float("nan"))

    index = {t: i for i, t in enumerate(goal_texts)}
    held = np.array([suite.split_of_goal(t) == "held_out" for t in goal_texts])
    scores, labels = [], []
    for e in episodes:
        p = reward_scores(
            model, torch.from_numpy(e.image), torch.from_numpy(e.direction),
            torch.from_numpy(e.carrying), torch.from_numpy(e.action), goal_table,
        ).numpy()  # (T, V)
        y = np.zeros_like(p, dtype=bool)
        for t in range(e.num_steps):
            for g in e.achieved[t + 1]:
                if g in index:  # not "put the key next to the key" (two identical objects)
                    y[t, index[g]] = True
        scores.append(p)
        labels.append(y)
    s, y = np.concatenate(scores), np.concatenate(labels)
    figures["reward_auroc_trained"] = auroc(s[:, ~held].ravel(), y[:, ~held].ravel())
    figures["reward_auroc_held_out"] = auroc(s[:, held].ravel(), y[:, held].ravel())
    figures["positives_trained"] = int(y[:, ~held].sum())
    figures["positives_held_out"] = int(y[:, held].sum())
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path,
                        help="run directories of `lwm train`, or model directories")
    parser.add_argument("--suite", default="babyai-goto")
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--goals", choices=("suite", "all"), default="suite",
                        help="goals the reward AUROC scores: the suite's verbs and object types "
                             "(what `lwm train` relabels with by default) or every concrete goal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console()

    from lwm.language.embed import GoalEncoder

    suite = load_suite(args.suite)
    t0 = time.perf_counter()
    episodes = collect(suite, args.episodes, args.seed)
    console.print(f"{len(episodes)} held-out-seed episodes collected in "
                  f"{time.perf_counter() - t0:.1f} s")
    # Scored goals: the model's task (the suite's verbs and types, `--goals suite`) or every
    # concrete goal; held-out combinations included, reported apart.
    goal_texts = suite.goal_vocabulary(args.goals, held_out=True)
    goal_table = GoalEncoder().encode(goal_texts, as_torch=True)

    results = {}
    table = Table(title=f"world model on {suite.name}: {len(episodes)} held-out-seed episodes")
    cols = ["run", "backbone", *(f"grid k={k}" for k in HORIZONS), "AUROC trained",
            "AUROC held-out"]
    for c in cols:
        table.add_column(c)
    for run in args.runs:
        model = WorldModel.from_pretrained(model_dir(run))
        figures = evaluate(model, episodes, suite, goal_texts, goal_table)
        figures["backbone"] = model.cfg.backbone
        results[str(run)] = figures
        table.add_row(str(run), model.cfg.backbone,
                      *(f"{figures[f'grid_acc_k{k}']:.4f}" for k in HORIZONS),
                      f"{figures['reward_auroc_trained']:.4f}",
                      f"{figures['reward_auroc_held_out']:.4f}")
    console.print(table)
    if args.json:
        write_json(args.json, {"machine": machine_info(), "seed": args.seed, "suite": suite.name,
                               "goals": args.goals,
                               "episodes": len(episodes), "runs": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
