"""lwm's native CPU kernels against the PyTorch paths they replace, paired in one process.

    python eval/bench_native.py --threads 2 --json runs/bench_native.json \
        --model runs/train/goto-ego-s0/model runs/train/goto-map-s0/model

Two parts, each timed in rounds that alternate the kernels on and off (`lwm.models.native
.switched`), so that every ratio is taken under the same load (this machine's load moves absolute
times by up to 2x), and reported as the median of the per-round ratios:

- kernels: one call of each kernel's entry point at a few row counts: a Mamba-2 layer's branch
  step (`Mamba2.step_branches`, a path of 3 tokens), the backbone's whole branch step
  (`Mamba2Backbone.step_branches`), `WorldModel.predict_latent` with each decoder, and the map
  decoder's map step (`WorldModel._remember`); `small` preset, random weights.
- calls: warm CEM calls (512 candidates x horizon 8 x 4 iterations, the `q` terminal) of the
  untrained `small` model and of each `--model`, one planner with the kernels and one without,
  each from the same state and its own warm start; "same plans" counts the rounds whose two
  plans were equal (rounding may part near-equal candidates).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from eval.bench_planning import ITERATIONS, H, K, history, run_name  # noqa: E402
from lwm.models import native  # noqa: E402
from lwm.models.ssm import Mamba2Branches  # noqa: E402
from lwm.models.world_model import CELL_IDS, WorldModel, preset  # noqa: E402
from lwm.planning import PLANNERS, make_planner  # noqa: E402
from lwm.report import machine_info, machine_line, write_json  # noqa: E402

ROWS = (1, 16, 64, 256, 512)


def paired(fn: Callable[[], Any], rounds: int, calls: int) -> dict[str, float]:
    """Median ms of `calls` calls of fn with the kernels on and off, alternating in rounds, and
    the median over rounds of off / on."""
    times: dict[bool, list[float]] = {True: [], False: []}
    for on in (True, False):  # one of each to settle
        with native.switched(on):
            fn()
    for _ in range(rounds):
        for on in (True, False):
            with native.switched(on):
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[on].append((time.perf_counter() - start) / calls)
    return summary(times)


def summary(times: dict[bool, list[float]]) -> dict[str, float]:
    """Seconds with the kernels on (True) and off, per round -> median ms of each and the median
    over rounds of off / on."""
    return {"native_ms": 1e3 * statistics.median(times[True]),
            "pytorch_ms": 1e3 * statistics.median(times[False]),
            "ratio": statistics.median(off / on for on, off in zip(times[True], times[False],
                                                                    strict=True))}


def kernel_cases(rows: int, seed: int) -> dict[str, Callable[[], Any]]:
    """Each kernel's entry point at `rows` rows, as a call that can be repeated."""
    torch.manual_seed(seed)
    model = WorldModel(preset("small")).eval()
    backbone = model.backbone
    block = backbone.blocks[0]
    with torch.no_grad():
        _, state = backbone.prefill(torch.randn(1, 16, model.cfg.d_model))
        branches = backbone.branch(state)
        for _ in range(3):  # a path of 3 tokens, as in the middle of a horizon
            branches = backbone.step(branches.take(torch.zeros(1, dtype=torch.long)),
                                     torch.randn(1, model.cfg.d_model))[1]
    pick = torch.zeros(rows, dtype=torch.long)
    x = torch.randn(rows, model.cfg.d_model)
    # the rows' states, taken once: a step writes its token into the room a take leaves and
    # the newest input into the conv ring, in place, so repeated steps cost the same
    layer: Mamba2Branches = branches.layers[0].take(pick)
    stack = branches.take(pick)
    cases = {
        "mamba2 layer step": lambda: block.step_branches(layer, x),
        "mamba2 stack step": lambda: backbone.step_branches(stack, x),
    }
    for decoder in ("mlp", "ego", "map"):
        m = WorldModel(preset("small", decoder=decoder)).eval()
        h = torch.randn(rows, m.latent_dim)
        h[:, m.feature_dim :] = torch.randint(0, CELL_IDS, (rows, m.latent_dim - m.feature_dim))
        a = torch.randint(0, m.cfg.n_actions, (rows,))
        cases[f"predict_latent {decoder}"] = lambda m=m, h=h, a=a: m.predict_latent(h, a)
        if decoder == "map":
            grid = torch.randint(0, CELL_IDS, (rows, m.map_moves.shape[-1]))
            front = torch.rand(rows) < 0.5
            z = m.predict_latent(h, a)
            cases["map step"] = lambda m=m, g=grid, f=front, a=a, z=z: m._remember(g, f, a, z)
    return cases


def call_pair(checkpoint: Path | None, seed: int, rounds: int) -> dict[str, Any]:
    """Warm CEM calls with and without the kernels, alternating, from the same state."""
    torch.manual_seed(seed)
    model = (WorldModel(preset("small")) if checkpoint is None
             else WorldModel.from_pretrained(checkpoint)).eval()
    state, h, goal = history(model, seed, checkpoint)
    cfg = PLANNERS["cem"][1](horizon=H, candidates=K, iterations=ITERATIONS,
                             discount=model.cfg.discount, terminal="q")
    planners = {on: make_planner("cem", cfg) for on in (True, False)}
    gens = {on: torch.Generator().manual_seed(seed) for on in (True, False)}
    times: dict[bool, list[float]] = {True: [], False: []}
    same = 0
    for r in range(rounds + 2):  # the first two: cold, then the first warm start
        plans = {}
        for on in (True, False):
            with native.switched(on):
                start = time.perf_counter()
                plans[on] = planners[on].plan(model, state, h, goal, generator=gens[on])
            if r >= 2:
                times[on].append(time.perf_counter() - start)
        same += int(torch.equal(plans[True].actions, plans[False].actions))
    return {**summary(times), "same_plans": same, "rounds": rounds + 2}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write all figures and the machine here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds per figure")
    parser.add_argument("--calls", type=int, default=20, help="kernel calls timed per round")
    parser.add_argument("--call-rounds", type=int, default=16, help="warm CEM calls per model")
    parser.add_argument("--model", type=Path, nargs="*", default=[],
                        help="trained checkpoints (runs/NAME/model) whose warm calls to pair too")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if native.kernels() is None:
        raise SystemExit("the native kernels are not available (LWM_NATIVE=0, or the build "
                         "failed: `lwm kernels --verbose` shows why)")
    start = time.perf_counter()
    kernels: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for rows in args.rows:
            for name, fn in kernel_cases(rows, args.seed).items():
                kernels.setdefault(name, {})[str(rows)] = paired(fn, args.rounds, args.calls)
    calls = {"untrained small" if c is None else run_name(c): call_pair(c, args.seed,
                                                                          args.call_rounds)
             for c in [None, *args.model]}
    result = {"machine": machine_info(), "seed": args.seed, "threads": args.threads,
              "rounds": args.rounds, "kernels": kernels, "calls": calls,
              "total_seconds": time.perf_counter() - start}
    if args.json:
        write_json(args.json, result)
    report(result)
    return result


def report(result: dict[str, Any]) -> None:
    console = Console(width=130)
    console.print(machine_line(result["machine"]))
    table = Table(title="one call: native ms / PyTorch ms (PyTorch / native, paired median)")
    rows = list(next(iter(result["kernels"].values())))
    table.add_column("kernel")
    for r in rows:
        table.add_column(f"{r} rows", justify="right")
    for name, by_rows in result["kernels"].items():
        table.add_row(name, *(f"{f['native_ms']:.3f} / {f['pytorch_ms']:.3f} ({f['ratio']:.2f}x)"
                              for f in by_rows.values()))
    console.print(table)
    calls = Table(title=f"warm CEM calls, {K} x {H} x {ITERATIONS}, q terminal")
    for col in ("model", "native ms", "pytorch ms", "pytorch / native", "same plans"):
        calls.add_column(col, justify="left" if col == "model" else "right")
    for name, c in result["calls"].items():
        calls.add_row(name, f"{c['native_ms']:.1f}", f"{c['pytorch_ms']:.1f}",
                      f"{c['ratio']:.2f}x", f"{c['same_plans']} / {c['rounds']}")
    console.print(calls)
    console.print(f"total {result['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
