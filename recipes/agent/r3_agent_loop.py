"""The agent recipe's agent loop: verl's ``ToolAgentLoop`` with a per-turn token budget.

Registered as ``r3_tool_agent`` by ``config/agent_loops.yaml`` (recipe.sh points
``actor_rollout_ref.rollout.agent.agent_loop_config_path`` at it and puts this folder on
``PYTHONPATH``). Everything else is verl's loop, with verl_r3's per-turn routing stitching
(``patches/verl_tool_agent_loop_0_9.py``) applied to it as to verl's own.

Limits of one conversation:
- turns: ``actor_rollout_ref.rollout.multi_turn.max_assistant_turns`` (verl's);
- tokens per assistant turn: ``r3_agent.turn_max_tokens`` of the trainer config, sent as the
  turn's ``max_tokens`` (never more than what is left of ``data.max_response_length``);
- tokens in all: ``data.max_response_length`` (verl's; tool responses count).

``SMOKE_PARSER`` (``r3_smoke_every_turn_is_code``) is for ``SMOKE=1`` only: a random tiny model
writes no tool-call syntax, so this parser reads every assistant turn as the code of a
``python`` call, and the smoke run goes through the sandbox and several turns.
"""

from __future__ import annotations

import json
from typing import Any

from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop
from verl.experimental.agent_loop.tool_parser import FunctionCall, ToolParser

__all__ = ["BudgetedToolAgentLoop", "SMOKE_PARSER"]

SMOKE_PARSER = "r3_smoke_every_turn_is_code"


class BudgetedToolAgentLoop(ToolAgentLoop):
    """``ToolAgentLoop`` whose every assistant turn is capped at ``r3_agent.turn_max_tokens`` tokens."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        settings = self.config.get("r3_agent") or {}
        budget = settings.get("turn_max_tokens")
        self.turn_max_tokens = int(budget) if budget is not None else self.response_length
        if self.turn_max_tokens < 1:
            raise ValueError(f"r3_agent.turn_max_tokens must be >= 1, got {budget!r}")

    async def _handle_generating_state(self, agent_data, sampling_params: dict[str, Any], ignore_termination=False):
        left = self.response_length - len(agent_data.response_mask)
        params = {**sampling_params, "max_tokens": max(1, min(self.turn_max_tokens, left))}
        return await super()._handle_generating_state(agent_data, params, ignore_termination=ignore_termination)


@ToolParser.register(SMOKE_PARSER)
class EveryTurnIsCode(ToolParser):
    """SMOKE only: each assistant turn is one ``python`` call whose code is the turn's text."""

    async def extract_tool_calls(self, responses_ids, tools=None):
        text = self.tokenizer.decode(responses_ids, skip_special_tokens=True)
        return text, [FunctionCall(name="python", arguments=json.dumps({"code": text}))]
