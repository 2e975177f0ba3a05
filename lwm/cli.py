"""The `lwm` command line: `lwm --help` lists the verbs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from lwm.config import TrainConfig, options_from

app = typer.Typer(
    help="lwm: language-conditioned world-model planning on BabyAI.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


def _not_available(verb: str, issue: int) -> None:
    console.print(
        f"[yellow]`lwm {verb}` is not available yet[/yellow]: it arrives with issue #{issue}. "
        "Nothing was run."
    )
    raise typer.Exit(code=2)


@app.command()
def suites() -> None:
    """List the task suites lwm ships, with their env, episode limit and held-out combinations."""
    from lwm.tasks import list_suites, load_suite

    table = Table(title="task suites")
    for col in ("suite", "env", "max steps", "held-out (colour, type)"):
        table.add_column(col)
    for name in list_suites():
        s = load_suite(name)
        held = ", ".join(f"{c} {t}" for c, t in s.split.held_out)
        table.add_row(name, s.env_id, str(s.max_steps), held)
    console.print(table)


@app.command()
def demo(
    suite: str = typer.Option("babyai-seq", help="task suite to follow"),
    episodes: int = typer.Option(3, min=1, help="episodes to run"),
    seed: int | None = typer.Option(None, help="first seed (default: the suite's eval seeds)"),
    out: Path = typer.Option(Path("runs/demo"), help="where GIFs are written"),
) -> None:
    """Run the main job: follow a task suite's instructions, print events, write GIFs.

    Until a trained agent exists (issue #5) the BabyAI bot (an oracle reading the true state)
    does the acting; everything else is the real pipeline: lwm's envs, events, achieved goals.
    """
    from lwm.envs.bot import BotPolicy
    from lwm.tasks import load_suite

    s = load_suite(suite)
    env = s.make_env(render_mode="rgb_array")
    first = s.seeds.eval_start if seed is None else seed
    summary = Table(title=f"{s.name}: the BabyAI bot (oracle) following the suite's missions")
    for col in ("seed", "mission", "success", "steps", "gif"):
        summary.add_column(col)
    for ep in range(episodes):
        result = _bot_episode(env, BotPolicy, first + ep, out / f"{s.name}-seed{first + ep}.gif")
        summary.add_row(*result)
    console.print(summary)


def _bot_episode(env, policy_cls, seed: int, gif: Path) -> tuple[str, ...]:
    from lwm.envs import ACTION_NAMES
    from lwm.viz import caption_frame, write_gif

    obs, info = env.reset(seed=seed)
    policy = policy_cls(env)
    mission = obs["mission"]
    console.rule(f"[bold]seed {seed}[/bold]: {mission}")
    for event in info["events"]:
        console.print(f"  [dim]start[/dim]  {event}")
    frames = [caption_frame(env.render(), [mission, "start"])]
    success, steps = False, 0
    while True:
        action = policy.act()
        obs, reward, terminated, truncated, info = env.step(action)
        steps += 1
        for event in info["events"]:
            console.print(f"  step {steps:3d}  [cyan]{ACTION_NAMES[action]:>7}[/cyan]  {event}")
        for goal in info["achieved"]:
            console.print(f"  step {steps:3d}  {'':>7}  [green]achieved[/green] {goal}")
        caption = [mission, f"step {steps}: {ACTION_NAMES[action]}"]
        frames.append(caption_frame(env.render(), caption))
        if terminated or truncated:
            success = terminated and reward > 0
            break
    write_gif(frames, gif)
    verdict = "[green]yes[/green]" if success else "[red]no[/red]"
    console.print(f"  -> success: {verdict} in {steps} steps; GIF: {gif}")
    return str(seed), mission, verdict, str(steps), str(gif)


@app.command()
@options_from(TrainConfig)
def train(
    run_dir: Path | None = typer.Option(
        None, "--run-dir", help="run directory (default runs/train/<suite>-<backbone>); "
        "a directory with a checkpoint is resumed"),
    **fields: Any,
) -> None:
    """Train a world model on a task suite with the Dyna loop (collect, store, fit, repeat)."""
    from lwm.train import Trainer

    cfg = TrainConfig(**fields)
    run_dir = run_dir or Path("runs/train") / f"{Path(cfg.suite).stem}-{cfg.backbone}"
    console.print(f"training a [bold]{cfg.preset}[/bold] {cfg.backbone} world model on "
                  f"[bold]{cfg.suite}[/bold] in {run_dir}")
    metrics = Trainer(cfg, run_dir).run()
    console.print("final: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


@app.command()
def plan() -> None:
    """Follow one plain-language instruction with a trained world model and planner."""
    _not_available("plan", 5)


@app.command(name="eval")
def evaluate() -> None:
    """Evaluate an agent on a task suite and write a report."""
    _not_available("eval", 6)


if __name__ == "__main__":
    app()
