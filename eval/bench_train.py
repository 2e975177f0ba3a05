"""Speed of one world-model training update (the Dyna loop's `fit` step) on CPU, one run.

    python eval/bench_train.py --json runs/bench_train.json

Builds a `Trainer` in a temporary directory, collects `--episodes` exploration episodes of the
suite, and times, in interleaved rounds (see `lwm.report.time_interleaved`), one full update:
sampling windows, relabelling goals, the loss, backward and the Adam step. The update runs twice
per round: with the goal heads' batched `pairwise` scoring (what training uses) and with a
straightforward broadcast reference of the same math, so the ratio between them is measured under
the same load. The loss of both is checked to agree before timing. A third path samples whole
windows without cutting the trailing padding (`lwm.train.trim_padding`), which training does.
A fourth runs the batched update under CPU bf16 autocast (`--precision bf16` of `lwm train`).
A fifth and sixth run it, in fp32 and bf16, for a model with the other next-view decoder
(`--decoder`: mlp or ego), trained on the same stored episodes.

    python eval/bench_train.py --from-run runs/wm-goto-h --seq-len 64 --batch-size 16

samples a training run's own stored episodes instead (the Q policy's episodes get shorter as it
learns, so cutting padding saves more there than on exploration episodes).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import lwm.train  # noqa: E402
from lwm.config import TrainConfig  # noqa: E402
from lwm.data import EpisodeStore, SequenceSampler  # noqa: E402
from lwm.models.world_model import DECODERS, MAP_CELLS, _GoalHead  # noqa: E402
from lwm.report import machine_info, time_interleaved, write_json  # noqa: E402
from lwm.train import Trainer, native_bf16, trim_padding  # noqa: E402


def reference_pairwise(head: _GoalHead, h: torch.Tensor, psi: torch.Tensor,
                       goals: torch.Tensor | None = None) -> torch.Tensor:
    """The goal head's pairwise scores written the direct way: gather whole goal features per
    slot and broadcast every state against its goals (the cells are copied once per goal)."""
    psi = psi if goals is None else psi[goals]
    k, n = head.hidden, head.n_out
    phi = head.state_mlp(h[..., : head.d]).unflatten(-1, (n, k))
    out = torch.einsum("blnk,blgk->blgn", phi, psi[..., :k]) / math.sqrt(k) + psi[..., k : k + n]
    if head.maps:
        cells = h[..., head.d : head.d + MAP_CELLS * head.cell_dim].unflatten(
            -1, (MAP_CELLS, head.cell_dim))
        query = psi[..., k + n :].unflatten(-1, (head.maps, head.cell_dim + 1))
        match = cells[:, :, None] @ query[..., :-1].transpose(-1, -2) + query[..., None, :, -1]
        out = out + head.map_out(head.read(match.flatten(-2))
                                 + head.history(h[..., : head.d])[:, :, None])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="babyai-goto")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--backbone", default="mamba2")
    parser.add_argument("--decoder", default="mlp", choices=DECODERS)
    parser.add_argument("--episodes", type=int, default=100, help="exploration episodes stored")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--n-goals", type=int, default=16)
    parser.add_argument("--goal-vocab", choices=("suite", "all"), default="suite")
    parser.add_argument("--from-run", type=Path,
                        help="sample this training run's stored episodes (read only)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write all figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = TrainConfig(suite=args.suite, preset=args.preset, backbone=args.backbone,
                      decoder=args.decoder,
                      episodes=args.episodes, batch_size=args.batch_size, seq_len=args.seq_len,
                      n_goals=args.n_goals, goal_vocab=args.goal_vocab, seed=args.seed,
                      threads=args.threads,
                      warmup_episodes=args.episodes)
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as tmp_other:
        trainer = Trainer(cfg, tmp, progress=False)
        if args.from_run:
            store = EpisodeStore(args.from_run / "episodes", mode="r")
            trainer.sampler = SequenceSampler(store, args.seq_len)
        else:
            trainer.collect(args.episodes)
            trainer.sampler.refresh()
        heads = (trainer.model.q_head, trainer.model.q_target, trainer.model.reward_head)
        other = next(d for d in DECODERS if d != args.decoder)
        other_trainer = Trainer(replace(cfg, decoder=other), tmp_other, progress=False)
        other_trainer.sampler = trainer.sampler  # the same stored episodes

        def update(reference: bool, trim: bool = True, bf16: bool = False) -> None:
            _use_reference(heads, reference)
            lwm.train.trim_padding = trim_padding if trim else (lambda batch: batch)
            trainer.bf16 = bf16
            try:
                trainer.fit(1)
            finally:
                lwm.train.trim_padding = trim_padding
                trainer.bf16 = False

        def other_update(bf16: bool) -> None:
            other_trainer.bf16 = bf16
            other_trainer.fit(1)

        batch_check = _loss_agreement(trainer, heads)
        seconds = time_interleaved({"batched": lambda: update(False),
                                    "untrimmed": lambda: update(False, trim=False),
                                    "reference": lambda: update(True),
                                    "bf16": lambda: update(False, bf16=True),
                                    "other_decoder": lambda: other_update(False),
                                    "other_decoder_bf16": lambda: other_update(True)},
                                   rounds=args.rounds)
        _use_reference(heads, False)

    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(),
        "seed": args.seed,
        "figures": {
            "update_ms": seconds["batched"] * 1e3,
            "reference_update_ms": seconds["reference"] * 1e3,
            "speedup": seconds["reference"] / seconds["batched"],
            "untrimmed_update_ms": seconds["untrimmed"] * 1e3,
            "trim_speedup": seconds["untrimmed"] / seconds["batched"],
            "stored_episodes": trainer.sampler.num_episodes,
            "updates_per_minute": 60 / seconds["batched"],
            "bf16_update_ms": seconds["bf16"] * 1e3,
            "bf16_speedup": seconds["batched"] / seconds["bf16"],
            "bf16_native": native_bf16(),
            "decoder": args.decoder,
            "other_decoder": other,
            "other_decoder_update_ms": seconds["other_decoder"] * 1e3,
            "other_decoder_bf16_update_ms": seconds["other_decoder_bf16"] * 1e3,
            "loss_max_abs_diff": batch_check,
        },
    }
    report(result)
    if args.json:
        write_json(args.json, result)
    return result


def _use_reference(heads, on: bool) -> None:
    """Score with `reference_pairwise` (on) or with the heads' own `pairwise` (off)."""
    for head in heads:
        if on:
            head.pairwise = reference_pairwise.__get__(head)
        else:
            head.__dict__.pop("pairwise", None)


def _loss_agreement(trainer: Trainer, heads) -> float:
    """Largest |difference| of the loss parts, batched vs reference, on one batch: the two
    paths compute the same math."""
    tensors = trainer.sample_batch()
    parts = []
    with torch.no_grad():
        for reference in (False, True):
            _use_reference(heads, reference)
            parts.append(torch.tensor(list(trainer.model.loss(tensors, trainer.goal_table)[1]
                                           .values())))
    _use_reference(heads, False)
    return float((parts[0] - parts[1]).abs().max())


def report(result: dict[str, Any]) -> None:
    fig = result["figures"]
    table = Table(title=f"one training update ({result['config']['preset']}, "
                        f"{result['config']['backbone']}, {result['config']['threads']} thread)")
    for col in ("path", "ms/update", "updates/min"):
        table.add_column(col)
    table.add_row("batched pairwise", f"{fig['update_ms']:.0f}", f"{fig['updates_per_minute']:.0f}")
    table.add_row("reference", f"{fig['reference_update_ms']:.0f}",
                  f"{60e3 / fig['reference_update_ms']:.0f}")
    table.add_row("untrimmed windows", f"{fig['untrimmed_update_ms']:.0f}",
                  f"{60e3 / fig['untrimmed_update_ms']:.0f}")
    table.add_row("batched, bf16 autocast", f"{fig['bf16_update_ms']:.0f}",
                  f"{60e3 / fig['bf16_update_ms']:.0f}")
    for suffix, label in (("", ""), ("_bf16", ", bf16 autocast")):
        ms = fig[f"other_decoder{suffix}_update_ms"]
        table.add_row(f"batched, {fig['other_decoder']} decoder{label} (this run: "
                      f"{fig['decoder']})", f"{ms:.0f}", f"{60e3 / ms:.0f}")
    Console().print(table)
    Console().print(f"batched vs reference {fig['speedup']:.2f}x; trimmed vs untrimmed windows "
                    f"{fig['trim_speedup']:.2f}x; largest loss difference "
                    f"{fig['loss_max_abs_diff']:.2e}; bf16 vs fp32 {fig['bf16_speedup']:.2f}x "
                    f"(native bf16 matmuls: {'yes' if fig['bf16_native'] else 'no'})")


if __name__ == "__main__":
    main()
