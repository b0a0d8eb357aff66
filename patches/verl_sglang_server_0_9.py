"""Patch: verl 0.9.x's SGLang rollout server against SGLang 0.5.23's interfaces.

What it patches (verl 0.9.1, package ``verl.workers.rollout.sglang_rollout``)
    1. ``async_sglang_server.dataclasses``: the module's binding of ``dataclasses``, replaced by a
       namespace whose ``fields()`` also lists the fields of a msgspec ``Struct``.
    2. ``http_server_engine.AsyncHttpServerAdapter``: the methods ``begin_weight_update`` and
       ``end_weight_update`` (POST to SGLang's endpoints of the same names), which makes the
       class instantiable again.
    3. ``sglang_rollout.ServerAdapter.update_weights``: wrapped in one weight-update session
       (begin before the first bucket, end after the last) on the server's TP leader.
    4. ``async_sglang_server.SGLangHttpServer.launch_server``: with routing replay it sets
       ``VERL_R3_SGLANG_COMPACT_ROUTING=1`` (unless already set) before SGLang starts its
       processes, whose verl_r3 plugin then keeps and sends routing compact
       (``sglang_compact_routing_0_5``). After launch, the server's
       ``tokenizer_manager.generate_request`` (that instance only) turns
       ``meta_info["routed_experts"]`` from SGLang's base64 string into the tensor
       ``[rows, num_hidden_layers, num_experts_per_tok]`` verl reads, in the dtype vLLM returns
       routing in (``uint8`` up to 256 experts, ``uint16`` above; zeros where a layer has no
       MoE, as SGLang leaves them), so that it leaves the server at one byte per id for most
       models rather than SGLang's four. The rows must be the output's (prompt + completion - 1);
       the width of an id follows from them. With routing replay and ``skip_tokenizer_init=False``
       it refuses to launch (``ValueError``): verl's reader on that path imports a module
       SGLang 0.5.23 no longer has.

Why
    verl 0.9.1 was written against SGLang 0.5.12; SGLang 0.5.23 (the release that runs on the
    CPU, see ``verl_r3.patches.sglang_cpu_0_5``) changed four things verl relies on:
    1. ``ServerArgs`` is a msgspec ``Struct``, not a dataclass: ``launch_server`` raises
       ``TypeError: must be called with a dataclass type or instance``.
    2. ``EngineBase`` gained the abstract methods ``begin_weight_update``/``end_weight_update``:
       ``AsyncHttpServerAdapter`` cannot be instantiated (``TypeError: Can't instantiate
       abstract class``), so no weight sync starts.
    3. Weight updates must run inside such a session (``sglang.srt.weight_sync.utils``).
    4. ``meta_info["routed_experts"]`` is base64 of little-endian int32 (the format
       ``verl_r3.core.formats.from_sglang`` reads); verl calls ``.numpy()`` on it
       (``AttributeError: 'str' object has no attribute 'numpy'``) with skip_tokenizer_init, and
       imports ``sglang.srt.layers.moe.routed_experts_capturer``, which 0.5.23 no longer has,
       without.

Upstream reference
    verl 0.9.1: ``verl/workers/rollout/sglang_rollout/async_sglang_server.py``
    (``SGLangHttpServer.launch_server``, ``generate``), ``http_server_engine.py``
    (``AsyncHttpServerAdapter``), ``sglang_rollout.py`` (``ServerAdapter.update_weights``);
    sglang 0.5.23: ``srt/server_args.py``, ``srt/entrypoints/EngineBase.py``,
    ``srt/entrypoints/http_server.py`` (``/begin_weight_update``, ``/end_weight_update``).

Versions tested
    verl 0.9.1 with sglang 0.5.23 (torch 2.14.1, CPU): ``main_ppo`` with
    ``actor_rollout_ref.rollout.name=sglang`` and R3, weights synced every step.

Remove when
    verl supports SGLang 0.5.23's interfaces (or verl_r3 moves to a verl that does).

Importing verl's SGLang modules imports SGLang: apply only where verl's SGLang rollout is used.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import types
import warnings

from verl_r3.patches._window import check_window, installed_version

logger = logging.getLogger(__name__)

SUPPORTED_VERL = ">=0.9.0,<0.10.0"
SUPPORTED_SGLANG = ">=0.5.23,<0.6.0"
_PKG = "verl.workers.rollout.sglang_rollout"

_originals: dict[str, object] = {}  # what apply() replaced, for revert(); empty = not applied


def check_version() -> tuple[str, str]:
    """Return (verl, sglang) versions, or raise RuntimeError if either is outside its window."""
    hint = "check verl's SGLang server against that SGLang and add a patch module for the pair if it still breaks"
    return (check_window("verl_sglang_server_0_9", "verl", installed_version("verl"), SUPPORTED_VERL, hint),
            check_window("verl_sglang_server_0_9", "sglang", installed_version("sglang"), SUPPORTED_SGLANG, hint))


def _fields(cls_or_instance):
    """``dataclasses.fields`` that also accepts a msgspec Struct (objects with a ``.name``)."""
    names = getattr(cls_or_instance, "__struct_fields__", None)
    if names is not None:
        return tuple(types.SimpleNamespace(name=name) for name in names)
    return dataclasses.fields(cls_or_instance)


_DATACLASSES = types.SimpleNamespace(**{name: getattr(dataclasses, name) for name in dataclasses.__all__})
_DATACLASSES.fields = _fields


async def _begin_weight_update(self, selector: str = "all"):
    return await self._make_async_request("begin_weight_update", {"selector": selector})


async def _end_weight_update(self):
    return await self._make_async_request("end_weight_update", {})


async def _update_weights(self, weights, *args, **kwargs):
    """verl's ``ServerAdapter.update_weights`` inside one SGLang weight-update session."""
    await self._init_server_adapter()
    leader = self._engine is not None and self._is_server_tp_leader()
    if leader:
        await self._engine.begin_weight_update()
    try:
        return await _originals["update_weights"](self, weights, *args, **kwargs)
    finally:
        if leader:
            await self._engine.end_weight_update()


COMPACT_FLAG = "VERL_R3_SGLANG_COMPACT_ROUTING"  # verl_r3.engines.sglang_engine.COMPACT_FLAG


def decode_routed_experts(meta_info: dict, num_layers: int, top_k: int, num_experts: int | None = None, *,
                          start: int = 0) -> torch.dtype | None:
    """Replace SGLang's base64 ``meta_info["routed_experts"]`` by a tensor ``[rows, L, K]``, in place,
    and return the dtype it arrived in (None when there was nothing to decode).

    ``rows`` comes from ``meta_info``'s token counts and ``start`` (the request's
    ``routed_experts_start_len``); a payload of another length raises ``ValueError`` naming the
    request. The width of an id follows from it: SGLang's ``int32``, or ``uint8`` / ``int16``
    from ``sglang_compact_routing_0_5``.

    With ``num_experts`` the ids are narrowed to ``storage_dtype(num_experts)``, vLLM's own dtype
    (``uint8`` up to 256 experts, ``uint16`` above), after checking every id lies in
    ``[0, num_experts)``: an id outside raises ``ValueError`` naming the request, rather than
    wrapping. Without it (a model type verl_r3 has no family for) they stay as they arrived."""
    encoded = meta_info.get("routed_experts")
    if not isinstance(encoded, (str, bytes)):
        return None
    import torch

    from verl_r3.core.formats import sglang_ids, sglang_rows
    from verl_r3.core.record import storage_dtype

    who = f"request {meta_info.get('id')}: "
    ids = sglang_ids(encoded, num_layers=num_layers, top_k=top_k, rows=sglang_rows(meta_info, start, who=who),
                     who=who)
    arrived = ids.dtype
    if num_experts is not None:
        if ids.numel():
            lo, hi = (int(v) for v in torch.aminmax(ids))
            if lo < 0 or hi >= num_experts:
                bad = lo if lo < 0 else hi
                # Compact payloads were clamped to [-1, experts] inside SGLang (-1 is 255 in uint8).
                hint = (f" (as sent compact: SGLang's ids are clamped to [-1, {num_experts}], -1 being 255 in uint8)"
                        if arrived != torch.int32 else "")
                raise ValueError(f"{who}SGLang routed expert id {bad} is outside "
                                 f"[0, {num_experts}) for a model with {num_experts} experts{hint}")
        ids = ids.to(storage_dtype(num_experts))
    meta_info["routed_experts"] = ids
    return arrived


def _start_len(obj) -> int:
    start = getattr(obj, "routed_experts_start_len", 0)
    if not isinstance(start, int):
        raise ValueError(f"verl_sglang_server_0_9: one routed_experts_start_len per request is expected, got {start!r}")
    return start


def _decoding(generate_request, num_layers: int, top_k: int, num_experts: int | None, compact):
    """``generate_request`` whose outputs carry decoded routing. ``compact``: the dtype SGLang's
    processes were asked to send (None: its ``int32``); a payload in another one warns once."""
    warned = []

    async def generate_request_decoded(obj, request=None):
        start = _start_len(obj)
        async for out in generate_request(obj, request):
            if isinstance(out, dict) and isinstance(out.get("meta_info"), dict):
                arrived = decode_routed_experts(out["meta_info"], num_layers, top_k, num_experts, start=start)
                if arrived is not None and compact is not None and arrived != compact and not warned:
                    warned.append(arrived)
                    # A Python warning, not a log record: verl starts SGLang with log_level="error", and SGLang
                    # sets the root logger to that level in this process.
                    warnings.warn(
                        f"verl_sglang_server_0_9: SGLang sent routing as {arrived}, not the compact {compact} asked "
                        f"of it with {COMPACT_FLAG}=1: verl_r3's SGLang plugin (entry point sglang.srt.plugins) is not "
                        "loaded in SGLang's processes here. Routing is still read correctly, at "
                        f"{arrived.itemsize} bytes per id inside SGLang", RuntimeWarning, stacklevel=2)
            yield out

    generate_request_decoded.__wrapped__ = generate_request
    return generate_request_decoded


def _num_experts(hf_config) -> int | None:
    """The model's expert count from verl_r3's family of its model type; None (routing stays
    ``int32``, logged) for a model type verl_r3 has no family for."""
    from verl_r3.core.replay import routing_dims

    try:
        return routing_dims(hf_config)[2]
    except ValueError as exc:
        logger.warning("verl_sglang_server_0_9: %s; SGLang's routing leaves the server as int32, four bytes per id",
                       exc)
        return None


async def _launch_server(self, *args, **kwargs):
    if self.config.enable_rollout_routing_replay and not self.config.skip_tokenizer_init:
        # verl reads routing through sglang.srt.layers.moe.routed_experts_capturer on that path, a module
        # SGLang 0.5.23 no longer has: every generate would fail with ModuleNotFoundError.
        raise ValueError(
            "verl_sglang_server_0_9: actor_rollout_ref.rollout.skip_tokenizer_init=False with routing replay: "
            "verl 0.9 then reads SGLang's routing through sglang.srt.layers.moe.routed_experts_capturer, which "
            "SGLang 0.5.23 removed; keep skip_tokenizer_init=True (verl's default)")
    compact = None
    if self.config.enable_rollout_routing_replay:
        # Read by verl_r3's plugin in the SGLang processes this launch starts (they inherit it).
        os.environ.setdefault(COMPACT_FLAG, "1")
        hf = self.model_config.hf_config
        experts = _num_experts(hf)
        if os.environ[COMPACT_FLAG] == "1" and experts is not None:
            from verl_r3.core.formats import sglang_compact_dtype

            compact = sglang_compact_dtype(experts)
    result = await _originals["launch_server"](self, *args, **kwargs)
    manager = getattr(self, "tokenizer_manager", None)
    if manager is not None and self.config.enable_rollout_routing_replay:
        manager.generate_request = _decoding(manager.generate_request, hf.num_hidden_layers, hf.num_experts_per_tok,
                                             experts, compact)
    return result


def is_applied() -> bool:
    return bool(_originals)


def apply() -> bool:
    """Install all four changes. Returns True if this call changed anything (idempotent)."""
    if _originals:
        return False
    verl_version, sglang_version = check_version()
    server = importlib.import_module(f"{_PKG}.async_sglang_server")
    http = importlib.import_module(f"{_PKG}.http_server_engine")
    rollout = importlib.import_module(f"{_PKG}.sglang_rollout")
    adapter = http.AsyncHttpServerAdapter
    _originals.update(
        dataclasses=server.dataclasses,
        abstract=adapter.__abstractmethods__,
        update_weights=rollout.ServerAdapter.update_weights,
        launch_server=server.SGLangHttpServer.launch_server,
    )
    server.dataclasses = _DATACLASSES
    adapter.begin_weight_update = _begin_weight_update
    adapter.end_weight_update = _end_weight_update
    adapter.__abstractmethods__ = frozenset(adapter.__abstractmethods__ - {"begin_weight_update", "end_weight_update"})
    rollout.ServerAdapter.update_weights = _update_weights
    server.SGLangHttpServer.launch_server = _launch_server
    logger.info("verl_sglang_server_0_9: verl %s with sglang %s: ServerArgs fields, weight-update sessions and "
                "routed_experts decoding in %s", verl_version, sglang_version, _PKG)
    return True


def revert() -> bool:
    """Restore verl's bindings. Idempotent."""
    if not _originals:
        return False
    server = importlib.import_module(f"{_PKG}.async_sglang_server")
    http = importlib.import_module(f"{_PKG}.http_server_engine")
    rollout = importlib.import_module(f"{_PKG}.sglang_rollout")
    adapter = http.AsyncHttpServerAdapter
    server.dataclasses = _originals["dataclasses"]
    for name in ("begin_weight_update", "end_weight_update"):
        if name in adapter.__dict__:
            delattr(adapter, name)
    adapter.__abstractmethods__ = _originals["abstract"]
    rollout.ServerAdapter.update_weights = _originals["update_weights"]
    server.SGLangHttpServer.launch_server = _originals["launch_server"]
    _originals.clear()
    logger.info("verl_sglang_server_0_9: restored %s", _PKG)
    return True
