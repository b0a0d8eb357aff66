#!/usr/bin/env bash
# The CPU quickstart: verl's own trainer (main_ppo) on a tiny MoE, GRPO / GRPO+R3 / GRPO+TIS /
# GSPO / GSPO+R3 on the same seeds, then a report. `make quickstart` runs it;
# `make quickstart QUICK=1` is the 2-step version. Every knob is an environment variable:
set -euo pipefail

PYTHON=${PYTHON:-.venv/bin/python}
QUICK=${QUICK:-}
STEPS=${STEPS:-$([ -n "$QUICK" ] && echo 2 || echo 12)}   # training steps per variant
VARIANTS=${VARIANTS:-grpo,grpo_r3,grpo_tis,gspo,gspo_r3}  # also: grpo_r2
ROLLOUT_ENGINE=${ROLLOUT_ENGINE:-vllm}                     # actor_rollout_ref.rollout.name: vllm | sglang | hf
ROLLOUT_DTYPE=${ROLLOUT_DTYPE:-bfloat16}                   # the trainer runs fp32
PROMPTS=${PROMPTS:-8}                                      # prompts per step
SAMPLES=${SAMPLES:-4}                                      # responses per prompt
HIDDEN=${HIDDEN:-64}                                       # model size: hidden, layers, experts, top-k
LAYERS=${LAYERS:-4}
EXPERTS=${EXPERTS:-8}
TOP_K=${TOP_K:-2}
WARM_START_STEPS=${WARM_START_STEPS:-}                     # empty: the model builder's default
LR=${LR:-2e-4}                                             # actor learning rate
SEED=${SEED:-0}
OUT=${OUT:-runs/quickstart}
# W&B: offline unless you are logged in (`wandb login`); an explicit WANDB_MODE wins.

if [ "$ROLLOUT_ENGINE" = sglang ]; then
    # SGLang pins its own torch: it runs in its own environment (built on first use, cached
    # under ~/.cache/verl_r3), with this checkout on PYTHONPATH.
    PYTHON="$(bash scripts/sglang_env.sh)/bin/python"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "quickstart: STEPS=$STEPS VARIANTS=$VARIANTS ROLLOUT_ENGINE=$ROLLOUT_ENGINE ROLLOUT_DTYPE=$ROLLOUT_DTYPE"
echo "            PROMPTS=$PROMPTS SAMPLES=$SAMPLES HIDDEN=$HIDDEN LAYERS=$LAYERS EXPERTS=$EXPERTS TOP_K=$TOP_K"
echo "            WARM_START_STEPS=${WARM_START_STEPS:-default} LR=$LR SEED=$SEED OUT=$OUT WANDB_MODE=${WANDB_MODE:-auto}"

exec "$PYTHON" -m verl_r3.quickstart --out "$OUT" --variants "$VARIANTS" --steps "$STEPS" \
    --prompts "$PROMPTS" --samples "$SAMPLES" --engine "$ROLLOUT_ENGINE" --rollout-dtype "$ROLLOUT_DTYPE" \
    --hidden "$HIDDEN" --layers "$LAYERS" --experts "$EXPERTS" --top-k "$TOP_K" --lr "$LR" --seed "$SEED" \
    ${WARM_START_STEPS:+--warm-start-steps "$WARM_START_STEPS"}
