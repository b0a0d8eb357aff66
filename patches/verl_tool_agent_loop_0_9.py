"""Patch: per-turn routing stitching in verl's multi-turn ``ToolAgentLoop`` (verl 0.9.x).

What it patches
    ``ToolAgentLoop._handle_generating_state`` in ``verl.experimental.agent_loop.tool_agent_loop``
    (verl 0.9.1): the coroutine that sends one assistant turn to the rollout engine and stores
    the engine's ``TokenOutput.routed_experts`` in ``agent_data.routed_experts``. The replacement
    runs verl's coroutine unchanged and then rewrites only ``agent_data.routed_experts``.

Why
    verl stores each turn's engine routing by replacing the previous one
    (``agent_data.routed_experts = output.routed_experts``). The engine of turn ``t`` returns rows
    for the whole sequence it was given, so after the last turn every earlier assistant token
    carries the routing the last turn's *prefill* computed for it (in another batch, possibly
    with newer weights in asynchronous training), not the routing it was generated with. R3
    would then replay routing that the rollout never used for those tokens, and the rollout
    log-probs (kept per turn by verl) and the routing would describe different computations.

    The replacement keeps the rows recorded by earlier turns and appends only the rows the new
    turn adds (see ``stitch_turn``): every generated token keeps the routing of the forward that
    consumed it when it was decoded, and every prompt or tool token the routing of the turn that
    first prefilled it. Rows follow the contract of ``verl_r3.core.record``: row ``i`` is the
    routing of input position ``i``; a turn of ``P`` prompt and ``g`` generated tokens ends at row
    ``P + g - 1``.

    Engine outputs come in two forms, told apart by their row count:
    * whole sequence, rows ``[0, P + g - 1)``: verl 0.9's vLLM and SGLang servers, the ``hf``
      engine of verl_r3, and verl's ``FullyAsyncLLMServerClient`` after a partial-rollout resume
      (it already keeps the first attempt's rows and appends only the resumed tokens' rows, so the
      turn arrives here as one whole-sequence output without a repeated prefix). The rows before
      the previous turn's end are dropped;
    * from an offset ``s``, rows ``[s, P + g - 1)`` (SGLang with ``routed_experts_start_len``):
      ``s`` must equal the number of rows already recorded; an overlap or a gap raises
      ``ValueError`` naming the request and turn.
    If a later turn's prompt no longer starts with the tokens of the earlier turns (a chat
    template builder that trimmed boundary tokens), the rows of the changed tokens are not kept:
    they described tokens that are no longer in the sequence, and the new turn's rows replace
    them. A turn that generated tokens without routing after turns that returned routing raises.
    Without routing (``enable_rollout_routing_replay`` off) nothing changes: verl's coroutine
    runs exactly as before.

Upstream reference
    verl 0.9.1, ``verl/experimental/agent_loop/tool_agent_loop.py``,
    ``ToolAgentLoop._handle_generating_state`` (``if output.routed_experts is not None:
    agent_data.routed_experts = output.routed_experts``); the partial-rollout merge in
    ``verl/workers/rollout/llm_server.py``, ``FullyAsyncLLMServerClient.generate``.

Versions tested
    verl 0.9.1 with torch 2.13.0 (CPU build), transformers 5.19.

Remove when
    verl's ``ToolAgentLoop`` keeps the routing of earlier turns and appends each turn's new rows
    (for example by passing ``routed_experts_start_len`` to SGLang and slicing vLLM's output).

Applied by ``verl_r3.integration.activate`` in every verl process, never on import of this module.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging

import numpy as np

from verl_r3.patches._window import check_window, installed_version

logger = logging.getLogger(__name__)

SUPPORTED = ">=0.9.0,<0.10.0"
#: The module patched (``verl_r3.integration.activate`` applies the patch when verl imports it).
TARGET_MODULE = "verl.experimental.agent_loop.tool_agent_loop"
_CLASS = "ToolAgentLoop"
_METHOD = "_handle_generating_state"
# AgentData attribute holding the token ids the recorded rows belong to (verl itself stores
# private per-trajectory state on AgentData the same way, e.g. ``_active_tools``).
_TOKENS_ATTR = "_r3_routed_token_ids"

_original: list = []  # [verl's coroutine function] while applied


def installed_verl_version() -> str | None:
    return installed_version("verl")


def check_version() -> str:
    """Return the installed verl version, or raise RuntimeError if it is outside the window."""
    return check_window(
        "verl_tool_agent_loop_0_9", "verl", installed_verl_version(), SUPPORTED,
        f"check whether {TARGET_MODULE}.{_CLASS}.{_METHOD} still replaces agent_data.routed_experts with each "
        "turn's output and add a patch module for its version window if it does",
    )


def _as_rows(routed, where: str) -> np.ndarray:
    if hasattr(routed, "detach"):  # torch.Tensor
        routed = routed.detach().cpu().numpy()
    rows = np.asarray(routed)
    if rows.ndim != 3:
        raise ValueError(f"{where}: routed_experts must be [rows, layers, top_k], got shape {rows.shape}")
    return rows


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def stitch_turn(recorded, recorded_token_ids, prompt_ids, token_ids, turn_rows, *, sample: str) -> np.ndarray:
    """Routing of one conversation after a turn: earlier rows kept, the turn's new rows appended.

    ``recorded`` are the rows kept so far (``[E, L, K]`` or None before the first routed turn);
    they belong to positions ``[0, E)`` of ``recorded_token_ids``. The turn fed ``prompt_ids``
    (``P`` tokens) and generated ``token_ids`` (``g``); ``turn_rows`` is what the engine returned
    for it, ending at row ``P + g - 1`` (``P - 1`` or ``P`` when ``g == 0``). Returns rows
    ``[0, P + g - 1)``. ``sample`` names the conversation in errors.
    """
    rows = _as_rows(turn_rows, sample)
    P, g, R = len(prompt_ids), len(token_ids), rows.shape[0]
    end = P + g - 1 if g else (P if R == P else P - 1)
    if R > end:
        raise ValueError(
            f"{sample}: the engine returned {R} routing rows for {P} prompt + {g} generated tokens; "
            f"at most {end} can exist (one per token fed to the model)"
        )
    start = end - R
    keep = 0
    if recorded is not None:
        recorded = _as_rows(recorded, sample)
        if recorded.shape[1:] != rows.shape[1:]:
            raise ValueError(
                f"{sample}: turn routing has (layers, top_k)={tuple(rows.shape[1:])} but earlier turns "
                f"recorded {tuple(recorded.shape[1:])}"
            )
        # Rows stay only where the prompt still holds the tokens they were recorded for.
        keep = min(recorded.shape[0], _common_prefix(list(recorded_token_ids or ()), list(prompt_ids)))
    if start == 0:
        new = rows[keep:]  # whole-sequence output: rows before `keep` were recorded by earlier turns
    elif start > keep:
        raise ValueError(
            f"{sample}: the turn's routing starts at row {start} but earlier turns recorded rows [0, {keep}) of "
            f"this prompt: rows [{keep}, {start}) have no routing (a gap between turns)"
        )
    elif start < keep:
        raise ValueError(
            f"{sample}: the turn's routing starts at row {start} inside rows [0, {keep}) already recorded by "
            f"earlier turns: rows [{start}, {keep}) would be recorded twice (overlapping turns)"
        )
    else:
        new = rows
    if keep == 0:
        return rows
    return np.concatenate([recorded[:keep], new.astype(recorded.dtype, copy=False)], axis=0)


def _describe(agent_data) -> str:
    return f"request {agent_data.request_id} (assistant turn {agent_data.assistant_turns})"


def _stitching(original):
    """verl's ``_handle_generating_state`` followed by stitching this turn's routing onto the earlier turns'."""

    @functools.wraps(original)
    async def _handle_generating_state(self, agent_data, sampling_params, *args, **kwargs):
        recorded = agent_data.routed_experts
        prompt_ids = list(agent_data.prompt_ids)
        # verl assigns routed_experts only when the engine returned routing; None tells the two apart.
        agent_data.routed_experts = None
        try:
            state = await original(self, agent_data, sampling_params, *args, **kwargs)
        except BaseException:
            if agent_data.routed_experts is None:
                agent_data.routed_experts = recorded
            raise
        turn_rows = agent_data.routed_experts
        if turn_rows is None:
            agent_data.routed_experts = recorded
            if recorded is not None and agent_data.response_ids:
                raise ValueError(
                    f"{_describe(agent_data)}: the engine generated {len(agent_data.response_ids)} tokens without "
                    "routing after earlier turns returned routing; their rows would be missing"
                )
            return state
        agent_data.routed_experts = stitch_turn(
            recorded, getattr(agent_data, _TOKENS_ATTR, None), prompt_ids, agent_data.response_ids, turn_rows,
            sample=_describe(agent_data),
        )
        setattr(agent_data, _TOKENS_ATTR, prompt_ids + list(agent_data.response_ids))
        return state

    return _handle_generating_state


def is_applied() -> bool:
    return bool(_original)


def apply() -> bool:
    """Install the replacement. Returns True if this call changed anything (idempotent)."""
    if _original:
        return False
    version = check_version()
    cls = getattr(importlib.import_module(TARGET_MODULE), _CLASS)
    current = cls.__dict__.get(_METHOD)
    if current is None or not inspect.iscoroutinefunction(current):
        raise RuntimeError(
            f"verl_tool_agent_loop_0_9: {TARGET_MODULE}.{_CLASS}.{_METHOD} is missing or not a coroutine"
        )
    try:
        source = inspect.getsource(current)
    except (OSError, TypeError):
        source = None
    if source is not None and "agent_data.routed_experts = output.routed_experts" not in source:
        raise RuntimeError(
            f"verl_tool_agent_loop_0_9: {_CLASS}.{_METHOD} of verl {version} no longer stores the turn's routing "
            "as agent_data.routed_experts = output.routed_experts; the stitching would see nothing"
        )
    _original.append(current)
    setattr(cls, _METHOD, _stitching(current))
    logger.info("verl_tool_agent_loop_0_9: verl %s: %s.%s.%s keeps earlier turns' routing and appends each turn's "
                "new rows", version, TARGET_MODULE, _CLASS, _METHOD)
    return True


def revert() -> bool:
    """Restore verl's coroutine. Idempotent."""
    if not _original:
        return False
    cls = getattr(importlib.import_module(TARGET_MODULE), _CLASS)
    if getattr(cls.__dict__.get(_METHOD), "__wrapped__", None) is _original[0]:
        setattr(cls, _METHOD, _original[0])
    _original.clear()
    logger.info("verl_tool_agent_loop_0_9: restored %s.%s.%s", TARGET_MODULE, _CLASS, _METHOD)
    return True
