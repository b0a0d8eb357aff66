"""Rollout of ``verl-r3 diagnose``: sample with routing capture in ``hf`` (in process), ``vllm`` or
``sglang`` (in a child process, see ``engine_worker``), and turn the routing into records."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from verl_r3.diagnose.inputs import ModelInfo


def progress_bar(total: int, desc: str, unit: str = "seq"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)


def request_seed(seed: int, prompt: int, sample: int) -> int:
    """Sampling seed of one (prompt, sample): the same rollouts whatever the batching."""
    return int.from_bytes(hashlib.blake2b(repr((seed, prompt, sample)).encode(), digest_size=7).digest(), "little")


@dataclass
class Sample:
    prompt: int  # index into the prompts
    prompt_ids: list[int]
    response_ids: list[int]
    log_probs: list[float]  # the rollout's log-prob of each response token
    routing: object  # [prompt + response - 1, layers, top_k] as the engine returned it (numpy)


def _jobs(spec: dict) -> list[tuple[int, int]]:
    return [(p, s) for p in range(len(spec["prompts"])) for s in range(spec["samples"])]


def generate_hf(spec: dict) -> list[Sample]:
    from verl_r3.integration.hf_rollout import HFGenerator, Request, torch_dtype

    gen = HFGenerator(spec["model"], dtype=torch_dtype(spec["dtype"]), device=spec["device"], capture_routing=True,
                      seed=spec["seed"], eos_token_ids=spec["eos"], pad_token_id=spec["pad"])
    jobs, out = _jobs(spec), []
    with progress_bar(len(jobs), f"rollout (hf, {spec['dtype']})") as bar:
        for start in range(0, len(jobs), spec["batch_size"]):
            chunk = jobs[start:start + spec["batch_size"]]
            requests = [Request(prompt_ids=spec["prompts"][p], max_tokens=spec["max_new_tokens"],
                                temperature=spec["temperature"], seed=request_seed(spec["seed"], p, s))
                        for p, s in chunk]
            for (p, _), r in zip(chunk, gen.generate(requests)):
                out.append(Sample(p, spec["prompts"][p], r.token_ids, r.log_probs, r.routed_experts))
            bar.update(len(chunk))
    return out


async def _vllm_samples(spec: dict, progress) -> list[dict]:
    import asyncio

    from vllm import SamplingParams
    from vllm.platforms import current_platform
    from vllm.sampling_params import RequestOutputKind

    from verl_r3.engines import vllm_engine

    longest = max(len(p) for p in spec["prompts"]) + spec["max_new_tokens"]
    engine = vllm_engine.start_engine(
        spec["model"], capture=True, dtype=spec["dtype"], max_model_len=longest, seed=spec["seed"],
        max_num_batched_tokens=max(2048, longest), max_num_seqs=256,
        logprobs_mode="processed_logprobs")  # log_softmax(logits / T), what verl's vLLM server asks for
    # vLLM's CPU sampler has no per-request generators ("CPU Generator does not use offset"): there
    # the engine seed alone fixes the stream, and the samples depend on how requests were batched.
    per_request_seed = not current_platform.is_cpu()

    async def one(p: int, s: int) -> dict:
        params = SamplingParams(max_tokens=spec["max_new_tokens"], temperature=spec["temperature"], logprobs=0,
                                seed=request_seed(spec["seed"], p, s) if per_request_seed else None,
                                stop_token_ids=spec["eos"], output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async for final in engine.generate({"prompt_token_ids": spec["prompts"][p]}, params, f"p{p}-s{s}"):
            pass
        c = final.outputs[0]
        if c.routed_experts is None:
            raise RuntimeError(f"vLLM returned no routing for prompt {p}: routing capture is off (on a CPU it comes "
                               "from verl_r3's vLLM plugin; `verl-r3 doctor` shows the capture path)")
        progress()
        return {"prompt": p, "token_ids": list(c.token_ids), "routing": c.routed_experts,
                "log_probs": [float(c.logprobs[i][t].logprob) for i, t in enumerate(c.token_ids)]}

    try:
        return await asyncio.gather(*(one(p, s) for p, s in _jobs(spec)))
    finally:
        engine.shutdown()


def _sglang_samples(spec: dict, progress) -> list[dict]:
    from verl_r3.core.formats import sglang_ids, sglang_rows
    from verl_r3.engines.sglang_engine import start_cpu_engine

    os.environ.pop("SGLANG_RETURN_ORIGINAL_LOGPROB", None)  # keep log-probs at the sampling temperature
    longest = max(len(p) for p in spec["prompts"]) + spec["max_new_tokens"]
    engine = start_cpu_engine(spec["model"], dtype=spec["dtype"], capture=True, random_seed=spec["seed"],
                              max_total_tokens=spec["batch_size"] * longest + 256, context_length=longest,
                              log_level="warning")
    jobs, out = _jobs(spec), []
    try:
        for start in range(0, len(jobs), spec["batch_size"]):
            chunk = jobs[start:start + spec["batch_size"]]
            params = [{"max_new_tokens": spec["max_new_tokens"], "temperature": spec["temperature"],
                       "stop_token_ids": spec["eos"], "sampling_seed": request_seed(spec["seed"], p, s) >> 1}
                      for p, s in chunk]
            results = engine.generate(input_ids=[spec["prompts"][p] for p, _ in chunk], sampling_params=params,
                                      return_logprob=True, return_routed_experts=True)
            for (p, _), r in zip(chunk, results):
                meta = r["meta_info"]  # routing: base64 [rows, L, K], one byte per id with compact routing
                rows = sglang_ids(meta["routed_experts"], num_layers=spec["num_layers"], top_k=spec["top_k"],
                                  rows=sglang_rows(meta), who=f"prompt {p}: ")
                out.append({"prompt": p, "token_ids": list(r["output_ids"]),
                            "log_probs": [float(x[0]) for x in meta["output_token_logprobs"]],
                            "routing": rows.numpy()})
                progress()
    finally:
        engine.shutdown()
    return out


def engine_worker(spec_path: str, out_dir: str) -> None:
    """Child-process entry for vLLM and SGLang: generate what ``spec_path`` asks, write ``samples.json``
    and ``routing.npy`` (every sample's rows, concatenated) to ``out_dir``, and print one ``@progress``
    line to stdout per finished sample (the engines log to stderr)."""
    import asyncio

    import numpy as np

    spec = json.loads(Path(spec_path).read_text())

    def progress() -> None:
        print("@progress", flush=True)

    samples = asyncio.run(_vllm_samples(spec, progress)) if spec["engine"] == "vllm" else \
        _sglang_samples(spec, progress)
    routing = [np.asarray(s.pop("routing"), dtype=np.int32) for s in samples]
    for s, rows in zip(samples, routing):
        s["rows"] = int(rows.shape[0])
    np.save(Path(out_dir) / "routing.npy", np.concatenate(routing))
    (Path(out_dir) / "samples.json").write_text(json.dumps(samples))


def sglang_interpreter() -> str:
    """SGLang's interpreter: this one when SGLang imports here, else ``VERL_R3_SGLANG_PYTHON``, else
    the environment ``scripts/sglang_env.sh`` builds on first use (as the quickstart does)."""
    if importlib.util.find_spec("sglang") is not None:
        return sys.executable
    from verl_r3.bench.capture import sglang_python

    if not os.environ.get("VERL_R3_SGLANG_PYTHON"):
        print("--engine sglang: looking for SGLang's environment (scripts/sglang_env.sh builds it the first time: "
              "about 4 minutes, 7.5 GB)", file=sys.stderr)
    try:
        python = sglang_python()
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"scripts/sglang_env.sh failed (exit {exc.returncode}):\n{exc.stderr[-3000:]}") from exc
    if python is None or not Path(python).is_file():
        raise ValueError("--engine sglang: SGLang is not installed here and no SGLang environment was found; set "
                         "VERL_R3_SGLANG_PYTHON to the python of an environment with sglang and verl_r3's SGLang "
                         "plugin (scripts/sglang_env.sh in a checkout builds one)")
    return python


def generate_in_child(spec: dict, python: str, out: Path, timeout: float) -> list[Sample]:
    """Run ``engine_worker`` under ``python`` in a child process (own process group, killed on timeout)."""
    import numpy as np

    root = str(Path(__file__).resolve().parents[2])  # the checkout (SGLang's environment lacks verl_r3)
    env = dict(os.environ, VLLM_LOGGING_STREAM="ext://sys.stderr", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("SGLANG_USE_CPU_ENGINE", None)  # selects SGLang's own CPU engine, which needs sgl-kernel's CPU build
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    log_path = out / f"{spec['engine']}.log"
    entry = "import sys; from verl_r3.diagnose.rollout import engine_worker; engine_worker(sys.argv[1], sys.argv[2])"
    with tempfile.TemporaryDirectory() as work, open(log_path, "w") as log, \
            progress_bar(len(_jobs(spec)), f"rollout ({spec['engine']}, {spec['dtype']})") as bar:
        (Path(work) / "spec.json").write_text(json.dumps(spec))
        proc = subprocess.Popen([python, "-c", entry, str(Path(work) / "spec.json"), work], stdout=subprocess.PIPE,
                                stderr=log, text=True, env=env, start_new_session=True)
        expired = threading.Event()

        def kill() -> None:
            expired.set()
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            for line in proc.stdout:
                if line.startswith("@progress"):
                    bar.update(1)
            code = proc.wait()
        finally:
            timer.cancel()
        if code != 0:
            why = f"did not finish within {timeout:.0f} s" if expired.is_set() else f"failed (exit {code})"
            tail = log_path.read_text()[-3000:]
            raise RuntimeError(f"{spec['engine']} rollout {why}; its log is {log_path}:\n{tail}")
        samples = json.loads((Path(work) / "samples.json").read_text())
        routing = np.load(Path(work) / "routing.npy")
    ends = np.cumsum([s["rows"] for s in samples])
    return [Sample(s["prompt"], spec["prompts"][s["prompt"]], s["token_ids"], s["log_probs"], routing[e - s["rows"]:e])
            for s, e in zip(samples, ends)]


def to_routing(samples: list[Sample], info: ModelInfo, moe_layers: list[int]) -> list:
    """Each sample's routing as a validated ``[n, L, K]`` tensor by position (row ``n - 1`` MISSING).

    Engines fill layers without a router differently (transformers -1, vLLM 0), so only the MoE
    layers are read; a row count other than ``n - 1`` is an error naming the sample."""
    import torch

    from verl_r3.core.formats import from_vllm

    dense = []
    for i, s in enumerate(samples):
        n = len(s.prompt_ids) + len(s.response_ids)
        rows = torch.as_tensor(s.routing)
        if rows.dim() != 3 or rows.shape[0] != n - 1 or tuple(rows.shape[1:]) != (info.num_layers, info.top_k):
            raise ValueError(f"sample {i}: the engine returned routing of shape {tuple(rows.shape)} for {n} tokens; "
                             f"expected [{n - 1}, {info.num_layers}, {info.top_k}]")
        if not s.response_ids or len(s.log_probs) != len(s.response_ids):
            raise ValueError(f"sample {i}: {len(s.response_ids)} response tokens but {len(s.log_probs)} log-probs")
        record = from_vllm(rows[:, moe_layers], info.num_experts, layer_map=moe_layers, num_layers=info.num_layers,
                           sample=i)
        dense.append(record.to_dense(length=n))
    return dense


