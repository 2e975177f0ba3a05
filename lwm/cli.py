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
def kernels(verbose: bool = typer.Option(False, help="show the compiler's output")) -> None:
    """Build (or load the cached build of) lwm's native CPU kernels, which imagination uses
    when they are there; otherwise the first plan builds them (about 30 s)."""
    from lwm.models import native

    try:
        module = native.build(verbose=verbose)
    except Exception as error:
        console.print(f"[red]the native kernels did not build[/red]: {error}\n"
                      "imagination will run the pure-PyTorch path (slower); --verbose shows "
                      "the compiler's output")
        raise typer.Exit(code=1) from error
    console.print(f"native kernels ready: {module.__file__}")


SHIPPED = "shipped"
"""--checkpoint value naming the small checkpoint lwm ships (see `lwm.resources.checkpoint`)."""


@app.command()
def demo(
    suite: str = typer.Option("babyai-goto", help="task suite to follow"),
    episodes: int = typer.Option(4, min=1, help="episodes to run"),
    seed: int | None = typer.Option(None, help="first seed (default: the suite's eval seeds)"),
    checkpoint: str | None = typer.Option(
        None, help="run or model directory; default: runs/train/<suite>-mamba2 if trained, else "
        "the checkpoint lwm ships for the suite, else train one with the defaults"),
    llm: str = typer.Option("local", help="'local', a provider string, or 'grammar'"),
    planner: str | None = typer.Option(
        None, help="cem, mppi, greedy or policy (default: the checkpoint's agent.json, else cem)"),
    policy: str = typer.Option("agent", help="'agent' (lwm) or 'bot' (BabyAI's oracle)"),
    out: Path = typer.Option(Path("runs/demo"), help="where GIFs are written"),
) -> None:
    """Run the main job: follow plain-language instructions (grammar missions and paraphrases)
    in a task suite's episodes, print what happens, write GIFs and a success table."""
    from lwm.tasks import load_suite

    s = load_suite(suite)
    env = s.make_env(render_mode="rgb_array")
    first = s.seeds.eval_start if seed is None else seed
    if policy == "bot":
        from lwm.envs.bot import BotPolicy

        summary = Table(title=f"{s.name}: the BabyAI bot (oracle) following the suite's missions")
        for col in ("seed", "mission", "success", "steps", "gif"):
            summary.add_column(col)
        for ep in range(episodes):
            gif = out / f"{s.name}-seed{first + ep}-bot.gif"
            summary.add_row(*_bot_episode(env, BotPolicy, first + ep, gif))
        console.print(summary)
        return
    agent = _load_agent(s, checkpoint, llm, planner)
    summary = Table(title=f"{s.name}: lwm ({type(agent.planner).__name__}, llm={llm}) "
                          "following instructions")
    for col in ("seed", "instruction", "kind", "subgoals", "success", "steps", "ms/action"):
        summary.add_column(col)
    wins = 0
    for ep in range(episodes):
        instruction, kind = _demo_instruction(s, env, first + ep, paraphrase=ep % 2 == 1)
        console.rule(f"[bold]seed {first + ep}[/bold] ({kind}): {instruction}")
        result = _agent_episode(agent, env, instruction, first + ep,
                                out / f"{s.name}-seed{first + ep}.gif", live=False)
        if result is None:
            summary.add_row(str(first + ep), instruction, kind, "-", "[red]refused[/red]", "0",
                            "-")
            continue
        wins += result.success
        summary.add_row(str(first + ep), instruction, kind, " ; ".join(result.subgoals),
                        "[green]yes[/green]" if result.success else "[red]no[/red]",
                        str(result.steps), f"{result.timings['plan_ms_mean']:.0f}")
    console.print(summary)
    console.print(f"success {wins}/{episodes}")


def _demo_instruction(suite, env, seed: int, paraphrase: bool) -> tuple[str, str]:
    """The episode's own mission, or a paraphrase of it from the suite's templates."""
    from lwm.envs.language import instr_goals

    obs, _ = env.reset(seed=seed)
    goals = instr_goals(env.unwrapped.instrs)
    if paraphrase and all(g.is_concrete for g in goals):
        options = suite.paraphrases(goals)
        if options:
            return options[seed % len(options)], "paraphrase"
    return obs["mission"], "mission"


def _load_agent(suite, checkpoint: str | None, llm: str, planner: str | None):
    from lwm.agent import Agent
    from lwm.resources import checkpoint as shipped_checkpoint

    trained = Path("runs/train") / f"{suite.name}-mamba2"
    if checkpoint == SHIPPED:
        path = shipped_checkpoint(suite.name)
    elif checkpoint is not None:
        path = Path(checkpoint)
    elif (trained / "model" / "config.json").exists():
        path = trained
    else:
        path = shipped_checkpoint(suite.name)
    if path is None or not ((path / "model" / "config.json").exists()
                            or (path / "config.json").exists()):
        from lwm.train import Trainer

        console.print(f"no trained world model for {suite.name}: training one with the "
                      f"defaults in {trained} (`lwm train --suite {suite.name}`)")
        Trainer(TrainConfig(suite=suite.name), trained).run()
        path = trained
    console.print(f"world model: {path}")
    return Agent.from_pretrained(path, llm=llm, planner=planner)


def _agent_episode(agent, env, instruction: str, seed: int, gif: Path, live: bool,
                   max_steps: int | None = None):
    """Run one episode, showing every step (a live table, or printed lines); write a GIF of the
    real frame beside the real and the imagined next view. None when the instruction is
    refused."""
    from rich.live import Live

    from lwm.envs import ACTION_NAMES
    from lwm.language.spec import InstructionError
    from lwm.viz import caption_frame, egocentric_frame, write_gif

    table = Table(title=f"{instruction!r}, seed {seed}")
    for col in ("step", "action", "imagined return", "subgoal", "events"):
        table.add_column(col)
    frames = []

    def show(record) -> None:
        events = "; ".join(record.events + [f"[green]achieved[/green] {a}"
                                            for a in record.achieved])
        row = (str(record.step), ACTION_NAMES[record.action], f"{record.imagined_return:.3f}",
               record.subgoal, events)
        if live:
            table.add_row(*row)
        elif events:
            console.print(f"  step {row[0]:>3}  [cyan]{row[1]:>7}[/cyan]  J={row[2]}  {events}")
        real = env.render()
        views = [egocentric_frame(record.real_image)]
        if record.imagined_image is not None and len(record.imagined_image):
            views.append(egocentric_frame(record.imagined_image[0]))
        pad = max(real.shape[0] - views[0].shape[0], 0)
        strip = np.concatenate([real] + [np.pad(v, ((0, pad), (4, 0), (0, 0))) for v in views],
                               axis=1)
        frames.append(caption_frame(strip, [
            f"{instruction} | subgoal: {record.subgoal}",
            f"step {record.step}: {ACTION_NAMES[record.action]} | imagined return "
            f"{record.imagined_return:.2f} | real | real next view | imagined next view",
        ]))

    try:
        if live:
            with Live(table, console=console, refresh_per_second=4):
                result = agent.run(instruction, env, seed=seed, max_steps=max_steps,
                                   decode=True, on_step=show)
        else:
            result = agent.run(instruction, env, seed=seed, max_steps=max_steps, decode=True,
                               on_step=show)
    except InstructionError as err:
        console.print(f"[red]cannot follow this instruction[/red]: {err}")
        return None
    for critique in result.critiques:
        verdict = "success" if critique.success else "failure"
        console.print(f"  critic: [bold]{verdict}[/bold]: {critique.reason}")
    if frames:
        write_gif(frames, gif)
    console.print(f"  {result.summary()}")
    console.print(f"  GIF: {gif} | planning {result.timings['plan_ms_mean']:.0f} ms/action | "
                  f"parse {result.timings['parse_s']:.1f} s")
    return result


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
    trainer = Trainer(cfg, run_dir)
    console.print(f"updates in {'bf16' if trainer.bf16 else 'fp32'} "
                  f"(--precision {cfg.precision}), {cfg.threads} torch thread(s)")
    metrics = trainer.run()
    console.print("final: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


@app.command(name="train-policy")
def train_policy(
    checkpoint: str = typer.Option(
        ..., help="the world model: a run or model directory, or 'shipped:SUITE' for the "
        "checkpoint lwm ships for SUITE"),
    out: Path = typer.Option(..., help="output checkpoint directory (the world model's files "
                             "are copied there); a directory with a policy run is resumed"),
    suite: str | None = typer.Option(None, help="suite whose training seeds to play (default: "
                                     "the checkpoint's)"),
    updates: int = typer.Option(2000, min=0, help="actor-critic updates in total"),
    envs: int = typer.Option(64, min=1, help="real episodes in lockstep: start states/update"),
    horizon: int = typer.Option(8, min=1, help="imagined steps per start state"),
    epsilon: float = typer.Option(0.1, min=0.0, max=1.0,
                                  help="share of real actions from the exploration policy"),
    entropy: float = typer.Option(1e-3, min=0.0, help="weight of the actor's entropy bonus"),
    lr: float = typer.Option(3e-4, min=0.0, help="Adam learning rate"),
    q_base: bool = typer.Option(True, help="actor logits = Q logits + a learned residual"),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, min=1, help="torch threads"),
) -> None:
    """Train a goal-conditioned policy for a world model by actor-critic in imagination (a fast
    policy: --planner policy; and MPPI's proposal: policy_prior)."""
    from lwm.models.world_model import CheckpointError
    from lwm.planning.actor import ActorCriticConfig
    from lwm.train_policy import PolicyTrainConfig, PolicyTrainer

    actor = ActorCriticConfig(horizon=horizon, entropy=entropy, lr=lr, q_base=q_base)
    cfg = PolicyTrainConfig(suite=suite, updates=updates, envs=envs, epsilon=epsilon, seed=seed,
                            threads=threads, actor=actor)
    try:
        trainer = PolicyTrainer(checkpoint, out, cfg)
    except CheckpointError as err:
        console.print(f"[red]error[/red]: {err}")
        raise typer.Exit(code=2) from None
    metrics = trainer.run()
    console.print("final: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    console.print(f"policy: {out} (lwm eval --checkpoint {out} --planner policy)")


@app.command()
def plan(
    instruction: str = typer.Argument(..., help="what to do, in plain language"),
    suite: str = typer.Option("babyai-goto", help="task suite whose env to act in"),
    seed: int = typer.Option(0, help="seed of the episode's layout"),
    checkpoint: str | None = typer.Option(
        None, help="run or model directory, or 'shipped' (default: runs/train/<suite>-mamba2, "
        "else the shipped checkpoint)"),
    llm: str = typer.Option(
        "local", help="'local' (embedded llama.cpp model), a provider string such as "
        "'openai:gpt-4o-mini', or 'grammar' for BabyAI's grammar parser and no critic"),
    planner: str | None = typer.Option(
        None, help="cem, mppi, greedy or policy (default: the checkpoint's agent.json, else cem)"),
    max_steps: int | None = typer.Option(None, help="step budget (default: the suite's)"),
    gif: Path | None = typer.Option(None, help="GIF of real frames beside imagined futures "
                                    "(default runs/plan/<suite>-seed<seed>.gif)"),
) -> None:
    """Follow one plain-language instruction: plan in imagination, act, critique, write a GIF."""
    from lwm.tasks import load_suite

    s = load_suite(suite)
    agent = _load_agent(s, checkpoint, llm, planner)
    env = s.make_env(render_mode="rgb_array")
    gif = gif or Path("runs/plan") / f"{s.name}-seed{seed}.gif"
    result = _agent_episode(agent, env, instruction, seed, gif, live=True, max_steps=max_steps)
    if result is None:
        raise typer.Exit(code=1)


@app.command(name="eval")
def evaluate(
    suite: str = typer.Option(..., help="task suite (`lwm suites`) or a YAML file"),
    agents: str = typer.Option(
        "lwm,bot,random", help="comma-separated agents: random, bot, lwm, lwm-grammar, "
        "lwm-no-critic, llm-only (sampled, as BALROG), llm-only-greedy, dqn"),
    episodes: int = typer.Option(200, min=1, help="episodes per agent (the same for all)"),
    out: Path | None = typer.Option(None, help="report directory (default reports/<suite>)"),
    checkpoint: str | None = typer.Option(
        None, help="world model of the lwm agents: a run or model directory (default: the "
        "checkpoint lwm ships for the suite)"),
    dqn_checkpoint: str | None = typer.Option(
        None, help="run directory of the dqn agent (`python eval/dqn.py RUN --train 4000`)"),
    llm: str = typer.Option(
        "local", help="LLM of the lwm and llm-only agents: 'local', a provider string, or "
        "'grammar' (lwm with BabyAI's grammar parser)"),
    planner: str | None = typer.Option(
        None, help="planner of the lwm agents: cem, mppi, greedy or policy (default: the "
        "checkpoint's agent.json, else cem)"),
    candidates: int | None = typer.Option(None, min=1, help="override the planner's K"),
    iterations: int | None = typer.Option(None, min=1, help="override the planner's rounds"),
    horizon: int | None = typer.Option(None, min=1, help="override the planner's H"),
    terminal: str | None = typer.Option(
        None, help="search planners: score a sequence's last action by Q ('q', the default: "
        "one imagined transition fewer) or step it and read v ('value')"),
    epsilon: float | None = typer.Option(
        None, min=0.0, max=1.0, help="greedy planner: chance of a random (move-biased) action"),
    reward_floor: bool | None = typer.Option(
        None, help="greedy planner: score actions by max(Q, reward head) (the default) or by Q "
        "alone (--no-reward-floor)"),
    repeat_penalty: float | None = typer.Option(
        None, min=0.0, help="lower an action's score this much for each time it was already "
        "taken from the same view this episode (0: off)"),
    workers: int = typer.Option(1, min=1, help="parallel workers (more than 1: Ray)"),
    ray_address: str | None = typer.Option(None, help="Ray cluster to run on ('auto', ...)"),
    seed: int = typer.Option(0, help="seed of the agents' own randomness"),
    paraphrase_share: float = typer.Option(
        0.5, min=0.0, max=1.0, help="share of episodes that get a paraphrase of the mission"),
    max_steps: int | None = typer.Option(
        None, min=1, help="cap every episode's step limit (default: BabyAI's for the mission)"),
    skip: int = typer.Option(
        0, min=0, help="skip this many evaluation seeds first (a separate range to tune "
        "settings on, e.g. --skip 200, before measuring on the first 200)"),
    preconditions: bool = typer.Option(
        True, help="lwm agents act on BabyAI's preconditions first (a put's object in hand, a "
        "door faced, a locked door's key); --no-preconditions: the ablation"),
    json_path: Path | None = typer.Option(None, "--json", help="also write report.json here"),
    fresh: bool = typer.Option(
        False, help="play every episode again: set aside the report directory's journal of "
        "finished episodes (as episodes.jsonl.old) instead of resuming from it"),
) -> None:
    """Run agents on the same evaluation episodes of a task suite and write a report: summary.md,
    report.json and PNG plots (success with 95 % intervals, held-out vs trained combinations,
    paraphrases vs grammar missions).

    Each finished episode goes into the report directory's journal (episodes.jsonl) at once: an
    interrupted evaluation resumes when the same command runs again, and more --episodes reuse
    those already played with the same settings."""
    import json
    import time

    from lwm.eval.collect import make_collector
    from lwm.eval.episodes import episodes_for
    from lwm.eval.journal import JOURNAL_NAME, EpisodeJournal, JournalError, run_agents
    from lwm.eval.report import paired, summarize, write_report
    from lwm.eval.runners import RUNNERS, LLMOnlyRunner, make_runner, runner_options
    from lwm.planning.base import check_terminal
    from lwm.resources import checkpoint as shipped_checkpoint
    from lwm.tasks import TaskSpecError, load_suite

    def fail(message: str) -> None:
        console.print(f"[red]error[/red]: {message}")
        raise typer.Exit(code=2)

    try:
        s = load_suite(suite)
    except TaskSpecError as err:
        fail(str(err))
    names = [a.strip() for a in agents.split(",") if a.strip()]
    unknown = [a for a in names if a not in RUNNERS]
    if not names or unknown:
        fail(f"unknown agent(s) {unknown or agents!r}; choose from {', '.join(RUNNERS)}")
    if len(set(names)) < len(names):
        fail(f"an agent is named twice in {agents!r}")
    if llm == "grammar" and any(RUNNERS[a].resolve() is LLMOnlyRunner for a in names):
        fail("the llm-only agents need an LLM: pass --llm local (or a provider string)")

    shared: dict[str, Any] = {"llm": llm, "seed": seed, "planner": planner,
                              "preconditions": preconditions}
    overrides = {k: v for k, v in (("candidates", candidates), ("iterations", iterations),
                                   ("horizon", horizon), ("terminal", terminal),
                                   ("epsilon", epsilon),
                                   ("reward_floor", reward_floor),
                                   ("repeat_penalty", repeat_penalty)) if v is not None}
    if terminal is not None:
        try:
            check_terminal(terminal)
        except ValueError as err:
            fail(f"--{err}")
    if overrides:
        shared["planner_cfg"] = overrides
    if "dqn" in names and dqn_checkpoint is None:
        fail("the dqn agent needs --dqn-checkpoint (a run of `python eval/dqn.py`)")
    if any("checkpoint" in runner_options(a) for a in names if a != "dqn"):
        path = Path(checkpoint) if checkpoint is not None else shipped_checkpoint(s.name)
        if path is None:
            fail(f"lwm ships no checkpoint for suite {s.name!r}: pass --checkpoint (train one "
                 f"with `lwm train --suite {s.name}`)")
        if not ((path / "config.json").is_file() or (path / "model" / "config.json").is_file()):
            fail(f"no world model at {path} (expected config.json there or in {path}/model)")
        shared["checkpoint"] = str(path)
    runners = {}
    for a in names:
        opts = {k: v for k, v in shared.items() if k in runner_options(a)}
        if a == "dqn":
            opts = {"checkpoint": dqn_checkpoint}
        runners[a] = make_runner(a, **opts)

    items = episodes_for(s, episodes, paraphrase_share=paraphrase_share, max_steps=max_steps,
                         start=s.seeds.eval_start + skip)
    out = out or Path("reports") / s.name
    journal_path = out / JOURNAL_NAME
    if fresh and journal_path.exists():
        journal_path.replace(journal_path.with_name(JOURNAL_NAME + ".old"))
    try:
        journal = EpisodeJournal(journal_path)
    except JournalError as err:
        fail(str(err))
    t0 = time.perf_counter()
    try:
        with make_collector(workers, ray_address) as collector:
            outcomes, reused = run_agents(runners, items, collector, journal)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/yellow]: the finished episodes are in "
                      f"{journal_path}; run the same command again to go on from there")
        raise typer.Exit(code=130) from None
    for a, n in reused.items():
        if n:
            console.print(f"{a}: {n} of {len(items)} episodes resumed from {journal_path}")
    summary = summarize(outcomes)

    table = Table(title=f"{s.name}: success % of {len(items)} evaluation episodes per agent")
    for col in ("agent", "success [95% CI]", "trained", "held-out", "grammar", "paraphrase",
                "steps", "LLM/ep", "ms/act", "errors"):
        table.add_column(col)

    def pct(rate: dict) -> str:
        return "-" if rate["success"] is None else f"{100 * rate['success']:.0f}"

    for a, row in summary.items():
        lo, hi = row["ci95"]
        ms = "-" if row["plan_ms_per_action"] is None else f"{row['plan_ms_per_action']:.0f}"
        table.add_row(a, f"{100 * row['success']:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]",
                      pct(row["by_split"]["train"]), pct(row["by_split"]["held_out"]),
                      pct(row["by_kind"]["grammar"]), pct(row["by_kind"]["paraphrase"]),
                      f"{row['mean_steps']:.1f}", f"{row['llm_calls_per_episode']:.1f}", ms,
                      str(row["errors"]))
    console.print(table)
    for r in paired(outcomes):
        console.print(f"{r['a']} vs {r['b']} on the same {r['n']} episodes: only {r['a']} "
                      f"succeeded in {r['only_a']}, only {r['b']} in {r['only_b']} "
                      f"(McNemar p = {r['mcnemar_p']:.2g})")

    meta = {"suite": s.name, "env_id": s.env_id, "agents": names, "episodes": len(items),
            "first_seed": items[0].seed, "seed": seed, "paraphrase_share": paraphrase_share,
            "max_steps": max_steps, "checkpoint": shared.get("checkpoint"), "llm": llm,
            "planner": planner, "planner_cfg": overrides, "preconditions": preconditions,
            "workers": workers,
            "ray_address": ray_address, "wall_s": time.perf_counter() - t0,
            "resumed_episodes": reused}
    paths = write_report(out, summary, outcomes, meta)
    if json_path is not None:
        from lwm.report import write_json

        write_json(json_path, json.loads(paths["json"].read_text()))
    console.print(f"report: {paths['summary']} ({', '.join(p.name for p in paths.values())})")


if __name__ == "__main__":
    app()
