"""``verl-r3 doctor``: what is installed, and how each rollout engine's routing would be captured.

For every package verl_r3 works with it reports the installed version (or that it is missing),
and for each rollout engine the capture path a run with
``actor_rollout_ref.rollout.enable_rollout_routing_replay=True`` would take:

- ``native``: the engine records routing itself (vLLM >= 0.22 on GPUs, SGLang with
  ``enable_return_routed_experts``, verl_r3's own ``hf`` engine);
- ``patch``: a verl_r3 patch provides it (vLLM's CPU build: ``vllm_cpu_capture_0_32``);
- ``unsupported``: with the reason (not installed, outside a patch's window, ...).

For vLLM it also says what verl_r3 does to each request's routing in vLLM's front end
(``vllm_front_end_routing_0_32``, every platform), or why vLLM keeps its own accumulation.

SGLang lives in its own environment here (it pins another torch): when it is not importable in
this one, the doctor asks the interpreter in ``VERL_R3_SGLANG_PYTHON`` or the cached environment
``scripts/sglang_env.sh`` built, without building one.
"""

from __future__ import annotations

import glob
import os
import platform
import subprocess
import sys

from verl_r3.patches._window import installed_version

__all__ = ["collect", "format_report"]

PACKAGES = ("verl", "torch", "transformers", "vllm", "vllm-cpu", "sglang", "ray", "verl-r3")


def _hf() -> tuple[str, str]:
    if installed_version("verl") is None:
        return "unsupported", "verl is not installed (the hf rollout is a verl rollout engine)"
    return "native", "verl_r3's hf engine records routing with RouterReplay (actor_rollout_ref.rollout.name=hf)"


def _vllm() -> tuple[str, str]:
    from verl_r3.integration import vllm_cpu

    return vllm_cpu.capture_path()


_SGLANG_PROBE = r"""
import json, importlib.metadata as md
out = {"version": md.version("sglang"), "torch": md.version("torch")}
try:
    import inspect
    from sglang.srt.server_args import ServerArgs
    out["native"] = "enable_return_routed_experts" in inspect.signature(ServerArgs).parameters
except Exception as exc:
    out["native"] = False
    out["error"] = repr(exc)
print(json.dumps(out))
"""


def sglang_env_python() -> str | None:
    """An SGLang interpreter that already exists: ``VERL_R3_SGLANG_PYTHON``, else the newest cached
    environment built by ``scripts/sglang_env.sh`` (none is built here)."""
    if os.environ.get("VERL_R3_SGLANG_PYTHON"):
        return os.environ["VERL_R3_SGLANG_PYTHON"]
    cache = os.environ.get("VERL_R3_CACHE", os.path.expanduser("~/.cache/verl_r3"))
    ready = sorted(glob.glob(os.path.join(cache, "envs", "sglang-*", ".ready")), key=os.path.getmtime)
    return os.path.join(os.path.dirname(ready[-1]), "bin", "python") if ready else None


def _sglang() -> tuple[str, str, str | None]:
    """(path, reason, version)."""
    import json

    python, where = sys.executable, "this environment"
    if installed_version("sglang") is None:
        python = sglang_env_python()
        if python is None:
            return ("unsupported", "SGLang is not installed here and no SGLang environment was found "
                    "(`ROLLOUT_ENGINE=sglang make quickstart` or `make test` builds one)", None)
        where = (f"VERL_R3_SGLANG_PYTHON ({python})" if os.environ.get("VERL_R3_SGLANG_PYTHON")
                 else f"its own environment ({os.path.dirname(os.path.dirname(python))})")
    try:
        proc = subprocess.run([python, "-c", _SGLANG_PROBE], capture_output=True, text=True, timeout=120)
        probe = json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception as exc:  # reported, not raised: the doctor must finish
        return "unsupported", f"SGLang in {where} could not be inspected: {exc}", None
    version = probe["version"]
    if not probe.get("native"):
        why = f" ({probe['error']})" if probe.get("error") else ""
        return "unsupported", f"SGLang {version} in {where} has no enable_return_routed_experts{why}", version
    from packaging.version import Version

    from verl_r3.patches import sglang_cpu_0_5

    on_cpu = ""
    try:
        from packaging.specifiers import SpecifierSet

        if Version(Version(version).base_version) in SpecifierSet(sglang_cpu_0_5.SUPPORTED):
            on_cpu = f"; on CPU with {sglang_cpu_0_5.__name__.rsplit('.', 1)[1]}"
        else:
            on_cpu = f"; no CPU patch for this version (sglang_cpu_0_5 supports {sglang_cpu_0_5.SUPPORTED})"
    except Exception:
        pass
    return "native", f"SGLang {version} (torch {probe['torch']}) in {where}: enable_return_routed_experts{on_cpu}", version


def collect() -> dict:
    """Versions and capture paths, as a JSON-ready dict."""
    versions = {name: installed_version(name) for name in PACKAGES}
    engines = {}
    for name, probe in (("hf", _hf), ("vllm", _vllm)):
        try:
            path, reason = probe()
        except Exception as exc:
            path, reason = "unsupported", f"{type(exc).__name__}: {exc}"
        engines[name] = {"capture": path, "reason": reason}
    try:
        from verl_r3.integration import vllm_cpu

        engines["vllm"]["front_end"] = vllm_cpu.front_end_routing()
    except Exception as exc:  # reported, not raised: the doctor must finish
        engines["vllm"]["front_end"] = f"{type(exc).__name__}: {exc}"
    path, reason, sglang_version = _sglang()
    engines["sglang"] = {"capture": path, "reason": reason}
    if versions["sglang"] is None and sglang_version is not None:
        versions["sglang"] = f"{sglang_version} (own environment)"
    return {"python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}",
            "versions": versions, "engines": engines}


def format_report(report: dict) -> str:
    lines = [f"verl-r3 doctor (python {report['python']}, {report['platform']})", "", "installed:"]
    lines += [f"  {name:<13}{version or '-'}" for name, version in report["versions"].items()]
    lines += ["", "routing capture per rollout engine (actor_rollout_ref.rollout.name):"]
    for name, info in report["engines"].items():
        lines.append(f"  {name:<7}{info['capture']:<12}{info['reason']}")
        if "front_end" in info:
            lines.append(f"  {'':<7}{'front end':<12}{info['front_end']}")
    return "\n".join(lines)
