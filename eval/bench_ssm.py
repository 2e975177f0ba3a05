"""Speed of the backbones on CPU: Mamba-2 vs GRU (and a transformer) at equal width, one run.

    python eval/bench_ssm.py --json runs/bench_ssm.json

1 torch thread, d_model 128, 2 layers. Imagination: one `step` at batch 1024 under no_grad.
Training: forward + backward of a (256, 16) batch of sequences (256 sequences of 16 tokens,
chunk 16). Each path is also expressed as a fraction of the machine's matmul FLOP/s, measured here
on 512^3 matmuls, using analytic FLOP counts (matmuls and the SSD scan; elementwise work is not
counted). All paths are timed in interleaved rounds so that ratios are computed under the same
load; absolute times on a shared machine are noisy, the ratios much less so.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from lwm.models import BackboneConfig, make_backbone  # noqa: E402
from lwm.report import machine_info, machine_line, time_interleaved, write_json  # noqa: E402

STEP_BATCH = 1024
TRAIN_BATCH, TRAIN_T = 256, 16
CFG = BackboneConfig(d_model=128, n_layers=2, d_state=16, headdim=32, expand=2, chunk_size=16)


# --------------------------------------------------------------------------------------------
# FLOP counts (multiply-adds count 2)
# --------------------------------------------------------------------------------------------


def gru_flops_per_token(cfg: BackboneConfig) -> float:
    """Input and hidden matmuls of 3 gates, per layer."""
    return cfg.n_layers * 2 * 6 * cfg.d_model**2


def mamba2_flops_per_token(cfg: BackboneConfig, chunk: int | None) -> float:
    """in_proj + out_proj, plus the SSD core: for a step, C.h and the rank-1 state update
    (2 * 2EN); for the chunked scan, per token C.B and M.x over the chunk (2LN + 2LE), chunk
    states and the state-to-output product (2 * 2EN)."""
    D, E, N = cfg.d_model, cfg.expand * cfg.d_model, cfg.d_state
    H = E // cfg.headdim
    proj = 2 * D * (2 * E + 2 * N + H) + 2 * E * D
    core = 4 * E * N + (0 if chunk is None else 2 * chunk * (N + E))
    return cfg.n_layers * (proj + core)


def transformer_flops_per_token(cfg: BackboneConfig, context: float) -> float:
    """qkv, output and 4x MLP matmuls (12 D^2) plus attention over `context` keys (2 * 2tD)."""
    return cfg.n_layers * (2 * 12 * cfg.d_model**2 + 4 * context * cfg.d_model)


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def matmul_peak(dtype: torch.dtype, n: int = 512, rounds: int = 3) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` on this thread."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    seconds = time_interleaved({"mm": lambda: a @ b}, rounds)["mm"]
    return 2 * n**3 / seconds


def step_paths(seed: int) -> tuple[dict[str, Callable[[], Any]], dict[str, float]]:
    """Imagination-step closures (batch 1024, no_grad) and the first-call (compile) seconds."""
    torch.manual_seed(seed)
    x = torch.randn(STEP_BATCH, CFG.d_model)
    paths: dict[str, Callable[[], Any]] = {}
    first_call: dict[str, float] = {}

    for name in ("gru", "transformer"):
        backbone = make_backbone(name, CFG)
        # The transformer steps from a 16-token context; both steps are functional, so the
        # state stays where it is and every call costs the same.
        _, state = backbone.prefill(torch.randn(STEP_BATCH, TRAIN_T, CFG.d_model))
        paths[f"{name} fp32"] = lambda b=backbone, s=state: b.step(s, x)

    eager = make_backbone("mamba2", CFG)
    ref_state = eager.init_state(STEP_BATCH)
    paths["mamba2 ref (functional)"] = lambda: eager.step_ref(ref_state, x)
    for compile_ in (False, True):
        for bf16 in (False, True):
            backbone = make_backbone("mamba2", replace(CFG, compile=compile_, bf16_matmul=bf16))
            backbone.load_state_dict(eager.state_dict())
            state = backbone.init_state(STEP_BATCH)
            mode = "compiled" if compile_ else "eager in-place"
            name = f"mamba2 {mode} {'bf16' if bf16 else 'fp32'}"

            def step(b=backbone, s=state):
                b.step(s, x)  # advances s in place

            start = time.perf_counter()
            for _ in range(CFG.d_conv - 1):  # one graph per ring slot
                step()
            first_call[name] = time.perf_counter() - start
            paths[name] = step
    return paths, first_call


def train_paths(seed: int) -> tuple[dict[str, Callable[[], Any]], dict[str, float]]:
    """Forward + backward closures on a (256, 16) batch and the first-call (compile) seconds."""
    torch.manual_seed(seed)
    x = torch.randn(TRAIN_BATCH, TRAIN_T, CFG.d_model)
    paths: dict[str, Callable[[], Any]] = {}
    first_call: dict[str, float] = {}

    def fwd_bwd(forward: Callable[[torch.Tensor], torch.Tensor], params) -> Callable[[], None]:
        def run():
            for p in params:
                p.grad = None
            forward(x).square().mean().backward()

        return run

    for name in ("gru", "transformer"):
        backbone = make_backbone(name, CFG)
        paths[f"{name} fp32"] = fwd_bwd(backbone, list(backbone.parameters()))

    mamba = make_backbone("mamba2", CFG)
    paths["mamba2 chunked eager"] = fwd_bwd(mamba, list(mamba.parameters()))

    def step_loop(seq: torch.Tensor) -> torch.Tensor:
        state, ys = mamba.init_state(seq.shape[0]), []
        for t in range(seq.shape[1]):
            y, state = mamba.step(state, seq[:, t])  # autograd on: the functional step_ref
            ys.append(y)
        return torch.stack(ys, 1)

    paths["mamba2 step loop eager"] = fwd_bwd(step_loop, list(mamba.parameters()))

    compiled = make_backbone("mamba2", replace(CFG, compile=True))
    compiled.load_state_dict(mamba.state_dict())
    run = fwd_bwd(compiled, list(compiled.parameters()))
    start = time.perf_counter()
    run()
    first_call["mamba2 chunked compiled"] = time.perf_counter() - start
    paths["mamba2 chunked compiled"] = run
    return paths, first_call


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write all figures and the machine here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()

    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    with torch.no_grad():
        steps, step_compile = step_paths(args.seed)
        step_s = time_interleaved(steps, args.rounds)
    trains, train_compile = train_paths(args.seed)
    train_s = time_interleaved(trains, max(3, args.rounds // 2))

    def flops_step(name: str) -> float:
        if name.startswith("gru"):
            per_token = gru_flops_per_token(CFG)
        elif name.startswith("transformer"):
            per_token = transformer_flops_per_token(CFG, TRAIN_T + 1)
        else:
            per_token = mamba2_flops_per_token(CFG, None)
        return STEP_BATCH * per_token

    def flops_train(name: str) -> float:
        if name.startswith("gru"):
            per_token = gru_flops_per_token(CFG)
        elif name.startswith("transformer"):
            per_token = transformer_flops_per_token(CFG, (TRAIN_T + 1) / 2)
        else:
            chunk = None if "step loop" in name else min(CFG.chunk_size, TRAIN_T)
            per_token = mamba2_flops_per_token(CFG, chunk)
        return 3 * TRAIN_BATCH * TRAIN_T * per_token  # backward ~ 2x forward

    def row(name: str, seconds: float, flops: float, per_call: int, base: float) -> dict:
        dtype = "bf16" if "bf16" in name else "fp32"
        return {
            "ms": 1e3 * seconds,
            "per_s": per_call / seconds,
            "gflop": flops / 1e9,
            "fraction_of_peak": flops / seconds / peak[dtype],
            "peak_dtype": dtype,
            "x_gru_fp32": seconds / base,
        }

    step_rows = {
        n: row(n, s, flops_step(n), STEP_BATCH, step_s["gru fp32"]) for n, s in step_s.items()
    }
    train_rows = {
        n: row(n, s, flops_train(n), TRAIN_BATCH * TRAIN_T, train_s["gru fp32"])
        for n, s in train_s.items()
    }
    ratios = {
        "step_mamba2_compiled_fp32_over_gru": step_s["mamba2 compiled fp32"] / step_s["gru fp32"],
        "step_mamba2_compiled_bf16_over_gru": step_s["mamba2 compiled bf16"] / step_s["gru fp32"],
        "step_mamba2_best_over_gru": min(v for k, v in step_s.items() if k.startswith("mamba2"))
        / step_s["gru fp32"],
        "train_mamba2_compiled_over_gru": train_s["mamba2 chunked compiled"] / train_s["gru fp32"],
        "train_mamba2_eager_over_gru": train_s["mamba2 chunked eager"] / train_s["gru fp32"],
        "step_loop_over_chunked_eager": train_s["mamba2 step loop eager"]
        / train_s["mamba2 chunked eager"],
        "step_loop_over_chunked_compiled": train_s["mamba2 step loop eager"]
        / train_s["mamba2 chunked compiled"],
    }
    targets = {
        "step fp32 <= 1.7x GRU": ratios["step_mamba2_compiled_fp32_over_gru"] <= 1.7,
        "step bf16 <= 1.3x GRU": ratios["step_mamba2_compiled_bf16_over_gru"] <= 1.3,
        "train <= 2x GRU": min(
            ratios["train_mamba2_compiled_over_gru"], ratios["train_mamba2_eager_over_gru"]
        )
        <= 2.0,
        "chunked >= 2x step loop": max(
            ratios["step_loop_over_chunked_eager"], ratios["step_loop_over_chunked_compiled"]
        )
        >= 2.0,
    }
    result = {
        "machine": machine_info(),
        "seed": args.seed,
        "rounds": args.rounds,
        "config": asdict(CFG),
        "shapes": {
            "step_batch": STEP_BATCH,
            "train_batch": TRAIN_BATCH,
            "train_seq_len": TRAIN_T,
            "transformer_step_context": TRAIN_T,
        },
        "matmul_peak_flops": peak,
        "imagination_step": step_rows,
        "training_fwd_bwd": train_rows,
        "first_call_seconds": {**step_compile, **train_compile},
        "ratios": ratios,
        "targets_met": targets,
        "total_seconds": time.perf_counter() - start,
    }
    report(result)
    if args.json:
        write_json(args.json, result)
    return result


def report(result: dict[str, Any]) -> None:
    """Print the tables with rich."""
    console = Console()
    peak = result["matmul_peak_flops"]
    console.print(
        f"{machine_line(result['machine'])}: matmul peak fp32 {peak['fp32'] / 1e9:.0f} "
        f"GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s"
    )
    for title, key, unit in (
        (f"Imagination step, batch {STEP_BATCH}", "imagination_step", "steps/s"),
        (f"Training fwd+bwd, {TRAIN_BATCH}x{TRAIN_T}", "training_fwd_bwd", "tokens/s"),
    ):
        table = Table(title=title)
        for col in ("path", "ms", unit, "GFLOP", "% of peak", "x GRU"):
            table.add_column(col, justify="left" if col == "path" else "right")
        for name, r in result[key].items():
            table.add_row(
                name,
                f"{r['ms']:.1f}",
                f"{r['per_s']:,.0f}",
                f"{r['gflop']:.2f}",
                f"{100 * r['fraction_of_peak']:.0f} % {r['peak_dtype']}",
                f"{r['x_gru_fp32']:.2f}",
            )
        console.print(table)
    table = Table(title="Ratios (same run)")
    table.add_column("ratio")
    table.add_column("value", justify="right")
    for name, value in result["ratios"].items():
        table.add_row(name, f"{value:.2f}")
    for name, met in result["targets_met"].items():
        table.add_row(f"target: {name}", "[green]met[/]" if met else "[red]missed[/]")
    console.print(table)
    first = ", ".join(f"{k} {v:.0f} s" for k, v in result["first_call_seconds"].items())
    console.print(f"first calls (compile): {first}; total {result['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
