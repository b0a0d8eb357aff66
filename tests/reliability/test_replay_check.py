"""The per-step replay check (``verl_r3.integration.step_metrics.replay_problems``): with R3 or
R2 on, every MoE layer must have routed every replayed token by the replayed routing
(``replay_active_frac == 1 - fallback_frac``), not everything may have fallen back, and a call
with no counts at all means replay was never installed. A failed check stops the run, or with
``router_replay.strict=False`` is logged as a warning.

The check on a real run (replay silently not installed, the run stops at step 1) is in
``test_faults.py``; the counts a real engine produces pass it in ``test_bad_input.py``.
"""

from __future__ import annotations

import logging
import types

import pytest

pytest.importorskip("verl")

from omegaconf import OmegaConf  # noqa: E402

from verl_r3 import keys  # noqa: E402
from verl_r3.integration import step_metrics as sm  # noqa: E402

# Counts of one call as the FSDP engine reports them: 40 (response token, MoE layer) pairs with
# rollout routing, 8 without (the fallback), all 40 routed by the replayed routing.
GOOD = {"micro_batches": 2.0, "pairs": 40.0, "missing": 8.0, "replayed": 40.0, "tokens_routed": 20.0,
        "tokens_differ": 0.0, "differ": 0.0, "differ_used": 0.0, "pairs_layer/00": 20.0, "pairs_layer/02": 20.0,
        "differ_layer/00": 0.0, "differ_layer/02": 0.0}


def _with(**changes) -> dict:
    return {**GOOD, **changes}


def test_a_step_that_replayed_every_routed_pair_passes_and_its_figures_add_up():
    assert sm.replay_problems("R3", GOOD, GOOD) == []
    assert sm.replay_problems("R2", {}, GOOD) == []  # R2: compute_log_prob records, nothing to check there
    assert sm.replay_problems("R3", {}, GOOD) == []  # verl's bypass mode: no compute_log_prob
    figures = sm.step_figures(GOOD, GOOD)
    assert figures[keys.REPLAY_ACTIVE_FRAC] == pytest.approx(1 - figures[keys.FALLBACK_FRAC]) == pytest.approx(40 / 48)


@pytest.mark.parametrize("mode, infer, update, message", [
    ("R3", GOOD, {}, "update_actor reported no r3 counts, so its forwards did not run in verl_r3's FSDPReplayEngine"),
    ("R3", GOOD, _with(replayed=20.0), "update_actor: 20 of 40 (response token, MoE layer) pairs with rollout routing "
                                       "were replayed (replay_active_frac 0.416667, expected 1 - fallback_frac = "
                                       "0.833333): MoE layers ran without replay"),
    ("R3", _with(replayed=0.0), GOOD, "compute_log_prob: 0 of 40"),
    ("R3", GOOD, _with(pairs=0.0, replayed=0.0, missing=48.0),
     "update_actor: all 48 (response token, MoE layer) pairs fell back to the trainer's own routing"),
    ("R2", {}, _with(pairs=0.0, missing=0.0, replayed=0.0), "update_actor: no (response token, MoE layer) pair carried"),
])
def test_what_the_check_reports(mode, infer, update, message):
    problems = sm.replay_problems(mode, infer, update)
    assert len(problems) == 1 and message in problems[0], problems
    assert sm.replay_problems("disabled", infer, update) == []  # nothing is promised without replay


def _trainer(strict=None, strategy="fsdp2", mode="R3"):
    router_replay = {"mode": mode} if strict is None else {"mode": mode, "strict": strict}
    config = OmegaConf.create({"actor_rollout_ref": {"actor": {"strategy": strategy,
                                                               "fsdp_config": {"router_replay": router_replay}}}})
    return types.SimpleNamespace(config=config, global_steps=7)


def _step_end(trainer, update):
    hooks = sm.TrainerHooks()
    collector = hooks._collector(trainer)
    collector._add({"update": update}, scale_by_dp=False)
    metrics = {}
    hooks.step_end(trainer, metrics, {"step": 1.0})
    return metrics


def test_a_failed_check_stops_the_run_by_default_and_is_a_warning_with_strict_false(caplog):
    broken = _with(replayed=0.0)
    with pytest.raises(RuntimeError, match=r"verl_r3 replay check, step 7, router_replay.mode=R3: update_actor: 0 of "
                                           r"40 .*router_replay.strict=False to log this as a warning instead"):
        _step_end(_trainer(), broken)
    with caplog.at_level(logging.WARNING, logger=sm.__name__):
        metrics = _step_end(_trainer(strict=False), broken)
    assert "verl_r3 replay check, step 7" in caplog.text
    assert metrics[keys.REPLAY_ACTIVE_FRAC] == 0.0  # the figures are still logged
    # The fallback is logged every step it happens.
    assert f"step 7: {keys.FALLBACK_FRAC}=0.1667" in caplog.text
    # Megatron and VeOmni actors replay with verl's own code: the check does not apply.
    assert sm.replay_settings(_trainer(strategy="megatron").config) == ("disabled", True)
    with pytest.raises(ValueError, match="router_replay.strict must be true or false, got 'no'"):
        sm.replay_settings(_trainer(strict="no").config)
