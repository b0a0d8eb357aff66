# The agent recipe's settings, sourced by ../common.sh (after the variant and the model preset).
# RECIPE_SETTINGS: every run. SMOKE_SETTINGS: SMOKE=1 only (on top of verl_r3's CPU settings).
export PYTHONPATH="$RECIPE_DIR${PYTHONPATH:+:$PYTHONPATH}"   # r3_agent_loop, in every verl process
RECIPE_SETTINGS=(
    "actor_rollout_ref.rollout.multi_turn.function_tool_path=$RECIPE_DIR/python_tool.py"
    "actor_rollout_ref.rollout.agent.agent_loop_config_path=$RECIPE_DIR/config/agent_loops.yaml"
)
SMOKE_MAX_POSITIONS=512
SMOKE_SETTINGS=(
    data.train_batch_size=4 actor_rollout_ref.actor.ppo_mini_batch_size=2
    data.max_prompt_length=320 data.max_response_length=160
    r3_agent.turn_max_tokens=16                 # 3 turns of 16 tokens, tool responses between them
    actor_rollout_ref.rollout.multi_turn.max_assistant_turns=3
    actor_rollout_ref.rollout.multi_turn.max_tool_response_length=24
    actor_rollout_ref.rollout.multi_turn.format=r3_smoke_every_turn_is_code
    actor_rollout_ref.rollout.n=2
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=1024
    actor_rollout_ref.actor.optim.lr=1e-4
    algorithm.filter_groups.enable=False
    actor_rollout_ref.actor.entropy_coeff=0.01   # random weights score 0 and GRPO advantages are 0: keeps the update non-zero
    trainer.val_before_train=False trainer.test_freq=-1 trainer.save_freq=-1
)
