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
    copied from the kept routing straight into one dense tensor of ``replay_dtype``: ``uint8`` with
    zero rows missing when the routing arrives as ``uint8`` (``K >= 2``), else ``narrow_dtype``.
    It is the only routing allocation of the micro-batch, and the trainer's own top-k that
    ``RouterReplay`` keeps shares its dtype (``verl-r3 bench memory``).

Backward and checkpointing
    verl runs a micro-batch's backward after ``forward_step`` returns, so the replay block
    opened for a micro-batch stays open until the next micro-batch starts or the call ends;
    activation-checkpoint recomputes in that backward replay the same routing.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Collection, Mapping, Sequence

import torch

from verl_r3.core.record import MISSING, compact_rows, missing_rows, narrow_dtype, zero_rows_missing
from verl_r3.core.replay import RouterReplay
from verl_r3.integration import step_metrics

__all__ = [
    "RouterReplayEngineMixin",
    "micro_batch_routing",
    "row_locator",
    "register_replay_engines",
    "replay_dtype",
    "replay_engine_class",
    "router_replay_mode",
    "router_replay_strict",
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
    labels: Sequence | None = None,
) -> torch.Tensor:
    """Dense ``[B, T, L, K]`` routing laid out like the model input verl builds for a micro-batch.

    ``routed_nested`` holds one ``[n, L, K]`` block per sample: of the micro-batch itself, or,
    with ``samples`` (the micro-batch's sample indices into it), of the whole batch the engine
    was called with, so the routing is never split into per-micro-batch copies. The carried
    blocks (``uint8`` as ``verl_r3.patches.verl_agent_loop_routing_0_9`` stores them, or verl's
    ``int16``) are cast into one tensor of ``dtype`` (default ``int16``, ``int32`` for wider input;
    the engine passes ``replay_dtype``), the only routing allocation of the micro-batch. Each
    sample's last row is missing (the engine reports none for the last token; verl zero-fills it),
    and so is every row whose ``K`` ids are all 0 when ``K >= 2``: verl's agent loop zero-fills the
    rows an engine did not return, and distinct ids make such a row impossible as routing
    (``verl_r3.core.record``, "Routing in verl's batches"). The rows of layers outside ``moe_layers``
    (dense layers) are missing too, whatever the engine wrote there: vLLM's capture reports every
    decoder layer and leaves zeros in dense ones. Missing rows are ``MISSING`` in a signed
    ``dtype`` and zeros in ``uint8`` (which only ``uint8`` blocks may be cast into). Errors name a
    sample by its index in ``routed_nested`` (``labels[index]`` when given)."""
    _check_jagged(routed_nested)
    offsets = routed_nested.offsets().cpu().to(torch.long)
    values = routed_nested.values()[int(offsets[0]):]
    offsets = offsets - offsets[0]
    routed_lengths = offsets.diff()
    if samples is not None:
        routed_lengths = routed_lengths[samples.cpu().to(torch.long)]
    lengths = input_ids_nested.offsets().diff().cpu()
    names = _sample_names(len(routed_lengths), samples, labels)

    def name(b: int) -> str:
        return names[b] if b < len(names) else str(b)

    if routed_lengths.shape != lengths.shape or not torch.equal(routed_lengths, lengths):
        bad = (routed_lengths != lengths).nonzero() if routed_lengths.shape == lengths.shape else torch.tensor([0])
        b = int(bad[0]) if bad.numel() else 0
        raise ValueError(
            f"routed_experts does not fit the batch: sample {name(b)} has "
            f"{int(routed_lengths[b]) if b < routed_lengths.numel() else 'no'} routing rows for "
            f"{int(lengths[b]) if b < lengths.numel() else 'no'} tokens"
        )
    if values.dtype in (torch.uint8, torch.int8, torch.int16):
        widest = torch.int16
    elif values.dtype in (torch.int32, torch.int64, torch.uint16):
        widest = torch.int32
    else:
        raise ValueError(f"routed_experts must hold integers, got {values.dtype}")
    dtype = dtype or widest
    if dtype == torch.uint8 and values.dtype != torch.uint8:
        raise ValueError(f"uint8 replay routing is cut from uint8 blocks only, got {values.dtype} (negative ids or "
                         "-1 rows would wrap around)")
    missing = MISSING if dtype.is_signed else 0
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
                    f"routed_experts: sample {name(b)} holds expert id {peak}, more than a model "
                    f"with {limit + 1} or fewer experts has (routing from a different model?)"
                )
    out = _layout_like_input(values, offsets, remove_padding=remove_padding, pad_size=pad_size, fill=missing,
                             dtype=dtype, samples=samples)
    rows = out.view(-1, *out.shape[2:])
    mb_offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.to(torch.long).cumsum(0)])
    if remove_padding:
        rows[_last_rows(mb_offsets)] = missing
    else:
        width = out.shape[1]
        last = [b * width + n - 1 for b, n in enumerate(lengths.tolist()) if n > 0]
        rows[torch.tensor(last, dtype=torch.long)] = missing
    if dtype.is_signed:
        zero_rows_missing(out)  # rows verl zero-filled (engine returned none); uint8 reads them as missing as they are
    if moe_layers is not None:
        dense = [layer for layer in range(values.shape[1]) if layer not in moe_layers]
        if dense:
            out[:, :, dense] = missing
    return out


def replay_dtype(carried: torch.dtype, num_experts: int, top_k: int) -> torch.dtype:
    """The dtype the engine replays a micro-batch in: ``uint8`` (zero rows missing) when the routing
    arrives as ``uint8`` and ``top_k >= 2``, else ``narrow_dtype`` (``int8`` up to 128 experts)."""
    if carried == torch.uint8 and top_k >= 2 and num_experts <= 256:
        return torch.uint8
    return narrow_dtype(num_experts)


def row_locator(input_ids_nested: torch.Tensor, *, remove_padding: bool, width: int,
                samples: torch.Tensor | None = None, labels: Sequence | None = None):
    """``locate(flat_row) -> (sample, row)`` for the micro-batch layout ``micro_batch_routing``
    builds, so that routing errors name the sample and its own row (``rr.replay(locate=...)``).
    Samples are named as ``micro_batch_routing`` names them; rows past the last sample are
    verl's static pad."""
    lengths = input_ids_nested.offsets().diff().cpu().tolist()
    names = _sample_names(len(lengths), samples, labels)
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)

    def locate(flat_row: int) -> tuple[object, int]:
        if not remove_padding:
            b, t = divmod(flat_row, width)
            return names[b], t
        b = bisect.bisect_right(starts, flat_row) - 1
        if b >= len(names):
            return "(padding)", flat_row - starts[-1]
        return names[b], flat_row - starts[b]

    return locate


def _sample_names(count: int, samples: torch.Tensor | None, labels: Sequence | None) -> list[str]:
    """Names of a micro-batch's ``count`` samples: their index in the call's batch (``samples``, or
    0..count-1), as ``labels`` gives it when given."""
    indices = range(count) if samples is None else samples.cpu().tolist()
    return [str(i if labels is None else labels[i]) for i in indices]


def _router_replay_key(engine_config, key: str, default):
    config = getattr(engine_config, "router_replay", None)
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def router_replay_mode(engine_config) -> str:
    """``router_replay.mode`` of an engine config (a dataclass, or the plain dict Hydra leaves
    when the key was added with ``+``/``++``); unknown values are refused."""
    mode = _router_replay_key(engine_config, "mode", "disabled")
    if mode not in MODES:
        raise ValueError(f"router_replay.mode must be one of {MODES}, got {mode!r}")
    return mode


def router_replay_strict(engine_config) -> bool:
    """``router_replay.strict`` (default True): a step whose replay check fails stops the run;
    False downgrades it to a warning (``verl_r3.integration.step_metrics``)."""
    strict = _router_replay_key(engine_config, "strict", True)
    if not isinstance(strict, bool):
        raise ValueError(f"router_replay.strict must be true or false, got {strict!r}")
    return strict


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
        router_replay_strict(self.engine_config)  # a bad value fails at start, not at the first step check
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

    def _close_block(self, error: BaseException | None = None) -> None:
        block, self._rr_block = self._rr_block, None
        if block is None:
            return
        if error is not None:  # the forward or backward failed: that error is the one to report
            block.__exit__(type(error), error, error.__traceback__)
            return
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
        self._rr_labels = None
        self._rr_fallback = {}  # sample (index in this call's batch) -> its tokens without rollout routing
        if self._rr_phase in ("replay", "observe"):
            # verl splits every field of the batch into micro-batch copies before the first forward;
            # the routing stays here once and each micro-batch's rows are cut from it by sample index.
            self._rr_routing = data["routed_experts"]
            self._rr_labels = _sample_labels(data)
            data = data.exclude("routed_experts")
            data[SAMPLE_INDEX_KEY] = torch.arange(len(data), device=self._rr_routing.values().device)
        try:
            output = super().forward_backward_batch(data, loss_function, forward_only)
        except BaseException as exc:
            self._close_block(exc)
            raise
        else:
            self._close_block()
            self._log_fallback(forward_only, len(data))
            return output
        finally:
            self._rr_phase = None
            self._rr_routing = None
            self._rr_labels = None

    def _log_fallback(self, forward_only: bool, samples: int) -> None:
        """One warning per call naming the samples with tokens that had no rollout routing."""
        if not self._rr_fallback:
            return
        named = sorted(self._rr_fallback.items())
        labels = _sample_names(samples, None, self._rr_labels)
        shown = ", ".join(f"{labels[i]}: {n}" for i, n in named[:8]) + (", ..." if len(named) > 8 else "")
        logger.warning(
            "%s: %d of %d samples have tokens without rollout routing (%d tokens); they ran with the trainer's own "
            "routing, the documented fallback (r3/fallback_frac counts it over response tokens). Tokens per "
            "sample: %s",
            "compute_log_prob" if forward_only else "update_actor", len(named), samples,
            sum(n for _, n in named), shown)

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
            dtype = replay_dtype(self._rr_routing.dtype, self._rr.num_experts, self._rr.top_k)
            routed = micro_batch_routing(self._rr_routing, micro_batch["input_ids"], remove_padding=remove_padding,
                                         pad_size=pad_size, moe_layers=self._rr.moe_layers, samples=samples,
                                         dtype=dtype, labels=self._rr_labels)
        if phase == "replay":
            locate = row_locator(micro_batch["input_ids"], remove_padding=remove_padding, width=routed.shape[1],
                                 samples=samples, labels=self._rr_labels)
            self._rr_block = self._rr.replay(routed, locate=locate)
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
                                      remove_padding=remove_padding, pad_size=pad_size, fill=0).to(routed.device)
            replayed_layers = handle.replayed_layers if phase == "replay" else ()
            stats.update(step_metrics.routing_stats(routed, native, used, mask, self._rr.moe_layers,
                                                    replayed_layers=replayed_layers))
            if phase == "replay":  # measuring only, every token runs natively: nothing falls back
                self._count_fallback(routed, micro_batch["input_ids"], samples, remove_padding)
            carried = self._rr_routing.values()
            tokens = int(micro_batch["input_ids"].offsets()[-1] - micro_batch["input_ids"].offsets()[0])
            stats["routing_bytes"] = float(tokens * carried[0].numel() * carried.element_size())
            stats["routing_tokens"] = float(tokens)
        self._add_stats(output, forward_only, stats, started)
        return loss, output

    def _count_fallback(self, routed, input_ids_nested, samples, remove_padding: bool) -> None:
        """Add each sample's tokens without rollout routing in some MoE layer to the call's tally (every
        token but its last, which never has a row). Row chunks bound the temporaries; one read back."""
        moe = sorted(self._rr.moe_layers)
        rows = routed.reshape(-1, *routed.shape[2:])
        every = moe == list(range(rows.shape[1]))
        chunk = max(1, step_metrics._CHUNK_IDS // max(1, rows.shape[1] * rows.shape[2]))
        missing = torch.cat([missing_rows(part if every else part[:, moe]).any(dim=-1) for part in rows.split(chunk)])
        offsets = input_ids_nested.offsets().to(device=missing.device, dtype=torch.long)
        offsets = offsets - offsets[0]
        lengths = offsets.diff()
        if remove_padding:
            running = torch.cat([missing.new_zeros(1, dtype=torch.long), missing.long().cumsum(0)])
            per_sample = running[offsets[1:]] - running[offsets[:-1]]
        else:  # right-padded: positions past a sample's length are padding, not tokens
            valid = torch.arange(routed.shape[1], device=missing.device) < lengths.unsqueeze(1)
            per_sample = (missing.view(routed.shape[:2]) & valid).sum(dim=1)
        per_sample = per_sample - (lengths > 0).long()  # the last token's row: missing by convention
        for index, count in zip(samples.cpu().tolist(), per_sample.tolist()):
            if count:
                self._rr_fallback[index] = self._rr_fallback.get(index, 0) + count

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
    """Recorded ``[B, T, L, K]`` (packed into ``B == 1``, or right-padded) -> jagged blocks per sample,
    carried like the rollout's routing (``compact_rows``: ``uint8`` up to 256 experts). Layers without
    MoE, which the record fills with -1, carry 0 like an engine's; the replay marks them missing."""
    offsets = input_ids_nested.offsets().cpu()
    lengths = offsets.diff().tolist()
    if remove_padding:
        values = routed_BTLK[0, : offsets[-1]]
    else:
        values = torch.cat([routed_BTLK[b, :n] for b, n in enumerate(lengths)])
    values = compact_rows(values.clamp(min=0).cpu())
    return torch.nested.nested_tensor_from_jagged(values, offsets=offsets)


def _sample_labels(data) -> list[str] | None:
    """Names of a call's samples for messages: their index, with verl's ``uid`` when the batch has one."""
    try:
        uids = data.get("uid", None) if hasattr(data, "get") else None
    except (KeyError, RuntimeError, TypeError):
        uids = None
    if uids is None:
        return None
    uids = uids.tolist() if hasattr(uids, "tolist") else list(uids)
    if len(uids) != len(data):
        return None
    return [f"{i} (uid {uid})" for i, uid in enumerate(uids)]


_ENGINE_CLASS = None


def replay_engine_class():
    """``FSDPReplayEngine``: verl's ``FSDPEngineWithLMHead`` with router replay (built once, lazily)."""
    global _ENGINE_CLASS
    if _ENGINE_CLASS is None:
        # With verl_r3 activated, this import may register the engines, building the class first.
        from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
    if _ENGINE_CLASS is None:
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
