#!/usr/bin/env bash
# Train the shipped PutNextLocal world model: fine-tune the shipped BALROG-style model
# (`--init-from shipped:balrog-babyai`, itself the GoToLocal model fine-tuned on balrog-babyai)
# with the Dyna loop on BabyAI PutNextLocal: seed 1, 1 thread, 3,000 episodes with no exploration
# warm-up, 300 updates of 8 64-step windows per 100 episodes, relabelling with every concrete
# goal, affordance exploration and 30 % stepping-stone episodes (as eval/make_balrog_checkpoint.sh).
# Then store it in half precision in lwm/resources/checkpoints/babyai-putnext with agent.json
# (greedy Q with repeat penalty 0.1, as the other shipped models).
#
# The shipped file is run `putnext-ft9` of session 9, trained with these commands: 3,000
# episodes, 6,279 s of training (fit 5,886 s, collection 393 s) on a 2-core machine shared with
# a second training run and evaluations. The chain behind it is 9,600 episodes: 2,600 GoToLocal
# (stage 1 of eval/make_checkpoint.sh), 4,000 balrog-babyai, 3,000 PutNextLocal.
# Usage: bash eval/make_putnext_checkpoint.sh [run-dir] [episodes]   (resumable)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/train/babyai-putnext-mamba2}
EPISODES=${2:-3000}
.venv/bin/lwm train --run-dir "$RUN" --suite babyai-putnext --preset small --backbone mamba2 \
    --decoder mlp \
    --seed 1 --threads 1 --episodes "$EPISODES" --collect-per-iter 100 --updates-per-iter 300 \
    --batch-size 8 --seq-len 64 --goal-vocab all --eval-every 1000 --eval-episodes 100 \
    --warmup-episodes 0 --init-from shipped:balrog-babyai --stepping-stones 0.3 \
    --exploration affordance
DEST=lwm/resources/checkpoints/babyai-putnext
.venv/bin/python eval/store_checkpoint.py "$RUN" "$DEST" --suite babyai-putnext
du -h "$DEST"/*
