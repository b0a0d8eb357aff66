"""Timers around the routing stages of a vLLM engine, inside vLLM's own processes.

``verl-r3 bench capture --engine vllm --stages`` sets ``VERL_R3_STAGE_TIMES`` to a folder before
it starts each engine; vLLM's engine core and worker processes inherit it, and the ``vllm``
plugin (``verl_r3.integration.vllm_cpu.plugin``) calls ``install`` there. Each function in
``STAGES`` is then wrapped with a timer, and the process writes its counts and seconds to
``<folder>/<pid>.json`` (at the end of a step, at most every ``DUMP_EVERY_S`` seconds, and at
exit; a process killed without exiting leaves out at most its last quarter second).
``read`` sums a folder's files. Nothing is installed unless the variable is set, and never in
the process that started the engine (the front end is shared by every engine of a benchmark).
Each timer adds about a microsecond per call to what it measures.
"""

from __future__ import annotations

import atexit
import functools
import gc
import json
import logging
import multiprocessing
import os
import threading
import time
from pathlib import Path

from verl_r3.integration.import_hooks import when_imported

logger = logging.getLogger(__name__)

__all__ = ["ENV", "STAGES", "STEP_STAGES", "install", "read"]

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
    "worker.begin_step": ("worker", f"{_CONNECTOR}.worker", "AuxOutputWorkerConnector.begin_step",
                          "vLLM's worker connector: the step's metadata"),
    "worker.commit": ("worker", _PATCH, "StepCommit.__call__", "StepCommit: rows into blocks and outputs"),
    "worker.store_put": ("worker", f"{_CONNECTOR}.store", "BlockObjectStore.put",
                         "vLLM's routing store: block writes (writer thread)"),
    "worker.gc": ("worker", "", "", "Python's garbage collector"),
    "core.schedule": ("engine core", "vllm.v1.core.sched.scheduler", "Scheduler.schedule",
                      "scheduling (and routing metadata when capturing)"),
    "core.build_connector_meta": ("engine core", f"{_CONNECTOR}.connector",
                                  "AuxOutputSchedulerConnector.build_connector_meta",
                                  "vLLM's scheduler connector: the step's metadata"),
    "core.update_from_output": ("engine core", "vllm.v1.core.sched.scheduler", "Scheduler.update_from_output",
                                "taking the step's outputs (and rows when capturing)"),
    "core.take_output": ("engine core", f"{_CONNECTOR}.connector", "AuxOutputSchedulerConnector.take_output",
                         "vLLM's scheduler connector: one request's rows"),
    "core.encode": ("engine core", "vllm.v1.serial_utils", "MsgpackEncoder.encode_into",
                    "serializing outputs to the front end (output thread)"),
    "core.gc": ("engine core", "", "", "Python's garbage collector"),
}
#: The stage counted once per engine step in each process role.
STEP_STAGES = {"worker": "worker.sample_tokens", "engine core": "core.update_from_output"}
_STEP_KEYS = frozenset(STEP_STAGES.values())
#: The garbage collector's entry of each role: the stages with no function to wrap.
_GC_KEYS = {role: key for key, (role, module, _qualname, _what) in STAGES.items() if not module}

_lock = threading.Lock()
_figures: dict[str, list] = {}  # key -> [calls, seconds]
_gc = [0, 0.0]  # collections and seconds since this process's first step, kept apart from _figures
_state = {"folder": None, "last": 0.0, "gc_began": None}


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
        stages = {k: list(v) for k, v in _figures.items()}
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
                entry = _figures.setdefault(key, [0, 0.0])
                entry[0] += 1
                entry[1] += now - began
            if key in _STEP_KEYS and now - _state["last"] >= DUMP_EVERY_S:
                _state["last"] = now
                _dump()  # at the end of a step: every stage of it counted
    timed.__verl_r3_stage__ = key
    return timed


def _wrap(key: str, qualname: str, module) -> None:
    cls_name, attr = qualname.split(".")
    cls = getattr(module, cls_name, None)
    fn = getattr(cls, attr, None) if cls is not None else None
    if fn is None:
        logger.warning("verl_r3 stage timers: %s.%s is missing; stage %s is not timed", module.__name__, qualname, key)
        return
    if getattr(fn, "__verl_r3_stage__", None) == key:
        return
    setattr(cls, attr, _timed(key, fn))


def install() -> bool:
    """Wrap every stage of ``STAGES`` with a timer in this process, when ``VERL_R3_STAGE_TIMES``
    names a folder and this is one of vLLM's child processes. Returns whether it did."""
    folder = os.environ.get(ENV)
    if not folder or multiprocessing.parent_process() is None or _state["folder"] is not None:
        return False
    Path(folder).mkdir(parents=True, exist_ok=True)
    _state["folder"] = folder
    for key, (_where, module, qualname, _what) in STAGES.items():
        if module:
            when_imported(module, functools.partial(_wrap, key, qualname))
    gc.callbacks.append(_gc_timer)
    atexit.register(_dump)
    return True


def read(folder: str | os.PathLike) -> dict:
    """The figures of every process that wrote to ``folder``, summed: ``{key: {"calls", "seconds",
    "us_per_call", "us_per_step", "calls_per_step"}}`` for the stages that ran, where a step is a call
    of the role's ``STEP_STAGES`` stage."""
    calls: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for path in sorted(Path(folder).glob("*.json")):
        for key, (n, s) in json.loads(path.read_text())["stages"].items():
            calls[key] = calls.get(key, 0) + n
            seconds[key] = seconds.get(key, 0.0) + s
    out = {}
    for key, n in calls.items():
        if n == 0 or key not in STAGES:
            continue
        steps = calls.get(STEP_STAGES[STAGES[key][0]], 0)
        out[key] = {"calls": n, "seconds": seconds[key], "us_per_call": seconds[key] / n * 1e6,
                    "us_per_step": seconds[key] / steps * 1e6 if steps else None,
                    "calls_per_step": n / steps if steps else None}
    return out
