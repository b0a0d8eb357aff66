# Shared by every recipes/<recipe>/run_<model>_<variant>.sh. The run script sets RECIPE, MODEL and
# VARIANT, then sources this file with its arguments, which reach main_ppo as extra Hydra
# overrides (they win over everything below). See recipes/README.md.
#
# Knobs (environment variables):
ROLLOUT_ENGINE=${ROLLOUT_ENGINE:-vllm}   # actor_rollout_ref.rollout.name: vllm | sglang | hf
TRAIN_BACKEND=${TRAIN_BACKEND:-fsdp}     # fsdp: verl_r3's FSDP2 R3 | megatron: verl's own Megatron R3
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-}         # default: the model preset's (8, or 1 for the small MoE)
MODEL_PATH=${MODEL_PATH:-}               # default: the model preset's hub id
DATA_DIR=${DATA_DIR:-$HOME/data/verl_r3/$RECIPE}   # written by recipes/$RECIPE/prepare_data.py
WANDB_PROJECT=${WANDB_PROJECT:-verl_r3_$RECIPE}
GROUP=${GROUP:-$RECIPE-$MODEL-$(date +%Y%m%d)}   # the runs you compare share a group (default: a day of one recipe and model)
OUT=${OUT:-runs/recipes/$GROUP}          # verl metrics (<variant>.jsonl), W&B offline runs, checkpoints
SMOKE=${SMOKE:-}                         # 1: CPU, a tiny random MoE, the recipe's offline data, 2 steps
STEPS=${STEPS:-}                         # training steps (default: the config's epochs; SMOKE: 2)
TIMEOUT_S=${TIMEOUT_S:-}                 # wall-clock limit of the run (SMOKE default 900 s)
DRY_RUN=${DRY_RUN:-}                     # 1: print the environment and command, one item a line; run nothing
PYTHON=${PYTHON:-python3}

set -euo pipefail
: "${RECIPE:?set by the run script}" "${MODEL:?set by the run script}" "${VARIANT:?set by the run script}"
RECIPES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RECIPE_DIR=$RECIPES_DIR/$RECIPE
die() { echo "recipes/$RECIPE ($MODEL, $VARIANT): $*" >&2; exit 2; }
[ -d "$RECIPE_DIR/config" ] || die "no recipe folder $RECIPE_DIR"

case $ROLLOUT_ENGINE in vllm | sglang | hf) ;; *) die "ROLLOUT_ENGINE must be vllm, sglang or hf, got '$ROLLOUT_ENGINE'" ;; esac
case $TRAIN_BACKEND in fsdp | megatron) ;; *) die "TRAIN_BACKEND must be fsdp or megatron, got '$TRAIN_BACKEND'" ;; esac

# ---- the variant: verl's own algorithms; only router_replay.mode=R3 is verl_r3's (arXiv 2510.11370) ----
GRPO=(actor_rollout_ref.actor.clip_ratio_low=0.2 actor_rollout_ref.actor.clip_ratio_high=0.27)   # clip-higher
TIS=(algorithm.rollout_correction.rollout_is=token algorithm.rollout_correction.rollout_is_threshold=2.0)  # C = 2
GSPO=(actor_rollout_ref.actor.policy_loss.loss_mode=gspo
      actor_rollout_ref.actor.clip_ratio_low=0.0003 actor_rollout_ref.actor.clip_ratio_high=0.0004
      actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean)
case $VARIANT in
grpo | grpo_r3) ALGO=("${GRPO[@]}") ;;
grpo_tis) ALGO=("${GRPO[@]}" "${TIS[@]}") ;;
gspo | gspo_r3) ALGO=("${GSPO[@]}") ;;
*) die "VARIANT must be grpo, grpo_r3, grpo_tis, gspo or gspo_r3, got '$VARIANT'" ;;
esac
REPLAY=disabled
case $VARIANT in *_r3) REPLAY=R3 ;; esac

# ---- the model preset: what the hardware decides (parallelism, offload, micro-batches, scale) ----
# Paper scale (arXiv 2510.11370): 256 prompts x 8 samples a step, prompts <= 2048 and responses <= 30720
# tokens, 8 mini-steps at lr 1e-6. The recipe configs hold it; presets scale it to the machine.
PRESET=()
case $MODEL in
qwen3_30b_a3b)   # Qwen3-30B-A3B: 48 layers, 128 experts, top-8
    GPUS_PER_NODE=${GPUS_PER_NODE:-8}
    MODEL_PATH=${MODEL_PATH:-Qwen/Qwen3-30B-A3B}
    if [ "$NNODES" -ge 4 ]; then   # 32+ GPUs: the paper's batch and lengths
        PRESET+=(actor_rollout_ref.rollout.tensor_model_parallel_size=4
                 actor_rollout_ref.rollout.gpu_memory_utilization=0.6
                 actor_rollout_ref.actor.ppo_max_token_len_per_gpu=34816)
    else                           # one node of 8 x 80 GB: a quarter of the batch, 8k responses, offloaded optimizer
        PRESET+=(data.train_batch_size=64 actor_rollout_ref.actor.ppo_mini_batch_size=8
                 data.max_response_length=8192
                 actor_rollout_ref.rollout.tensor_model_parallel_size=4
                 actor_rollout_ref.rollout.gpu_memory_utilization=0.5
                 actor_rollout_ref.actor.ppo_max_token_len_per_gpu=12288
                 actor_rollout_ref.actor.fsdp_config.param_offload=True
                 actor_rollout_ref.actor.fsdp_config.optimizer_offload=True
                 actor_rollout_ref.ref.fsdp_config.param_offload=True)
    fi
    MEGATRON=(actor_rollout_ref.actor.megatron.expert_model_parallel_size=8
              actor_rollout_ref.actor.megatron.tensor_model_parallel_size=1
              actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=$NNODES) ;;
olmoe_1b_7b)     # OLMoE-1B-7B: 16 layers, 64 experts, top-8; one 80 GB GPU with offload
    GPUS_PER_NODE=${GPUS_PER_NODE:-1}
    MODEL_PATH=${MODEL_PATH:-allenai/OLMoE-1B-7B-0125-Instruct}
    PRESET+=(data.train_batch_size=32 actor_rollout_ref.actor.ppo_mini_batch_size=4
             data.max_prompt_length=1024 data.max_response_length=4096
             actor_rollout_ref.rollout.tensor_model_parallel_size=1
             actor_rollout_ref.rollout.gpu_memory_utilization=0.35
             actor_rollout_ref.actor.ppo_max_token_len_per_gpu=10240
             actor_rollout_ref.actor.fsdp_config.param_offload=True
             actor_rollout_ref.actor.fsdp_config.optimizer_offload=True
             actor_rollout_ref.ref.fsdp_config.param_offload=True)
    MEGATRON=(actor_rollout_ref.actor.megatron.expert_model_parallel_size=1
              actor_rollout_ref.actor.megatron.tensor_model_parallel_size=1
              actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=1) ;;
*) die "unknown MODEL '$MODEL' (qwen3_30b_a3b, olmoe_1b_7b)" ;;
esac

# ---- the training backend ----
CONFIG_NAME=r3_$RECIPE
if [ "$TRAIN_BACKEND" = megatron ]; then
    CONFIG_NAME=r3_${RECIPE}_megatron   # verl's ppo_megatron_trainer plus the recipe's deltas
    BACKEND=("${MEGATRON[@]}" "actor_rollout_ref.actor.megatron.router_replay.mode=$REPLAY")
    # verl's Megatron engine does not read an fsdp_config
    PRESET=($(printf '%s\n' "${PRESET[@]}" | grep -v fsdp_config || true))
else
    BACKEND=(actor_rollout_ref.actor.strategy=fsdp2 actor_rollout_ref.ref.strategy=fsdp2
             "++actor_rollout_ref.actor.fsdp_config.router_replay.mode=$REPLAY")
fi

# ---- the recipe's own settings (recipe.sh: RECIPE_SETTINGS always; SMOKE_SETTINGS, SMOKE_MAX_POSITIONS) ----
RECIPE_SETTINGS=()
SMOKE_SETTINGS=()
SMOKE_MAX_POSITIONS=512
# shellcheck source=/dev/null
source "$RECIPE_DIR/recipe.sh"

# ---- SMOKE: the same script on CPU, a tiny random MoE and the recipe's offline data, 2 steps ----
if [ -z "$SMOKE" ]; then
    SMOKE_SETTINGS=()
else
    SMOKE_DIR=$(realpath -m "${SMOKE_DIR:-runs/smoke/$RECIPE}")
    STEPS=${STEPS:-2}
    TIMEOUT_S=${TIMEOUT_S:-900}
    [ "$TRAIN_BACKEND" = fsdp ] || die "SMOKE runs TRAIN_BACKEND=fsdp (Megatron needs GPUs)"
    MODEL_PATH=$SMOKE_DIR/model
    DATA_DIR=$SMOKE_DIR/data
    NNODES=1
    GPUS_PER_NODE=1
    PRESET=()
    BACKEND=("++actor_rollout_ref.actor.fsdp_config.router_replay.mode=$REPLAY")
    mapfile -t CPU_SETTINGS < <("$PYTHON" -m verl_r3.integration.cpu_settings --engine "$ROLLOUT_ENGINE")
    [ "${#CPU_SETTINGS[@]}" -gt 0 ] || die "verl_r3 is not importable by $PYTHON"
    SMOKE_SETTINGS=("${CPU_SETTINGS[@]}" "${SMOKE_SETTINGS[@]}")
    if [ -z "$DRY_RUN" ]; then
        [ -f "$MODEL_PATH/config.json" ] || "$PYTHON" -m verl_r3.quickstart.model --out "$MODEL_PATH" \
            --warm-start-steps 0 --max-positions "$SMOKE_MAX_POSITIONS" >/dev/null
        [ -f "$DATA_DIR/train.parquet" ] || "$PYTHON" "$RECIPE_DIR/prepare_data.py" --smoke --out "$DATA_DIR"
    fi
    if [ "$ROLLOUT_ENGINE" = sglang ]; then   # SGLang pins its own torch: its own environment
        PYTHON="$(bash "$RECIPES_DIR/../scripts/sglang_env.sh")/bin/python"
        export PYTHONPATH="$RECIPES_DIR/..${PYTHONPATH:+:$PYTHONPATH}"
    fi
    eval "$("$PYTHON" -m verl_r3.integration.cpu_settings --engine "$ROLLOUT_ENGINE" --env)"
fi

# ---- W&B and verl's metrics file: one project per recipe, one group per launch, job type = variant ----
OUT=$(realpath -m "$OUT")   # Ray actors (verl's trainer among them) do not share this shell's directory
DATA_DIR=$(realpath -m "$DATA_DIR")
case $MODEL_PATH in /* | ./* | ../*) MODEL_PATH=$(realpath -m "$MODEL_PATH") ;; *) [ ! -e "$MODEL_PATH" ] || MODEL_PATH=$(realpath -m "$MODEL_PATH") ;; esac
WANDB_VARS=$("$PYTHON" -m verl_r3.wandb_naming --project "$WANDB_PROJECT" --group "$GROUP" --variant "$VARIANT" --dir "$OUT")
eval "$WANDB_VARS"
export VERL_USE_EXTERNAL_MODULES=verl_r3.integration.activate   # verl_r3 in every verl process
export VERL_FILE_LOGGER_PATH=$OUT/$VARIANT.jsonl

OVERRIDES=(
    "data.train_files=$DATA_DIR/train.parquet"
    "data.val_files=$DATA_DIR/test.parquet"
    "actor_rollout_ref.model.path=$MODEL_PATH"
    "actor_rollout_ref.rollout.name=$ROLLOUT_ENGINE"
    # capture routing in every variant: R3 replays it, the others measure their disagreement with it
    actor_rollout_ref.rollout.enable_rollout_routing_replay=True
    actor_rollout_ref.rollout.calculate_log_probs=True
    "reward.custom_reward_function.path=$RECIPE_DIR/reward.py"
    reward.custom_reward_function.name=compute_score
    "trainer.nnodes=$NNODES"
    "trainer.n_gpus_per_node=$GPUS_PER_NODE"
    "trainer.project_name=$WANDB_PROJECT"
    "trainer.experiment_name=$WANDB_NAME"
    "trainer.default_local_dir=$OUT/checkpoints/$VARIANT"
    "${ALGO[@]}" "${BACKEND[@]}" "${PRESET[@]}" "${RECIPE_SETTINGS[@]}" "${SMOKE_SETTINGS[@]}"
)
[ -z "$STEPS" ] || OVERRIDES+=("trainer.total_training_steps=$STEPS")

# Hydra refuses a key set twice: the last setting of each key wins (the run script's arguments last).
dedupe() {
    local -A seen=()
    local -a kept=()
    local i key
    for ((i = $# ; i >= 1; i--)); do
        key=${!i%%=*}
        key=${key#++}; key=${key#+}; key=${key#\~}
        [ -n "${seen[$key]:-}" ] || { seen[$key]=1; kept=("${!i}" "${kept[@]}"); }
    done
    printf '%s\n' "${kept[@]}"
}
mapfile -t OVERRIDES < <(dedupe "${OVERRIDES[@]}" "$@")

CMD=("$PYTHON" -m verl.trainer.main_ppo --config-path "$RECIPE_DIR/config" --config-name "$CONFIG_NAME"
     "${OVERRIDES[@]}")
[ -z "$TIMEOUT_S" ] || CMD=(timeout --kill-after=30 "$TIMEOUT_S" "${CMD[@]}")

if [ -n "$DRY_RUN" ]; then
    for name in VERL_USE_EXTERNAL_MODULES VERL_PLATFORM VERL_R3_SGLANG_CPU VERL_FILE_LOGGER_PATH; do
        [ -z "${!name:-}" ] || echo "env $name=${!name}"
    done
    printf '%s\n' "${CMD[@]}"
    exit 0
fi
mkdir -p "$OUT"
echo "recipes/$RECIPE: $MODEL $VARIANT engine=$ROLLOUT_ENGINE backend=$TRAIN_BACKEND nodes=$NNODES x $GPUS_PER_NODE" \
     "${SMOKE:+SMOKE }out=$OUT" >&2
exec "${CMD[@]}"
