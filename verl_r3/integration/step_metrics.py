"""The ``r3/`` metrics of every verl step: counted by the FSDP engine, combined by the trainer.

Names and meanings of what is logged: ``verl_r3.keys``.

Scope
    Every verl run with verl_r3 active and the FSDP engine (``FSDPReplayEngine``, whatever
    ``router_replay.mode``) on verl's v1 trainer (``trainer.use_v1``, verl's default). Nothing
    runs an extra forward: the figures come from the forwards ``compute_log_prob`` and
    ``update_actor`` do anyway.

Lifecycle
    1. Worker, per micro-batch (``engine_stats``/``add_stats``): the engine counts what the
       figures need (k3 sums, tokens beyond each tau, routed pairs, differing pairs per layer,
       replayed and missing pairs, routing bytes) and adds each count to verl's metrics as a
       ``Metric`` summed over micro-batches, under ``r3_stats/<phase>/<name>``, ``phase``
       ``infer`` (``compute_log_prob``) or ``update`` (``update_actor``).
    2. Trainer (``patches/verl_trainer_step_metrics_0_9.py`` calls ``Collector``): the counts
       are taken out of the workers' outputs before verl reduces them (verl would average
       them), totalled over micro-batches and data-parallel ranks, and at the end of the step
       turned into the ``r3/`` figures with ``verl_r3.core.metrics``: ratios of totals, so
       exactly the figures of the whole step at once.

Which forward a figure describes
    k3 KL and F(tau) compare the rollout's log-probs with those the loss uses as the
    behaviour policy: ``compute_log_prob``'s (``old_log_probs``) when verl recomputes them,
    else (verl's bypass mode) the update's own forwards. Router disagreement likewise comes
    from ``compute_log_prob`` when it saw rollout routing, else from the update (under R2: the
    routing recorded by ``compute_log_prob`` against the update's own choice).
    ``replay_active_frac``, ``fallback_frac`` and ``routing_bytes_per_token`` count every
    forward of the step.

Data-parallel totals
    verl all-gathers metrics over the data-parallel group; ``compute_log_prob`` returns every
    rank's gathered copy (the first is kept), ``update_actor`` averages each count over the
    ranks (the totals are scaled back by the group size, counted as ``dp_size`` per
    micro-batch over ``micro_batches``). Seconds are rank 0's.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from types import SimpleNamespace

import torch

from verl_r3 import keys
from verl_r3.core.record import MISSING, zero_rows_missing
from verl_r3.core.metrics import (
    DEFAULT_TAUS,
    mismatch_from_sums,
    mismatch_sums,
    routing_from_sums,
    routing_sums,
)

__all__ = [
    "STATS_PREFIX",
    "Collector",
    "add_stats",
    "logprob_stats",
    "phase_problems",
    "replay_problems",
    "replay_settings",
    "routing_stats",
    "step_figures",
]

logger = logging.getLogger(__name__)

#: Prefix of the per-micro-batch counts in verl's metrics (never logged: the trainer takes them out).
STATS_PREFIX = "r3_stats/"
PHASES = ("infer", "update")


# --------------------------------------------------------------------------- worker side


def logprob_stats(micro_batch, log_probs: torch.Tensor) -> dict[str, float]:
    """k3 and F(tau) counts of one micro-batch: rollout log-probs against ``log_probs``, the
    trainer's (verl's per-token output over the whole sequence), over response tokens.
    Empty when the batch carries no rollout log-probs."""
    names = set(micro_batch.keys())
    if "rollout_log_probs" not in names or "response_mask" not in names:
        return {}
    from verl.workers.utils.padding import no_padding_2_padding

    train_BR = no_padding_2_padding(log_probs, micro_batch).float()
    rollout_BR = _padded(micro_batch["rollout_log_probs"], train_BR.shape, 0.0).float()
    mask_BR = _padded(micro_batch["response_mask"], train_BR.shape, 0).bool()
    return mismatch_sums(rollout_BR, train_BR, mask_BR, DEFAULT_TAUS)


def _padded(t: torch.Tensor, shape, fill) -> torch.Tensor:
    """A response-level tensor (jagged, or padded ``[B, R']``) as ``[B, R]``."""
    if t.is_nested:
        return torch.nested.to_padded_tensor(t, padding=fill, output_size=tuple(shape))
    out = t.new_full(tuple(shape), fill)
    width = min(t.shape[1], shape[1])
    out[:, :width] = t[:, :width]
    return out


#: (token, layer, k) ids counted at once by routing_stats: its temporaries stay a few MB.
_CHUNK_IDS = 1 << 18


def routing_stats(routed: torch.Tensor, native: torch.Tensor, used: torch.Tensor | None, token_mask: torch.Tensor,
                  moe_layers, *, replayed_layers=()) -> dict[str, float]:
    """Routing counts of one micro-batch over (response token, MoE layer) pairs.

    ``routed`` is the rollout's routing, ``native`` the trainer's own top-k, ``used`` what the
    experts received (``native`` when nothing is replayed; ``None``: the replayed routing, with
    ``native`` where ``routed`` is missing, as ``rr.replay`` routes), all ``[B, T, L, K]`` over
    every decoder layer, signed or ``uint8`` (zero rows missing); ``token_mask`` ``[B, T]`` selects
    response tokens. ``replayed_layers`` are the MoE layers whose router hook actually routed by
    ``routed`` in the forward
    (``ReplayHandle.replayed_layers``): ``replayed`` counts their pairs with rollout routing, so a
    layer that did not replay shows in the step's check. Per-layer counts are keyed by the
    decoder layer index. Counted in row chunks, so no full-size copy is made."""
    layers = sorted(moe_layers)
    num_layers, k = routed.shape[-2:]
    every_layer = layers == list(range(num_layers))
    rows = [None if t is None else t.reshape(-1, num_layers, k) for t in (routed, native, used)]
    mask = token_mask.bool().reshape(-1)
    chunk = max(1, _CHUNK_IDS // max(1, num_layers * k))
    sums: dict = {}
    for begin in range(0, rows[0].shape[0], chunk):
        r, n, u = (None if t is None else _signed(t[begin:begin + chunk] if every_layer
                                                  else t[begin:begin + chunk, layers])
                   for t in rows)
        if u is None:
            r_n = r.to(n.dtype)
            u = torch.where((r_n == MISSING).all(dim=-1, keepdim=True), n, r_n)
        for key, value in routing_sums(r, n, mask[begin:begin + chunk], used=u).items():
            sums[key] = value if key not in sums else sums[key] + value
    pairs_L = sums["pairs_L"].tolist()
    out = {
        "pairs": float(sum(pairs_L)),
        "differ": float(sums["differ_L"].sum()),
        "differ_used": float(sums["differ_used_L"].sum()),
        "tokens_routed": sums["tokens"],
        "tokens_differ": sums["tokens_differ"],
        "missing": sums["missing"],
        "replayed": float(sum(p for layer, p in zip(layers, pairs_L) if layer in replayed_layers)),
    }
    for layer, p, d in zip(layers, pairs_L, sums["differ_L"].tolist()):
        out[f"pairs_layer/{layer:02d}"] = p
        out[f"differ_layer/{layer:02d}"] = d
    return out


def _signed(rows: torch.Tensor) -> torch.Tensor:
    """A chunk of routing in the signed form ``verl_r3.core.metrics`` reads: ``uint8`` routing's zero
    rows become ``MISSING`` rows (``verl_r3.core.record``)."""
    if rows.dtype != torch.uint8:
        return rows
    return zero_rows_missing(rows.to(torch.int16))


def add_stats(output: dict, *, phase: str, stats: dict[str, float], seconds: float, dp_rank: int,
              dp_size: int) -> None:
    """Add one micro-batch's counts to verl's metrics of ``output`` (summed over micro-batches)."""
    from verl.utils.metric import Metric

    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    metrics = output.setdefault("metrics", {})
    rows = dict(stats, micro_batches=1.0, dp_size=float(dp_size), seconds=seconds if dp_rank == 0 else 0.0)
    for name, value in rows.items():
        metrics[f"{STATS_PREFIX}{phase}/{name}"] = Metric(value=float(value), aggregation="sum")


# --------------------------------------------------------------------------- trainer side


def _total(value) -> float:
    """Sum of every number in verl's metric structures (``Metric``, lists of them, floats)."""
    if hasattr(value, "values") and hasattr(value, "aggregation"):  # verl.utils.metric.Metric
        return float(sum(value.values))
    if isinstance(value, (list, tuple)):
        return sum(_total(v) for v in value)
    return float(value)


def take_stats(metrics: dict) -> dict[str, dict[str, float]]:
    """Remove every ``r3_stats/`` entry from ``metrics``; their totals per phase."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for key in [k for k in metrics if isinstance(k, str) and k.startswith(STATS_PREFIX)]:
        phase, name = key[len(STATS_PREFIX):].split("/", 1)
        out[phase][name] = _total(metrics.pop(key))
    return dict(out)


class Collector:
    """The counts of one trainer's current step; ``figures()`` turns them into ``r3/`` metrics."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.totals: dict[str, dict[str, float]] = {phase: defaultdict(float) for phase in PHASES}
        self.seconds = 0.0

    def _add(self, stats: dict[str, dict[str, float]], *, scale_by_dp: bool) -> None:
        for phase, counts in stats.items():
            if phase not in self.totals:
                raise ValueError(f"unknown phase {phase!r} in {STATS_PREFIX} metrics")
            factor = 1.0
            if scale_by_dp and counts.get("micro_batches"):
                factor = counts["dp_size"] / counts["micro_batches"]  # verl averaged each count over the ranks
            for name, value in counts.items():
                self.totals[phase][name] += value * factor

    def add_infer_output(self, output) -> None:
        """``compute_log_prob``'s output (verl's ``KVBatchMeta``; its ``extra_info["metrics"]`` holds
        one all-gathered copy per returning rank)."""
        extra = getattr(output, "extra_info", None) or {}
        copies = extra.get("metrics")
        if isinstance(copies, dict):
            copies = [copies]
        if not copies:
            return
        first = take_stats(copies[0])
        for other in copies[1:]:
            if isinstance(other, dict):
                take_stats(other)
        self._add(first, scale_by_dp=False)

    def add_update_output(self, output) -> None:
        """``update_actor``'s output (a TensorDict whose ``metrics`` verl reduces next): counts removed."""
        try:
            metrics = output["metrics"]
        except (KeyError, TypeError):
            return
        if isinstance(metrics, dict):
            self._add(take_stats(metrics), scale_by_dp=True)

    def figures(self, step_seconds: float | None) -> dict[str, float]:
        """The step's ``r3/`` figures (see ``verl_r3.keys``); resets the counts."""
        started = time.perf_counter()
        out = step_figures(self.totals["infer"], self.totals["update"])
        seconds = self.totals["infer"].get("seconds", 0.0) + self.totals["update"].get("seconds", 0.0)
        if out:
            seconds += time.perf_counter() - started
            out[keys.METRICS_SECONDS] = seconds
            if step_seconds:
                out[keys.METRICS_TIME_FRAC] = seconds / step_seconds
        self.reset()
        return out


def step_figures(infer: dict[str, float], update: dict[str, float]) -> dict[str, float]:
    """``r3/`` figures from the step's totals of the two phases (see the module docstring)."""
    out: dict[str, float] = {}
    lp = infer if infer.get("tokens") else update
    if lp.get("tokens"):
        mm = mismatch_from_sums({k: v for k, v in lp.items() if k in ("k3_sum", "tokens")
                                 or k.startswith("extreme_count_")})
        out[keys.K3_KL] = mm["k3_kl"]
        for tau in keys.TAUS:
            out[keys.extreme_frac(tau)] = mm[f"extreme_frac_{tau:g}"]

    rt = infer if infer.get("pairs", 0.0) + infer.get("missing", 0.0) > 0 else update
    if rt.get("pairs", 0.0) + rt.get("missing", 0.0) > 0:
        layers = sorted(int(k.split("/")[1]) for k in rt if k.startswith("pairs_layer/"))
        fig = routing_from_sums({
            "pairs_L": [rt[f"pairs_layer/{i:02d}"] for i in layers],
            "differ_L": [rt[f"differ_layer/{i:02d}"] for i in layers],
            "differ_used_L": [rt["differ_used"]],
            "tokens": rt["tokens_routed"], "tokens_differ": rt["tokens_differ"], "missing": rt["missing"],
        })
        out[keys.ROUTER_DISAGREE] = fig["router"]
        out[keys.ROUTER_DISAGREE_TOKEN] = fig["token"]
        out[keys.ROUTER_DISAGREE_LAYERS_PER_TOKEN] = fig["layers_per_token"]
        out[keys.ROUTER_DISAGREE_REPLAYED] = fig["router_used"]
        for layer, value in zip(layers, fig["per_layer"]):
            if not math.isnan(value):
                out[keys.router_disagree_layer(layer)] = value

    both = [infer, update]
    selected = sum(p.get("pairs", 0.0) + p.get("missing", 0.0) for p in both)
    if selected:
        out[keys.REPLAY_ACTIVE_FRAC] = sum(p.get("replayed", 0.0) for p in both) / selected
        out[keys.FALLBACK_FRAC] = sum(p.get("missing", 0.0) for p in both) / selected
    routing_tokens = sum(p.get("routing_tokens", 0.0) for p in both)
    if routing_tokens:
        out[keys.ROUTING_BYTES_PER_TOKEN] = sum(p.get("routing_bytes", 0.0) for p in both) / routing_tokens
    return out


# --------------------------------------------------------------------------- the replay check


def replay_problems(mode: str, infer: dict[str, float], update: dict[str, float]) -> list[str]:
    """What a step's totals say went wrong with replay under ``router_replay.mode`` (empty: the
    step replayed as configured).

    The phases that must replay: ``update_actor`` under R3 and R2, and ``compute_log_prob`` under
    R3 when verl ran it through the FSDP engine. In each, every (response token, MoE layer) pair
    with rollout routing must have been routed by it, counted from the layers whose replay hook
    actually ran (so ``replay_active_frac == 1 - fallback_frac``), and not every pair may have
    fallen back (no sample carried routing). A phase with no counts at all did not run in
    ``FSDPReplayEngine``: replay was never installed.
    """
    if mode == "disabled":
        return []
    problems = phase_problems("update_actor", update)
    if mode == "R3" and infer.get("micro_batches"):
        problems = phase_problems("compute_log_prob", infer) + problems
    return problems


def phase_problems(call: str, totals: dict[str, float]) -> list[str]:
    """What the totals of one replaying call (``compute_log_prob`` or ``update_actor``) say went
    wrong (see ``replay_problems``)."""
    pairs, missing, replayed = totals.get("pairs", 0.0), totals.get("missing", 0.0), totals.get("replayed", 0.0)
    if not totals.get("micro_batches"):
        return [f"{call} reported no r3 counts, so its forwards did not run in verl_r3's FSDPReplayEngine and "
                "nothing was replayed (it needs actor strategy fsdp or fsdp2 and VERL_USE_EXTERNAL_MODULES="
                "verl_r3.integration.activate in every verl process)"]
    if pairs + missing == 0:
        return [f"{call}: no (response token, MoE layer) pair carried routing to replay"]
    if pairs == 0:
        return [f"{call}: all {missing:.0f} (response token, MoE layer) pairs fell back to the trainer's own "
                "routing: no sample carried rollout routing"]
    if abs(replayed - pairs) > 1e-6 * pairs:
        return [f"{call}: {replayed:.0f} of {pairs:.0f} (response token, MoE layer) pairs with rollout routing were "
                f"replayed (replay_active_frac {replayed / (pairs + missing):.6f}, expected 1 - fallback_frac = "
                f"{pairs / (pairs + missing):.6f}): MoE layers ran without replay"]
    return []


def replay_settings(config) -> tuple[str, bool]:
    """``(router_replay.mode, router_replay.strict)`` of the actor in a verl trainer config; the
    mode is ``disabled`` for actors that do not run verl_r3's engine (Megatron, VeOmni)."""
    from verl_r3.integration.fsdp_replay import router_replay_mode, router_replay_strict

    actor = config.actor_rollout_ref.actor
    if actor.get("strategy", None) not in ("fsdp", "fsdp2"):
        return "disabled", True
    engine = SimpleNamespace(router_replay=(actor.get("fsdp_config", None) or {}).get("router_replay", None))
    return router_replay_mode(engine), router_replay_strict(engine)


# --------------------------------------------------------------------------- activation


class TrainerHooks:
    """What ``patches/verl_trainer_step_metrics_0_9`` calls: one ``Collector`` per trainer."""

    @staticmethod
    def _collector(trainer) -> Collector:
        collector = trainer.__dict__.get("_verl_r3_collector")
        if collector is None:
            collector = trainer.__dict__["_verl_r3_collector"] = Collector()
        return collector

    def infer_output(self, trainer, output) -> None:
        self._collector(trainer).add_infer_output(output)

    def update_output(self, trainer, output) -> None:
        self._collector(trainer).add_update_output(output)

    def step_failed(self, trainer, error: BaseException) -> None:
        """A training step raised ``error``: name rollout servers that died (``rollout_health``)."""
        from verl_r3.integration.rollout_health import explain_step_failure

        explain_step_failure(trainer, error)

    def step_end(self, trainer, metrics: dict, timing_raw: dict) -> None:
        """Add the step's ``r3/`` figures, warn about fallback, and run the replay check (an error
        unless ``router_replay.strict`` is false, then a warning)."""
        collector = self._collector(trainer)
        mode, strict = replay_settings(trainer.config)
        problems = replay_problems(mode, collector.totals["infer"], collector.totals["update"])
        figures = collector.figures(timing_raw.get("step"))
        metrics.update(figures)
        step = getattr(trainer, "global_steps", None)
        if figures.get(keys.FALLBACK_FRAC):
            logger.warning("step %s: %s=%.4g: (response token, MoE layer) pairs without rollout routing ran with the "
                           "trainer's own routing (the documented fallback)", step, keys.FALLBACK_FRAC,
                           figures[keys.FALLBACK_FRAC])
        if problems:
            message = f"verl_r3 replay check, step {step}, router_replay.mode={mode}: " + "; ".join(problems)
            if strict:
                raise RuntimeError(message + ". Set router_replay.strict=False to log this as a warning instead")
            logger.warning(message)


TRAINER_MODULE = "verl.trainer.ppo.v1.trainer_base"


def install() -> None:
    """Apply the trainer patch now if verl's v1 trainer is imported, else as soon as it is."""
    from verl_r3.integration.import_hooks import when_imported

    when_imported(TRAINER_MODULE, _apply)


def _apply(_module) -> None:
    from verl_r3.patches import verl_trainer_step_metrics_0_9

    verl_trainer_step_metrics_0_9.apply(TrainerHooks())
