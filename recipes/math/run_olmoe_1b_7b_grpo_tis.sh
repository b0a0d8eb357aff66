#!/usr/bin/env bash
# Math: GRPO + TIS (token-level truncated importance sampling, C = 2) on OLMoE-1B-7B (one 80 GB GPU).
# Knobs (ROLLOUT_ENGINE, TRAIN_BACKEND, NNODES, GPUS_PER_NODE, MODEL_PATH, DATA_DIR, WANDB_PROJECT,
# SMOKE, ...): recipes/common.sh. Arguments are extra Hydra overrides. See README.md.
RECIPE=math MODEL=olmoe_1b_7b VARIANT=grpo_tis
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh" "$@"
