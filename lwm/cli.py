"""The `lwm` command line: `lwm --help` lists the verbs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
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
def plan(
    instruction: str = typer.Argument(..., help="what to do, in plain language"),
    suite: str = typer.Option("babyai-goto", help="task suite whose env to act in"),
    seed: int = typer.Option(0, help="seed of the episode's layout"),
    checkpoint: Path | None = typer.Option(
        None, help="run or model directory (default runs/train/<suite>-mamba2)"),
    llm: str = typer.Option(
        "local", help="'local' (embedded llama.cpp model), a provider string such as "
        "'openai:gpt-4o-mini', or 'grammar' for BabyAI's grammar parser and no critic"),
    planner: str = typer.Option("cem", help="cem or mppi"),
    max_steps: int | None = typer.Option(None, help="step budget (default: the suite's)"),
    gif: Path | None = typer.Option(None, help="GIF of real frames beside imagined futures "
                                    "(default runs/plan/<suite>-seed<seed>.gif)"),
) -> None:
    """Follow one plain-language instruction: plan in imagination, act, critique, write a GIF."""
    from rich.live import Live

    from lwm.agent import Agent
    from lwm.envs import ACTION_NAMES
    from lwm.language.spec import InstructionError
    from lwm.tasks import load_suite
    from lwm.viz import caption_frame, egocentric_frame, write_gif

    s = load_suite(suite)
    checkpoint = checkpoint or Path("runs/train") / f"{s.name}-mamba2"
    if not (checkpoint / "model" / "config.json").exists() and not (
            checkpoint / "config.json").exists():
        console.print(f"[red]no trained world model at {checkpoint}[/red]: run "
                      f"`lwm train --suite {s.name}` first, or pass --checkpoint")
        raise typer.Exit(code=1)
    agent = Agent.from_pretrained(checkpoint, llm=None if llm == "grammar" else llm,
                                  planner=planner)
    env = s.make_env(render_mode="rgb_array")
    table = Table(title=f"{instruction!r} on {s.name}, seed {seed}")
    for col in ("step", "action", "imagined return", "subgoal", "events"):
        table.add_column(col)
    frames = []

    def show(record) -> None:
        events = "; ".join(record.events + [f"[green]achieved[/green] {a}"
                                            for a in record.achieved])
        table.add_row(str(record.step), ACTION_NAMES[record.action],
                      f"{record.imagined_return:.3f}", record.subgoal, events)
        real = env.render()
        views = [egocentric_frame(record.real_image)]
        if record.imagined_image is not None and len(record.imagined_image):
            views.append(egocentric_frame(record.imagined_image[0]))
        pad = max(real.shape[0] - views[0].shape[0], 0)
        row = np.concatenate([real] + [np.pad(v, ((0, pad), (4, 0), (0, 0))) for v in views], 1)
        frames.append(caption_frame(row, [
            f"{instruction} | subgoal: {record.subgoal}",
            f"step {record.step}: {ACTION_NAMES[record.action]} | imagined return "
            f"{record.imagined_return:.2f} | real | real view | imagined next view",
        ]))

    try:
        with Live(table, console=console, refresh_per_second=4):
            result = agent.run(instruction, env, seed=seed, max_steps=max_steps, decode=True,
                               on_step=show)
    except InstructionError as err:
        console.print(f"[red]cannot follow this instruction[/red]: {err}")
        raise typer.Exit(code=1) from None
    for critique in result.critiques:
        verdict = "success" if critique.success else "failure"
        console.print(f"critic: [bold]{verdict}[/bold]: {critique.reason}")
    gif = gif or Path("runs/plan") / f"{s.name}-seed{seed}.gif"
    if frames:
        write_gif(frames, gif)
    console.print(result.summary())
    console.print(f"GIF: {gif}  |  planning {result.timings['plan_ms_mean']:.0f} ms/action")


@app.command(name="eval")
def evaluate() -> None:
    """Evaluate an agent on a task suite and write a report."""
    _not_available("eval", 6)


if __name__ == "__main__":
    app()
