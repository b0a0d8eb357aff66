# The math recipe's settings, sourced by ../common.sh (after the variant and the model preset).
# RECIPE_SETTINGS: every run. SMOKE_SETTINGS: SMOKE=1 only (on top of verl_r3's CPU settings).
RECIPE_SETTINGS=()
SMOKE_MAX_POSITIONS=512   # the tiny model's context (tokens are bytes)
SMOKE_SETTINGS=(
    data.train_batch_size=4 actor_rollout_ref.actor.ppo_mini_batch_size=2
    data.max_prompt_length=256 data.max_response_length=32
    actor_rollout_ref.rollout.n=2
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=1024
    actor_rollout_ref.actor.optim.lr=1e-4
    algorithm.filter_groups.enable=False   # random weights: most groups score all 0
    actor_rollout_ref.actor.entropy_coeff=0.01   # random weights score 0 and GRPO advantages are 0: keeps the update non-zero
    trainer.val_before_train=False trainer.test_freq=-1 trainer.save_freq=-1
)
