"""verl_r3.patches.verl_sglang_replica_cpu_0_9: verl's loader for the SGLang replica, swapped and restored."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("verl")

from verl.workers.rollout.replica import RolloutReplicaRegistry  # noqa: E402

from verl_r3.patches import verl_sglang_replica_cpu_0_9 as patch  # noqa: E402


@pytest.fixture
def clean():
    was_applied = patch.is_applied()
    patch.revert()
    yield
    patch.revert()
    if was_applied:
        patch.apply()


def test_apply_swaps_the_loader_and_revert_restores_it(clean):
    original = RolloutReplicaRegistry._registry["sglang"]
    assert patch.apply() is True and patch.apply() is False
    assert RolloutReplicaRegistry._registry["sglang"] is patch.load_sglang_replica
    assert patch.revert() is True and patch.revert() is False
    assert RolloutReplicaRegistry._registry["sglang"] is original


@pytest.mark.parametrize("version", ["0.8.9", "0.10.0"])
def test_refuses_verl_outside_its_window(clean, monkeypatch, version):
    monkeypatch.setattr(patch, "installed_verl_version", lambda: version)
    with pytest.raises(RuntimeError, match=r"verl_sglang_replica_cpu_0_9 supports verl >=0\.9\.0,<0\.10\.0, found verl "
                                           + version.replace(".", r"\.")):
        patch.apply()
    assert not patch.is_applied()


def test_the_loader_imports_without_sglangs_cpu_engine_switch(monkeypatch):
    """Where SGLang is absent the import fails, but the switch is restored either way."""
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    seen = {}
    import builtins

    real_import = builtins.__import__

    def spy(name, *args, **kwargs):
        if name == "verl.workers.rollout.sglang_rollout.async_sglang_server":
            seen["switch"] = os.environ.get("SGLANG_USE_CPU_ENGINE")
            raise ImportError("stop here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", spy)
    with pytest.raises(ImportError, match="stop here"):
        patch.load_sglang_replica()
    assert seen == {"switch": None}
    assert os.environ["SGLANG_USE_CPU_ENGINE"] == "1"
