"""Cost of routing capture in a rollout engine: generation throughput with and without it.

``verl-r3 bench capture --engine hf|vllm|sglang [--json]``. For each engine, two instances
serve the same tiny randomly initialised Qwen3-MoE (the quickstart's architecture, built here
from a config): one capturing routing, one not. Every round sends a batch of new prompts
(``prompts`` prompts of ``prompt_len`` random tokens, ``new_tokens`` generated tokens each,
``ignore_eos``), as each step of an RL run does, to one instance and then the same batch to the
other, alternating which goes first, after an untimed warm-up round each. (Sending one batch
over and over would make every round after the first a prefix-cache hit, which a capturing vLLM
answers from its routing store: a cost of its own, not of generation.) Throughput is generated
tokens over the wall time of the batch; the result gives each side's per-round figures, their
medians and ``ratio = capture / plain`` (target >= 0.99).
Every captured routing is checked to have one row per token fed, so the capture side really
captured.

``--control`` adds a third instance, a second one without capture, timed in the
same rounds: ``control_ratio = control / plain`` is what two identical sides measure apart on
this machine, the resolution any ``ratio`` here has. vLLM engines are started twice, in one
order and then the reverse, each order timing half of the rounds (the engine started first runs
differently here), and get two warm-up rounds each. vLLM binds its CPU worker to its own cores
and reserves the rest for its front end and engine core, but does not keep those off the
worker's cores; by default the benchmark pins them (this process and the engine cores) to the
reserved cores after each start, the same for every side (``--no-pin`` leaves them to the OS).
The result's ``machine.placement`` says where they ran.

For vLLM the result also gives ``front_end``: per side, the CPU milliseconds this process
(vLLM's client, which decodes every step's outputs and gathers each request's routing) used in
each timed round (``cpu_ms``), and the milliseconds its garbage collector ran in it (``gc_ms``).
The front end shares its CPUs with the engine cores, so what it spends there is taken from them;
one front end serves every side, so a collection lands in whichever round is running. Once the
engines have started, the benchmark freezes this process's heap for the collector, as vLLM's own
server does after start-up.

``--stages`` (vllm) also times each routing stage inside the engines' own processes
(``verl_r3.patches.vllm_cpu_stage_timers_0_32``, applied by verl_r3's vLLM plugin when the
benchmark sets ``VERL_R3_STAGE_TIMES``): the result's ``stages`` gives every side's microseconds
per engine step, and ``stages_share`` what the capturing engine's routing stages weigh against the
plain engine's step, with the ratio they alone would give (``stage_share``). On hf, ``--stages``
times the capturing generator's routing work in this process (``HF_STAGES``: ``RouterReplay``'s
hooks and the cut of the batch's routing into each request's rows, ``HFStageTimer``), per forward,
against the plain generator's time per forward (``hf_stage_share``, the same keys).

- ``hf``: ``verl_r3.integration.hf_rollout.HFGenerator`` in this process (``capture_routing``).
- ``vllm``: two ``AsyncLLM`` engines in this environment (``verl_r3.engines.vllm_engine``);
  ``enable_return_routed_experts`` on one (on CPU through ``vllm_cpu_capture_0_32``).
- ``sglang``: ``verl_r3.bench.capture_sglang`` in SGLang's own environment (a subprocess;
  ``scripts/sglang_env.sh`` or ``VERL_R3_SGLANG_PYTHON``), or in this process when SGLang is
  importable here.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from verl_r3.child import run_child

__all__ = ["ENGINES", "TARGET_RATIO", "batches", "interleave", "run"]

ENGINES = ("hf", "vllm", "sglang")
TARGET_RATIO = 0.99
MAX_POSITIONS = 256  # the quickstart architecture's max_position_embeddings
SGLANG_TIMEOUT_S = 1800


def machine(**extra) -> dict:
    import torch

    return {"processor": platform.processor() or platform.machine(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "device": "cpu", **extra}


def build_model(path: str, *, layers: int, experts: int, top_k: int, hidden: int, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from verl_r3.quickstart.model import build_config, build_tokenizer

    tokenizer = build_tokenizer()
    config = build_config(tokenizer, hidden_size=hidden, layers=layers, experts=experts, top_k=top_k)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)


def summary(engine: str, runs: dict[str, list[float]], shape: dict, machine: dict) -> dict:
    """The result of one engine's rounds (``runs``: tokens/s per side and round): medians and ratios."""
    capture, plain = statistics.median(runs["capture"]), statistics.median(runs["plain"])
    out = {"engine": engine, "tokens_per_s_capture": capture, "tokens_per_s_plain": plain,
           "ratio": capture / plain, "paired_ratio": paired_ratio(runs["capture"], runs["plain"]),
           "target": TARGET_RATIO, "rounds": len(runs["capture"]),
           "capture_runs": runs["capture"], "plain_runs": runs["plain"], "shape": shape, "machine": machine}
    if "control" in runs:
        control = statistics.median(runs["control"])
        out.update(tokens_per_s_control=control, control_ratio=control / plain, control_runs=runs["control"],
                   control_paired_ratio=paired_ratio(runs["control"], runs["plain"]))
    return out


def paired_ratio(side: list[float], plain: list[float]) -> float:
    """The median of the rounds' own ratios ``side[k] / plain[k]``: each round runs the two sides back
    to back on one batch, so a drift of the machine's speed over the run moves both figures of a
    round and cancels in its ratio, where it stays in the ratio of the medians."""
    if len(side) != len(plain) or not side:
        raise ValueError(f"paired_ratio: {len(side)} and {len(plain)} rounds; one figure per round on each side")
    return statistics.median(s / p for s, p in zip(side, plain))


def batches(seed: int, rounds: int, prompts: int, prompt_len: int) -> list[list[list[int]]]:
    """The prompts of each round: ``rounds + 1`` batches of new random prompts, the first for the
    warm-up (each side gets the same batch in the same round)."""
    rng = random.Random(seed)
    return [[[rng.randrange(3, 250) for _ in range(prompt_len)] for _ in range(prompts)] for _ in range(rounds + 1)]


def _order(sides: list[str], i: int) -> list[str]:
    """Round ``i``'s order of the sides: forwards on even rounds, backwards on odd ones."""
    return list(sides) if i % 2 == 0 else list(reversed(sides))


def interleave(sides: list[str], rounds: int, timed) -> dict[str, list[float]]:
    """``timed(side, k)`` -> tokens/s on batch k; one untimed call per side on batch 0, then ``rounds``
    rounds on batches 1..rounds, the order of the sides alternating."""
    for side in sides:
        timed(side, 0)
    out = {side: [] for side in sides}
    for i in range(rounds):
        for side in _order(sides, i):
            out[side].append(timed(side, i + 1))
    return out


# The capturing HFGenerator's own work, timed by ``--stages``: (key, attribute, object, what).
HF_STAGES = (
    ("begin", "_begin_forward", "rr", "RouterReplay: the forward begins (model pre-hook)"),
    ("route", "_route", "rr", "RouterReplay: a router's ids kept (router hook)"),
    ("end", "_end_forward", "rr", "RouterReplay: the forward ends (model hook)"),
    ("gather", "_request_routing", "generator", "the batch's routing cut into each request's rows"),
)


class HFStageTimer:
    """Times the capturing ``HFGenerator``'s routing work (``HF_STAGES``) by wrapping those methods on
    the instances (the hooks call them through ``self``), counting calls and seconds only while
    ``counting`` is set (the timed rounds). Torch's dispatch of the hooks is not timed."""

    def __init__(self, generator) -> None:
        self.counting = False
        self.calls = {key: 0 for key, *_ in HF_STAGES}
        self.seconds = {key: 0.0 for key, *_ in HF_STAGES}
        owners = {"rr": generator.rr, "generator": generator}
        for key, attr, owner, _what in HF_STAGES:
            obj = owners[owner]
            setattr(obj, attr, self._timed(key, getattr(obj, attr)))

    def _timed(self, key: str, fn):
        def timed(*args, **kwargs):
            if not self.counting:
                return fn(*args, **kwargs)
            began = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - began
                self.calls[key] += 1

        return timed


def hf_stage_share(timer: HFStageTimer, plain_seconds: float) -> tuple[dict, dict]:
    """``--stages`` for hf: each stage's microseconds per forward of the capturing generator, and what
    they weigh against the plain generator's time per forward over the same rounds (``share``,
    ``stages_ratio = plain / (plain + routing)``; the keys of vLLM's ``stages_share``)."""
    forwards = timer.calls["end"]
    if not forwards:
        raise RuntimeError("--stages: the capturing generator ran no forward inside its timed rounds")
    stages = {key: {"what": what, "calls": timer.calls[key], "us_per_forward": timer.seconds[key] / forwards * 1e6,
                    "calls_per_forward": timer.calls[key] / forwards}
              for key, _attr, _owner, what in HF_STAGES}
    routing = sum(f["us_per_forward"] for f in stages.values())
    step = plain_seconds / forwards * 1e6
    return ({"forwards": forwards, "stages": stages},
            {"routing_us": routing, "plain_step_us": step, "share": routing / step,
             "stages_ratio": step / (step + routing)})


def _run_hf(path: str, sides: list[str], rounds_batches: list, new_tokens: int, rounds: int, dtype: str,
            stages: bool = False) -> tuple[dict, dict, HFStageTimer | None, dict]:
    import torch

    from verl_r3.integration.hf_rollout import HFGenerator, Request

    generators = {side: HFGenerator(path, dtype=getattr(torch, dtype), capture_routing=side == "capture", seed=0)
                  for side in sides}
    timer = HFStageTimer(generators["capture"]) if stages else None
    seconds_by_side = {side: 0.0 for side in sides}

    def timed(side: str, k: int) -> float:
        batch = rounds_batches[k]
        requests = [Request(prompt_ids=p, max_tokens=new_tokens, ignore_eos=True) for p in batch]
        if timer is not None:
            timer.counting = side == "capture" and k > 0
        began = time.perf_counter()
        results = generators[side].generate(requests)
        seconds = time.perf_counter() - began
        if timer is not None:
            timer.counting = False
        if k > 0:
            seconds_by_side[side] += seconds
        for p, r in zip(batch, results):
            if side == "capture" and r.routed_experts.shape[0] != len(p) + len(r.token_ids) - 1:
                raise RuntimeError(f"hf capture returned {r.routed_experts.shape[0]} rows for "
                                   f"{len(p) + len(r.token_ids)} tokens")
        return sum(len(r.token_ids) for r in results) / seconds

    runs = interleave(sides, rounds, timed)
    import transformers

    return runs, machine(transformers=transformers.__version__), timer, seconds_by_side


_gc_seconds = [0.0, None]  # this process's collections so far, and when the one under way began


def _gc_timer(phase: str, info: dict) -> None:
    now = time.perf_counter()
    if phase == "start":
        _gc_seconds[1] = now
    elif _gc_seconds[1] is not None:
        _gc_seconds[0] += now - _gc_seconds[1]
        _gc_seconds[1] = None


def _cpu_seconds() -> float:
    """CPU seconds this process's threads have used (user and system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _set_affinity(pid: int, cpus) -> None:
    """Every thread of process ``pid`` onto ``cpus`` (threads started later inherit it); a process or
    thread that ended meanwhile is passed over."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return
    for tid in threads:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:
            pass


def pin_engine_processes(allowed: set[int]) -> dict:
    """Put this process and vLLM's other processes on the CPUs vLLM left free of its workers.

    vLLM's CPU worker binds itself to its cores (``VLLM_CPU_OMP_THREADS_BIND``, ``auto`` by default)
    and reserves the others for the front end and engine core, but leaves those two free to run
    anywhere, so the OS may also run them on the worker's core. Workers are the processes vLLM
    names ``VLLM::Worker``; processes that end while this runs are passed over. Returns ``{"pinned": cpus,
    "worker_cpus": cpus}``, or ``{"pinned": None, "why": ...}`` where they are not bound to part of
    ``allowed`` (then nothing is moved)."""
    import psutil

    def name(p) -> str:
        try:
            return p.name()
        except psutil.NoSuchProcess:
            return ""

    me = psutil.Process()
    children = me.children(recursive=True)
    workers = [p for p in children if name(p).startswith("VLLM::Worker")]
    if not workers or any(set(p.cpu_affinity()) == allowed for p in workers):
        return {"pinned": None, "why": "vLLM's workers are not bound to part of this process's CPUs "
                                       f"{sorted(allowed)} (VLLM_CPU_OMP_THREADS_BIND)"}
    worker_cpus = set().union(*(p.cpu_affinity() for p in workers))
    reserved = allowed - worker_cpus
    if not reserved:
        return {"pinned": None, "why": f"the vLLM workers are bound to every CPU {sorted(allowed)}"}
    for p in [me] + [c for c in children if c not in workers]:
        _set_affinity(p.pid, reserved)
    return {"pinned": sorted(reserved), "worker_cpus": sorted(worker_cpus)}


def _run_vllm(path: str, sides: list[str], rounds_batches: list, new_tokens: int, rounds: int, dtype: str,
              pin: bool = True, stages_dir: str | None = None) -> tuple[dict, dict]:
    # vLLM logs to stdout by default; the benchmark's stdout is its table or JSON.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    import vllm
    from vllm.utils.gc_utils import freeze_gc_heap

    from verl_r3.engines import vllm_engine as V
    from verl_r3.patches import vllm_cpu_stage_timers_0_32 as stage_timers

    front_end: dict[str, dict[str, list[float]]] = {side: {"cpu_ms": [], "gc_ms": []} for side in sides}

    async def timed(engine, side: str, k: int) -> float:
        began, gc_began = _cpu_seconds(), _gc_seconds[0]
        figures = await V.run(engine, [V.EngineRequest(p, new_tokens) for p in rounds_batches[k]])
        if k:  # a timed round, not a warm-up
            front_end[side]["cpu_ms"].append((_cpu_seconds() - began) * 1e3)
            front_end[side]["gc_ms"].append((_gc_seconds[0] - gc_began) * 1e3)
        for c in figures.completions:
            rows = None if c.routed_experts is None else c.routed_experts.shape[0]
            want = len(c.prompt_ids) + len(c.token_ids) - 1 if side == "capture" else None
            if rows != want:
                raise RuntimeError(f"vllm {side}: {rows} routing rows, expected {want}")
        return figures.generated_tokens / figures.seconds

    async def main():
        first = rounds_batches[0]
        length = len(first[0]) + new_tokens
        out = {side: [] for side in sides}
        # The engine started first runs measurably slower or faster here (CPU binding), so each
        # start order gets half of the rounds: the engines are started in the order of ``sides``,
        # then in the reverse order.
        done = 0
        for started, count in ((_order(sides, 0), (rounds + 1) // 2), (_order(sides, 1), rounds // 2)):
            if count == 0:
                continue
            engines = {}
            try:
                _set_affinity(os.getpid(), allowed)  # new engines bind their workers as on a fresh start
                for side in started:
                    if stages_dir is not None:  # the engine's processes time their stages into the side's folder
                        os.environ[stage_timers.ENV] = os.path.join(stages_dir, side)
                    try:
                        engines[side] = V.start_engine(path, capture=side == "capture", dtype=dtype,
                                                       max_model_len=length, max_num_seqs=len(first),
                                                       max_num_batched_tokens=max(2048, length))
                    finally:
                        if stages_dir is not None:
                            os.environ.pop(stage_timers.ENV, None)
                if pin:
                    placement.append(pin_engine_processes(allowed))
                # As vLLM's own server does once it has started (vllm.utils.gc_utils.freeze_gc_heap):
                # the collector no longer walks the start-up heap (torch, vLLM, the engines' clients).
                # Unfrozen, one full collection of it (about 400 ms here) lands in whichever round
                # crosses the threshold, and more often on the side that allocates more.
                freeze_gc_heap()
                # Two warm-up rounds: after one, the first timed round of the engine started first
                # still ran about 30% slower here.
                for _ in range(2):
                    for side in sides:
                        await timed(engines[side], side, 0)
                for i in range(count):
                    for side in _order(sides, i):
                        out[side].append(await timed(engines[side], side, done + i + 1))
            finally:
                # No local keeps an engine once it is shut down: a frame that outlives this coroutine
                # (vLLM's imports keep some) would hold it until interpreter exit, where
                # AsyncLLM.__del__ fails noisily.
                while engines:
                    engines.popitem()[1].shutdown()
                gc.unfreeze()
            done += count
        return out

    allowed = set(os.sched_getaffinity(0))
    placement: list[dict] = []
    gc.callbacks.append(_gc_timer)
    try:
        runs = asyncio.run(main())
    finally:
        gc.callbacks.remove(_gc_timer)
        _set_affinity(os.getpid(), allowed)
    where = placement[0] if placement else {"pinned": None, "why": "not asked (--no-pin)"}
    if any(p != where for p in placement):
        where = {"pinned": [p["pinned"] for p in placement], "why": "the two engine starts were placed differently"}
    return runs, machine(vllm=vllm.__version__, placement=where), front_end


def sglang_python() -> str | None:
    """The interpreter of SGLang's environment: ``VERL_R3_SGLANG_PYTHON``, else the one
    ``scripts/sglang_env.sh`` builds (or finds cached) when running from a checkout. ValueError
    when ``VERL_R3_SGLANG_PYTHON`` names no executable file."""
    named = os.environ.get("VERL_R3_SGLANG_PYTHON")
    if named:
        if not (os.path.isfile(named) and os.access(named, os.X_OK)):
            what = "not an executable file" if os.path.exists(named) else "no such file"
            raise ValueError(f"VERL_R3_SGLANG_PYTHON={named}: {what}; set it to the python of an environment with "
                             "sglang (scripts/sglang_env.sh builds one)")
        return named
    script = Path(__file__).resolve().parents[2] / "scripts" / "sglang_env.sh"
    if not script.exists():
        return None
    env_dir = subprocess.run(["bash", str(script)], check=True, capture_output=True, text=True).stdout.strip()
    return os.path.join(env_dir, "bin", "python")


def _run_sglang(**kw) -> dict:
    try:
        import sglang  # noqa: F401
    except ImportError:
        pass
    else:
        from verl_r3.bench import capture_sglang

        return capture_sglang.run(**kw)
    python = sglang_python()
    if python is None:
        raise RuntimeError("SGLang is not installed here; set VERL_R3_SGLANG_PYTHON to an interpreter that has it")
    root = str(Path(__file__).resolve().parents[2])
    args = [python, "-m", "verl_r3.bench.capture_sglang", "--json"]
    for key, value in kw.items():
        flag = f"--{key.replace('_', '-')}"
        args += ([flag] if value else []) if isinstance(value, bool) else [flag, str(value)]
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # SGLang's scheduler and detokenizer die with the child, also when it hangs.
    child = run_child(args, timeout_s=SGLANG_TIMEOUT_S, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                      env=env)
    if child.returncode != 0:
        why = f"did not finish within {SGLANG_TIMEOUT_S} s" if child.timed_out else f"failed ({child.returncode})"
        raise RuntimeError(f"SGLang benchmark {why}:\n{(child.stderr or '')[-4000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def run(engine: str, *, rounds: int = 5, prompts: int = 32, prompt_len: int = 64, new_tokens: int = 64,
        layers: int = 4, experts: int = 8, top_k: int = 2, hidden: int = 128, dtype: str = "float32",
        seed: int = 0, control: bool = False, pin: bool | None = None, stages: bool = False,
        int32_routing: bool = False) -> dict:
    """Measure ``engine`` and return the result dict (see the module docstring). ``int32_routing``
    (sglang only) captures with SGLang's own ``int32`` routing instead of verl_r3's compact routing. ``pin`` (vllm only,
    default on) puts the front end and engine cores on the CPUs vLLM reserved for them. ``stages``
    (vllm only) also times the routing stages inside each engine's processes: the result's ``stages``
    holds, per side, ``verl_r3.patches.vllm_cpu_stage_timers_0_32.read`` of its engines, and
    ``stages_share`` what the capturing engine's routing stages weigh against the plain engine's
    step (``stage_share``)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; one of {', '.join(ENGINES)}")
    if pin is not None and engine != "vllm":
        raise ValueError(f"--no-pin is a vllm option: only vLLM's processes are pinned, not {engine}'s")
    if stages and engine == "sglang":
        raise ValueError("--stages is an hf and vllm option: SGLang's processes are not timed by stage")
    if int32_routing and engine != "sglang":
        raise ValueError(f"--int32-routing is an sglang option: only SGLang's routing is narrowed by verl_r3, not "
                         f"{engine}'s")
    for name, value in (("rounds", rounds), ("prompts", prompts), ("prompt_len", prompt_len),
                        ("new_tokens", new_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    shape = {"prompts": prompts, "prompt_len": prompt_len, "new_tokens": new_tokens, "layers": layers,
             "experts": experts, "top_k": top_k, "hidden": hidden, "dtype": dtype}
    if engine == "sglang":
        return _run_sglang(rounds=rounds, prompts=prompts, prompt_len=prompt_len, new_tokens=new_tokens,
                           layers=layers, experts=experts, top_k=top_k, hidden=hidden, dtype=dtype, seed=seed,
                           control=control, int32_routing=int32_routing)
    if prompt_len + new_tokens > MAX_POSITIONS:
        raise ValueError(f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds the benchmark model's "
                         f"{MAX_POSITIONS} positions")
    rounds_batches = batches(seed, rounds, prompts, prompt_len)
    with tempfile.TemporaryDirectory() as path, tempfile.TemporaryDirectory() as timers:
        build_model(path, layers=layers, experts=experts, top_k=top_k, hidden=hidden, seed=seed)
        sides = ["capture", "plain"] + (["control"] if control else [])
        if engine == "hf":
            runs, machine, timer, seconds = _run_hf(path, sides, rounds_batches, new_tokens, rounds, dtype,
                                                    stages=stages)
            result = summary(engine, runs, shape, machine)
            if timer is not None:
                result["stages"], result["stages_share"] = hf_stage_share(timer, seconds["plain"])
            return result
        runs, machine, front_end = _run_vllm(path, sides, rounds_batches, new_tokens, rounds, dtype,
                                             pin=pin is not False, stages_dir=timers if stages else None)
        result = summary(engine, runs, shape, machine)
        result["front_end"] = front_end
        if stages:
            result["stages"] = read_stages(timers, sides)
            result["stages_share"] = stage_share(result["stages"])
    return result


def read_stages(folder: str, sides: list[str]) -> dict:
    """Each side's stage figures from ``folder/<side>``; an error when the capturing engine wrote none
    (the timers come with verl_r3's vLLM plugin, which applies them on vLLM's CPU build only)."""
    from verl_r3.patches import vllm_cpu_stage_timers_0_32 as stage_timers

    out = {side: stage_timers.read(os.path.join(folder, side)) for side in sides}
    if not out["capture"]:
        raise RuntimeError("--stages: the capturing engine's processes wrote no stage times; they are timed by "
                           "verl_r3's vLLM plugin on vLLM's CPU build, with the vllm.general_plugins entry point "
                           "installed (verl-r3 doctor shows both)")
    return out


def stage_share(stages: dict) -> dict:
    """What the capturing engine's timed routing stages weigh against the plain engine's step.

    ``routing_us``: the capturing engine's ``ROUTING_STAGES`` per step (``worker_us`` and
    ``core_us`` its two processes' parts); ``plain_step_us``: the plain engine's ``STEP_PARTS`` per
    step; ``share = routing_us / plain_step_us``; ``stages_ratio = plain_step_us / (plain_step_us +
    routing_us)``, the throughput ratio if capture cost nothing but those stages. It measures the
    routing stages apart from the spread between engines that ``ratio`` also holds, and leaves out
    what the stages do not time (the output thread, the front end, caches)."""
    from verl_r3.patches.vllm_cpu_stage_timers_0_32 import ROUTING_STAGES, STAGES, STEP_PARTS

    capture, plain = stages["capture"], stages["plain"]
    missing = [key for key in STEP_PARTS if (plain.get(key) or {}).get("us_per_step") is None]
    if missing:
        raise RuntimeError(f"--stages: the plain engine's processes timed no {', '.join(missing)}; "
                           "its step cannot be measured")
    per_role = {"worker": 0.0, "engine core": 0.0}
    for key in ROUTING_STAGES:
        if (capture.get(key) or {}).get("us_per_step") is not None:
            per_role[STAGES[key][0]] += capture[key]["us_per_step"]
    routing = per_role["worker"] + per_role["engine core"]
    step = sum(plain[key]["us_per_step"] for key in STEP_PARTS)
    return {"routing_us": routing, "worker_us": per_role["worker"], "core_us": per_role["engine core"],
            "plain_step_us": step, "share": routing / step, "stages_ratio": step / (step + routing)}


def format_result(result: dict) -> str:
    """The readable table of a ``run`` result."""
    s, m = result.get("shape", {}), result.get("machine", {})
    verdict = "within" if result["ratio"] >= result["target"] else "BELOW"
    lines = [f"verl-r3 bench capture --engine {result['engine']}: generation throughput with vs without capture"]
    if s:
        lines.append(f"shape    {s.get('prompts')} prompts x {s.get('prompt_len')} tokens, {s.get('new_tokens')} new "
                     f"tokens each; {s.get('layers')} layers, {s.get('experts')} experts, top-{s.get('top_k')}, "
                     f"hidden {s.get('hidden')}, {s.get('dtype')}")
        if s.get("routing_bytes_per_id"):
            lines.append(f"routing  {' or '.join(map(str, s['routing_bytes_per_id']))} bytes per id as the capturing "
                         "engine sent it")
    if m:
        lines.append("machine  " + ", ".join(f"{k} {v}" for k, v in m.items() if k != "placement"))
    where = m.get("placement")
    if where and where.get("worker_cpus"):
        lines.append(f"placement front end and engine cores pinned to CPUs {where['pinned']}, the cores vLLM left "
                     f"free of its workers (CPUs {where['worker_cpus']})")
    elif where:
        lines.append(f"placement not pinned: {where['why']}")
    lines.append(f"rounds   {result['rounds']} per side, interleaved; median tokens/s:")
    for side in ("capture", "plain", "control"):
        if f"tokens_per_s_{side}" not in result:
            continue
        runs = result.get(f"{side}_runs")
        tail = f"   runs: {', '.join(f'{x:.0f}' for x in runs)}" if runs else ""
        lines.append(f"  {side:<9}{result[f'tokens_per_s_{side}']:10.0f}{tail}")
    lines.append(f"ratio    {result['ratio']:.4f} capture / plain  (target >= {result['target']}: {verdict})")
    if "control_ratio" in result:
        lines.append(f"control  {result['control_ratio']:.4f} control / plain  (two instances without capture: how far "
                     "apart identical sides land on this machine)")
    if "paired_ratio" in result:
        control = (f", control / plain {result['control_paired_ratio']:.4f}" if "control_paired_ratio" in result
                   else "")
        lines.append(f"paired   capture / plain {result['paired_ratio']:.4f}{control}  (the median of each round's own "
                     "ratio, its two sides run back to back)")
    if "front_end" in result:
        cpu = ", ".join(f"{side} {statistics.median(f['cpu_ms']):.1f}" for side, f in result["front_end"].items())
        gc_ms = ", ".join(f"{side} {max(f['gc_ms']):.1f}" for side, f in result["front_end"].items())
        lines += [f"front end CPU milliseconds a round in this process (vLLM's client and its output processing), "
                  f"medians: {cpu}",
                  f"          its garbage collector, the longest round's milliseconds: {gc_ms}"]
    if "stages" in result and result["engine"] == "hf":
        st, f = result["stages"], result["stages_share"]
        lines.append(f"stages   microseconds per forward of the capturing generator in the timed rounds ({st['forwards']} "
                     "forwards); the plain side runs none of them:")
        for figure in st["stages"].values():
            calls = figure["calls_per_forward"]
            note = f"  ({calls:.2f} calls per forward)" if abs(calls - 1) > 0.005 else ""
            lines.append(f"  {figure['what']:<56}{figure['us_per_forward']:10.1f}{note}")
        lines += [f"routing  {f['routing_us']:.0f} microseconds per forward, {f['share']:.1%} of the plain generator's "
                  f"time per forward ({f['plain_step_us']:.0f}: the forward, sampling, the batch's bookkeeping);",
                  f"         by the stages alone the ratio would be {f['stages_ratio']:.4f} (torch's dispatch of the "
                  "hooks is not timed)"]
        return "\n".join(lines)
    if "stages" in result:
        lines += format_stages(result["stages"])
    if "stages_share" in result:
        f = result["stages_share"]
        lines += [f"routing  {f['routing_us']:.0f} microseconds per step in the capturing engine's routing stages "
                  f"(worker {f['worker_us']:.0f}, engine core {f['core_us']:.0f}),",
                  f"         {f['share']:.1%} of the plain engine's step ({f['plain_step_us']:.0f}: forward, sampling, "
                  "scheduling, taking outputs);",
                  f"         by the stages alone the ratio would be {f['stages_ratio']:.4f}"]
    return "\n".join(lines)


def format_stages(stages: dict) -> list[str]:
    """The lines of ``--stages``: each stage's microseconds per engine step, side by side."""
    from verl_r3.patches.vllm_cpu_stage_timers_0_32 import ROUTING_STAGES, STAGES

    sides = list(stages)
    lines = ["stages   microseconds per engine step in vLLM's processes, every round (warm-ups included), timers on "
             "every side; a routing stage's median call, in microseconds, beside it:",
             f"  {'':<12}{'':<52}" + "".join(f"{side:>10}" for side in sides)]
    role = None
    for key, (where, _module, _qualname, what) in STAGES.items():
        figures = [stages[side].get(key) for side in sides]
        if not any(figures):
            continue
        cells = "".join(f"{f['us_per_step']:10.1f}" if f and f["us_per_step"] is not None else f"{'-':>10}"
                        for f in figures)
        per_step = [f["calls_per_step"] for f in figures if f and f["calls_per_step"] is not None]
        notes = []
        if key.endswith(".gc"):
            notes.append(" / ".join(str(f["calls"]) if f else "0" for f in figures) + " collections")
        elif per_step and abs(per_step[0] - 1) > 0.05:
            notes.append(f"{per_step[0]:.1f} calls per step")
        median = figures[0].get("us_median_call") if figures[0] else None
        if key in ROUTING_STAGES and median is not None:  # the capturing side's: only it runs them
            notes.append(f"median call {median:.1f}")
        calls = f"  ({'; '.join(notes)})" if notes else ""
        lines.append(f"  {where if where != role else '':<12}{what:<52}{cells}{calls}")
        role = where
    return lines


if __name__ == "__main__":
    sys.exit("run `verl-r3 bench capture --engine ENGINE`")
