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
- one-step accuracy by kind of cell: the view is partial, so not every cell of the next view can
  be known. Every step's one-step prediction (the real history through o_t, then a_t) is scored
  per cell of o_t+1, by where that cell's grid position was seen (from the agent's true pose):
  "in view" (visible in o_t), "recalled" (visible earlier, not in o_t: only memory knows it),
  "new" (never visible before) and "unseen" (not visible in o_t+1 either). `known share` is the
  share of cells that are not new: a model that knew every cell it had seen and missed every
  new one would score that.
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
from lwm.envs.spatial import view_positions
from lwm.models.metrics import auroc, open_loop_accuracy, reward_scores, teacher_forced
from lwm.models.world_model import WorldModel, model_dir
from lwm.report import machine_info, write_json
from lwm.tasks import load_suite
from lwm.train import explore_episode

STARTS = (0, 8, 16, 24)
HORIZONS = (1, 5, 15)


KINDS = ("in view", "recalled", "new", "unseen")


def collect(suite, n: int, seed: int) -> list:
    env, rng, recorder = suite.make_env(), np.random.default_rng(seed), EpisodeRecorder()
    return [explore_episode(env, s, rng, recorder, meta={"seed": s})
            for s in suite.seeds_for(None, n)]


def cell_kinds(suite, episode) -> np.ndarray:
    """(T, 7, 7) index into `KINDS` of every cell of o_1..o_T (module docstring), from the
    agent's poses when the episode's actions are replayed from its seed."""
    env = suite.make_env()
    env.reset(seed=episode.meta["seed"])
    base = env.unwrapped
    poses = [view_positions(tuple(base.agent_pos), base.agent_dir)]
    for action in episode.action:
        env.step(int(action))
        poses.append(view_positions(tuple(base.agent_pos), base.agent_dir))
    visible = episode.image[..., 0] != 0  # (T+1, 7, 7)
    seen: set[tuple[int, int]] = set()
    kinds = np.empty((episode.num_steps, 7, 7), np.int64)
    for t in range(episode.num_steps):
        in_view = {tuple(p) for p in poses[t][visible[t]]}
        seen |= in_view
        for x in range(7):
            for y in range(7):
                p = tuple(poses[t + 1][x, y])
                kinds[t, x, y] = (3 if not visible[t + 1, x, y] else 0 if p in in_view
                                  else 1 if p in seen else 2)
    return kinds


@torch.no_grad()
def one_step_by_kind(model: WorldModel, suite, episodes: list) -> dict:
    """Share of cells and one-step accuracy for each of `KINDS`, over every step of every
    episode, and the known share (module docstring)."""
    right, total = np.zeros(len(KINDS)), np.zeros(len(KINDS))
    for e in episodes:
        image, action = torch.from_numpy(e.image), torch.from_numpy(e.action)
        h = teacher_forced(model, image, torch.from_numpy(e.direction),
                           torch.from_numpy(e.carrying), action)  # (T, latent)
        pred = model.most_likely(model.decode(h, action))["image"]  # (T, 7, 7, 3)
        ok = (pred == image[1:].long()).all(-1).numpy()  # (T, 7, 7)
        kinds = cell_kinds(suite, e)
        right += np.bincount(kinds[ok], minlength=len(KINDS))
        total += np.bincount(kinds.ravel(), minlength=len(KINDS))
    out = {kind: {"share": float(total[i] / total.sum()),
                  "accuracy": float(right[i] / total[i]) if total[i] else float("nan")}
           for i, kind in enumerate(KINDS)}
    out["all"] = {"share": 1.0, "accuracy": float(right.sum() / total.sum())}
    out["known_share"] = 1.0 - out["new"]["share"]
    return out


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
    figures["one_step_by_kind"] = one_step_by_kind(model, suite, episodes)
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
    kinds = Table(title="one-step accuracy by kind of cell (share of cells in brackets)")
    for c in ["run", *KINDS, "all", "known share"]:
        kinds.add_column(c)
    for run, figures in results.items():
        by = figures["one_step_by_kind"]
        kinds.add_row(run, *(f"{by[k]['accuracy']:.4f} ({by[k]['share']:.3f})"
                             for k in (*KINDS, "all")), f"{by['known_share']:.4f}")
    console.print(kinds)
    if args.json:
        write_json(args.json, {"machine": machine_info(), "seed": args.seed, "suite": suite.name,
                               "goals": args.goals,
                               "episodes": len(episodes), "runs": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
