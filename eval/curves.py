"""Sample-efficiency curves: held-out success vs training episodes, one line per run.

    python eval/curves.py runs/wm-goto-g runs/dqn-k3 --out runs/curves.png --json runs/curves.json

Reads the periodic greedy evaluations that training logs to `metrics.jsonl` (`lwm train`'s
`eval_every`, the DQN baseline's `eval_every`: success on the suite's first evaluation seeds,
never trained on) and plots them on a log axis of episodes (linear below 100, so that the
evaluation `lwm train` makes before training, at episode 0, shows where each curve starts).
BabyAI's criterion (99 % success) is a horizontal line; the episodes PPO needs to reach it in
BabyAI 1.1 are vertical reference lines for the suites that have one. The JSON holds every
point and, per run, the first evaluation at or above each `--threshold`, with the training wall
time it took.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from lwm.report import machine_info, write_json  # noqa: E402

PPO_EPISODES = {"babyai-goto": 611_000, "babyai-pickup": 982_000, "babyai-putnext": 876_000}
"""Episodes PPO needs for 99 % success in BabyAI 1.1 (GoToLocal, PickupLoc, PutNextLocal)."""
BABYAI_CRITERION = 0.99


def read_run(run_dir: Path) -> dict[str, Any]:
    """A run's label, suite and evaluation points, from its metrics.jsonl and config."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise SystemExit(f"{run_dir}: no metrics.jsonl (is it an lwm or DQN run directory?)")
    points = []
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "eval_success" in row:
            points.append({k: row.get(k) for k in ("episodes", "eval_success",
                                                   "eval_success_train", "eval_success_held_out",
                                                   "train_s")})
    config: dict[str, Any] = {}
    if (run_dir / "trainer.json").is_file():
        config = json.loads((run_dir / "trainer.json").read_text()).get("config", {})
    if "backbone" in config:
        kind = f"world model ({config['backbone']})"
    elif (run_dir / "config.json").is_file():  # the DQN baseline's run directory
        config = json.loads((run_dir / "config.json").read_text())
        config = config.get("config", config)
        kind = f"DQN + HER ({config.get('frames', '?')} frames)"
    else:
        kind = "run"
    return {"run": str(run_dir), "label": f"{run_dir.name}: {kind}",
            "suite": config.get("suite"), "points": points}


def first_reaching(points: list[dict[str, Any]], threshold: float) -> dict[str, Any] | None:
    """The first evaluation with success >= threshold, or None."""
    return next((p for p in points if p["eval_success"] >= threshold), None)


def plot(runs: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for run in runs:
        pts = run["points"]
        if pts:
            ax.plot([p["episodes"] for p in pts], [p["eval_success"] for p in pts],
                    marker="o", markersize=3, label=run["label"])
    ax.axhline(BABYAI_CRITERION, color="grey", linestyle="--", linewidth=1)
    ax.text(0.01, BABYAI_CRITERION, "BabyAI criterion (99 %)", va="bottom", fontsize=8,
            color="grey", transform=ax.get_yaxis_transform())
    suites = {run["suite"] for run in runs if run["suite"] in PPO_EPISODES}
    for suite in sorted(suites):
        ax.axvline(PPO_EPISODES[suite], color="black", linestyle=":", linewidth=1)
        ax.text(PPO_EPISODES[suite], 0.02, f" PPO to 99 % ({suite}, BabyAI 1.1)", rotation=90,
                fontsize=8, va="bottom", ha="right")
    # Logarithmic from 100 episodes on, linear below, so a run's evaluation before training
    # (episode 0: the agent's rules with an untrained model) stays on the plot.
    ax.set_xscale("symlog", linthresh=100)
    ax.set_xlim(left=0)
    ax.set_xlabel("training episodes (0: before training)")
    ax.set_ylabel("greedy success on held-out evaluation seeds")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower center")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (lwm train or DQN)")
    ap.add_argument("--out", type=Path, default=Path("runs/curves.png"), help="plot file")
    ap.add_argument("--threshold", type=float, action="append",
                    help="success levels to report episodes for (default 0.9, 0.95, 0.99)")
    ap.add_argument("--json", type=Path, help="write all figures here")
    args = ap.parse_args(argv)
    thresholds = args.threshold or [0.9, 0.95, BABYAI_CRITERION]
    runs = [read_run(d) for d in args.runs]
    for run in runs:
        run["reached"] = {str(t): first_reaching(run["points"], t) for t in thresholds}
        last = run["points"][-1] if run["points"] else None
        reached = ", ".join(f"{float(t):.0%} at {r['episodes']} episodes" if r else
                            f"{float(t):.0%} not reached" for t, r in run["reached"].items())
        print(f"{run['label']}: {len(run['points'])} evaluations, last "
              f"{last['eval_success']:.1%} at {last['episodes']} episodes; {reached}"
              if last else f"{run['label']}: no evaluations logged")
    plot(runs, args.out)
    print(f"plot: {args.out}")
    result = {"machine": machine_info(), "seed": None, "runs": runs,
              "ppo_episodes_to_99": PPO_EPISODES, "plot": str(args.out)}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
