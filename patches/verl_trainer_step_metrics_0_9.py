"""Patch: hand the workers' per-step counts to a collector in verl's v1 PPO trainer (verl 0.9.x),
and explain a step that fails because a rollout server died.

What it patches
    Four methods of ``PPOTrainer`` in ``verl.trainer.ppo.v1.trainer_base`` (verl 0.9.1), each
    wrapped, verl's code running unchanged inside:
    ``_compute_old_log_prob`` and ``_update_actor``: while they run, the trainer's
    ``actor_rollout_wg.compute_log_prob`` / ``.update_actor`` (instance attributes verl's worker
    group binds) are wrapped so that their outputs pass through the hooks first;
    ``_compute_metrics``: after verl has assembled the step's metrics, the hook adds its own;
    ``step``: an error escaping a training step goes to the hook first, which may raise a
    clearer one from it.

Why
    verl's v1 trainer keeps only the ``mfu`` entry of ``compute_log_prob``'s metrics and
    averages every entry of ``update_actor``'s over micro-batches and mini-batches. Counts that
    must be totalled over a step (tokens, pairs, per-layer pairs) therefore either vanish or
    turn into means of ratios. The hooks receive the raw outputs, take their own entries out
    before verl reduces the rest, and add the step's figures next to verl's metrics. Nothing
    else of the outputs or of verl's metrics changes. And verl's v1 agent loop turns every
    request to a rollout server that died into a failed trajectory, so the step then fails with
    an error about its replay buffer that does not name the cause.

Upstream reference
    verl 0.9.1, ``verl/trainer/ppo/v1/trainer_base.py``: ``PPOTrainer._compute_old_log_prob``
    (``output = self.actor_rollout_wg.compute_log_prob(batch)``, metrics unused),
    ``PPOTrainer._update_actor`` (``rename_dict(output["metrics"], "actor/")`` then
    ``reduce_metrics``), ``PPOTrainer._compute_metrics`` (called by ``fit`` right before
    ``self.logger.log``), ``PPOTrainer.step`` (called by ``fit`` once per training step).

Versions tested
    verl 0.9.1 with torch 2.13.0 (CPU build), transformers 5.19.

Remove when
    verl's trainer passes worker metrics through with their aggregation (e.g. keeps
    ``compute_log_prob``'s metrics and sums ``Metric(aggregation="sum")`` entries over a step).

Applied by ``verl_r3.integration.activate`` (through ``verl_r3.integration.step_metrics``) when
verl's trainer module is imported, never on import of this module. ``apply(hooks)`` takes an
object with ``infer_output(trainer, output)``, ``update_output(trainer, output)``,
``step_end(trainer, metrics, timing_raw)`` and ``step_failed(trainer, error)``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging

from verl_r3.patches._window import check_window, installed_version

logger = logging.getLogger(__name__)

SUPPORTED = ">=0.9.0,<0.10.0"
_TARGET_MODULE = "verl.trainer.ppo.v1.trainer_base"
_CLASS = "PPOTrainer"
# trainer method -> the worker-group method whose output it hands to the hook named
_CALLS = {"_compute_old_log_prob": ("compute_log_prob", "infer_output"),
          "_update_actor": ("update_actor", "update_output")}
_STEP_END = "_compute_metrics"
_STEP = "step"

_original: dict = {}  # method name -> verl's function, while applied


def installed_verl_version() -> str | None:
    return installed_version("verl")


def check_version() -> str:
    """Return the installed verl version, or raise RuntimeError if it is outside the window."""
    return check_window(
        "verl_trainer_step_metrics_0_9", "verl", installed_verl_version(), SUPPORTED,
        f"check that {_TARGET_MODULE}.{_CLASS} still calls actor_rollout_wg.compute_log_prob/update_actor from "
        f"{', '.join(_CALLS)} and logs after {_STEP_END}, and add a patch module for its version window",
    )


@contextlib.contextmanager
def _intercepting(worker_group, name: str, hook):
    """Within the block, ``worker_group.<name>(...)`` returns its output after ``hook(output)``."""
    had_own = name in vars(worker_group)
    original = getattr(worker_group, name)

    @functools.wraps(original)
    def call(*args, **kwargs):
        output = original(*args, **kwargs)
        hook(output)
        return output

    setattr(worker_group, name, call)
    try:
        yield
    finally:
        if had_own:
            setattr(worker_group, name, original)
        else:
            delattr(worker_group, name)


def _around_call(method, wg_method: str, hook_name: str, hooks):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        hook = getattr(hooks, hook_name)
        with _intercepting(self.actor_rollout_wg, wg_method, lambda output: hook(self, output)):
            return method(self, *args, **kwargs)

    return wrapper


def _after_metrics(method, hooks):
    @functools.wraps(method)
    def wrapper(self, batch, metrics, timing_raw, *args, **kwargs):
        result = method(self, batch, metrics, timing_raw, *args, **kwargs)
        hooks.step_end(self, metrics, timing_raw)
        return result

    return wrapper


def _explaining_failures(method, hooks):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as error:
            hooks.step_failed(self, error)
            raise

    return wrapper


def is_applied() -> bool:
    return bool(_original)


def apply(hooks) -> bool:
    """Wrap the three methods. Returns True if this call changed anything (idempotent)."""
    if _original:
        return False
    version = check_version()
    cls = getattr(importlib.import_module(_TARGET_MODULE), _CLASS)
    missing = [m for m in (*_CALLS, _STEP_END, _STEP) if not callable(cls.__dict__.get(m))]
    if missing:
        raise RuntimeError(f"verl_trainer_step_metrics_0_9: {_TARGET_MODULE}.{_CLASS} of verl {version} has no "
                           f"{', '.join(missing)}")
    for method, (wg_method, hook_name) in _CALLS.items():
        _original[method] = cls.__dict__[method]
        setattr(cls, method, _around_call(_original[method], wg_method, hook_name, hooks))
    _original[_STEP_END] = cls.__dict__[_STEP_END]
    setattr(cls, _STEP_END, _after_metrics(_original[_STEP_END], hooks))
    _original[_STEP] = cls.__dict__[_STEP]
    setattr(cls, _STEP, _explaining_failures(_original[_STEP], hooks))
    logger.info("verl_trainer_step_metrics_0_9: verl %s: %s.%s hands compute_log_prob/update_actor outputs, "
                "the step's metrics and a failed step to %s", version, _TARGET_MODULE, _CLASS, type(hooks).__name__)
    return True


def revert() -> bool:
    """Restore verl's methods. Idempotent."""
    if not _original:
        return False
    cls = getattr(importlib.import_module(_TARGET_MODULE), _CLASS)
    for method, function in _original.items():
        if getattr(cls.__dict__.get(method), "__wrapped__", None) is function:
            setattr(cls, method, function)
    _original.clear()
    logger.info("verl_trainer_step_metrics_0_9: restored %s.%s", _TARGET_MODULE, _CLASS)
    return True
