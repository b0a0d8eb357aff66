"""Record and replay MoE routing on a Hugging Face model.

Scope
    ``RouterReplay(model)`` binds to one model instance. Inside ``rr.record()`` forwards use
    native routing and the chosen experts are recorded; inside ``rr.replay(routed)`` every MoE
    layer routes each token to the experts in ``routed`` (contract: ``verl_r3.core.record``)
    while the gate weights are recomputed from the trainer's own router scores with the
    family's arithmetic, so the router keeps its gradient. Outside both blocks the model is
    untouched. R3 replays a rollout engine's routing; R2 records in one forward and replays
    in the next.

Lifecycle (explicit state machine, ``Mode``)
    OFF -> RECORD -> OFF and OFF -> REPLAY -> OFF; blocks do not nest. Hooks stay installed
    until ``rr.remove()``; a model carries at most one live ``RouterReplay``.

Indexing
    Each MoE layer is known by identity of its router module and by its absolute decoder
    index (the ``L`` axis of the record). A forward of ``[B, T]`` tokens routes ``B * T``
    rows per layer, in the order of ``routed[:, :, l].reshape(-1, K)``; packed sequences
    (``B == 1``, position ids restarting) need nothing special.

Consumption and checkpointing
    Every MoE layer consumes its targets exactly once per model forward; a layer that is
    skipped (a hub kernel bypassing the router, a module replaced after binding) or called
    twice fails the forward loudly, and a replay block left without any forward of the bound
    model (another instance of the model was called) fails when it closes. A router call
    during backward is an activation checkpoint recompute: inside the block it replays the same
    targets (and is not counted again); after the block it raises, because the native routing
    it would use is not what the saved forward used.

Fallback (the one documented exception to strict replay)
    Rows that are ``MISSING`` in all K slots use the trainer's native top-k for exactly
    that (token, layer). They are counted in ``rr.stats['fallback']``; replayed pairs in
    ``'replayed'``. The native top-k is computed in every replayed forward anyway, so
    ``'disagree'`` and ``'disagree_per_layer'`` give the router disagreement between the
    replayed routing and what the trainer would have chosen.

Malformed routing raises ``ValueError`` before the forward runs.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import importlib
import math
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from verl_r3 import core
from verl_r3.core.metrics import expert_sets_differ
from verl_r3.core.record import MISSING, dense_dtype, missing_rows, validate_routing

__all__ = ["Mode", "RouterFamily", "RouterReplay", "register_family", "registered_families", "routing_dims",
           "supported_families"]

# Legend: B batch, T positions, N = B * T rows routed per layer, L layers, K top-k, E experts.


class RouterFamily:
    """How one model family routes; subclasses are small (see ``verl_r3.families``).

    ``hook`` says where the (weights, indices) pair can be swapped:
    ``"router"``: the router module's forward returns ``(scores, weights_NK, idx_NK)``;
    ``"experts"``: the router returns only scores and the experts module is called as
    ``experts(hidden, idx_NK, weights_NK)`` (selection happens in between).
    """

    model_types: tuple[str, ...] = ()
    hook: str = "router"

    def locate(self, decoder_layer: nn.Module) -> tuple[nn.Module, nn.Module] | None:
        """(router, experts) of a decoder layer, or None for a dense layer."""
        raise NotImplementedError

    def num_experts(self, config) -> int:
        raise NotImplementedError

    def top_k(self, config) -> int:
        return int(config.num_experts_per_tok)

    def gates(self, scores: torch.Tensor, idx_NK: torch.Tensor, config) -> torch.Tensor:
        """Gate weights of the experts ``idx_NK`` from the router's own ``scores``, with the
        family's arithmetic (bit-identical to native when ``idx_NK`` is the native choice)."""
        raise NotImplementedError

    def check_installed(self) -> None:
        """Raise ValueError when the installed library is outside this adapter's window."""


_FAMILIES: dict[str, RouterFamily] = {}
_FAMILY_MODULES_LOCK = threading.RLock()
# Model instance -> its live RouterReplay (weak: a deepcopy of a model is a new, unbound key).
_BOUND: weakref.WeakKeyDictionary[nn.Module, RouterReplay] = weakref.WeakKeyDictionary()


def register_family(family: RouterFamily) -> RouterFamily:
    for model_type in family.model_types:
        _FAMILIES[model_type] = family
    return family


def registered_families() -> dict[str, RouterFamily]:
    """Every registered family by model type, after importing the modules listed in
    ``verl_r3.core.family_modules`` (each once; an import error propagates and the module stays
    listed)."""
    if core.family_modules:
        with _FAMILY_MODULES_LOCK:  # threads of an engine process may look up their first family together
            while core.family_modules:
                name = core.family_modules[0]
                importlib.import_module(name)
                core.family_modules.remove(name)
    return _FAMILIES


def supported_families() -> list[str]:
    return sorted(registered_families())


def routing_dims(config) -> tuple[int, int, int]:
    """``(L, K, E)`` of the routing a supported MoE model config produces: decoder layers, experts
    per token, experts. ValueError for an unsupported family, or for more experts per token than
    the model has (1 <= K <= E)."""
    family = registered_families().get(getattr(config, "model_type", None))
    if family is None:
        raise ValueError(f"model type {getattr(config, 'model_type', None)!r} is not a supported MoE family "
                         f"(supported: {', '.join(supported_families())})")
    top_k, experts = family.top_k(config), family.num_experts(config)
    if not 1 <= top_k <= experts:
        raise ValueError(f"model type {config.model_type!r}: {top_k} experts per token of {experts} experts; a "
                         "router picks between 1 and all of them")
    return int(config.num_hidden_layers), top_k, experts


class Mode(enum.Enum):
    OFF = "off"
    RECORD = "record"
    REPLAY = "replay"


def _in_backward() -> bool:
    # A router call while autograd executes a graph is an activation-checkpoint recompute.
    return torch._C._current_graph_task_id() != -1


@dataclass(eq=False)
class _Layer:
    index: int
    router: nn.Module
    experts: nn.Module
    last_mode: Mode = Mode.OFF  # mode of the last non-recompute forward through this layer
    stash: torch.Tensor | None = None  # scores between router and experts ("experts" hook)


@dataclass
class _Forward:
    """Bookkeeping of one model forward."""

    shape: tuple[int, int] | None
    consumed: set[int] = field(default_factory=set)  # layers routed in this forward
    ids: dict[int, torch.Tensor] = field(default_factory=dict)  # each routed layer's native [B*T, K] (_keep_native)


# Router ids (of all layers) a record block may hold as the routers made them before it lays its
# forwards out without being read: 2**24 ids, 128 MiB of int64.
RECORD_PENDING_IDS = 1 << 24


class RecordHandle:
    """What ``rr.record()`` yields: the routing of the forwards run inside the block.

    A forward's layers are laid out (one stack, one cast to the record dtype) when ``forwards`` or
    ``routed_experts`` is read, not inside the forward, where a tensor operation run between the
    model's own costs far more than the small copy it makes (tens of microseconds each on CPU;
    docs/capture-cost.md, "Where hf's capture cost goes"). Until then the block holds each layer's
    ids as its router made them; at the end of a forward that takes them past
    ``RECORD_PENDING_IDS``, it lays out every forward it holds."""

    def __init__(self, layout) -> None:
        self._layout = layout  # _Forward -> its [B, T, L, K]
        self._pending: list[_Forward] = []
        self._pending_ids = 0
        self._forwards: list[torch.Tensor] = []

    def _add(self, fwd: _Forward) -> None:
        self._pending.append(fwd)
        self._pending_ids += sum(ids.numel() for ids in fwd.ids.values())
        if self._pending_ids > RECORD_PENDING_IDS:
            self._flush()

    def _flush(self) -> None:
        pending, self._pending, self._pending_ids = self._pending, [], 0
        self._forwards.extend(self._layout(fwd) for fwd in pending)

    @property
    def forwards(self) -> list[torch.Tensor]:
        """Each forward's routing, ``[B, T, L, K]`` in the record dtype, in the order they ran."""
        if self._pending:
            self._flush()
        return self._forwards

    @property
    def routed_experts(self) -> torch.Tensor:
        """Routing of the last forward, ``[B, T, L, K]``; dense layers hold -1."""
        if not self.forwards:
            raise RuntimeError("no forward of the bound model ran inside rr.record()")
        return self.forwards[-1]


class ReplayHandle:
    """What ``rr.replay()`` yields."""

    def __init__(self, routed: torch.Tensor) -> None:
        self._routed = routed
        self.native_experts: torch.Tensor | None = None  # trainer's own top-k, last forward, [B, T, L, K], routed's dtype
        self.replayed_layers: frozenset[int] = frozenset()  # MoE layers that routed by `routed`, last forward

    @property
    def used_experts(self) -> torch.Tensor | None:
        """What the experts received in the last forward, ``[B, T, L, K]``: the replayed routing, and
        the native top-k where it was missing (the fallback). Computed when asked (not stored)."""
        native = self.native_experts
        if native is None:
            return None
        routed = self._routed.to(device=native.device)
        return torch.where(missing_rows(routed).unsqueeze(-1), native, routed.to(native.dtype))


class RouterReplay:
    """Record and replay the routing of one Hugging Face MoE model (see the module docstring)."""

    def __init__(self, model: nn.Module, *, validate: bool = True) -> None:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        family = registered_families().get(model_type)
        if family is None:
            raise ValueError(
                f"RouterReplay: model type {model_type!r} is not a supported MoE family "
                f"(supported: {', '.join(supported_families())}); a dense model has nothing to replay"
            )
        family.check_installed()
        if model in _BOUND:
            raise ValueError("RouterReplay: this model already has a RouterReplay bound; call its remove() first")
        self.model = model
        self.config = config
        self.family = family
        self.validate = validate
        self.num_layers = int(config.num_hidden_layers)
        self.top_k = family.top_k(config)
        self.num_experts = family.num_experts(config)
        self._dtype = dense_dtype(self.num_experts)
        self.layers = self._find_layers(model, family, self.num_layers)
        if not self.layers:
            raise ValueError(f"RouterReplay: {model_type} model has no MoE layer (all layers dense)")
        self.moe_layers = frozenset(layer.index for layer in self.layers)
        self.mode = Mode.OFF
        self._routed: torch.Tensor | None = None
        self._forward: _Forward | None = None
        self._handle: RecordHandle | ReplayHandle | None = None
        self._counts = _Counts(Mode.OFF, self.num_layers)
        self._hooks = self._install()
        _BOUND[model] = self

    # -- discovery -----------------------------------------------------------------------
    @staticmethod
    def _find_layers(model: nn.Module, family: RouterFamily, num_layers: int) -> list[_Layer]:
        stacks = [
            m
            for name, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and name.split(".")[-1] == "layers" and len(m) == num_layers
        ]
        if len(stacks) != 1:
            raise ValueError(
                f"RouterReplay: expected one decoder-layer list of length num_hidden_layers={num_layers}, "
                f"found {len(stacks)}"
            )
        layers = []
        for index, decoder_layer in enumerate(stacks[0]):
            found = family.locate(decoder_layer)
            if found is not None:
                layers.append(_Layer(index, *found))
        return layers

    def _install(self) -> list[torch.utils.hooks.RemovableHandle]:
        # Hooks are closures (not bound methods) and check module identity, so a deepcopy of
        # the model shares the functions but is never replayed through this controller.
        model = self.model
        hooks = [
            model.register_forward_pre_hook(
                lambda m, args, kwargs: self._begin_forward(args, kwargs) if m is model else None, with_kwargs=True
            ),
            model.register_forward_hook(lambda m, args, out: self._end_forward() if m is model else None),
        ]
        for layer in self.layers:
            hooks.extend(self._install_layer(layer))
        return hooks

    def _install_layer(self, layer: _Layer) -> list[torch.utils.hooks.RemovableHandle]:
        if self.family.hook == "router":

            def on_router(module, args, out, layer=layer):
                if module is not layer.router:
                    return None
                scores, weights, idx = out
                swapped = self._route(layer, scores, weights, idx)
                return None if swapped is None else (scores, *swapped)

            return [layer.router.register_forward_hook(on_router)]

        def stash_scores(module, args, out, layer=layer):
            if module is layer.router:
                layer.stash = out[0] if isinstance(out, tuple) else out

        def on_experts(module, args, layer=layer):
            if module is not layer.experts:
                return None
            if len(args) != 3:
                raise RuntimeError(
                    f"layer {layer.index}: experts called with {len(args)} positional arguments, "
                    "expected (hidden_states, top_k_index, top_k_weights)"
                )
            hidden, idx, weights = args
            scores, layer.stash = layer.stash, None
            swapped = self._route(layer, scores, weights, idx)
            return None if swapped is None else (hidden, swapped[1], swapped[0])

        return [
            layer.router.register_forward_hook(stash_scores),
            layer.experts.register_forward_pre_hook(on_experts),
        ]

    def remove(self) -> None:
        """Uninstall every hook; the model behaves as if never bound."""
        if self.mode is not Mode.OFF:
            raise RuntimeError(f"RouterReplay.remove() inside a {self.mode.value} block")
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if _BOUND.get(self.model) is self:
            del _BOUND[self.model]

    # -- blocks --------------------------------------------------------------------------
    @contextlib.contextmanager
    def record(self) -> Iterator[RecordHandle]:
        """Forwards inside use native routing; the handle collects ``[B, T, L, K]`` per forward."""
        handle = RecordHandle(functools.partial(self._stack_native, dtype=self._dtype))
        with self._block(Mode.RECORD, handle):
            yield handle

    @contextlib.contextmanager
    def replay(self, routed: torch.Tensor, *, locate=None) -> Iterator[ReplayHandle]:
        """Forwards (and checkpoint recomputes) inside route by ``routed`` ``[B, T, L, K]``.

        ``locate`` (optional) maps a row of the flattened ``[B * T]`` rows to ``(sample, row)``
        for validation errors, e.g. when several sequences are packed into ``B == 1``."""
        if self.mode is not Mode.OFF:
            raise RuntimeError(f"RouterReplay: cannot enter replay inside a {self.mode.value} block")
        if not isinstance(routed, torch.Tensor) or routed.dim() != 4:
            shape = tuple(routed.shape) if isinstance(routed, torch.Tensor) else type(routed).__name__
            raise ValueError(f"rr.replay: routing must be a [batch, positions, layers, top_k] tensor, got {shape}")
        if self.validate:
            validate_routing(
                routed,
                num_layers=self.num_layers,
                top_k=self.top_k,
                num_experts=self.num_experts,
                moe_layers=self.moe_layers,
                what="rr.replay routing",
                locate=locate,
            )
        handle = ReplayHandle(routed)
        self._routed = routed
        try:
            with self._block(Mode.REPLAY, handle):
                yield handle
                if self._counts.forwards == 0:
                    raise RuntimeError(
                        "rr.replay(): no forward of the bound model ran inside the block, so nothing was replayed; "
                        "RouterReplay binds to the model instance it was given (another instance, a copy or a "
                        "submodule was called?)"
                    )
        finally:
            self._routed = None

    @contextlib.contextmanager
    def _block(self, mode: Mode, handle) -> Iterator[None]:
        if self.mode is not Mode.OFF:
            raise RuntimeError(f"RouterReplay: cannot enter {mode.value} inside a {self.mode.value} block")
        if not self._hooks:
            raise RuntimeError("RouterReplay: hooks were removed; bind a new RouterReplay")
        self.mode, self._handle, self._forward = mode, handle, None
        self._counts = _Counts(mode, self.num_layers)
        try:
            yield
        finally:
            self.mode, self._handle, self._forward = Mode.OFF, None, None

    @property
    def stats(self) -> dict:
        """Counts of the last (or current) block, in (token, layer) pairs.

        record: forwards, recorded. replay: forwards, replayed, fallback, disagree (replayed
        pairs whose native expert set differs), disagree_per_layer (fraction per absolute
        layer, nan for layers without MoE or nothing replayed), recomputed (router calls in
        checkpoint recomputes, not counted in the other figures).
        """
        return self._counts.as_dict(self.moe_layers)

    # -- per forward ---------------------------------------------------------------------
    def _begin_forward(self, args, kwargs) -> None:
        if self.mode is Mode.OFF:
            return
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        shape = tuple(ids.shape[:2]) if isinstance(ids, torch.Tensor) and ids.dim() >= 2 else None
        if self.mode is Mode.REPLAY and shape is not None and shape != tuple(self._routed.shape[:2]):
            raise ValueError(
                f"rr.replay: routing covers [batch, positions]={tuple(self._routed.shape[:2])} "
                f"but the forward's input is {shape}"
            )
        self._forward = _Forward(shape)

    def _end_forward(self) -> None:
        fwd, self._forward = self._forward, None
        if self.mode is Mode.OFF or fwd is None:
            return
        unused = [layer.index for layer in self.layers if layer.index not in fwd.consumed]
        if unused:
            raise RuntimeError(
                f"RouterReplay ({self.mode.value}): MoE layers {unused} were not routed through their router "
                "module in this forward (a fused or hub kernel bypassing it, or modules replaced after binding); "
                "replay would be a silent no-op"
            )
        self._counts.forwards += 1
        if self.mode is Mode.RECORD:
            self._handle._add(fwd)
        else:
            self._handle.native_experts = self._stack_native(fwd, self._routed.dtype)
            self._handle.replayed_layers = frozenset(fwd.consumed)

    def _keep_native(self, fwd: _Forward, index: int, idx_NK: torch.Tensor) -> None:
        """Keep a layer's native ``[B*T, K]`` ids for ``_stack_native``. Recording keeps the router's
        tensor as it is (no tensor operation per layer inside the forward; see ``RecordHandle``);
        under replay each layer's ids are converted to the routing's dtype at once (validated to hold
        every id, ``uint8`` included), so a training forward holds one or two bytes per id, not eight."""
        fwd.ids[index] = idx_NK if self.mode is Mode.RECORD else idx_NK.to(self._routed.dtype)

    def _stack_native(self, fwd: _Forward, dtype: torch.dtype) -> torch.Tensor:
        """The forward's native routing ``[B, T, L, K]`` in ``dtype`` (the record dtype, or under replay
        the routing's): one stack of the layers' ids, layers without MoE holding missing rows (-1, or 0
        in an unsigned dtype)."""
        first = next(iter(fwd.ids.values()))
        rows = first.shape[0]
        B, T = fwd.shape or (1, rows)
        if B * T != rows:
            raise RuntimeError(f"RouterReplay: the routers routed {rows} tokens but the forward's input is "
                               f"[batch, positions]={(B, T)}")
        missing = None
        if len(fwd.ids) < self.num_layers:
            missing = torch.full_like(first, MISSING if dtype.is_signed else 0)
        layers = [fwd.ids.get(index, missing) for index in range(self.num_layers)]
        return torch.stack(layers, dim=1).to(dtype).view(B, T, self.num_layers, self.top_k)

    def _layer_targets(self, layer: _Layer, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's replay targets ``[B*T, K]`` (long) and missing rows ``[B*T]``: cut from the routing
        when the layer runs (and again when a checkpoint recomputes it), never cached, so a block holds
        no copy of the routing beyond the caller's tensor."""
        rows = self._routed[:, :, layer.index].reshape(-1, self.top_k).to(device)
        return rows.to(torch.long), missing_rows(rows)

    def _route(self, layer: _Layer, scores, weights, idx_NK):
        """Returns None (keep native) or the swapped ``(weights_NK, idx_NK)``."""
        recompute = _in_backward()
        if self.mode is Mode.OFF:
            if recompute and layer.last_mode is Mode.REPLAY:
                raise RuntimeError(
                    f"layer {layer.index}: backward after leaving rr.replay() recomputes a checkpointed layer "
                    "with native routing; run backward inside the replay block"
                )
            if not recompute:
                layer.last_mode = Mode.OFF
            return None
        fwd = self._forward
        if not recompute:
            if fwd is None:
                raise RuntimeError(
                    f"layer {layer.index}: MoE layer ran outside a forward of the model bound to RouterReplay "
                    "(call that model, not a submodule)"
                )
            if layer.index in fwd.consumed:
                raise RuntimeError(f"layer {layer.index} routed twice in one forward; replay targets are consumed once")
            fwd.consumed.add(layer.index)
            layer.last_mode = self.mode
            self._keep_native(fwd, layer.index, idx_NK)
        else:
            self._counts.recomputed += 1
        if self.mode is Mode.RECORD:
            if not recompute:
                self._counts.recorded += idx_NK.shape[0]
            return None
        targets_NK, missing_N = self._layer_targets(layer, idx_NK.device)
        if targets_NK.shape[0] != idx_NK.shape[0]:
            raise ValueError(
                f"layer {layer.index}: replay routing has {targets_NK.shape[0]} rows per layer but the layer "
                f"routes {idx_NK.shape[0]} tokens"
            )
        chosen_NK = torch.where(missing_N.unsqueeze(-1), idx_NK, targets_NK)
        gates_NK = self.family.gates(scores, chosen_NK, self.config)
        if not recompute:
            self._count_replay(layer.index, idx_NK, targets_NK, missing_N)
        return gates_NK, chosen_NK

    def _count_replay(self, index: int, native_NK, targets_NK, missing_N) -> None:
        # Tensors stay on the device: no host sync per layer; rr.stats converts once.
        counts = self._counts
        if counts.replayed_L is None:
            counts.replayed_L = torch.zeros(self.num_layers, dtype=torch.long, device=native_NK.device)
            counts.fallback_L = torch.zeros_like(counts.replayed_L)
            counts.disagree_L = torch.zeros_like(counts.replayed_L)
        differ_N = expert_sets_differ(native_NK, targets_NK) & ~missing_N
        fallback = missing_N.sum()
        counts.fallback_L[index] += fallback
        counts.replayed_L[index] += missing_N.numel() - fallback
        counts.disagree_L[index] += differ_N.sum()


@dataclass
class _Counts:
    """Counters of one block, in (token, layer) pairs; see RouterReplay.stats."""

    mode: Mode
    num_layers: int
    forwards: int = 0
    recomputed: int = 0
    recorded: int = 0
    replayed_L: torch.Tensor | None = None
    fallback_L: torch.Tensor | None = None
    disagree_L: torch.Tensor | None = None

    def as_dict(self, moe_layers: frozenset[int]) -> dict:
        out = {"forwards": self.forwards, "recomputed": self.recomputed}
        if self.mode is Mode.RECORD:
            out["recorded"] = self.recorded
        elif self.mode is Mode.REPLAY:
            if self.replayed_L is None:
                replayed = fallback = disagree = [0] * self.num_layers
            else:
                replayed, fallback, disagree = (t.tolist() for t in (self.replayed_L, self.fallback_L, self.disagree_L))
            out.update(replayed=sum(replayed), fallback=sum(fallback), disagree=sum(disagree))
            out["disagree_per_layer"] = [
                disagree[i] / replayed[i] if i in moe_layers and replayed[i] else math.nan
                for i in range(self.num_layers)
            ]
        return out
