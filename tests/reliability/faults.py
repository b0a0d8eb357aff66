"""Faults injected into a real ``main_ppo`` run (tests only).

Loaded in every verl process next to verl_r3 (``VERL_USE_EXTERNAL_MODULES=verl_r3.integration.activate,faults``
with this folder on ``PYTHONPATH``); ``R3_FAULT`` picks the fault, ``R3_FAULT_MARKER`` (a file
path) makes a one-time fault happen once across restarts:

``kill_actor:N``    the actor worker kills itself (SIGKILL) in its N-th ``update_actor`` call,
                    i.e. mid-step N with one mini-batch per step;
``kill_rollout:N``  the ``hf`` rollout server kills itself (SIGKILL) at its first request once
                    the weights version verl gave it (``global_steps``) is N or more;
``skip_replay``     the FSDP engine measures instead of replaying (its phase ``replay`` becomes
                    ``observe``): replay silently not installed, what the step check must catch.
"""

from __future__ import annotations

import os
import signal

FAULT = os.environ.get("R3_FAULT", "")
MARKER = os.environ.get("R3_FAULT_MARKER", "")


def _once() -> bool:
    """True the first time across processes and restarts (creates the marker)."""
    try:
        fd = os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install() -> None:
    kind, _, arg = FAULT.partition(":")
    if kind == "skip_replay":
        from verl_r3.integration.fsdp_replay import replay_engine_class

        engine = replay_engine_class()
        phase = engine._phase

        def observe_instead(self, data, forward_only):
            chosen = phase(self, data, forward_only)
            if chosen == "replay":
                self._observer()
                return "observe"
            return chosen

        engine._phase = observe_instead
    elif kind == "kill_actor":
        from verl_r3.integration.fsdp_replay import replay_engine_class

        engine = replay_engine_class()
        forward_backward = engine.forward_backward_batch
        calls = {"update": 0}

        def dying(self, data, loss_function, forward_only=False):
            if not forward_only:
                calls["update"] += 1
                if calls["update"] == int(arg) and _once():
                    _die()
            return forward_backward(self, data, loss_function, forward_only)

        engine.forward_backward_batch = dying
    elif kind == "kill_rollout":
        from verl_r3.integration import hf_rollout

        server = hf_rollout.HFRolloutServer
        generate = server.generate

        async def dying(self, *args, **kwargs):
            if self.global_steps is not None and self.global_steps >= int(arg) and _once():
                _die()
            return await generate(self, *args, **kwargs)

        server.generate = dying
    elif kind:
        raise ValueError(f"unknown R3_FAULT {FAULT!r}")


_install()
