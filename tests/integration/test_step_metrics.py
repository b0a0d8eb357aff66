"""The r3/ step metrics: counts added per micro-batch survive verl's own aggregation over
micro-batches, mini-batches and data-parallel ranks, and become the figures of the whole step.

verl's aggregation is run with verl's own functions (``append_to_dict``, ``Metric.aggregate_dp``)
on the structures its FSDP engine and workers build; the end-to-end path through the real
trainer is in test_main_ppo_cpu.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("verl")

from verl.utils.metric import Metric  # noqa: E402
from verl.utils.py_functional import append_to_dict  # noqa: E402

from verl_r3 import keys  # noqa: E402
from verl_r3.core.metrics import logprob_mismatch, router_disagreement  # noqa: E402
from verl_r3.integration import step_metrics as sm  # noqa: E402
from verl_r3.integration.import_hooks import when_imported  # noqa: E402

L, K, E = 3, 2, 8
MOE = (0, 2)  # layer 1 dense


def _micro_batch(g: torch.Generator, tokens: int):
    """Rollout / trainer routing and log-probs of one micro-batch, [1, T, L, K] and [1, T]."""
    routed = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens * L)]).view(1, tokens, L, K)
    native = routed.clone()
    flip = torch.rand(1, tokens, L, generator=g) < 0.3
    native[flip] = (native[flip] + 1) % E  # a different expert set where flipped (ids stay distinct)
    native[:, :, 1] = -1
    routed[:, :, 1] = -1
    routed[0, 0] = -1  # one token without rollout routing: the fallback
    mask = torch.ones(1, tokens, dtype=torch.bool)
    rollout_lp = -torch.rand(1, tokens, generator=g) * 3
    train_lp = rollout_lp + torch.randn(1, tokens, generator=g)
    return routed, native, mask, rollout_lp, train_lp


def _engine_metrics(batches, *, rank: int, phase: str, seconds: float) -> dict:
    """One rank's metrics as verl's engine returns them: each key a Metric over micro-batches."""
    out: dict = {}
    for routed, native, mask, rollout_lp, train_lp in batches:
        stats = sm.routing_stats(routed, native, native, mask, MOE)
        from verl_r3.core.metrics import mismatch_sums

        stats.update(mismatch_sums(rollout_lp, train_lp, mask))
        stats["routing_bytes"] = float(routed.numel() * routed.element_size())
        stats["routing_tokens"] = float(routed.shape[1])
        output = {"metrics": {"actor/pg_loss": Metric(value=1.0, aggregation="mean")}}
        sm.add_stats(output, phase=phase, stats=stats, seconds=seconds, dp_rank=rank, dp_size=2)
        append_to_dict(out, output["metrics"])
    return out


@pytest.fixture(scope="module")
def ranks():
    g = torch.Generator().manual_seed(0)
    return [[_micro_batch(g, t) for t in (5, 9)], [_micro_batch(g, t) for t in (7, 4)]]


def _expected(ranks) -> dict:
    """The figures computed on every token of every rank at once."""
    flat = [mb for rank in ranks for mb in rank]
    routed = torch.cat([mb[0][0] for mb in flat])
    native = torch.cat([mb[1][0] for mb in flat])
    rollout_lp = torch.cat([mb[3][0] for mb in flat])
    train_lp = torch.cat([mb[4][0] for mb in flat])
    mm = logprob_mismatch(rollout_lp, train_lp, torch.ones_like(rollout_lp, dtype=torch.bool))
    rd = router_disagreement(routed[:, list(MOE)], native[:, list(MOE)])
    missing = int((routed[:, list(MOE)] == -1).all(-1).sum())
    return {
        keys.K3_KL: mm["k3_kl"], **{keys.extreme_frac(t): mm[f"extreme_frac_{t:g}"] for t in keys.TAUS},
        keys.ROUTER_DISAGREE: rd["router"], keys.ROUTER_DISAGREE_TOKEN: rd["token"],
        keys.ROUTER_DISAGREE_LAYERS_PER_TOKEN: rd["layers_per_token"],
        keys.ROUTER_DISAGREE_REPLAYED: rd["router"],
        keys.router_disagree_layer(0): rd["per_layer"][0], keys.router_disagree_layer(2): rd["per_layer"][1],
        keys.REPLAY_ACTIVE_FRAC: 0.0, keys.FALLBACK_FRAC: missing / (rd["pairs"] + missing),
        keys.ROUTING_BYTES_PER_TOKEN: L * K * 8,  # int64 rows here
    }


def test_compute_log_prob_path_totals_every_rank_once(ranks):
    per_rank = [_engine_metrics(b, rank=i, phase="infer", seconds=0.25) for i, b in enumerate(ranks)]
    gathered = {k: [m[k] for m in per_rank] for k in per_rank[0]}  # allgather_dict_into_dict
    # Both ranks return the gathered copy; verl's BatchMeta concat lists them in extra_info.
    output = SimpleNamespace(extra_info={"metrics": [gathered, {k: list(v) for k, v in gathered.items()}]})
    collector = sm.Collector()
    collector.add_infer_output(output)
    assert collector.totals["infer"]["micro_batches"] == 4.0
    assert collector.totals["infer"]["seconds"] == 0.5  # rank 0's two micro-batches
    figures = collector.figures(step_seconds=10.0)
    expected = _expected(ranks)
    assert {k: figures[k] for k in expected} == pytest.approx(expected)
    assert figures[keys.METRICS_SECONDS] >= 0.5
    assert figures[keys.METRICS_TIME_FRAC] == pytest.approx(figures[keys.METRICS_SECONDS] / 10.0)
    assert not any(k.startswith(sm.STATS_PREFIX) for k in gathered)
    assert collector.figures(step_seconds=10.0) == {}  # reset after each step


def test_update_actor_path_undoes_verls_average_over_ranks(ranks):
    # update_actor: per mini-batch, each key is Metric.aggregate_dp over the ranks, appended over
    # mini-batches (verl's train_mini_batch); here rank i holds micro-batch j of mini-batch j.
    metrics: dict = {}
    for j in range(2):
        per_rank = [_engine_metrics([ranks[i][j]], rank=i, phase="update", seconds=0.125) for i in range(2)]
        mini = {k: Metric.aggregate_dp([m[k] for m in per_rank]) for k in per_rank[0]}
        append_to_dict(metrics, mini)
    output = {"metrics": metrics}
    collector = sm.Collector()
    collector.add_update_output(output)
    assert set(metrics) == {"actor/pg_loss"}  # verl reduces what is left, as before
    assert collector.totals["update"]["seconds"] == pytest.approx(0.25)  # rank 0's
    figures = collector.figures(step_seconds=None)
    expected = _expected(ranks)
    assert {k: figures[k] for k in expected} == pytest.approx(expected)
    assert keys.METRICS_TIME_FRAC not in figures


def test_log_probs_from_compute_log_prob_routing_from_the_update_when_only_it_has_any():
    g = torch.Generator().manual_seed(1)
    a, b = _micro_batch(g, 6), _micro_batch(g, 6)
    from verl_r3.core.metrics import mismatch_sums

    infer = mismatch_sums(a[3], a[4], a[2])  # R2: compute_log_prob records, so it has no rollout routing
    update = dict(mismatch_sums(b[3], b[4], b[2]), **sm.routing_stats(b[0], b[1], b[0], b[2], MOE, replayed_layers=MOE))
    figures = sm.step_figures(infer, update)
    assert figures[keys.K3_KL] == pytest.approx(logprob_mismatch(a[3], a[4], a[2])["k3_kl"])
    assert figures[keys.ROUTER_DISAGREE] == pytest.approx(router_disagreement(b[0][..., list(MOE), :],
                                                                              b[1][..., list(MOE), :])["router"])
    assert figures[keys.ROUTER_DISAGREE_REPLAYED] == 0.0  # what was used is the replayed routing
    assert 0 < figures[keys.REPLAY_ACTIVE_FRAC] == 1 - figures[keys.FALLBACK_FRAC] < 1
    # Bypass mode: no compute_log_prob at all, everything from the update.
    assert sm.step_figures({}, update)[keys.K3_KL] == pytest.approx(logprob_mismatch(b[3], b[4], b[2])["k3_kl"])
    assert sm.step_figures({}, {}) == {}


def test_unknown_phase_is_refused():
    with pytest.raises(ValueError, match="phase must be one of"):
        sm.add_stats({}, phase="rollout", stats={"tokens": 1.0}, seconds=0.0, dp_rank=0, dp_size=1)
    collector = sm.Collector()
    with pytest.raises(ValueError, match="unknown phase 'other'"):
        collector.add_update_output({"metrics": {"r3_stats/other/tokens": 1.0}})


def test_when_imported_runs_after_the_first_import_and_now_when_already_imported(tmp_path, monkeypatch):
    (tmp_path / "r3_hook_pkg").mkdir()
    (tmp_path / "r3_hook_pkg" / "__init__.py").write_text("")
    (tmp_path / "r3_hook_pkg" / "target.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    when_imported("r3_hook_pkg.target", lambda m: seen.append(m.VALUE + 1))
    assert seen == []
    import importlib

    module = importlib.import_module("r3_hook_pkg.target")
    assert seen == [42]
    assert module.__spec__.loader.get_filename("r3_hook_pkg.target").endswith("target.py")  # delegated
    when_imported("r3_hook_pkg.target", lambda m: seen.append("now"))
    assert seen == [42, "now"]
    for name in ("r3_hook_pkg.target", "r3_hook_pkg"):
        sys.modules.pop(name, None)


def test_trainer_patch_wraps_and_restores_verls_methods():
    code = textwrap.dedent("""
        import verl.trainer.ppo.v1.trainer_base as tb
        from verl_r3.patches import verl_trainer_step_metrics_0_9 as p
        from verl_r3.integration.step_metrics import TrainerHooks
        names = ("_compute_old_log_prob", "_update_actor", "_compute_metrics", "step")
        before = {n: tb.PPOTrainer.__dict__[n] for n in names}
        assert p.apply(TrainerHooks()) and not p.apply(TrainerHooks()) and p.is_applied()
        assert all(tb.PPOTrainer.__dict__[n].__wrapped__ is before[n] for n in names)
        assert p.revert() and not p.revert() and not p.is_applied()
        assert all(tb.PPOTrainer.__dict__[n] is before[n] for n in names)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_activation_patches_the_trainer_when_verl_imports_it():
    code = textwrap.dedent("""
        import os, sys
        os.environ["VERL_USE_EXTERNAL_MODULES"] = "verl_r3.integration.activate"
        import verl
        from verl_r3.patches import verl_trainer_step_metrics_0_9 as p
        assert "verl.trainer.ppo.v1.trainer_base" not in sys.modules and not p.is_applied()
        from verl.trainer.ppo.v1 import get_trainer_cls  # what verl's TaskRunnerV1 imports
        assert p.is_applied()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
