#!/usr/bin/env bash
# Code: GRPO (clip-higher 0.2 / 0.27) on Qwen3-30B-A3B (8 x 80 GB; NNODES>=4: the paper's scale).
# Knobs (ROLLOUT_ENGINE, TRAIN_BACKEND, NNODES, GPUS_PER_NODE, MODEL_PATH, DATA_DIR, WANDB_PROJECT,
# SMOKE, ...): recipes/common.sh. Arguments are extra Hydra overrides. See README.md.
RECIPE=code MODEL=qwen3_30b_a3b VARIANT=grpo
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh" "$@"
