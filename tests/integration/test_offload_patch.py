"""verl_r3.patches.verl_fsdp2_offload_cpu_0_9, in-process against verl's real engine module.

The end-to-end effect (verl's forward-only reference engine builds and runs on CPU) is
tested in test_fsdp_replay.py::test_reference_engine_never_replays_even_when_configured.
"""

from __future__ import annotations

import pytest

pytest.importorskip("verl")


@pytest.fixture
def patch_module():
    from verl_r3.patches import verl_fsdp2_offload_cpu_0_9 as patch

    was_applied = patch.is_applied()
    yield patch
    patch.revert()
    if was_applied:
        patch.apply()


def test_apply_and_revert_are_idempotent(patch_module):
    from torch.distributed.fsdp import CPUOffloadPolicy

    import verl.workers.engine.fsdp.transformer_impl as impl

    patch_module.revert()
    assert impl.CPUOffloadPolicy is CPUOffloadPolicy
    assert patch_module.apply() is True and patch_module.apply() is False
    assert impl.CPUOffloadPolicy is not CPUOffloadPolicy
    assert patch_module.revert() is True and patch_module.revert() is False
    assert impl.CPUOffloadPolicy is CPUOffloadPolicy


@pytest.mark.parametrize("device,pinned", [("cpu", False), ("cuda", True)])
def test_policy_is_unpinned_only_on_the_cpu_platform(patch_module, monkeypatch, device, pinned):
    from torch.distributed.fsdp import CPUOffloadPolicy

    import verl.utils.device
    import verl.workers.engine.fsdp.transformer_impl as impl

    patch_module.apply()
    monkeypatch.setattr(verl.utils.device, "get_device_name", lambda: device)
    policy = impl.CPUOffloadPolicy(pin_memory=True)  # what verl writes for its reference model
    assert isinstance(policy, CPUOffloadPolicy) and policy.pin_memory is pinned
