#!/usr/bin/env bash
# Train the shipped GoToLocal world model: a `small` mamba2 model, Dyna loop on BabyAI GoToLocal,
# 1 thread, 5,000 episodes in two stages:
#   1. seed 0, 2,600 episodes (exploration for 200, then mostly the model's own epsilon-greedy Q
#      policy), 300 updates of 8 whole-episode windows (64 steps) per 100 episodes, relabelling
#      with every concrete goal (`--goal-vocab all`);
#   2. a second run started from stage 1's weights (`--init-from`, a fresh episode store and
#      optimizer), seed 1, 2,400 more episodes of the same recipe with no exploration warm-up.
# Each run evaluates the agent (greedy Q, repeat penalty 0.1) on 200 held-out seeds as it goes
# (metrics.jsonl). Then store stage 2 in half precision (4.7 MB) in
# lwm/resources/checkpoints/babyai-goto with agent.json,
# the planner measured best for the shipped weights (greedy Q with a repeat penalty; see that
# file and issue #5's notes).
#
# Stage 1 of the shipped file is run `wm-goto-i`, trained at commits e8118c7 (to 1,100 episodes)
# and 835f59f (resumed to 2,600). Its first process was killed mid-iteration, so the run lost one
# iteration's 300 updates (7,500 in all, where these commands make 7,800); with that and the
# Mamba-2 state-layout change between the two commits, the commands train the same recipe, not
# bit-identical weights. On a 2-core machine shared with 2-3 other jobs, stage 1 took 76 min.
# Stage 2 is run `goto-ft` (session 8, these commands, started from the shipped stage-1 file):
# 62 min of training wall time (train_s), sharing the machine with one or two other jobs.
# Usage: bash eval/make_checkpoint.sh [run-dir] [stage-2 run-dir]   (resumable: run it again)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/train/babyai-goto-mamba2}
.venv/bin/lwm train --run-dir "$RUN" --suite babyai-goto --preset small --backbone mamba2 \
    --decoder mlp \
    --seed 0 --threads 1 --episodes 2600 --collect-per-iter 100 --updates-per-iter 300 \
    --batch-size 8 --seq-len 64 --goal-vocab all --eval-every 500 --eval-episodes 200
FT=${2:-$RUN-ft}
.venv/bin/lwm train --run-dir "$FT" --suite babyai-goto --preset small --backbone mamba2 \
    --decoder mlp \
    --init-from "$RUN" --seed 1 --threads 1 --episodes 2400 --warmup-episodes 0 \
    --collect-per-iter 100 --updates-per-iter 300 --batch-size 8 --seq-len 64 --goal-vocab all \
    --eval-every 800 --eval-episodes 200
DEST=lwm/resources/checkpoints/babyai-goto
.venv/bin/python eval/store_checkpoint.py "$FT" "$DEST" --suite babyai-goto
du -h "$DEST"/*
