"""Router replay (R3 and R2) in verl's FSDP/FSDP2 engine for Hugging Face MoE models.

verl 0.9.x replays routing only in its Megatron and VeOmni engines. ``FSDPReplayEngine``
is verl's own ``FSDPEngineWithLMHead`` with ``verl_r3.RouterReplay`` bound to the model;
with ``router_replay.mode`` (verl's own key on every engine config, e.g.
``actor_rollout_ref.actor.fsdp_config.router_replay.mode``) at ``disabled`` it computes what
verl's engine computes, and only measures: the rollout-vs-trainer mismatch of every
micro-batch is counted for the step's ``r3/`` metrics (``verl_r3.integration.step_metrics``),
in every mode, from the forward it runs anyway.

Phases, decided per ``forward_backward_batch`` call
    R3, forward-only (old log-probs) and training (update): replay the batch's
    ``routed_experts`` (the rollout engine's routing).
    R2, forward-only: record the trainer's own routing and return it as
    ``model_output["routed_experts"]`` (one ``[n, L, K]`` row block per sample, nested like
    verl's other outputs); training: replay the batch's ``routed_experts``.

Routing of a micro-batch
    verl carries ``routed_experts`` as a jagged tensor, one ``[n, L, K]`` block per sample over
    its ``n`` valid tokens (``verl_r3.core.record`` for the contract). The row of a sample's
    last token is never routing (engines return ``n - 1`` rows and verl zero-fills the last),
    so it is marked missing and that token falls back to native routing (its logits are not
    trained). With ``use_remove_padding`` the blocks are packed like the input ids (plus
    missing rows for verl's static pad); without it they are right-padded with missing rows.
    The blocks arrive as ``uint8`` for models with up to 256 experts
    (``verl_r3.patches.verl_agent_loop_routing_0_9``) or as verl's ``int16``.

    verl splits every field of a call's batch into micro-batch copies before the first forward.
    The routing is taken out of the batch first and kept once; a per-sample index
    (``SAMPLE_INDEX_KEY``) travels through verl's split instead, and each micro-batch's rows are
    copied from the kept routing straight into one dense tensor of ``narrow_dtype`` (``int8`` up to
    128 experts), the only routing allocation of the micro-batch (``verl-r3 bench memory``).

Backward and checkpointing
    verl runs a micro-batch's backward after ``forward_step`` returns, so the replay block
    opened for a micro-batch stays open until the next micro-batch starts or the call ends;
    activation-checkpoint recomputes in that backward replay the same routing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping

import torch

from verl_r3.core.record import MISSING, narrow_dtype
from verl_r3.core.replay import RouterReplay
from verl_r3.integration import step_metrics

__all__ = [
    "RouterReplayEngineMixin",
    "micro_batch_routing",
    "register_replay_engines",
    "replay_engine_class",
    "router_replay_mode",
]

logger = logging.getLogger(__name__)

MODES = ("disabled", "R2", "R3")
#: Field added to the batch while the engine runs: each sample's index into the routing held aside.
SAMPLE_INDEX_KEY = "r3_sample_index"


def _check_jagged(routed_nested) -> None:
    if not (isinstance(routed_nested, torch.Tensor) and routed_nested.is_nested):
        raise ValueError(
            "routed_experts must be verl's jagged (nested) tensor of one [n, layers, top_k] block per sample, "
            f"got {type(routed_nested).__name__}"
        )
    if routed_nested.values().dim() != 3:
        raise ValueError(f"routed_experts blocks must be [n, layers, top_k], got values {tuple(routed_nested.values().shape)}")


def _last_rows(offsets: torch.Tensor) -> torch.Tensor:
    """Row index of each non-empty sample's last token in a jagged tensor's values."""
    lengths = offsets.diff()
    return offsets[1:].to(torch.long)[lengths > 0] - 1


def _layout_like_input(values: torch.Tensor, offsets: torch.Tensor, *, remove_padding: bool, pad_size: int,
                       fill: int, dtype: torch.dtype | None = None, samples: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token ``values`` of a jagged batch laid out like verl's model input for a micro-batch:
    packed into ``[1, total + pad_size, ...]`` with ``use_remove_padding``, else right-padded
    ``[B, T, ...]``; ``fill`` goes in the padding. ``samples``, when given, picks (in order) the
    samples of the jagged batch that form the micro-batch. One allocation of ``dtype`` (default:
    the values'), which the values are cast into as they are copied."""
    dtype = dtype or values.dtype
    offsets = offsets.cpu().to(torch.long)
    starts, lengths = offsets[:-1], offsets.diff()
    if samples is not None:
        picked = samples.cpu().to(torch.long)
        starts, lengths = starts[picked], lengths[picked]
    starts, lengths = starts.tolist(), lengths.tolist()
    tail = values.shape[1:]
    if remove_padding:
        total = sum(lengths)
        out = torch.full((1, total + pad_size, *tail), fill, dtype=dtype, device=values.device)
        if samples is None and starts and starts[0] == 0:
            out[0, :total] = values[:total]  # the micro-batch is the whole jagged batch: one copy
        else:
            pos = 0
            for start, n in zip(starts, lengths):
                out[0, pos:pos + n] = values[start:start + n]
                pos += n
        return out
    out = torch.full((len(lengths), max(lengths, default=0), *tail), fill, dtype=dtype, device=values.device)
    for b, (start, n) in enumerate(zip(starts, lengths)):
        out[b, :n] = values[start:start + n]
    return out


def micro_batch_routing(
    routed_nested: torch.Tensor, input_ids_nested: torch.Tensor, *, remove_padding: bool, pad_size: int = 0,
    moe_layers: Collection[int] | None = None, samples: torch.Tensor | None = None, dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dense signed ``[B, T, L, K]`` routing laid out like the model input verl builds for a micro-batch.

    ``routed_nested`` holds one ``[n, L, K]`` block per sample: of the micro-batch itself, or,
    with ``samples`` (the micro-batch's sample indices into it), of the whole batch the engine
    was called with, so the routing is never split into per-micro-batch copies. The carried
    blocks (``uint8`` as ``verl_r3.patches.verl_agent_loop_routing_0_9`` stores them, or verl's
    ``int16``) are cast into one tensor of ``dtype`` (default ``int16``, ``int32`` for wider input;
    the engine passes ``narrow_dtype`` of the model, ``int8`` up to 128 experts), the only routing
    allocation of the micro-batch. Each sample's last row is ``MISSING`` (the engine reports none
    for the last token; verl zero-fills it), and so are the rows of layers outside ``moe_layers``
    (dense layers) whatever the engine wrote there: vLLM's capture reports every decoder layer
    and leaves zeros in dense ones."""
    _check_jagged(routed_nested)
    offsets = routed_nested.offsets().cpu().to(torch.long)
    values = routed_nested.values()[int(offsets[0]):]
    offsets = offsets - offsets[0]
    routed_lengths = offsets.diff()
    if samples is not None:
        routed_lengths = routed_lengths[samples.cpu().to(torch.long)]
    lengths = input_ids_nested.offsets().diff().cpu()
    if routed_lengths.shape != lengths.shape or not torch.equal(routed_lengths, lengths):
        bad = (routed_lengths != lengths).nonzero() if routed_lengths.shape == lengths.shape else torch.tensor([0])
        sample = int(bad[0]) if bad.numel() else 0
        raise ValueError(
            f"routed_experts does not fit the batch: sample {sample} has "
            f"{int(routed_lengths[sample]) if sample < routed_lengths.numel() else 'no'} routing rows for "
            f"{int(lengths[sample])} tokens"
        )
    if values.dtype in (torch.uint8, torch.int8, torch.int16):
        widest = torch.int16
    elif values.dtype in (torch.int32, torch.int64, torch.uint16):
        widest = torch.int32
    else:
        raise ValueError(f"routed_experts must hold integers, got {values.dtype}")
    dtype = dtype or widest
    limit = torch.iinfo(dtype).max
    if limit < torch.iinfo(values.dtype).max:  # narrowing: no id may wrap around
        starts = offsets[:-1] if samples is None else offsets[:-1][samples.cpu().to(torch.long)]
        blocks = [(b, start, n) for b, (start, n) in enumerate(zip(starts.tolist(), routed_lengths.tolist())) if n]
        if blocks:  # one maximum per sample, read back once
            peaks = torch.stack([values[start:start + n].amax() for _, start, n in blocks]).tolist()
            over = [(b, peak) for (b, _, _), peak in zip(blocks, peaks) if peak > limit]
            if over:
                b, peak = over[0]
                raise ValueError(
                    f"routed_experts: sample {b} of the micro-batch holds expert id {peak}, more than a model "
                    f"with {limit + 1} or fewer experts has (routing from a different model?)"
                )
    out = _layout_like_input(values, offsets, remove_padding=remove_padding, pad_size=pad_size, fill=MISSING,
                             dtype=dtype, samples=samples)
    rows = out.view(-1, *out.shape[2:])
    mb_offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.to(torch.long).cumsum(0)])
    if remove_padding:
        rows[_last_rows(mb_offsets)] = MISSING
    else:
        width = out.shape[1]
        last = [b * width + n - 1 for b, n in enumerate(lengths.tolist()) if n > 0]
        rows[torch.tensor(last, dtype=torch.long)] = MISSING
    if moe_layers is not None:
        dense = [layer for layer in range(values.shape[1]) if layer not in moe_layers]
        if dense:
            out[:, :, dense] = MISSING
    return out


def router_replay_mode(engine_config) -> str:
    """``router_replay.mode`` of an engine config (a dataclass, or the plain dict Hydra leaves
    when the key was added with ``+``/``++``); unknown values are refused."""
    config = getattr(engine_config, "router_replay", None)
    if config is None:
        mode = "disabled"
    elif isinstance(config, Mapping):
        mode = config.get("mode", "disabled")
    else:
        mode = getattr(config, "mode", "disabled")
    if mode not in MODES:
        raise ValueError(f"router_replay.mode must be one of {MODES}, got {mode!r}")
    return mode


class RouterReplayEngineMixin:
    """Mixed in before verl's FSDP engine class; see the module docstring."""

    def _router_replay_mode(self) -> str:
        return router_replay_mode(self.engine_config)

    def initialize(self):
        super().initialize()
        self._rr = None
        self._rr_phase = None
        self._rr_block = None
        self._rr_observe_failed = False
        self.router_replay_stats = {}
        mode = self._router_replay_mode()
        if getattr(self.engine_config, "forward_only", False):
            # verl builds the reference model as a forward-only engine: it never replays.
            if mode != "disabled":
                logger.warning("router_replay.mode=%s ignored on a forward-only (reference) engine: the reference "
                               "model never replays", mode)
            self._rr_mode = "disabled"
            self._rr_reference = True
            return
        self._rr_mode = mode
        self._rr_reference = False
        if mode != "disabled":
            self._rr = RouterReplay(self.module)

    def _phase(self, data, forward_only: bool) -> str | None:
        mode = self._rr_mode
        has_routing = "routed_experts" in data.keys()
        if mode == "disabled":
            # Measure only: the trainer's own routing against the rollout's, nothing replayed.
            if has_routing and not self._rr_reference and self._observer() is not None:
                return "observe"
            return None
        if mode == "R2" and forward_only:
            return "record"
        if not has_routing:
            raise ValueError(
                f"router_replay.mode={mode} but the batch carries no routed_experts: "
                + (
                    "R3 needs actor_rollout_ref.rollout.enable_rollout_routing_replay=True and a rollout engine that "
                    "returns routing (verl_r3 capture for vLLM/SGLang, or the hf rollout)"
                    if mode == "R3"
                    else "R2 replays the routing recorded by compute_log_prob; run it before update_actor"
                )
            )
        return "replay"

    def _observer(self) -> RouterReplay | None:
        if self._rr is None and not self._rr_observe_failed:
            try:
                self._rr = RouterReplay(self.module)
            except (ValueError, TypeError, RuntimeError) as exc:
                self._rr_observe_failed = True
                logger.warning("router disagreement not measured: %s", exc)
        return self._rr

    def _close_block(self) -> None:
        block, self._rr_block = self._rr_block, None
        if block is not None:
            block.__exit__(None, None, None)
            for key, value in self._rr.stats.items():
                if isinstance(value, int):
                    self.router_replay_stats[key] = self.router_replay_stats.get(key, 0) + value

    def forward_backward_batch(self, data, loss_function, forward_only=False):
        # Counts of RouterReplay.stats summed over this call's micro-batches (forwards,
        # replayed, fallback, disagree, recomputed for replay; forwards, recorded for record).
        self.router_replay_stats = {}
        self._rr_phase = self._phase(data, forward_only)
        self._rr_routing = None
        if self._rr_phase in ("replay", "observe"):
            # verl splits every field of the batch into micro-batch copies before the first forward;
            # the routing stays here once and each micro-batch's rows are cut from it by sample index.
            self._rr_routing = data["routed_experts"]
            data = data.exclude("routed_experts")
            data[SAMPLE_INDEX_KEY] = torch.arange(len(data), device=self._rr_routing.values().device)
        try:
            return super().forward_backward_batch(data, loss_function, forward_only)
        finally:
            self._close_block()
            self._rr_phase = None
            self._rr_routing = None

    def forward_step(self, micro_batch, loss_function, forward_only):
        self._close_block()  # the previous micro-batch's backward has run by now
        phase = self._rr_phase
        if phase is None:
            loss, output = super().forward_step(micro_batch, loss_function, forward_only)
            if not self._rr_reference:
                started = time.perf_counter()
                self._add_stats(output, forward_only, self._logprob_stats(micro_batch, output), started)
            return loss, output
        from verl.utils import tensordict_utils as tu

        if getattr(self, "use_ulysses_sp", False):
            raise ValueError("router replay with Ulysses sequence parallelism is not supported yet")
        remove_padding = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)
        pad_size = self._get_packed_pad_size(int(micro_batch["input_ids"].offsets()[-1])) if remove_padding else 0
        routed = None
        if phase != "record":
            samples = micro_batch[SAMPLE_INDEX_KEY]
            routed = micro_batch_routing(self._rr_routing, micro_batch["input_ids"], remove_padding=remove_padding,
                                         pad_size=pad_size, moe_layers=self._rr.moe_layers, samples=samples,
                                         dtype=narrow_dtype(self._rr.num_experts))
        if phase == "replay":
            self._rr_block = self._rr.replay(routed)
        else:
            self._rr_block = self._rr.record()
        handle = self._rr_block.__enter__()
        loss, output = super().forward_step(micro_batch, loss_function, forward_only)
        started = time.perf_counter()
        stats = self._logprob_stats(micro_batch, output)
        if phase == "record":
            output.setdefault("model_output", {})["routed_experts"] = _per_sample(
                handle.routed_experts, micro_batch["input_ids"], remove_padding=remove_padding
            )
        else:
            native = handle.native_experts if phase == "replay" else handle.routed_experts
            used = None if phase == "replay" else native  # None: replayed rows, native where missing
            mask = _layout_like_input(_response_rows(micro_batch), micro_batch["input_ids"].offsets(),
                                      remove_padding=remove_padding, pad_size=pad_size, fill=0)
            stats.update(step_metrics.routing_stats(routed, native, used, mask.to(routed.device), self._rr.moe_layers,
                                                    replayed=phase == "replay"))
            carried = self._rr_routing.values()
            tokens = int(micro_batch["input_ids"].offsets()[-1] - micro_batch["input_ids"].offsets()[0])
            stats["routing_bytes"] = float(tokens * carried[0].numel() * carried.element_size())
            stats["routing_tokens"] = float(tokens)
        self._add_stats(output, forward_only, stats, started)
        return loss, output

    @staticmethod
    def _logprob_stats(micro_batch, output) -> dict:
        log_probs = output.get("model_output", {}).get("log_probs")
        return {} if log_probs is None else step_metrics.logprob_stats(micro_batch, log_probs)

    def _add_stats(self, output, forward_only: bool, stats: dict, started: float) -> None:
        """Counts for the step's ``r3/`` metrics (``verl_r3.integration.step_metrics``); nothing when
        there is nothing to count (no rollout log-probs and no routing)."""
        if not stats:
            return
        step_metrics.add_stats(output, phase="infer" if forward_only else "update", stats=stats,
                               seconds=time.perf_counter() - started, dp_rank=self.get_data_parallel_rank(),
                               dp_size=self.get_data_parallel_size())


def _response_rows(micro_batch) -> torch.Tensor:
    """Per-token 0/1 values over the micro-batch's jagged tokens: response tokens in the response
    mask, each sample's last token excluded (the rollout reports no routing for it)."""
    ids = micro_batch["input_ids"]
    resp = micro_batch["response_mask"] if "response_mask" in micro_batch.keys() else micro_batch["loss_mask"]
    resp_rows = list(resp.unbind()) if resp.is_nested else list(resp)
    prompts = micro_batch["prompts"]
    if prompts.is_nested:
        prompt_lens = prompts.offsets().diff().tolist()
    else:
        prompt_lens = micro_batch["attention_mask"][:, : prompts.shape[1]].sum(dim=1).tolist()
    rows = []
    for n, p, r in zip(ids.offsets().diff().tolist(), prompt_lens, resp_rows):
        row = torch.zeros(n, dtype=torch.int32, device=r.device)
        row[p:n] = r[: n - p].to(torch.int32)
        rows.append(row)
    values = torch.cat(rows)
    values[_last_rows(ids.offsets())] = 0
    return values


def _per_sample(routed_BTLK: torch.Tensor, input_ids_nested: torch.Tensor, *, remove_padding: bool) -> torch.Tensor:
    """Recorded ``[B, T, L, K]`` (packed into ``B == 1``, or right-padded) -> jagged blocks per sample."""
    offsets = input_ids_nested.offsets().cpu()
    lengths = offsets.diff().tolist()
    if remove_padding:
        values = routed_BTLK[0, : offsets[-1]]
    else:
        values = torch.cat([routed_BTLK[b, :n] for b, n in enumerate(lengths)])
    return torch.nested.nested_tensor_from_jagged(values.cpu(), offsets=offsets)


_ENGINE_CLASS = None


def replay_engine_class():
    """``FSDPReplayEngine``: verl's ``FSDPEngineWithLMHead`` with router replay (built once, lazily)."""
    global _ENGINE_CLASS
    if _ENGINE_CLASS is None:
        from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

        _ENGINE_CLASS = type("FSDPReplayEngine", (RouterReplayEngineMixin, FSDPEngineWithLMHead), {
            "__doc__": "verl's FSDP/FSDP2 engine with router replay (verl_r3.integration.fsdp_replay).",
            "__module__": __name__,
        })
    return _ENGINE_CLASS


def register_replay_engines(devices=(("cuda", "nvidia"), ("cpu", "cpu"))) -> None:
    """Make verl pick ``FSDPReplayEngine`` for ``language_model`` on fsdp/fsdp2. Idempotent.

    Registered under (device, vendor) keys, which verl's ``EngineRegistry`` prefers to the
    device-only keys its own engine holds; with ``router_replay.mode=disabled`` the engine
    computes what verl's does (and counts the step's ``r3/`` metrics).
    """
    from verl.workers.engine.base import EngineRegistry

    engine = replay_engine_class()
    registry = EngineRegistry._engines.setdefault("language_model", {})
    for device, vendor in devices:
        backends = [b for b in ("fsdp", "fsdp2") if (device, vendor) not in registry.get(b, {})]
        if backends:
            EngineRegistry.register(model_type="language_model", backend=backends, device=device, vendor=vendor)(engine)
