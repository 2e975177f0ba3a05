"""Planning speed on CPU: ms per action for CEM and MPPI over each backbone, one run.

    python eval/bench_planning.py --json runs/bench_planning.json

1 torch thread (`--threads`), world model preset `small` with random weights, and with `--model` a
trained checkpoint (or several) too (how much prefix sharing saves depends on how far the search
concentrates), one environment, 512 candidates x horizon 8 x 4 iterations = 16,384 candidate
transitions an action. Each planner plans from the state after a 16-step random history; "cold" is
a call from the uniform distribution (the first of an episode), "warm" the median of MPC calls
warm-started from the previous plan. Planners step each distinct action prefix once per call
(`PrefixTree`), so the rows actually stepped by the backbone (with a compiled step: padded to
powers of two) are reported beside the candidate transitions; "dense" is the same 4 x 512 x 8
imagination with every candidate stepped separately, for scale. Each search path runs with both
terminals (`--terminal`): "value" steps all H transitions, "q" scores the last action by Q and
steps H - 1 (`lwm.planning.base`). A breakdown of one more warm call shows which world-model
parts the time goes to. Analytic FLOPs of the stepped rows (backbone, decoder, heads:
`row_flops`; elementwise work and table reads not counted) over the machine's measured matmul
FLOP/s show how close each path is to the hardware limit. Paths are timed in interleaved rounds
so that ratios are taken under the same load; then each path runs alone, call after call, as an
agent plans with one model ("alone": interleaved calls each follow other models' calls). Every
Mamba-2 path also runs as "pytorch", without lwm's native CPU kernels (`lwm.models.native`), and
as "legacy", the way planners ran before session 17 (each imagined branch an independent state,
every iteration stepping all its prefixes again, no native kernels); the pytorch / current and
legacy / current ratios of warm calls are printed.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import lwm.planning.cem  # noqa: E402
import lwm.planning.mppi  # noqa: E402
from eval.bench_ssm import (  # noqa: E402
    gru_flops_per_token,
    mamba2_flops_per_token,
    matmul_peak,
    transformer_flops_per_token,
)
from lwm.models import native  # noqa: E402
from lwm.models.ssm import BatchState  # noqa: E402
from lwm.models.world_model import (  # noqa: E402
    MAP_CELLS,
    N_CELLS,
    OBS_LOGITS,
    WorldModel,
    preset,
)
from lwm.planning import PLANNERS, SearchConfig, make_planner  # noqa: E402
from lwm.planning.base import TERMINALS, Candidates, PrefixTree, imagine_candidates  # noqa: E402
from lwm.report import machine_info, machine_line, write_json  # noqa: E402

SEARCH_PLANNERS = sorted(n for n, (_, cfg) in PLANNERS.items() if issubclass(cfg, SearchConfig))
"""The planners that search imagined sequences (greedy Q has no budget to time)."""

K, H, ITERATIONS = 512, 8, 4
HISTORY = 16
TARGET_MS = 100.0


def row_flops(model: WorldModel, context: float) -> float:
    """Matmul FLOPs of one stepped (history, action) pair: decoder (with the ego and map
    decoders' gates), backbone step, reward and cont heads (the Q head runs on the last step's
    rows only and is left out). Imagination encodes the decoded view by summing rows of tables
    (`WorldModel.predict_latent`), and the copy decoders read a table of cell ids made once
    per call, so neither counts."""
    cfg, bb = model.cfg, model.cfg.backbone_cfg
    d, hid = cfg.d_model, cfg.hidden
    backbone = {
        "mamba2": lambda: mamba2_flops_per_token(bb, None),
        "gru": lambda: gru_flops_per_token(bb),
        "transformer": lambda: transformer_flops_per_token(bb, context),
    }[cfg.backbone]()
    decode = 2 * (d * hid + hid * OBS_LOGITS)
    if cfg.decoder in ("ego", "map"):  # gates for two sources per cell
        decode += 2 * hid * 2 * N_CELLS
    # the goal folded in (`WorldModel.fold_goals`): the state stream's first layer, then a dot
    # with the goal's vector; with goal maps, the folded read of the cells and the history's
    map_hidden = model.reward_head.history.out_features if cfg.goal_maps else 0
    reward = 2 * (d * hid + hid) + 2 * map_hidden * (MAP_CELLS * cfg.cell_dim + d + 1)
    cont = 2 * (d * hid + hid)
    return backbone + decode + reward + cont


def run_name(checkpoint: Path) -> str:
    """What a trained path is called: its run's directory name (runs/NAME/model -> NAME)."""
    return checkpoint.parent.name if checkpoint.name == "model" else checkpoint.name


def build(backbone: str, mode: str, seed: int, checkpoint: Path | None = None) -> WorldModel:
    """A `small` world model (or a trained checkpoint's); mode "eager" (with lwm's native CPU
    kernels, `lwm.models.native`, when they are built), "pytorch" (eager without them),
    "compile" or "compile+bf16" (Mamba-2 only), or "legacy": PyTorch as before session 17, with
    every imagined branch an independent state (no `Mamba2Branches`) and each iteration's
    sequences scored in a fresh tree (`Bench.call` swaps the planners' `PrefixTree` for
    `FreshTree`)."""
    torch.manual_seed(seed)
    if checkpoint is None:
        model = WorldModel(preset("small", backbone=backbone)).eval()
    else:
        model = WorldModel.from_pretrained(checkpoint).eval()
    if mode == "legacy":
        model.branch = lambda state: state.clone()  # type: ignore[method-assign]
    elif mode not in ("eager", "pytorch"):
        model = copy.deepcopy(model)
        model.cfg.backbone_cfg.compile = True  # the same object the backbone reads
        model.cfg.backbone_cfg.bf16_matmul = mode == "compile+bf16"
    return model


def history(model: WorldModel, seed: int,
            checkpoint: Path | None = None) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """State and history h (1, d) after HISTORY random observations and actions, and a goal:
    a random one, or with a trained checkpoint the first its run was trained on
    (runs/NAME/goals.safetensors) when there is one."""
    gen = torch.Generator().manual_seed(seed)
    state = model.init_state(1)
    prev = torch.full((1,), model.START)
    with torch.no_grad():
        for _ in range(HISTORY):
            z = model.encode(
                torch.randint(0, 6, (1, 7, 7, 3), generator=gen),
                torch.randint(0, 4, (1,), generator=gen),
                torch.zeros(1, 2, dtype=torch.long),
            )
            h, state = model.next(state, z, prev)
            prev = torch.randint(0, 7, (1,), generator=gen)
    goal = torch.randn(1, 384, generator=gen)
    table = None if checkpoint is None else checkpoint.parent / "goals.safetensors"
    if table is not None and table.exists():
        goal = load_file(str(table))["embeddings"][:1]  # (1, goal_dim)
    return state, h, goal


class FreshTree(PrefixTree):
    """A `PrefixTree` that forgets between `score` calls: each CEM / MPPI iteration steps all
    its distinct prefixes again, as planners did before session 17."""

    def score(self, actions: torch.Tensor, discount: float) -> Candidates:
        self.levels = []
        return super().score(actions, discount)


class Bench:
    """One (backbone, mode, planner) combination: its model, planner and measurements."""

    def __init__(
        self, backbone: str, mode: str, planner: str, seed: int, checkpoint: Path | None = None,
        terminal: str = "value",
    ):
        self.name = f"{backbone} {mode} {planner}" + (" q-terminal" if terminal == "q" else "") \
            + (f" ({run_name(checkpoint)})" if checkpoint else "")
        self.backbone, self.mode, self.planner_name = backbone, mode, planner
        self.terminal = terminal
        self.model = build(backbone, mode, seed, checkpoint)
        self.state, self.h, self.goal = history(self.model, seed, checkpoint)
        cfg = PLANNERS[planner][1](
            horizon=H, candidates=K, iterations=ITERATIONS, discount=self.model.cfg.discount,
            terminal=terminal,
        )
        self.planner = make_planner(planner, cfg)
        self.gen = torch.Generator().manual_seed(seed)
        self.rows: list[int] = []
        step = self.model.next

        def counting_next(state, z, prev_action):
            self.rows.append(len(prev_action))
            return step(state, z, prev_action)

        self.counting_next = counting_next
        self.model.next = counting_next  # counts the rows the planner steps
        self.seconds: list[float] = []
        self.rows_per_call: list[int] = []
        self.last_level_rows: list[int] = []  # CEM with the value terminal: rows of step H-1
        self.first_call_s = 0.0
        self.fell_back = False

    def call(self) -> None:
        self.rows.clear()
        modules = (lwm.planning.cem, lwm.planning.mppi) if self.mode == "legacy" else ()
        for module in modules:
            module.PrefixTree = FreshTree
        try:
            with native.switched(self.mode not in ("pytorch", "legacy")):
                start = time.perf_counter()
                self.planner.plan(self.model, self.state, self.h, self.goal, generator=self.gen)
                self.seconds.append(time.perf_counter() - start)
        finally:
            for module in modules:
                module.PrefixTree = PrefixTree
        self.rows_per_call.append(sum(self.rows))
        if self.planner_name == "cem" and self.terminal == "value":  # H rows lists an iteration
            self.last_level_rows.append(sum(self.rows[H - 1 :: H]))

    def solo(self, n: int) -> list[float]:
        """Seconds of n consecutive warm calls of this path alone, as an agent plans (after
        one call to settle); the interleaved rounds' records are left as they were."""
        marks = len(self.seconds), len(self.rows_per_call), len(self.last_level_rows)
        for _ in range(n + 1):
            self.call()
        seconds = self.seconds[marks[0] + 1 :]
        del self.seconds[marks[0] :], self.rows_per_call[marks[1] :]
        del self.last_level_rows[marks[2] :]
        return seconds

    def breakdown(self) -> dict[str, float]:
        """ms spent in each world-model part during one more warm call; "planner" is the rest
        (sampling, prefix bookkeeping, refits). The goal heads run with the goal folded in
        (`GoalFold`): q_folded serves the terminal value and MPPI's Q-head prior."""
        spent: dict[str, float] = {}

        def timed(name, fn):
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                out = fn(*args, **kwargs)
                spent[name] = spent.get(name, 0.0) + 1e3 * (time.perf_counter() - start)
                return out

            return wrapper

        # predict_latent: decoding the imagined view and encoding its most likely reading
        parts = ("next", "predict_latent", "reward_folded", "cont", "q_folded")
        for name in parts:
            setattr(self.model, name, timed(name, getattr(self.model, name)))
        take = BatchState.take  # reading the rows of states (`index` reads through it)
        BatchState.take = timed("state rows", take)
        try:
            self.call()
        finally:
            BatchState.take = take
            for name in parts:
                delattr(self.model, name)
            self.model.next = self.counting_next
        spent["planner"] = 1e3 * self.seconds.pop() - sum(spent.values())
        self.rows_per_call.pop()
        if self.last_level_rows:
            self.last_level_rows.pop()
        return spent

    def warm_up(self) -> None:
        """A few calls (compiles every graph a compiled step needs), then forget them."""
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                self.call()
        self.first_call_s = time.perf_counter() - start
        self.fell_back = any("eager" in str(w.message).lower() for w in caught)
        self.seconds.clear()
        self.rows_per_call.clear()
        self.last_level_rows.clear()
        self.planner.reset()


def dense_seconds(backbone: str, seed: int) -> float:
    """Seconds of ITERATIONS x K x H imagination with every candidate stepped (eager)."""
    model = build(backbone, "eager", seed)
    state, h, goal = history(model, seed)
    actions = torch.randint(0, 7, (K, H), generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    for _ in range(ITERATIONS):
        imagine_candidates(model, state, h, goal, K, H, 0.9, lambda t, h: actions[:, t])
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write all figures and the machine here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=6, help="MPC calls timed per path")
    parser.add_argument("--solo-rounds", type=int, default=12,
                        help="then warm calls of each path in a row, alone (0: none)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled paths")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: the documented setup; this machine has 2 cores)")
    parser.add_argument(
        "--model", type=Path, nargs="+", default=[],
        help="also time trained checkpoints (e.g. runs/NAME/model), eager, each for its run's "
        "first goal (runs/NAME/goals.safetensors)",
    )
    parser.add_argument(
        "--terminal", nargs="+", choices=TERMINALS, default=list(TERMINALS),
        help="how sequences end (SearchConfig.terminal): 'value' steps all H transitions, 'q' "
        "scores the last action by Q and steps H - 1; each is timed as its own path",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    compiled = [] if args.no_compile else ["compile"]
    if not args.no_compile and peak["bf16"] > peak["fp32"]:  # no AVX-512 bf16: far slower
        compiled.append("compile+bf16")
    modes = {"mamba2": ["eager", "pytorch", "legacy", *compiled]}
    paths = [
        Bench(backbone, mode, planner, args.seed, terminal=terminal)
        for backbone in ("mamba2", "gru", "transformer")
        for mode in modes.get(backbone, ["eager"])
        for planner in SEARCH_PLANNERS
        for terminal in args.terminal
    ]
    for checkpoint in args.model:
        trained = WorldModel.from_pretrained(checkpoint).cfg.backbone
        paths += [Bench(trained, mode, p, args.seed, checkpoint, terminal)
                  for mode in ["eager", "pytorch", "legacy"]
                  for p in SEARCH_PLANNERS for terminal in args.terminal]
    for path in paths:
        path.warm_up()
    for _ in range(args.rounds):  # round 0 is cold (uniform start), the rest warm-started
        for path in paths:
            path.call()
    # Interleaving puts each call after other models' calls; an agent plans with one model,
    # call after call, so each path also runs alone.
    solo = {path.name: path.solo(args.solo_rounds) for path in paths} if args.solo_rounds else {}
    breakdown = {path.name: path.breakdown() for path in paths}
    dense = {b: dense_seconds(b, args.seed) for b in ("mamba2", "gru", "transformer")}

    results = {}
    for path in paths:
        warm_s = statistics.median(path.seconds[1:])
        warm_rows = statistics.median(path.rows_per_call[1:])
        flops = row_flops(path.model, HISTORY + H / 2)
        dtype = "bf16" if path.mode == "compile+bf16" else "fp32"
        results[path.name] = {
            "backbone": path.backbone,
            "mode": path.mode,
            "planner": path.planner_name,
            "terminal": path.terminal,
            "cold_ms": 1e3 * path.seconds[0],
            "warm_ms": 1e3 * warm_s,
            "warm_solo_ms": 1e3 * statistics.median(solo[path.name]) if solo else None,
            "solo_calls_ms": [1e3 * s for s in solo.get(path.name, [])],
            "calls_ms": [1e3 * s for s in path.seconds],
            "cold_rows_stepped": path.rows_per_call[0],
            # the transitions the q terminal does not step: the last level's share of the rows
            "warm_last_level_share": (
                sum(path.last_level_rows[1:]) / sum(path.rows_per_call[1:])
                if path.last_level_rows else None),
            "warm_rows_stepped": warm_rows,
            "candidate_transitions_per_s": K * H * ITERATIONS / warm_s,
            "stepped_transitions_per_s": warm_rows / warm_s,
            "fraction_of_peak": warm_rows * flops / warm_s / peak[dtype],
            "peak_dtype": dtype,
            "warm_up_s": path.first_call_s,
            "compile_fell_back_to_eager": path.fell_back,
            "breakdown_ms": breakdown[path.name],
        }
    # Same-run ratios: each legacy and pytorch path's warm ms over the current eager path's.
    speedup, speedup_native = ({
        name.replace(f" {mode}", ""):
        r["warm_ms"] / results[name.replace(f" {mode} ", " eager ", 1)]["warm_ms"]
        for name, r in results.items() if r["mode"] == mode} for mode in ("legacy", "pytorch"))
    best = {t: min(r["warm_ms"] for r in results.values()
                   if r["backbone"] == "mamba2" and r["terminal"] == t) for t in args.terminal}
    best_solo = {t: min(r["warm_solo_ms"] for r in results.values()
                        if r["backbone"] == "mamba2" and r["terminal"] == t)
                 for t in args.terminal} if solo else {}
    result = {
        "machine": machine_info(),
        "seed": args.seed,
        "setup": {
            "preset": "small", "envs": 1, "candidates": K, "horizon": H,
            "iterations": ITERATIONS, "history": HISTORY, "rounds": args.rounds,
            "solo_rounds": args.solo_rounds,
            "threads": args.threads,
        },
        "matmul_peak_flops": peak,
        "row_flops": {b: row_flops(build(b, "eager", args.seed), HISTORY + H / 2)
                      for b in ("mamba2", "gru", "transformer")},
        "checkpoints": [str(c) for c in args.model],
        "paths": results,
        "dense_ms_per_action": {b: 1e3 * s for b, s in dense.items()},
        "target_ms_per_action": TARGET_MS,
        "speedup_over_legacy": speedup,
        "native_kernels": native.kernels() is not None,
        "speedup_over_pytorch": speedup_native,
        "best_mamba2_warm_ms": best,
        "target_met_mamba2": {t: ms <= TARGET_MS for t, ms in best.items()},
        "best_mamba2_warm_solo_ms": best_solo,
        "target_met_mamba2_solo": {t: ms <= TARGET_MS for t, ms in best_solo.items()},
        "bf16_skipped": "compile+bf16" not in modes["mamba2"] and not args.no_compile,
        "total_seconds": time.perf_counter() - start,
    }
    if args.json:
        write_json(args.json, result)
    report(result)
    return result


def report(result: dict[str, Any]) -> None:
    console = Console(width=130)
    console.print(
        f"{machine_line(result['machine'])}, native kernels "
        f"{'on' if result['native_kernels'] else '[red]not built[/]'}:"
        f" matmul peak {result['matmul_peak_flops']['fp32'] / 1e9:.0f} GFLOP/s fp32, "
        f"{result['matmul_peak_flops']['bf16'] / 1e9:.0f} bf16"
    )
    table = Table(title=f"Planning, {K} candidates x horizon {H} x {ITERATIONS} iterations, 1 env")
    for col in ("path", "cold ms", "warm ms", "alone ms", "rows stepped", "cand. trans/s",
                "stepped/s", "% of peak", "warm-up s"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for name, r in result["paths"].items():
        flag = " [red](eager fallback)[/]" if r["compile_fell_back_to_eager"] else ""
        table.add_row(
            name + flag,
            f"{r['cold_ms']:.0f}",
            f"{r['warm_ms']:.0f}",
            "" if r["warm_solo_ms"] is None else f"{r['warm_solo_ms']:.0f}",
            f"{r['cold_rows_stepped']} / {r['warm_rows_stepped']:.0f}",
            f"{r['candidate_transitions_per_s']:,.0f}",
            f"{r['stepped_transitions_per_s']:,.0f}",
            f"{100 * r['fraction_of_peak']:.1f} % {r['peak_dtype']}",
            f"{r['warm_up_s']:.0f}",
        )
    console.print(table)
    parts = Table(title="Where a warm call's time goes (ms)")
    names = list(dict.fromkeys(n for r in result["paths"].values() for n in r["breakdown_ms"]))
    parts.add_column("path")
    for name in names:
        parts.add_column(name, justify="right")
    for name, r in result["paths"].items():
        parts.add_row(name, *(f"{r['breakdown_ms'].get(n, 0.0):.0f}" for n in names))
    console.print(parts)
    shares = ", ".join(f"{name} {100 * r['warm_last_level_share']:.0f} %"
                       for name, r in result["paths"].items()
                       if r.get("warm_last_level_share") is not None)
    console.print(f"share of a warm CEM call's rows at its last level (what the q terminal "
                  f"does not step): {shares}")
    speedup = ", ".join(f"{name} {ratio:.2f}x"
                        for name, ratio in result["speedup_over_legacy"].items())
    console.print(f"warm calls as before session 17 (legacy) over now, same run: {speedup}")
    if result["speedup_over_pytorch"]:
        native_ratio = ", ".join(f"{name} {ratio:.2f}x"
                                 for name, ratio in result["speedup_over_pytorch"].items())
        console.print(f"warm calls without the native kernels (pytorch) over with them, same "
                      f"run: {native_ratio}")
    dense = ", ".join(f"{b} {ms:.0f} ms" for b, ms in result["dense_ms_per_action"].items())
    console.print(f"every candidate stepped separately (eager): {dense}")
    for terminal, met in result["target_met_mamba2"].items():
        console.print(
            f"target <= {TARGET_MS:.0f} ms/action with mamba2 (warm, {terminal} terminal): "
            f"best {result['best_mamba2_warm_ms'][terminal]:.0f} ms interleaved, "
            + ("[green]met[/]" if met else "[red]missed[/]")
        )
    for terminal, met in result["target_met_mamba2_solo"].items():
        console.print(
            f"target <= {TARGET_MS:.0f} ms/action with mamba2 (warm, {terminal} terminal): "
            f"best {result['best_mamba2_warm_solo_ms'][terminal]:.0f} ms alone, "
            + ("[green]met[/]" if met else "[red]missed[/]")
        )
    console.print(f"total {result['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
