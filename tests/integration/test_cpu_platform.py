"""The CPU platform for verl 0.9 (verl_r3.integration.cpu_platform) and its patch.

Everything that depends on how ``import verl`` runs (VERL_USE_EXTERNAL_MODULES, VERL_PLATFORM,
the platform singleton) is checked in a fresh subprocess under a timeout; the patch's
apply/revert bookkeeping is checked in-process against the real verl module.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("verl")

MODULE = "verl_r3.integration.cpu_platform"
TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(code: str, *, select_cpu: bool, extra_env: dict | None = None) -> dict:
    """Run code in a fresh interpreter with the platform module loaded; return its JSON line."""
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_USE_EXTERNAL_MODULES")}
    env["VERL_USE_EXTERNAL_MODULES"] = MODULE
    env["VERL_USE_EXTERNAL_PLUGINS"] = "none"
    if select_cpu:
        env["VERL_PLATFORM"] = "cpu"
    env.update(extra_env or {})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    last = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert last, f"no RESULT line:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return json.loads(last[-1][len("RESULT ") :])


def test_selected_platform_reports_cpu_and_gloo():
    out = _run(
        """
        import json, torch
        import verl
        from verl.plugin.platform import get_platform
        from verl.utils.device import (
            get_device_id, get_device_name, get_nccl_backend, get_resource_name,
            get_torch_device, get_visible_devices_keyword, is_device_available, manual_seed,
        )
        dev = get_torch_device()
        free, total = dev.mem_get_info()
        manual_seed(7)
        state = dev.get_rng_state()
        a = torch.rand(3)
        dev.set_rng_state(state)
        b = torch.rand(3)
        # the device id must be usable where verl uses it: as a tensor destination
        moved = torch.ones(2).to(get_device_id())
        from verl.utils.memory_utils import get_memory_info, aggressive_empty_cache, reset_memory_stats
        aggressive_empty_cache(); reset_memory_stats()
        from verl.utils.profiler.performance import _get_current_mem_info
        print("RESULT " + json.dumps({
            "platform": type(get_platform()).__name__,
            "device": get_device_name(), "backend": get_nccl_backend(), "ray": get_resource_name(),
            "visible": get_visible_devices_keyword(), "available": is_device_available(),
            "device_id": get_device_id(), "moved": str(moved.device),
            "free": free, "total": total,
            "reserved": dev.memory_reserved(), "allocated": dev.memory_allocated(),
            "max_reserved": dev.max_memory_reserved(), "max_allocated": dev.max_memory_allocated(),
            "rng_replayed": bool(torch.equal(a, b)), "rng_dtype": str(state.dtype),
            "count": dev.device_count(), "stream": type(dev.current_stream()).__name__,
            "props_total": dev.get_device_properties(dev.current_device()).total_memory,
            "memory_info": get_memory_info(), "perf": list(_get_current_mem_info()),
            "empty_cache": dev.empty_cache(), "sync": dev.synchronize(), "set_device": dev.set_device(0),
        }))
        """,
        select_cpu=True,
    )
    assert out["platform"] == "PlatformCPU"
    assert (out["device"], out["backend"], out["ray"]) == ("cpu", "gloo", "GPU")
    assert out["visible"] == "CUDA_VISIBLE_DEVICES" and out["available"] is True
    assert out["device_id"] == "cpu" and out["moved"] == "cpu"
    assert 0 < out["free"] <= out["total"] and out["props_total"] == out["total"]
    assert out["reserved"] == out["allocated"] == out["max_reserved"] == out["max_allocated"] == 0
    assert out["rng_replayed"] and out["rng_dtype"] == "torch.uint8"
    assert out["count"] == 1 and out["stream"] == "Stream"
    assert out["memory_info"]["total_memory_gb"] > 0
    assert float(out["perf"][3]) > 0  # host total memory in GB, as verl's perf logger prints it


def test_verl_helpers_init_gloo_process_group_and_all_reduce():
    port = _free_port()
    out = _run(
        """
        import json, torch, torch.distributed as dist
        import verl
        from verl.utils import distributed as vd
        from verl.workers import engine_workers  # binds the function by name at import
        from verl_r3.patches import verl_pg_backend_0_9 as patch
        results = {"applied": patch.is_applied(),
                   "engine_workers_bound": engine_workers.initialize_global_process_group_ray
                   is vd.initialize_global_process_group_ray}
        # 1) the helper verl's torchrun entry points use (sft_trainer)
        local_rank, rank, world = vd.initialize_global_process_group(timeout_second=60)
        t = torch.tensor([3.0])
        dist.all_reduce(t)
        results.update(plain=[local_rank, rank, world], plain_backend=dist.get_backend(), plain_sum=t.item())
        vd.destroy_global_process_group()
        # 2) the helper verl's Ray workers use (TrainingWorker.__init__)
        engine_workers.initialize_global_process_group_ray(timeout_second=60)
        t = torch.ones(4)
        dist.all_reduce(t)
        results.update(ray_backend=dist.get_backend(), ray_world=dist.get_world_size(), ray_sum=t.sum().item())
        vd.destroy_global_process_group()
        print("RESULT " + json.dumps(results))
        """,
        select_cpu=True,
        extra_env={
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
        },
    )
    assert out["applied"] and out["engine_workers_bound"]
    assert out["plain"] == [0, 0, 1] and out["plain_backend"] == "gloo" and out["plain_sum"] == 3.0
    assert out["ray_backend"] == "gloo" and out["ray_world"] == 1 and out["ray_sum"] == 4.0


def test_without_verl_platform_verl_keeps_its_own_detection():
    code = """
        import json
        import verl
        from verl.plugin.platform import PlatformRegistry, get_platform
        from verl.utils.device import get_device_name, get_nccl_backend
        from verl_r3.patches import verl_pg_backend_0_9 as patch
        print("RESULT " + json.dumps({
            "registered": "cpu" in PlatformRegistry.registered_names(),
            "module_loaded": %r in __import__("sys").modules,
            "platform": type(get_platform()).__name__,
            "device": get_device_name(), "backend": get_nccl_backend(),
            "patched": patch.is_applied(),
        }))
    """ % MODULE
    with_module = _run(code, select_cpu=False)
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_USE_EXTERNAL_MODULES")}
    env["VERL_USE_EXTERNAL_PLUGINS"] = "none"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code).replace(f"{MODULE!r} in", "'x' in")],
        env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    plain = json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1][7:])
    assert with_module["registered"] and with_module["module_loaded"] and not with_module["patched"]
    # Same platform, device and backend as verl alone picks on this machine.
    for key in ("platform", "device", "backend"):
        assert with_module[key] == plain[key], key
    assert with_module["platform"] != "PlatformCPU"


def test_ray_worker_process_gets_the_platform():
    # verl imports VERL_USE_EXTERNAL_MODULES in every process; a Ray task asking for the
    # platform's resource must come up on the CPU platform with the patch applied.
    out = _run(
        """
        import json, ray, verl
        from verl.plugin.platform import get_platform
        ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)

        @ray.remote
        def probe():
            import os
            from verl.plugin.platform import get_platform
            from verl.utils.device import get_device_name, get_nccl_backend
            from verl_r3.patches import verl_pg_backend_0_9 as patch
            return {"device": get_device_name(), "backend": get_nccl_backend(),
                    "platform": type(get_platform()).__name__, "patched": patch.is_applied(),
                    "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}

        options = get_platform().ray_resource_options(1)
        result = ray.get(probe.options(**options).remote(), timeout=120)
        ray.shutdown()
        print("RESULT " + json.dumps({"options": options, **result}))
        """,
        select_cpu=True,
    )
    assert out["options"] == {"num_gpus": 1}
    assert (out["device"], out["backend"], out["platform"], out["patched"]) == ("cpu", "gloo", "PlatformCPU", True)
    assert out["visible"] == "0"


# ------------------------------------------------------------------------------------------
# The patch module, in-process against the real verl.utils.distributed.
# ------------------------------------------------------------------------------------------


@pytest.fixture
def patch_module():
    from verl_r3.patches import verl_pg_backend_0_9 as patch

    yield patch
    patch.revert()


def test_patch_apply_and_revert_are_idempotent(patch_module):
    import verl.utils.distributed as vd
    from verl.workers import engine_workers

    was_applied = patch_module.is_applied()
    patch_module.revert()
    originals = (vd.initialize_global_process_group, vd.initialize_global_process_group_ray)
    assert engine_workers.initialize_global_process_group_ray is originals[1]

    assert patch_module.apply() is True
    assert patch_module.apply() is False  # second apply changes nothing
    patched = (vd.initialize_global_process_group, vd.initialize_global_process_group_ray)
    assert patched[0] is not originals[0] and patched[1] is not originals[1]
    assert engine_workers.initialize_global_process_group_ray is patched[1]
    assert patch_module.apply() is False
    assert (vd.initialize_global_process_group, vd.initialize_global_process_group_ray) == patched

    assert patch_module.revert() is True
    assert patch_module.revert() is False
    assert vd.initialize_global_process_group is originals[0]
    assert vd.initialize_global_process_group_ray is originals[1]
    assert engine_workers.initialize_global_process_group_ray is originals[1]
    if was_applied:
        patch_module.apply()


def test_patch_keeps_verl_backend_off_the_cpu_platform(patch_module):
    from verl.utils.device import get_device_name, get_nccl_backend

    expected = "gloo" if get_device_name() == "cpu" else f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"
    assert patch_module.default_backend() == expected


def test_patch_module_import_patches_nothing():
    out = _run(
        """
        import json
        import verl.utils.distributed as vd
        before = vd.initialize_global_process_group_ray
        from verl_r3.patches import verl_pg_backend_0_9 as patch
        print("RESULT " + json.dumps({"same": vd.initialize_global_process_group_ray is before,
                                      "applied": patch.is_applied()}))
        """,
        select_cpu=False,
        extra_env={"VERL_USE_EXTERNAL_MODULES": ""},
    )
    assert out == {"same": True, "applied": False}
